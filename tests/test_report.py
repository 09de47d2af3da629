"""Reports (report.py): sparsity totals weighted by size, the table, to_dict, parameter counts and
the sparsity scan of a tiny model whose parameters are counted by hand."""
from dataclasses import dataclass

import torch

from conftest import tiny_model

from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.report import (LayerRecord, PruneReport, StructureReport, _plain, memory_now, parameter_counts,
                             sparsity_report)

# tiny Llama (hidden 64, MLP 96, 4 heads of 16, 2 KV heads, vocab 128, 2 blocks, untied head):
ATTN = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64        # q, k, v, o: 12288
MLP = 3 * 64 * 96                                    # gate, up, down: 18432
BLOCK = ATTN + MLP + 2 * 64                          # + two RMSNorm weights: 30848
LLAMA_BLOCKS = 2 * BLOCK                             # 61696
LLAMA_ALL = LLAMA_BLOCKS + 128 * 64 + 128 * 64 + 64  # + embeddings, lm_head, final norm: 78144
LLAMA_LINEARS = 2 * (ATTN + MLP)                     # 61440


def _report(**extra):
    layers = [LayerRecord("model.layers.0.self_attn.q_proj", 0, 0.5, 3, 4, 0.125, 0.5),
              LayerRecord("model.layers.1.mlp.down_proj", 1, 0.5, 1, 12, None, 0.25, note="damp raised")]
    return PruneReport("wanda", MagnitudeConfig(sparsity=0.5), "true", 16, 32, layers=layers, seconds=1.23456,
                       **extra)


def test_layer_record_achieved():
    assert LayerRecord("x", 0, 0.5, 3, 4, None, 0.0).achieved == 0.75
    assert LayerRecord("x", 0, 0.5, 0, 7, None, 0.0).achieved == 0.0


def test_sparsity_is_weighted_by_layer_size():
    report = _report()
    assert report.sparsity == 4 / 16                   # not the mean of 0.75 and 1/12
    assert PruneReport("magnitude", None, "true", 0, 0).sparsity == 0.0


def test_table():
    lines = _report().table().splitlines()
    assert lines[0] == f"{'layer':<48} {'requested':>9} {'achieved':>9} {'rel.err':>8}"
    assert lines[1] == f"{'model.layers.0.self_attn.q_proj':<48}    50.00%    75.00%   0.1250"
    assert lines[2] == f"{'model.layers.1.mlp.down_proj':<48}    50.00%     8.33%        -"
    assert lines[3] == f"{'all pruned layers':<48} {'':>9}    25.00%"
    assert len(lines) == 4


def test_prune_report_to_dict():
    d = _report().to_dict()
    assert d["method"] == "wanda"
    assert d["config"]["sparsity"] == 0.5 and d["config"]["per"] == "layer" and d["config"]["nm"] is None
    assert d["config"]["targets"] == [] and d["config"]["overrides"] == {}       # tuples become lists
    assert d["seconds"] == 1.235
    assert d["sparsity_of_pruned_layers"] == 0.25
    assert (d["sequential"], d["calibration_windows"], d["calibration_seqlen"]) == ("true", 16, 32)
    assert d["layers"][0] == {"name": "model.layers.0.self_attn.q_proj", "block": 0, "requested": 0.5, "zeros": 3,
                              "numel": 4, "error": 0.125, "seconds": 0.5, "note": None, "problem": None,
                              "achieved": 0.75}
    assert d["layers"][1]["note"] == "damp raised" and d["layers"][1]["achieved"] == 1 / 12
    assert "allocation" not in d and "adapter_parameters" not in d
    assert d["blocks"] == [] and d["memory_budget"] == {}


def test_prune_report_to_dict_optional_sections():
    adapters = {"a": (torch.zeros(8, 2), torch.zeros(2, 5)), "b": (torch.zeros(3, 1), torch.zeros(1, 4))}
    allocation = {"kind": "owl", "block_sparsity": [0.45, 0.55]}
    d = _report(allocation=allocation, adapters=adapters).to_dict()
    assert d["allocation"] == allocation
    assert d["adapter_parameters"] == 16 + 10 + 3 + 4


