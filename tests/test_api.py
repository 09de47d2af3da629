"""api.py: the summary table and step lines on hand-made reports, and one `run_recipe` end to end on
the tiny local checkpoint (calibration and evaluation from a small .txt file, wanda at 0.5, export)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.api import describe_step, run_recipe, summary_table
from prunekit.recipe import recipe_from_dict, recipe_to_dict
from prunekit.report import LayerRecord, PruneReport, StructureReport

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_summary_table_with_dense_and_pruned_perplexity():
    result = {"parameters": 1_234_567, "parameters_after": 1_234_567,
              "dense_perplexity": {"ppl": 12.34567, "protocol": "ignored: the pruned one is shown"},
              "pruned_perplexity": {"ppl": 15.5, "protocol": "default, 640 tokens"},
              "sparsity": {"block_linear_sparsity": 0.5}}
    assert summary_table(result).splitlines() == [
        "model   perplexity  parameters  sparsity (block linears)",
        "dense   12.346      1.2M        -                       ",
        "pruned  15.500      1.2M        50.00%                  ",
        "protocol: default, 640 tokens",
    ]


def test_summary_table_without_evaluation():
    result = {"parameters": 78144, "sparsity": {"block_linear_sparsity": 0.123456}}
    assert summary_table(result) == ("model   perplexity  parameters  sparsity (block linears)\n"
                                     "pruned  -           0.1M        12.35%                  ")


def test_summary_table_of_a_width_step_and_a_protocol_from_the_dense_model():
    result = {"parameters": 2_000_000, "parameters_after": 1_500_000, "dense_perplexity": {"ppl": 9.0, "protocol": "P"},
              "sparsity": {"block_linear_sparsity": 0.0}}
    lines = summary_table(result).splitlines()
    assert lines[1].split() == ["dense", "9.000", "2.0M", "-"]
    assert lines[2].split() == ["pruned", "-", "1.5M", "0.00%"]
    assert lines[3] == "protocol: P"


def test_summary_table_with_an_eora_adapter():
    result = {"parameters": 3_000_000, "parameters_after": 3_000_000, "adapter_parameters": 45_000,
              "dense_perplexity": {"ppl": 10.0}, "pruned_perplexity_without_adapter": {"ppl": 14.0},
              "pruned_perplexity": {"ppl": 11.25}, "sparsity": {"block_linear_sparsity": 0.5}}
    lines = summary_table(result).splitlines()
    assert len(lines) == 4                                              # no protocol given
    assert lines[0].startswith("model                        perplexity")
    assert [cell.strip() for cell in lines[2].split("  ") if cell.strip()] == [
        "pruned, sparse weights only", "14.000", "3.0M", "50.00%"]
    assert [cell.strip() for cell in lines[3].split("  ") if cell.strip()] == [
        "pruned + EoRA adapter", "11.250", "3.0M + 0.04M", "50.00%"]


def test_describe_step_of_a_linear_step():
    layers = [LayerRecord("a", 0, 0.5, 3, 4, None, 0.1), LayerRecord("b", 1, 0.5, 1, 12, None, 0.2)]
    report = PruneReport("wanda", None, "block", 4, 32, layers=layers, seconds=1.26)
    assert describe_step(0, report) == ("step 0: wanda -> 25.00% of the pruned layers' weights are zero "
                                        "(2 layers, 1.3 s, sequential=block)")
    assert describe_step(2, report, ", out of core").endswith("(2 layers, 1.3 s, sequential=block, out of core)")


def test_describe_step_of_a_structural_step():
    report = StructureReport("wanda-sp", None, 1_000_000, 750_000, 1_500_000, 1_250_000, seconds=2.04,
                             notes=["bias compensation not stored", "second note"])
    assert describe_step(1, report, ", out of core") == (
        "step 1: wanda-sp removed 25.00% of the block parameters (1.0M -> 0.8M; model 1.5M -> 1.2M), "
        "2.0 s, out of core\n  note: bias compensation not stored\n  note: second note")
    assert "\n" not in describe_step(0, StructureReport("sleb", None, 10, 5, 20, 15))


def test_resume_needs_a_run_directory(tiny_model_dir, tmp_path):
    recipe = recipe_from_dict({"model": str(tiny_model_dir), "steps": [{"method": "magnitude", "sparsity": 0.5}]})
    with pytest.raises(ValueError, match="resume=True continues a recorded run"):
        run_recipe(recipe, resume=True, echo=lambda *a: None)


def _text_file(tmp_path):
    words = "the value of a function is returned to the caller when the list is empty or the file is closed"
    lines = [f"{words} {i} and {i * 7 % 13}" for i in range(80)]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_windows_longer_than_the_context_are_refused(tiny_model_dir, tmp_path):
    recipe = recipe_from_dict({"model": str(tiny_model_dir), "calibration": {"source": str(_text_file(tmp_path)),
                                                                             "samples": 2, "seqlen": 4096},
                               "steps": [{"method": "wanda", "sparsity": 0.5}],
                               "export": {"path": str(tmp_path / "out")}})
    with pytest.raises(ValueError, match=r"calibration\.seqlen=4096 is longer than the model's context"):
        run_recipe(recipe, progress=False, echo=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_run_recipe_end_to_end(tiny_model_dir, tmp_path):
    text = _text_file(tmp_path)
    out = tmp_path / "pruned"
    recipe = recipe_from_dict({
        "model": str(tiny_model_dir),
        "calibration": {"source": str(text), "samples": 4, "seqlen": 16, "batch_size": 2},
        "steps": [{"method": "wanda", "sparsity": 0.5}],
        "eval": {"data": str(text), "seqlen": 16, "max_tokens": 64},
        "export": {"path": str(out)},
    })
    printed = []
    result = run_recipe(recipe, progress=False, echo=printed.append)

    assert result["recipe"] == recipe_to_dict(recipe)
    assert result["calibration"] == {"source": str(text), "samples": 4, "seqlen": 16, "seed": 0, "split_tokens": 1656,
                                     "distinct_tokens": 64}
    assert result["parameters"] == result["parameters_after"] == 78144
    assert result["dense_perplexity"]["ppl"] > 1 and result["pruned_perplexity"]["ppl"] > 1
    assert result["dense_perplexity"]["ppl"] != result["pruned_perplexity"]["ppl"]
    assert result["sparsity"]["block_linear_sparsity"] == 0.5
    assert result["structure"] == {"stock": True, "num_blocks": 2, "widths": result["structure"]["widths"]}
    assert result["export"] == str(out.resolve())
    [step] = result["steps"]
    assert step["method"] == "wanda" and step["sparsity_of_pruned_layers"] == 0.5
    assert (step["calibration_windows"], step["calibration_seqlen"]) == (4, 16)
    assert sorted(layer["name"] for layer in step["layers"]) == sorted(
        f"model.layers.{b}.{name}" for b in range(2) for name in LINEARS)
    assert summary_table(result) in printed
    assert "step 0: wanda -> 50.00% of the pruned layers' weights are zero (14 layers" in "\n".join(printed)

    assert (out / "prunekit.json").is_file() and list(out.glob("*.safetensors")) and (out / "README.md").is_file()
    assert not list(out.glob("*.bin"))
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["recipe"] == recipe_to_dict(recipe)
    assert meta["sparsity"]["block_linear_sparsity"] == 0.5
    assert "blocks" in step and "blocks" not in meta["steps"][0]           # timing noise stays out of the file

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    differs_from_magnitude = False
    for b in range(2):
        for name in LINEARS:
            W0 = dense.get_submodule(f"model.layers.{b}.{name}").weight
            W = pruned.get_submodule(f"model.layers.{b}.{name}").weight
            zeros = W == 0
            assert zeros.sum().item() == W.numel() // 2, name
            assert (zeros.sum(1) == W.shape[1] // 2).all(), name             # wanda compares within each row
            assert torch.equal(W, W0 * ~zeros), name                         # kept weights are unchanged
            by_magnitude = W0.abs() <= W0.abs().kthvalue(W.shape[1] // 2, dim=1, keepdim=True).values
            differs_from_magnitude |= not torch.equal(zeros, by_magnitude)
    assert differs_from_magnitude                                             # the input norms shaped the mask
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)


@pytest.mark.parametrize("native, dtype, hinted", [(True, "float32", True), (False, "float32", False),
                                                    (True, "bfloat16", False)])
def test_bfloat16_hint_on_cpus_that_multiply_bfloat16(tiny_model_dir, tmp_path, monkeypatch, native, dtype, hinted):
    """A float32 run on a CPU with AMX / AVX512-BF16 says that --dtype bfloat16 is faster there."""
    from prunekit.io import loading
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: native)
    recipe = recipe_from_dict({"model": str(tiny_model_dir), "dtype": dtype,
                               "calibration": {"source": str(_text_file(tmp_path)), "samples": 2, "seqlen": 16},
                               "steps": [{"method": "magnitude", "sparsity": 0.5}]})
    printed = []
    run_recipe(recipe, progress=False, echo=printed.append)
    assert (loading.BF16_HINT in printed) == hinted


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    from prunekit.io import loading
    import builtins
    real_open = builtins.open
    for flags, expected in (("fpu sse avx512f avx512_bf16", True), ("fpu amx_tile amx_bf16", True),
                            ("fpu sse avx2", False)):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        def fake_open(path, *args, _file=cpuinfo, **kwargs):
            return real_open(_file if path == "/proc/cpuinfo" else path, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake_open)
        assert loading.cpu_has_native_bf16() is expected
