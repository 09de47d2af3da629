"""Compressed sparse storage (io/sparse.py): exact bitmaps on hand-built tensors, bit-exact round trips, a tiny
pruned Llama exported, reloaded and run offloaded, and the export's safety rules (existing output, source,
full disk)."""
import errno
import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, llama, saved_tensors, tiny_model

from prunekit import MagnitudeConfig, prune_, save_pretrained_atomic
from prunekit.io.export import DiskFullError
from prunekit.io.sparse import (BYTES_PER_WEIGHT, FORMAT, SUFFIX, check_packed, compress, compressed_bytes, decompress,
                                export_sparse, is_sparse_export, load_sparse, load_sparse_state,
                                offloaded_sparse_model, pack_bits, read_sparse, unpack_bits)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.dtype])


# --------------------------------------------------------------------------- hand-built tensors

def test_pack_bits_is_row_major_least_significant_bit_first():
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    # flattened, element 0 first: 10110000 | 10000000 | 11 (18 bits -> 3 bytes, the last 6 padding bits zero)
    assert pack_bits(mask).tolist() == [0b00001101, 0b00000001, 0b00000011]
    assert pack_bits(mask).dtype == torch.uint8
    assert unpack_bits(pack_bits(mask), 18).tolist() == mask.reshape(-1).tolist()


def test_compress_known_matrix():
    W = torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0],
                      [3.0, 0.0, 0.0, 0.0, 4.25]])                   # (2, 5): 10 bits -> 2 bytes
    bitmap, values = compress(W)
    # bits 1, 3, 5, 9 -> byte 0 = 0b00101010, byte 1 = 0b00000010
    assert bitmap.tolist() == [0b00101010, 0b00000010]
    assert values.tolist() == [1.5, -2.0, 3.0, 4.25]
    assert values.dtype == torch.float32
    assert torch.equal(decompress(bitmap, values, W.shape), W)


def test_two_of_four_pattern_gives_alternating_nibbles():
    W = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 4.0, 0.0]], dtype=torch.bfloat16)
    bitmap, values = compress(W)
    assert bitmap.tolist() == [0b01011010]
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0] and values.dtype == torch.bfloat16
    assert compressed_bytes(W.numel(), 4, 2) == 1 + 8                 # 1/8 B per weight + 4 values x 2 B


def _pattern(kind: str, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g).to(dtype)
    W[W == 0] = 1                                                    # no accidental zeros in "dense" patterns
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "dense":
        return W
    if kind == "half":
        return W.masked_fill(torch.rand(shape, generator=g) < 0.5, 0)
    if kind == "2:4":
        groups = W.reshape(-1, 4)
        drop = groups.abs().float().argsort(dim=1)[:, :2]
        return groups.scatter(1, drop, 0).reshape(shape)
    raise AssertionError(kind)