def test_structure_report():
    report = StructureReport("wanda-sp", {"sparsity": 0.25}, block_params_before=1000, block_params_after=750,
                             model_params_before=1500, model_params_after=1250, seconds=2.0004,
                             removed_blocks=[3], widths=[{"heads": 3}], scores={"s": (1, 2)}, notes=["n"])
    assert report.removed_fraction == 0.25
    assert report.to_dict() == {
        "method": "wanda-sp", "config": {"sparsity": 0.25}, "seconds": 2.0,
        "block_params_before": 1000, "block_params_after": 750, "model_params_before": 1500,
        "model_params_after": 1250, "removed_fraction_of_block_params": 0.25, "removed_blocks": [3],
        "widths": [{"heads": 3}], "scores": {"s": [1, 2]}, "notes": ["n"]}
    assert StructureReport("x", None, 0, 0, 0, 0).removed_fraction == 0.0


def test_plain_turns_nested_dataclasses_and_tuples_into_plain_values():
    @dataclass
    class Inner:
        pair: tuple

    @dataclass
    class Outer:
        inner: Inner
        items: list

    assert _plain(Outer(Inner((1, 2)), [Inner(()), {"k": (3,)}])) == {
        "inner": {"pair": [1, 2]}, "items": [{"pair": []}, {"k": [3]}]}
    assert _plain("text") == "text"


def test_parameter_counts_of_a_tiny_llama():
    assert parameter_counts(tiny_model("llama")) == (LLAMA_BLOCKS, LLAMA_ALL) == (61696, 78144)


def test_parameter_counts_count_tied_weights_once():
    # GPT-2: wte 128x64, wpe 64x64, ln_f 2x64, head tied to wte; a block: 2 LayerNorms + c_attn, c_proj, c_fc, c_proj
    block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert parameter_counts(tiny_model("gpt2")) == (2 * block, 2 * block + 128 * 64 + 64 * 64 + 128)


def test_sparsity_report_of_a_tiny_llama():
    model = tiny_model("llama")
    dense = sparsity_report(model)
    assert dense["parameters"] == LLAMA_ALL
    assert dense["block_linear_sparsity"] == 0.0 and dense["model_sparsity"] == 0.0
    assert len(dense["layers"]) == 14 and set(dense["layers"].values()) == {0.0}
    with torch.no_grad():
        layers = model.model.layers
        layers[0].self_attn.q_proj.weight.zero_()                 # 4096 zeros
        layers[1].mlp.down_proj.weight[:, :48] = 0                # half of 96 x 64: 3072 zeros
        model.model.embed_tokens.weight[0] = 0                    # 64 zeros outside the blocks
    scan = sparsity_report(model)
    assert scan["layers"]["model.layers.0.self_attn.q_proj"] == 1.0
    assert scan["layers"]["model.layers.1.mlp.down_proj"] == 0.5
    assert scan["layers"]["model.layers.1.self_attn.q_proj"] == 0.0
    assert scan["block_linear_sparsity"] == (4096 + 3072) / LLAMA_LINEARS
    assert scan["model_sparsity"] == (4096 + 3072 + 64) / LLAMA_ALL


def test_sparsity_report_counts_only_block_linear_weights():
    model = tiny_model("gpt2")                     # biases start at zero: they count in the model, not the linears
    scan = sparsity_report(model)
    assert list(scan["layers"]) == [f"transformer.h.{i}.{name}" for i in range(2)
                                    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert scan["block_linear_sparsity"] == 0.0
    zero_biases = 2 * (192 + 64 + 256 + 64 + 2 * 64) + 64        # linear and LayerNorm biases, ln_f's too
    assert zero_biases == 1472 and scan["model_sparsity"] == zero_biases / 112384
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:, :96] = 0   # Conv1D stores (in, out): half the outputs
    assert sparsity_report(model)["layers"]["transformer.h.0.attn.c_attn"] == 0.5


def test_memory_now_on_cpu():
    memory = memory_now(torch.device("cpu"))
    assert set(memory) == {"rss_mb", "peak_rss_mb"}
    # both in MiB, rounded to 0.1; the peak (getrusage) and the current RSS (psutil) come from different
    # counters, so only their scale is compared
    assert memory["rss_mb"] > 10 and memory["peak_rss_mb"] > 10
    assert memory == {k: round(v, 1) for k, v in memory.items()}
