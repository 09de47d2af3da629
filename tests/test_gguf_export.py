"""GGUF export (io/gguf_writer.py): the math on hand-built tensors, the architecture each pruned
model is written as, refusals, and the file run in a real llama.cpp (llama-cpp-python, built by
scripts/setup.sh): logits and greedy continuations equal transformers' for every output kind."""
import errno
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from conftest import BPE_VOCAB, MOE_CONFIGS, llama_config

from prunekit.io.gguf_writer import (
    ARCHES, GgufUnsupportedError, _interleave, _llama3_rope_factors, check_gguf_output, plan_gguf, write_gguf)


SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
             vocab_size=BPE_VOCAB, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda **kw: llama_config(**{**SHAPE, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**SHAPE, **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**SHAPE, **kw}),
    "qwen3": lambda **kw: transformers.Qwen3Config(**{**SHAPE, "head_dim": 16, **kw}),
    "gemma3_text": lambda **kw: transformers.Gemma3TextConfig(**{
        **SHAPE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], **kw}),
    "phi3": lambda **kw: transformers.Phi3Config(**{**SHAPE, "pad_token_id": 0, "eos_token_id": 0, "bos_token_id": 0,
                                                    **kw}),
}


def build(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](**overrides)).eval()
    with torch.no_grad():                       # peaked logits: greedy continuations have clear winners
        model.lm_head.weight.mul_(8) if not model.config.tie_word_embeddings else None
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)              # Qwen2's q/k/v biases: nonzero, so they are really written
    return model


IDS = [5, 77, 140, 23, 260, 9, 31, 199, 64, 12]


def llama_cpp(path: Path):
    from llama_cpp import Llama
    # an f32 KV cache (llama.cpp keeps f16 by default): the comparison is of the graph, not of the cache
    return Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)


def assert_runs_the_same(model, path: Path, new_tokens: int = 12) -> None:
    """llama.cpp's logits on IDS equal transformers' (f32 file), and the greedy continuation with
    llama.cpp's KV cache equals transformers' (a divergence is allowed only at a tie of < 1e-3)."""
    llm = llama_cpp(path)
    try:
        llm.eval(IDS)
        ours = np.array(llm.scores[:len(IDS)])
        with torch.no_grad():
            ref = model(torch.tensor([IDS])).logits[0].float().numpy()
        assert np.abs(ours - ref).max() <= 1e-3 + 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max()
        tokens = []
        for _ in range(new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(nxt)
            llm.eval([nxt])
    finally:
        llm.close()
    with torch.no_grad():
        model.generation_config.eos_token_id = None            # llama.cpp's loop here does not stop at EOS either
        expected = model.generate(torch.tensor([IDS]), max_new_tokens=new_tokens, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    want = expected.sequences[0, len(IDS):].tolist()
    if tokens != want:
        first = next(i for i, (a, b) in enumerate(zip(tokens, want)) if a != b)
        top2 = expected.scores[first][0].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, (tokens, want)


def test_interleave_reorders_each_heads_halves_into_pairs():
    # one head of dim 4: HF rows [a0, a1 | b0, b1] -> llama.cpp pairs [a0, b0, a1, b1]; two heads independently
    rows = torch.arange(8.0)[:, None].repeat(1, 3)
    out = _interleave(rows, heads=2)
    assert out[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert torch.equal(_interleave(torch.arange(4.0), heads=1), torch.tensor([0.0, 2.0, 1.0, 3.0]))   # biases


def test_llama3_rope_factors_equal_transformers_frequencies():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_parameters=params,
                                      max_position_embeddings=131072)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    divisors = _llama3_rope_factors(params, 128).double()
    assert torch.allclose(base / divisors, inv_freq.double(), rtol=1e-5)
    assert divisors[0] == 1 and divisors[-1] == 8 and not math.isclose(divisors[40].item(), 1)


@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                         ("qwen3", "qwen3"), ("gemma3_text", "gemma3"), ("phi3", "phi3")])
def test_dense_model_is_written_as_its_stock_architecture(family, arch):
    plan = plan_gguf(build(family))
    assert plan.arch.name == arch and plan.uniform and not plan.notes