SHAPES = [(1, 1), (3, 5), (7, 13), (1, 17), (2, 3, 5), (4, 8), (3, 12), (6, 20)]      # sizes 1..120, most not x8
CASES = [(kind, shape) for kind in ("zeros", "dense", "half", "2:4") for shape in SHAPES
         if kind != "2:4" or math.prod(shape) % 4 == 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, shape", CASES)
def test_round_trip_is_bit_exact(kind, shape, dtype):
    W = _pattern(kind, shape, dtype)
    bitmap, values = compress(W)
    assert bitmap.numel() == math.ceil(W.numel() / 8)                # odd sizes: one padded last byte
    assert values.numel() == int((W != 0).sum()) and values.dtype == dtype
    back = decompress(bitmap, values, W.shape)
    assert back.dtype == dtype and back.shape == W.shape
    assert torch.equal(_bits(back), _bits(W))                       # equal bits, not just equal values
    if kind == "zeros":
        assert values.numel() == 0 and int(bitmap.sum()) == 0
    if kind == "dense":
        assert values.numel() == W.numel()


def test_negative_zero_comes_back_positive_and_nonfinite_values_keep_their_bits():
    nan = torch.tensor(float("nan"))
    W = torch.tensor([[-0.0, 1.0, 0.0, float("inf")], [float("-inf"), -0.0, 5e-45, -1.0]])
    W[0, 2] = -nan                                                   # a NaN with its sign bit set
    bitmap, values = compress(W)
    assert values.numel() == 6                                       # the two -0.0 are zeros, not stored
    back = decompress(bitmap, values, W.shape)
    nonzero = W != 0
    assert torch.equal(_bits(back)[nonzero], _bits(W)[nonzero])      # NaN payload/sign, inf, subnormal kept
    assert back[0, 0].item() == 0 and not torch.signbit(back[0, 0]) and not torch.signbit(back[1, 1])


def test_corrupt_inputs_are_refused():
    W = torch.tensor([[1.0, 0.0, 2.0]])
    bitmap, values = compress(W)
    with pytest.raises(ValueError, match="marks 2 nonzeros but there are 1"):
        decompress(bitmap, values[:1], W.shape)
    with pytest.raises(ValueError, match="padding bits"):
        decompress(bitmap | 0b10000000, values, W.shape)
    with pytest.raises(ValueError, match="has 1 bytes, this one 2"):
        decompress(torch.cat([bitmap, bitmap]), values, W.shape)
    with pytest.raises(ValueError, match="uint8"):
        check_packed(bitmap.to(torch.int32), values, W.shape)


# --------------------------------------------------------------------------- a tiny pruned model on disk

@pytest.fixture(scope="module")
def pruned(tiny_model_dir, tmp_path_factory):
    """The tiny Llama of `tiny_model_dir`, magnitude-pruned to 50 %, saved by `save_pretrained_atomic` with
    its tokenizer; and its sparse export without exponent coding (the bitmap layout alone; exponent coding has
    its own tests below)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = tmp_path_factory.mktemp("sparse")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)
    dense = save_pretrained_atomic(model, AutoTokenizer.from_pretrained(tiny_model_dir), root / "dense",
                                   metadata={"method": "magnitude", "sparsity": 0.5})
    stats = export_sparse(dense, root / "sparse", entropy=False)
    return model, dense, root / "sparse", stats


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def test_export_stores_block_weights_compressed_and_says_so(pruned):
    _, dense, sparse, stats = pruned
    files = sorted(p.name for p in sparse.iterdir())
    assert "model" + SUFFIX in files and "model.safetensors" not in files
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "prunekit.json"):
        assert name in files
    record = json.loads((sparse / "prunekit.json").read_text())
    assert record["method"] == "magnitude" and record["sparsity"] == 0.5          # the source's record is kept
    storage = record["storage"]
    assert storage["format"] == FORMAT and storage["version"] == 2 and storage["bytes_per_weight"] == BYTES_PER_WEIGHT
    compressed = {n for n, t in storage["tensors"].items() if t["compressed"]}
    assert compressed == {f"model.layers.{i}.{m}.weight" for i in range(2) for m in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    entry = storage["tensors"]["model.layers.0.mlp.up_proj.weight"]               # (96, 64) float32, 50 %
    assert entry["density"] == 0.5 and entry["bytes_per_weight"] == 1 / 8 + 0.5 * 4
    assert stats["tensors_compressed"] == 14 == storage["tensors_compressed"]
    original = saved_tensors(dense)
    assert stats["bytes_dense"] == sum(t.numel() * t.element_size() for t in original.values())
    on_disk, _ = read_sparse(sparse)
    stored = sum(t.numel() * t.element_size() for t in on_disk.values()) + sum(
        p.nbytes for p in read_sparse(sparse)[1].values())
    assert stats["bytes_compressed"] == stored == storage["bytes_compressed"]
    assert stats["ratio"] == pytest.approx(stored / stats["bytes_dense"]) and stats["ratio"] < 0.7
    assert (sparse / ("model" + SUFFIX)).stat().st_size < 0.7 * (dense / "model.safetensors").stat().st_size
    assert is_sparse_export(sparse) and not is_sparse_export(dense)


def test_every_tensor_round_trips_bit_exactly(pruned):
    _, dense, sparse, _ = pruned
    original, restored = saved_tensors(dense), load_sparse_state(sparse)
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(_bits(restored[name]), _bits(tensor)), name


def test_load_sparse_gives_the_same_model_and_logits(pruned):
    model, _, sparse, _ = pruned
    reloaded, tokenizer = load_sparse(sparse)
    assert tokenizer is not None and not reloaded.training
    state = reloaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(reloaded, IDS), _logits(model, IDS))
    half, _ = load_sparse(sparse, dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight.bfloat16())


def test_stock_from_pretrained_refuses_the_folder_instead_of_loading_random_weights(pruned):
    from transformers import AutoModelForCausalLM
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(pruned[2])


def test_prunekit_load_reads_a_sparse_export(pruned):
    """`prunekit.load` dispatches to `load_sparse` (a two-line change in io/loading.py)."""
    import inspect

    from prunekit.io import loading
    if "is_sparse_export" not in inspect.getsource(loading):
        pytest.skip("io/loading.py does not dispatch to io/sparse.py yet (see the change proposed with this file)")
    from prunekit import load
    model, tokenizer = load(pruned[2])
    assert torch.equal(_logits(model, IDS), _logits(pruned[0], IDS)) and tokenizer.pad_token is not None
    model, _ = loading.load_pruned(pruned[2])
    assert torch.equal(_logits(model, IDS), _logits(pruned[0], IDS))


def test_offloaded_model_decompresses_one_block_at_a_time(pruned):
    model, _, sparse, _ = pruned
    offloaded, _ = offloaded_sparse_model(sparse)
    info = offloaded.prunekit_sparse_offload
    assert (info.blocks, info.tensors) == (2, 14)
    blocks = offloaded.model.layers

    def compressed_params(block):
        return [p for n, p in block.named_parameters() if n.endswith("proj.weight")]

    assert all(p.is_meta for block in blocks for p in compressed_params(block))      # nothing dense at rest
    seen = []

    def watch(index):
        def hook(module, args, kwargs):
            seen.append([not p.is_meta for block in blocks for p in compressed_params(block)])
        return hook

    handles = [mlp.register_forward_pre_hook(watch(i), with_kwargs=True)
               for i, mlp in enumerate(b.mlp for b in blocks)]
    try:
        logits = _logits(offloaded, IDS)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(logits, _logits(model, IDS))
    assert seen == [[True] * 7 + [False] * 7, [False] * 7 + [True] * 7]              # only the running block
    assert all(p.is_meta for block in blocks for p in compressed_params(block))      # freed again
    prompt = IDS[:1, :4]
    assert torch.equal(offloaded.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------- more kinds of checkpoints

def test_tied_bfloat16_two_of_four_model(tmp_path):
    model = llama(tie_word_embeddings=True).to(torch.bfloat16)
    prune_(model, MagnitudeConfig(sparsity=0.5, nm=(2, 4)), None, progress=False)
    dense = save_pretrained_atomic(model, None, tmp_path / "dense", metadata={})
    stats = export_sparse(dense, tmp_path / "sparse")
    assert stats["tensors_compressed"] == 14
    storage = json.loads((tmp_path / "sparse" / "prunekit.json").read_text())["storage"]
    assert storage["tensors"]["model.layers.0.self_attn.q_proj.weight"]["bytes_per_weight"] == 1 / 8 + 0.5 * 2
    original, restored = saved_tensors(dense), load_sparse_state(tmp_path / "sparse")
    assert original.keys() == restored.keys() and "lm_head.weight" not in restored
    assert all(torch.equal(_bits(restored[k]), _bits(v)) for k, v in original.items())
    # the reference is the dense export loaded by transformers (`model.to(bfloat16)` also cast the rotary table)
    from transformers import AutoModelForCausalLM
    reference = _logits(AutoModelForCausalLM.from_pretrained(dense, dtype="auto"), IDS)
    reloaded, tokenizer = load_sparse(tmp_path / "sparse", dtype="auto")
    assert tokenizer is None and reloaded.dtype == torch.bfloat16
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(_logits(reloaded, IDS), reference)
    offloaded, _ = offloaded_sparse_model(tmp_path / "sparse", dtype="auto")
    assert offloaded.lm_head.weight is offloaded.model.embed_tokens.weight
    assert torch.equal(_logits(offloaded, IDS), reference)


def test_weights_too_dense_to_gain_stay_dense(tmp_path):
    model = llama()
    with torch.no_grad():
        W = model.model.layers[0].mlp.up_proj.weight
        W.view(-1)[: W.numel() // 64] = 0                             # 1.6 % zeros: 1/8 + 0.984 x 4 > 4 bytes
        model.model.layers[1].mlp.up_proj.weight.view(-1)[: W.numel() // 16] = 0      # 6.25 %: worth it
    dense = save_pretrained_atomic(model, None, tmp_path / "dense", metadata={})
    stats = export_sparse(dense, tmp_path / "sparse")
    tensors = json.loads((tmp_path / "sparse" / "prunekit.json").read_text())["storage"]["tensors"]
    assert not tensors["model.layers.0.mlp.up_proj.weight"]["compressed"]
    assert tensors["model.layers.1.mlp.up_proj.weight"]["compressed"]
    assert stats["tensors_compressed"] == 1 and stats["ratio"] < 1
    assert torch.equal(load_sparse(tmp_path / "sparse")[0].model.layers[0].mlp.up_proj.weight, W)


def test_non_uniform_width_export_keeps_its_widths(tmp_path, calib):
    from transformers import AutoModelForCausalLM  # noqa: F401  (the loader builds the stock class)

    from prunekit import WandaSPConfig
    from prunekit.io.loading import load_pruned
    from prunekit.surgery import block_widths, stock_widths
    model = tiny_model("llama")
    prune_(model, WandaSPConfig(sparsity=0.4, uniform=False), calib, progress=False)
    prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)
    widths = block_widths(model)
    assert stock_widths(model) is None
    dense = save_pretrained_atomic(model, None, tmp_path / "dense",
                                   metadata={"structure": {"stock": False, "widths": widths}})
    export_sparse(dense, tmp_path / "sparse")
    reference, _ = load_pruned(dense)
    for loaded in (load_sparse(tmp_path / "sparse")[0], offloaded_sparse_model(tmp_path / "sparse")[0]):
        assert block_widths(loaded) == widths
        assert torch.equal(_logits(loaded, IDS), _logits(reference, IDS))


# --------------------------------------------------------------------------- safety of the export

def _fingerprint(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_output_is_refused_without_overwrite_and_the_source_is_never_touched(pruned, tmp_path):
    _, dense, _, _ = pruned
    before = _fingerprint(dense)
    out = tmp_path / "out"
    export_sparse(dense, out)
    first = _fingerprint(out)
    with pytest.raises(FileExistsError, match="already exists"):
        export_sparse(dense, out)
    assert _fingerprint(out) == first
    export_sparse(dense, out, overwrite=True)
    assert is_sparse_export(out)
    with pytest.raises(ValueError, match="input model"):
        export_sparse(dense, dense / "inside")
    with pytest.raises(ValueError, match="input model"):
        export_sparse(dense, dense, overwrite=True)
    with pytest.raises(ValueError, match="already a"):
        export_sparse(out, tmp_path / "again")
    assert _fingerprint(dense) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]                     # no staging folder left


def _fill_disk(kind):
    def fake_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)                                      # a partial file is on disk
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    return fake_save_file


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_full_disk_leaves_neither_output_nor_staging(pruned, tmp_path, monkeypatch, kind):
    import safetensors.torch
    _, dense, _, _ = pruned
    monkeypatch.setattr(safetensors.torch, "save_file", _fill_disk(kind))
    with pytest.raises(DiskFullError, match="nothing was written") as info:
        export_sparse(dense, tmp_path / "out")
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()                                                       # an old export stays as it was
    (tmp_path / "out" / "prunekit.json").write_text(json.dumps({"versions": {"prunekit": "0"}}))
    with pytest.raises(DiskFullError, match="unchanged"):
        export_sparse(dense, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["prunekit.json"]


def test_a_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only pickles"):
        export_sparse(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_without_prunekit_record(tmp_path):
    """A plain `save_pretrained` folder in several shards: one sparse shard per shard, no index copied."""
    model = llama()
    prune_(model, MagnitudeConfig(sparsity=0.7), None, progress=False)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    shards = sorted(p.name for p in (tmp_path / "src").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "src" / "model.safetensors.index.json").is_file()
    stats = export_sparse(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
        s.removesuffix(".safetensors") + SUFFIX for s in shards)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    record = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert "prunekit" in record["versions"] and record["storage"]["tensors_compressed"] == stats["tensors_compressed"]
    original, restored = saved_tensors(tmp_path / "src"), load_sparse_state(tmp_path / "out")
    assert original.keys() == restored.keys()
    assert all(torch.equal(_bits(restored[k]), _bits(v)) for k, v in original.items())
    (tmp_path / "out" / sorted((tmp_path / "out").glob("*" + SUFFIX))[0].name).unlink()
    with pytest.raises(ValueError, match="are not the ones prunekit.json lists"):
        load_sparse_state(tmp_path / "out")


# --------------------------------------------------------------------------- exponent coding (byte planes)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_byte_planes_round_trip_bit_for_bit(dtype):
    from prunekit.io.sparse import join_planes, split_planes
    x = (torch.randn(37, 129, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")]).to(dtype)
    exponent, mantissa = split_planes(x)
    assert exponent.dtype == mantissa.dtype == torch.uint8 and mantissa.numel() == x.numel() * (x.element_size() - 1)
    back = join_planes(exponent, mantissa, dtype, x.shape)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), x.view(torch.uint8))
    with pytest.raises(ValueError, match="do not make"):
        join_planes(exponent, mantissa[:-1], dtype, x.shape)
    with pytest.raises(ValueError, match="does not inflate"):
        join_planes(exponent[1:], mantissa, dtype, x.shape)


def test_the_high_byte_of_weights_in_a_few_binades_deflates_well():
    from prunekit.io.sparse import split_planes
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02    # like trained weights
    exponent, mantissa = split_planes(x)
    assert exponent.numel() < 0.6 * x.numel()             # sign + 7 exponent bits: about 3-4 bits of information
    constant = torch.full((4096,), 0.75)                  # one exponent, one sign: next to nothing
    assert split_planes(constant)[0].numel() < 100


def test_exponent_coding_is_lossless_and_smaller(tmp_path):
    from transformers import AutoModelForCausalLM
    model = llama(hidden_size=128, intermediate_size=256)                 # block weights past PLANES_MIN_NUMEL
    prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)
    dense = save_pretrained_atomic(model, None, tmp_path / "dense", metadata={})
    plain = export_sparse(dense, tmp_path / "plain", entropy=False)
    coded = export_sparse(dense, tmp_path / "coded")
    storage = json.loads((tmp_path / "coded" / "prunekit.json").read_text())["storage"]
    assert storage["version"] == 2 and storage["exponent_coding"] and "exponent" in storage["layout"]
    from prunekit.io.sparse import PLANES_KEY, _read_safetensors
    metadata, raw = _read_safetensors(tmp_path / "coded" / ("model" + SUFFIX))
    planed = json.loads(metadata[PLANES_KEY])
    assert "model.embed_tokens.weight" in planed and "model.layers.0.mlp.up_proj.weight.values" in planed
    assert "model.layers.0.mlp.up_proj.weight.values.exponent" in raw and "model.embed_tokens.weight" not in raw
    assert coded["bytes_compressed"] == sum(t.numel() * t.element_size() for t in raw.values())
    assert coded["bytes_compressed"] < 0.95 * plain["bytes_compressed"]
    sizes = [(tmp_path / kind / ("model" + SUFFIX)).stat().st_size for kind in ("coded", "plain")]
    assert sizes[0] < sizes[1]
    original, restored = saved_tensors(dense), load_sparse_state(tmp_path / "coded")
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(_bits(restored[name]), _bits(tensor)), name
    loaded, _ = load_sparse(tmp_path / "coded")
    offloaded, _ = offloaded_sparse_model(tmp_path / "coded")
    reference = _logits(AutoModelForCausalLM.from_pretrained(dense).eval(), IDS)
    assert torch.equal(_logits(loaded, IDS), reference) and torch.equal(_logits(offloaded, IDS), reference)


def test_a_corrupt_exponent_plane_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from prunekit.io.sparse import _read_safetensors
    model = llama(hidden_size=128, intermediate_size=256)
    prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)
    dense = save_pretrained_atomic(model, None, tmp_path / "dense", metadata={})
    export_sparse(dense, tmp_path / "coded")
    file = tmp_path / "coded" / ("model" + SUFFIX)
    metadata, _ = _read_safetensors(file)
    tensors = load_file(str(file))
    key = "model.embed_tokens.weight.exponent"
    tensors[key] = tensors[key][:-3].clone()
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(ValueError, match="model.embed_tokens.weight is corrupt"):
        load_sparse_state(tmp_path / "coded")
