"""Out of core (`--offload disk`), width and depth pruning and allocation pre-passes write exactly
what the in-memory engine writes: same tensors, same config, loadable the same way."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB, saved_tensors
from prunekit.prune import prune_
from prunekit.io.loading import load_pruned
from prunekit.core.residency import OnDisk, ShardReader, empty_model
from prunekit.io.offload import check_step, prune_out_of_core
from prunekit.recipe import step_from_dict
from prunekit.surgery import block_widths, stock_widths


def _deep(family: str, layers: int = 6):
    """A tiny model with enough blocks for depth pruning."""
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = (config.layer_types * layers)[:layers]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _compare(tmp_path, model, step, calib, *, expect_stock=None):
    """Prune a copy in memory and the saved checkpoint out of core; everything must agree."""
    dense = tmp_path / "dense"
    model.save_pretrained(dense, max_shard_size="40KB")
    assert len(list(dense.glob("*.safetensors"))) > 1               # several input shards
    memory = AutoModelForCausalLM.from_pretrained(dense).eval()
    prune_(memory, step, calib, device="cpu", progress=False)
    memory.save_pretrained(tmp_path / "memory")
    expected = saved_tensors(tmp_path / "memory")

    report, out, _ = prune_out_of_core(dense, step, calib, tmp_path / "disk", progress=False)
    got = saved_tensors(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    disk_config = json.loads((out / "config.json").read_text())
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "intermediate_size", "ffn_dim", "num_attention_heads",
                "num_key_value_heads", "layer_types", "attention_bias", "mlp_bias"):
        assert disk_config.get(key) == memory_config.get(key), key
    structure = json.loads((out / "prunekit.json").read_text())["structure"]
    assert structure["stock"] is (stock_widths(memory) is not None)     # GPT-2/OPT: pruned heads are not stock
    assert structure["widths"] == block_widths(memory)
    if expect_stock is not None:
        assert structure["stock"] is expect_stock
    reloaded, _ = load_pruned(out)                       # stock loader for uniform exports
    ids = calib[:2] if calib is not None else torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, memory(ids).logits)
    assert not list(tmp_path.glob(".disk.tmp-*"))        # staging swapped into place
    return report, out


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("raw", [
    {"method": "magnitude-sp", "sparsity": 0.25},                                 # data-free
    {"method": "wanda-sp", "sparsity": 0.25},                                     # uniform, calibrated
    {"method": "flap", "sparsity": 0.25},                                         # uniform + bias compensation
], ids=["magnitude-sp", "wanda-sp", "flap"])
def test_width_out_of_core_equals_in_memory(tmp_path, calib, family, raw):
    step = step_from_dict(dict(raw, round_to=4))
    _compare(tmp_path, _deep(family, 3), step, None if raw["method"] == "magnitude-sp" else calib)


def test_flap_non_uniform_out_of_core_keeps_recorded_widths(tmp_path, calib):
    """The adaptive (global) allocation gives blocks different widths: the export keeps the input
    config, records the widths, and `load_pruned` rebuilds it; zero biases added by FLAP are
    written for every block."""
    step = step_from_dict({"method": "flap", "sparsity": 0.3, "uniform": False, "round_to": 4})
    _, out = _compare(tmp_path, _deep("llama", 4), step, calib, expect_stock=False)
    widths = json.loads((out / "prunekit.json").read_text())["structure"]["widths"]
    assert len({w["channels"] for w in widths}) > 1


def test_taylor_block_gradients_out_of_core(tmp_path, calib):
    _compare(tmp_path, _deep("llama", 3), step_from_dict({"method": "taylor", "sparsity": 0.25, "round_to": 4}),
             calib)


@pytest.mark.parametrize("raw", [
    {"method": "last-k", "layers": 2},
    {"method": "block-influence", "layers": 2},
    {"method": "angular", "layers": 2},
    {"method": "sleb", "layers": 2},
    {"method": "laco", "layers": 2, "merge": 2, "threshold": -1.0},
], ids=["last-k", "block-influence", "angular", "sleb", "laco"])
def test_depth_out_of_core_equals_in_memory(tmp_path, calib, raw):
    step = step_from_dict(raw)
    report, out = _compare(tmp_path, _deep("llama", 6), step, None if raw["method"] == "last-k" else calib)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert len(report.removed_blocks) == 2


@pytest.mark.parametrize("family", ["gpt2", "opt", "qwen2", "phi3"])
def test_sleb_out_of_core_reads_each_familys_head(tmp_path, calib, family):
    """SLEB's calibration loss runs the final norm and the LM head (GPT-2's ln_f, OPT's
    final_layer_norm, ...) out of core too."""
    _compare(tmp_path, _deep(family, 4), step_from_dict({"method": "sleb", "layers": 1}), calib)


def test_depth_out_of_core_renumbers_sliding_window_layers(tmp_path, calib):
    """Gemma 3 keeps one attention type per block: the kept blocks keep theirs, renumbered."""
    step = step_from_dict({"method": "block-influence", "layers": 2})
    _compare(tmp_path, _deep("gemma3_text", 5), step, calib)


@pytest.mark.parametrize("raw", [
    {"method": "wanda", "sparsity": 0.5, "allocation": "owl"},
    {"method": "wanda", "sparsity": 0.5, "allocation": "sensitivity"},
], ids=["owl", "sensitivity"])
def test_allocation_prepass_out_of_core(tmp_path, calib, raw):
    _compare(tmp_path, _deep("llama", 3), step_from_dict(raw), calib)


def test_on_disk_reads_tied_head_and_added_biases(tmp_path):
    """The tied LM head reads the embedding's tensor; a bias that pruning added loads as zeros, but
    one the config declares and the checkpoint lacks is an error; a tensor of the wrong shape is
    refused with both shapes named."""
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "m")
    skeleton = empty_model(AutoConfig.from_pretrained(tmp_path / "m"))
    disk = OnDisk(skeleton, ShardReader(tmp_path / "m"), tmp_path, torch.float32)
    head = skeleton.get_output_embeddings()
    disk.load(head, "cpu")
    assert torch.equal(head.weight, model.get_input_embeddings().weight)
    disk.unload(head)
    assert head.weight.is_meta
    proj = skeleton.model.layers[0].self_attn.o_proj
    proj.bias = torch.nn.Parameter(torch.empty(64, device="meta"))
    disk.load(proj, "cpu")
    assert torch.equal(proj.bias, torch.zeros(64)) and torch.equal(proj.weight,
                                                                   model.model.layers[0].self_attn.o_proj.weight)
    disk.unload(proj)
    declared = AutoConfig.from_pretrained(tmp_path / "m")
    declared.mlp_bias = True                       # the config promises biases the checkpoint lacks
    strict = OnDisk(empty_model(declared), ShardReader(tmp_path / "m"), tmp_path, torch.float32)
    with pytest.raises(KeyError, match=r"mlp\.gate_proj\.bias is not in the checkpoint"):
        strict.load(strict.model.model.layers[0].mlp, "cpu")
    proj.weight = torch.nn.Parameter(torch.empty(64, 32, device="meta"))
    with pytest.raises(ValueError, match=r"shape \(64, 64\).*expects \(64, 32\)"):
        disk.load(proj, "cpu")


def test_out_of_core_reads_a_non_uniform_export(tmp_path, calib):
    """A non-uniform width-pruned export (widths in prunekit.json) is the input of the next step:
    the skeleton is re-sliced to its recorded widths before any block is read."""
    step = step_from_dict({"method": "flap", "sparsity": 0.3, "uniform": False, "round_to": 4})
    _, first = _compare(tmp_path, _deep("llama", 4), step, calib, expect_stock=False)
    wanda = step_from_dict({"method": "wanda", "sparsity": 0.5})
    _, second, _ = prune_out_of_core(first, wanda, calib, tmp_path / "second", progress=False)
    memory, _ = load_pruned(first)
    prune_(memory, wanda, calib, device="cpu", progress=False)
    got = saved_tensors(second)
    for name, tensor in memory.state_dict().items():
        if name in got:
            assert torch.equal(got[name], tensor), name


def test_check_step_refuses_what_needs_the_whole_model():
    with pytest.raises(ValueError, match="gradient: model"):
        check_step(step_from_dict({"method": "gblm", "sparsity": 0.5, "gradient": "model"}))
    with pytest.raises(ValueError, match="needs the whole model"):
        check_step(step_from_dict({"method": "lora", "steps": 1}))


def test_block_stream_passes_keep_their_activations_memory_mapped(tmp_path, calib, monkeypatch):
    """Out of core, a scoring pass's cached activations (block 0's inputs, then every block's
    outputs) go to memory-mapped files, whose names are unlinked at once: nothing is left behind."""
    from prunekit.core import residency
    calls = []
    original = residency.spill

    def counting(hidden, folder):
        calls.append(len(hidden))
        return original(hidden, folder)
    monkeypatch.setattr(residency, "spill", counting)
    _compare(tmp_path, _deep("llama", 4), step_from_dict({"method": "block-influence", "layers": 1}), calib)
    assert calls == [1] * 5                       # 8 windows in one chunk; inputs + 4 blocks' outputs
    assert not list(tmp_path.rglob("*.activations"))


@pytest.mark.parametrize("raw", [
    {"method": "gblm", "sparsity": 0.5, "gradient": "block"},            # gradients through one block
    {"method": "ria", "nm": [2, 4], "permute": True},                    # channels reordered in the block
    {"method": "wanda", "sparsity": 0.5, "update": "admm"},              # weights re-fitted to the mask
    {"method": "pruner-zero", "sparsity": 0.5, "gradient": "block"},
], ids=["gblm-block", "ria-permute", "wanda-admm", "pruner-zero"])
def test_unstructured_variants_out_of_core(tmp_path, calib, raw):
    _compare(tmp_path, _deep("llama", 2), step_from_dict(raw), calib)