def test_unsupported_family_and_rope_are_refused():
    with pytest.raises(GgufUnsupportedError, match="model type 'gpt2'"):
        plan_gguf(AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(GgufUnsupportedError, match="'yarn'"):
        plan_gguf(build("llama", rope_parameters=yarn))


def test_output_path_rules(tmp_path):
    with pytest.raises(ValueError, match="ends in .gguf"):
        check_gguf_output(tmp_path / "model.bin")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(IsADirectoryError):
        check_gguf_output(tmp_path / "dir.gguf")
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"GGUF....")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_gguf_output(existing)
    assert check_gguf_output(existing, overwrite=True) == existing.resolve()
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_gguf_output(notes, overwrite=True)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(ValueError, match="input model"):
        check_gguf_output(model_dir / "x.gguf", protect=[model_dir])


def test_disk_full_leaves_nothing_and_keeps_the_old_file(bpe, tmp_path, monkeypatch):
    import gguf
    out = tmp_path / "m.gguf"
    write_gguf(build("llama"), bpe, out, outtype="f32")
    before = out.read_bytes()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OSError, match="disk full.*nothing was written.*unchanged"):
        write_gguf(build("llama", seed=1), bpe, out, outtype="f32", overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_f16_refuses_weights_beyond_its_range(bpe, tmp_path):
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(GgufUnsupportedError, match="float16's range"):
        write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f16")
    assert not (tmp_path / "m.gguf").exists()


def test_word_level_tokenizer_is_refused_with_the_reason(tmp_path):
    from conftest import tiny_tokenizer
    with pytest.raises(GgufUnsupportedError, match="no GGUF form"):
        write_gguf(build("llama"), tiny_tokenizer(), tmp_path / "m.gguf", outtype="f32")
    assert not (tmp_path / "m.gguf").exists()


# ---- in llama.cpp --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_runs_in_llama_cpp_as_in_transformers(family, bpe, tmp_path):
    model = build(family)
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert_runs_the_same(model, result.path)


def test_tokenizer_and_llama3_rope_and_tied_embeddings(bpe, tmp_path):
    from llama_cpp import Llama
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    model = build("llama", rope_parameters=rope, tie_word_embeddings=True)
    path = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32").path
    assert_runs_the_same(model, path)
    llm = Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    try:
        text = "def prune(model, sparsity):\n    return {'x': 1.5}  # done"
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe(text)["input_ids"]
    finally:
        llm.close()


@pytest.mark.parametrize("outtype,tolerance", [("f16", 0.05), ("bf16", 0.2), ("q8_0", 0.2)])
def test_outtypes_run_close_to_float(outtype, tolerance, bpe, tmp_path):
    model = build("llama")
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype=outtype)
    assert result.outtype == outtype
    llm = llama_cpp(result.path)
    try:
        llm.eval(IDS)
        ours = np.array(llm.scores[:len(IDS)])
    finally:
        llm.close()
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(ours - ref).max() < tolerance * np.abs(ref).max()
    f32 = write_gguf(model, bpe, tmp_path / "f.gguf", outtype="f32")
    assert result.bytes < f32.bytes


# ---- pruned models: each output kind in llama.cpp ------------------------------------------------------------

def calibration(windows: int = 8) -> torch.Tensor:
    return torch.randint(0, BPE_VOCAB, (windows, 16), generator=torch.Generator().manual_seed(1))


def pruned(family: str, config, **overrides):
    from prunekit import prune_
    model = build(family, **overrides)
    prune_(model, config, calibration(), progress=False)
    return model


def kinds():
    from prunekit.methods.flap import FlapConfig
    from prunekit.methods.last_k import LastKConfig
    from prunekit.methods.wanda import WandaConfig
    from prunekit.methods.wanda_sp import WandaSPConfig
    return {
        "unstructured": (WandaConfig(sparsity=0.5), "stock"),
        "2:4": (WandaConfig(nm=(2, 4)), "stock"),
        "depth": (LastKConfig(layers=1), "stock"),
        "width-uniform": (WandaSPConfig(sparsity=0.3), "stock"),
        "width-non-uniform": (FlapConfig(sparsity=0.4, uniform=False, round_to=4), "deci"),
    }


