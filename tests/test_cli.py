"""The command line end to end on a tiny local checkpoint: prune -> export -> eval, the recipe
path giving the same model, and bad input that fails fast and writes nothing."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.cli import main
from prunekit.report import sparsity_report

FAST = ["--samples", "4", "--seqlen", "32", "--set", "eval.max_tokens=640"]


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_prune_export_and_eval(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--method", "sparsegpt", "--nm", "2:4", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "expected speedup: N:M sparsity" in printed
    assert "tokens scored=" in printed and "seqlen=32" in printed          # the protocol is printed
    model = AutoModelForCausalLM.from_pretrained(out)                       # stock transformers
    scan = sparsity_report(model)
    assert scan["block_linear_sparsity"] == pytest.approx(0.5)
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["recipe"]["steps"] == [{"method": "sparsegpt", "nm": [2, 4]}]
    assert {k: meta["calibration"][k] for k in ("source", "samples", "seqlen", "seed")} == {
        "source": "default", "samples": 4, "seqlen": 32, "seed": 0}
    assert 0 < meta["calibration"]["distinct_tokens"] <= 4 * 32 < meta["calibration"]["split_tokens"]
    assert meta["pruned_perplexity"]["ppl"] > 1 and meta["dense_perplexity"]["ppl"] > 1
    assert set(meta["sparsity"]["layers"]) == set(scan["layers"])
    assert {"torch", "transformers", "prunekit"} <= set(meta["versions"])
    assert not list(out.glob("*.bin"))

    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--seqlen", "32", "--max-tokens", "640", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "ppl" in printed and "stride=32" in printed and "50.00% of decoder-block linear weights" in printed
    result = json.loads(report.read_text())
    assert result["perplexity"]["ppl"] == pytest.approx(meta["pruned_perplexity"]["ppl"], rel=1e-5)


def test_recipe_run_equals_prune_command(tiny_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.6", "--out", str(a),
                 "--no-eval", "--samples", "4", "--seqlen", "32"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ncalibration: {{samples: 4, seqlen: 32}}\n"
                      f"steps:\n- {{method: wanda, sparsity: 0.5}}\nexport: {{path: {b}}}\n")
    assert main(["run", str(recipe), "--set", "steps.0.sparsity=0.6"]) == 0
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dry_run_prints_a_loadable_recipe(tiny_model_dir, capsys, tmp_path):
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--nm", "4:8", "--dry-run"]) == 0
    text = capsys.readouterr().out
    from prunekit.recipe import dump_recipe, load_recipe
    assert dump_recipe(load_recipe(text)) == text
    assert load_recipe(text).steps[0].nm == (4, 8)


def test_list(capsys):
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert "sparsegpt" in printed and "qwen3" in printed and "gpt2" in printed


@pytest.mark.parametrize("args, message", [
    (["--method", "wandaa", "--sparsity", "0.5"], "unknown method 'wandaa'"),
    (["--method", "wanda", "--sparsity", "1.0"], r"[0, 1)"),
    (["--method", "wanda", "--sparsity", "-0.2"], r"[0, 1)"),
    (["--method", "wanda", "--nm", "4:4"], "smaller than M"),
    (["--method", "wanda", "--nm", "2-4"], "N:M"),
    (["--method", "wanda"], "--sparsity"),
    (["--method", "wanda", "--sparsity", "0.5", "--set", "steps.0.sparsty=0.3"], "did you mean 'sparsity'"),
    (["--method", "wanda", "--sparsity", "0.5", "--seqlen", "4096"], "longer than the model's context"),
])
def test_bad_input_fails_fast_and_writes_nothing(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert main(["prune", str(tiny_model_dir), *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_and_recipe(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--method", "wanda", "--sparsity", "0.5"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unsupported_architecture_writes_nothing(tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM
    from conftest import tiny_tokenizer
    src = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=128)).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "bloom" in err and "llama" in err
    assert not out.exists()


def test_existing_output_refused_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr("prunekit.io.loading.load",
                        lambda *a, **k: pytest.fail("loaded the model before checking --out"))
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_never_replaces_a_model_prunekit_did_not_write(tiny_model_dir, tmp_path, capsys):
    """The probe's data loss: --out naming an ordinary Hugging Face model with --overwrite replaced it."""
    import shutil
    big = tmp_path / "big"
    shutil.copytree(tiny_model_dir, big)
    before = {p.name: p.read_bytes() for p in big.iterdir()}
    argv = ["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
            "--out", str(big), "--overwrite"]
    assert main(argv) == 2
    assert "was not written by prunekit" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in big.iterdir()} == before
    mine = tmp_path / "mine"                          # what prunekit exported, it may replace
    assert main([*argv[:-2], str(mine)]) == 0
    assert main([*argv[:-2], str(mine), "--overwrite"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.7", "--nm", "2:4"], "sparsity 0.7 and nm 2:4 disagree"),
    (["--sparsity", "0.5", "--eora-rank", "100000"], "use --eora-rank 32 or less"),
])
def test_requests_that_cannot_be_met_are_refused(tiny_model_dir, tmp_path, capsys, extra, message):
    """The probe's silent results: --sparsity 0.7 --nm 2:4 gave 50%; --eora-rank 100000 was clamped."""
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", *extra, "--no-eval", "--samples", "2",
                 "--seqlen", "16", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_agreeing_sparsity_and_nm_are_accepted():
    from prunekit.recipe import step_from_dict
    assert step_from_dict({"method": "wanda", "sparsity": 0.5, "nm": [2, 4]}).nm == (2, 4)
    assert step_from_dict({"method": "wanda", "sparsity": 0.25, "nm": [1, 4]}).sparsity == 0.25


def test_refuses_to_overwrite_the_input_model(tiny_model_dir, capsys):
    before = _weights(tiny_model_dir)
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tiny_model_dir), "--overwrite", "--no-eval"]) == 2
    assert "input" in capsys.readouterr().err.lower()
    after = _weights(tiny_model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_chained_depth_then_width_recipe_exports_a_smaller_stock_model(tiny_model_dir, tmp_path, capsys):
    """A recipe chains steps: remove a block, then FLAP width pruning; the export is a stock checkpoint
    (uniform widths) with one block fewer that loads with plain transformers and has the reported size."""
    from transformers import AutoModelForCausalLM
    out, report = tmp_path / "out", tmp_path / "run.json"
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ncalibration: {{samples: 4, seqlen: 32}}\n"
                      "steps:\n- {method: block-influence, layers: 1}\n- {method: flap, sparsity: 0.2, uniform: true}\n"
                      f"eval: {{seqlen: 32, max_tokens: 640}}\nexport: {{path: {out}}}\n")
    assert main(["run", str(recipe), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "expected speedup: depth pruning" in printed and "expected speedup: width pruning" in printed
    result = json.loads(report.read_text())
    assert [s["method"] for s in result["steps"]] == ["block-influence", "flap"]
    assert result["structure"]["stock"] and result["structure"]["num_blocks"] == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.mlp_bias
    assert sum(p.numel() for p in model.parameters()) == result["parameters_after"]


def test_sparsity_zero_is_refused_before_loading(tmp_path, capsys):
    """Issue 21, part 6: it failed after loading the model with 'targets=() ignore=() select no linear layer'."""
    out = tmp_path / "out"
    assert main(["prune", str(tmp_path / "no-model-needed"), "--method", "wanda", "--sparsity", "0",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sparsity=0 prunes nothing" in err and "--sparsity 0.5" in err
    assert not out.exists()