@pytest.mark.parametrize("kind", list(kinds()))
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_pruned_models_run_in_llama_cpp_as_in_transformers(family, kind, bpe, tmp_path):
    config, expected = kinds()[kind]
    model = pruned(family, config)
    plan = plan_gguf(model)
    stock = FAMILIES_ARCH[family]
    if family == "qwen2" and kind == "width-uniform":
        expected = "deci"                   # llama.cpp's qwen2 ties the query width to the hidden size
    assert plan.arch.name == (stock if expected == "stock" else expected), plan.notes
    assert plan.uniform == (kind != "width-non-uniform"), [(b.heads, b.ffn) for b in plan.blocks]
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert_runs_the_same(model, result.path)


FAMILIES_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def test_qwen3_uniform_width_is_stock_and_non_uniform_is_refused(bpe, tmp_path):
    from prunekit.methods.flap import FlapConfig
    from prunekit.methods.wanda_sp import WandaSPConfig
    model = pruned("qwen3", WandaSPConfig(sparsity=0.3))
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert result.arch == "qwen3"
    assert_runs_the_same(model, result.path)
    with pytest.raises(GgufUnsupportedError, match="q/k norms.*--uniform"):
        write_gguf(pruned("qwen3", FlapConfig(sparsity=0.4, uniform=False, round_to=4)), bpe, tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


def test_width_bias_compensation_is_written(bpe, tmp_path):
    # FLAP adds output biases (o_proj, down_proj) that carry its compensation; llama's loader reads them
    from prunekit.methods.flap import FlapConfig
    model = pruned("llama", FlapConfig(sparsity=0.5, round_to=4))
    assert plan_gguf(model).biases == {"o", "down"}
    assert_runs_the_same(model, write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32").path)


def test_attention_free_and_ffn_free_blocks_as_deci_no_op_layers(bpe, tmp_path):
    """A block with no heads or no FFN channels left: deci skips the attention (n_head 0) or gets a
    one-wide zero FFN; llama.cpp must equal the model with those sublayers removed."""
    from prunekit.io.gguf_writer import _tensors, _written_heads
    model = build("llama")
    plan = plan_gguf(model)
    plan.blocks[0].heads = plan.blocks[0].kv_heads = plan.blocks[2].heads = plan.blocks[2].kv_heads = 0
    plan.blocks[1].ffn = 0
    plan.arch = ARCHES["deci"]
    names = dict(_tensors(model, plan))
    assert "blk.2.attn_q.weight" not in names and "blk.2.attn_norm.weight" not in names
    assert torch.equal(names["blk.0.attn_output.weight"], torch.zeros(64, 16))    # block 0: a zero one-head stand-in
    assert _written_heads(plan) == ([1, 4, 0], [1, 2, 0])
    assert torch.equal(names["blk.1.ffn_down.weight"], torch.zeros(64, 1))
    assert torch.equal(names["blk.1.ffn_norm.weight"], torch.ones(64))


def test_experts_uniform_run_in_llama_cpp_and_uneven_are_refused(bpe, tmp_path):
    from prunekit import prune_
    from prunekit.methods.expert_frequency import ExpertFrequencyConfig
    shape = {**MOE_CONFIGS["mixtral"]().to_dict(), "vocab_size": BPE_VOCAB}
    shape.pop("model_type", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.MixtralConfig(**shape)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    prune_(model, ExpertFrequencyConfig(experts=4), calibration(), progress=False)
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert result.arch == "llama"
    assert_runs_the_same(model, result.path)
    from prunekit.models import spec_for
    from prunekit.surgery import keep_experts_
    keep_experts_(model.model.layers[0], spec_for(model).experts, torch.tensor([0, 1, 2]))   # 3 here, 4 elsewhere
    with pytest.raises(GgufUnsupportedError, match="one expert count.*--uniform"):
        write_gguf(model, bpe, tmp_path / "u.gguf")
    assert not (tmp_path / "u.gguf").exists()


def test_qwen3_moe_uniform_experts_run_and_dense_blocks_are_refused(bpe, tmp_path):
    from prunekit import prune_
    from prunekit.methods.expert_frequency import ExpertFrequencyConfig
    shape = {**MOE_CONFIGS["qwen3_moe"]().to_dict(), "vocab_size": BPE_VOCAB, "mlp_only_layers": [],
             "moe_intermediate_size": 32}
    shape.pop("model_type", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**shape)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    prune_(model, ExpertFrequencyConfig(experts=4), calibration(), progress=False)
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert result.arch == "qwen3moe"
    assert_runs_the_same(model, result.path)
    mixed = AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**{**shape, "mlp_only_layers": [0]}))
    with pytest.raises(GgufUnsupportedError, match=r"experts in every block.*\[0\]"):
        plan_gguf(mixed)
    unnormalised = AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**{**shape, "norm_topk_prob": False}))
    with pytest.raises(GgufUnsupportedError, match="norm_topk_prob=False"):
        plan_gguf(unnormalised)


# ---- command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_model_dir(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama-bpe"
    build("llama").save_pretrained(path)
    bpe.save_pretrained(path)
    return path


def test_cli_export_writes_a_file_llama_cpp_runs_and_refuses_to_overwrite(bpe_model_dir, tmp_path, capsys):
    from prunekit.cli import main
    out = tmp_path / "m.gguf"
    assert main(["export", str(bpe_model_dir), "--format", "gguf", "--out", str(out), "--outtype", "f32"]) == 0
    assert "llama.cpp architecture 'llama'" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir).eval()
    assert_runs_the_same(model, out)
    before = out.read_bytes()
    assert main(["export", str(bpe_model_dir), "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", str(bpe_model_dir), "--format", "gguf", "--out", str(bpe_model_dir / "x.gguf")]) == 2
    assert "input model" in capsys.readouterr().err
    assert not (bpe_model_dir / "x.gguf").exists()


def test_prune_with_export_format_gguf_writes_model_gguf_in_the_export(bpe_model_dir, tmp_path):
    import json

    from prunekit.cli import main
    out = tmp_path / "pruned"
    assert main(["prune", str(bpe_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "4",
                 "--seqlen", "32", "--no-eval", "--out", str(out), "--export-format", "gguf", "--outtype", "f32"]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    assert record["gguf"]["arch"] == "llama" and record["gguf"]["path"] == "model.gguf"
    assert record["recipe"]["export"]["format"] == "gguf"
    assert_runs_the_same(AutoModelForCausalLM.from_pretrained(out).eval(), out / "model.gguf")


def test_gguf_export_fails_before_pruning_when_the_writer_cannot_take_the_model(tiny_model_dir, tmp_path, capsys):
    from prunekit.cli import main
    # the tiny checkpoint's tokenizer is word-level: no GGUF form; refused before any calibration or pruning
    code = main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--no-eval",
                 "--out", str(tmp_path / "o"), "--export-format", "gguf"])
    assert code == 2 and "no GGUF form" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--export-format",
                 "gguf"]) == 2
    assert "give --out" in capsys.readouterr().err
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--offload", "disk",
                 "--out", str(tmp_path / "o"), "--export-format", "gguf"]) == 2
    assert "prunekit export" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["unstructured", "depth", "width-uniform"])
def test_gemma3_pruned_runs_in_llama_cpp_and_non_uniform_is_refused(kind, bpe, tmp_path):
    # depth: removing block 0 leaves [full, sliding]; the per-layer sliding pattern must follow
    from prunekit.depth import remove_blocks
    if kind == "depth":
        model = build("gemma3_text")
        remove_blocks(model, [0])
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    else:
        model = pruned("gemma3_text", kinds()[kind][0])
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert result.arch == "gemma3"
    assert_runs_the_same(model, result.path)


def test_gemma3_refusals(bpe, tmp_path):
    from prunekit.methods.flap import FlapConfig
    with pytest.raises(GgufUnsupportedError, match="q/k norms"):
        plan_gguf(pruned("gemma3_text", FlapConfig(sparsity=0.4, uniform=False, round_to=4)))
    with pytest.raises(GgufUnsupportedError, match="query_pre_attn_scalar=256"):
        plan_gguf(build("gemma3_text", query_pre_attn_scalar=256))


@pytest.mark.parametrize("kind", ["unstructured", "depth", "width-uniform"])
def test_phi3_fused_projections_run_in_llama_cpp(kind, bpe, tmp_path):
    from prunekit.methods.wanda_sp import WandaSPConfig
    config = WandaSPConfig(sparsity=0.3, attention=False) if kind == "width-uniform" else kinds()[kind][0]
    model = pruned("phi3", config)          # FFN channels only: llama.cpp's phi3 ties the query width to the hidden
    result = write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32")
    assert result.arch == "phi3"
    assert_runs_the_same(model, result.path)
    with pytest.raises(GgufUnsupportedError, match="query width"):
        plan_gguf(pruned("phi3", WandaSPConfig(sparsity=0.1, mlp=False)))
