"""Recipes out of core (`offload: disk`): steps chain through intermediate checkpoints, a run
directory keeps finished steps, dtype "auto" and Hub ids resolve to what is on disk."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import llama, saved_tensors, tiny_tokenizer
from prunekit.io import offload
from prunekit.api import run_recipe
from prunekit.io.loading import load_pruned
from prunekit.recipe import recipe_from_dict

CHAIN = [{"method": "flap", "sparsity": 0.25, "round_to": 4},
         {"method": "wanda", "sparsity": 0.5},
         {"method": "block-influence", "layers": 2}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "llama6"
    llama(num_hidden_layers=6).save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def _recipe(model, out, steps, offload="none", dtype="float32"):
    return recipe_from_dict({"model": str(model), "offload": offload, "dtype": dtype,
                             "calibration": {"samples": 4, "seqlen": 16, "seed": 0},
                             "steps": steps, "export": {"path": str(out)}})


def _lines():
    lines = []
    return lines, lambda *args, **kwargs: lines.append(" ".join(str(a) for a in args))


def test_multi_step_recipe_out_of_core_equals_in_memory(tmp_path, model_dir):
    run_recipe(_recipe(model_dir, tmp_path / "memory", CHAIN), progress=False, echo=lambda *a: None)
    lines, echo = _lines()
    result = run_recipe(_recipe(model_dir, tmp_path / "disk", CHAIN, offload="disk"), progress=False, echo=echo)
    expected, got = saved_tensors(tmp_path / "memory"), saved_tensors(tmp_path / "disk")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["mlp_bias"] is True       # FLAP's bias compensation
    record = json.loads((tmp_path / "disk" / "prunekit.json").read_text())
    memory_record = json.loads((tmp_path / "memory" / "prunekit.json").read_text())
    assert record["structure"] == memory_record["structure"] and not record["structure"]["stock"]
    assert [s["method"] for s in record["steps"]] == ["flap", "wanda", "block-influence"]
    assert [s["method"] for s in result["steps"]] == ["flap", "wanda", "block-influence"]
    assert any("step 2: block-influence removed" in line and "out of core" in line for line in lines)
    assert not list(tmp_path.glob(".disk.steps-*"))              # the intermediate checkpoints are gone
    model, _ = load_pruned(tmp_path / "disk")                      # FLAP's adaptive widths differ per block
    assert len(model.model.layers) == 4


def test_run_dir_keeps_finished_steps_and_resumes_after_them(tmp_path, model_dir, monkeypatch):
    steps = CHAIN[:2]
    run_recipe(_recipe(model_dir, tmp_path / "whole", steps, offload="disk"), progress=False, echo=lambda *a: None)
    calls = []
    original = offload.prune_out_of_core

    def crash_on_step_1(source, step, *args, **kwargs):
        calls.append(type(step).__name__)
        if len(calls) == 2:
            raise KeyboardInterrupt                           # Ctrl-C in the second step
        return original(source, step, *args, **kwargs)
    monkeypatch.setattr(offload, "prune_out_of_core", crash_on_step_1)
    run = tmp_path / "run"
    recipe = _recipe(model_dir, tmp_path / "out", steps, offload="disk")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, progress=False, echo=lambda *a: None, run_dir=run)
    assert (run / "step0" / "prunekit.json").is_file() and not (tmp_path / "out").exists()

    monkeypatch.setattr(offload, "prune_out_of_core", original)
    lines, echo = _lines()
    run_recipe(recipe, progress=False, echo=echo, run_dir=run, resume=True)
    assert any("steps 0..0: finished in an earlier session" in line for line in lines)
    expected, got = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "out")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    record = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert [s["method"] for s in record["steps"]] == ["flap", "wanda"]


def test_dtype_auto_takes_the_checkpoint_dtype(tmp_path, model_dir):
    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(half)
    tiny_tokenizer().save_pretrained(half)
    result = run_recipe(_recipe(half, tmp_path / "out", [{"method": "wanda", "sparsity": 0.5}], offload="disk",
                                dtype="auto"), progress=False, echo=lambda *a: None)
    assert result["dtype"] == "bfloat16"
    assert {t.dtype for t in saved_tensors(tmp_path / "out").values()} == {torch.bfloat16}


def test_hub_id_downloads_safetensors_only(tmp_path, model_dir, monkeypatch):
    """A Hub id is fetched with snapshot_download (config, safetensors, tokenizer: no pickles)
    and pruned from the local snapshot; the test stands in for the Hub with a local folder."""
    import huggingface_hub
    asked = {}

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        asked.update(repo=repo_id, patterns=allow_patterns)
        folder = tmp_path / "snapshot"
        shutil.copytree(model_dir, folder, dirs_exist_ok=True)
        return str(folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    run_recipe(_recipe("someone/tiny-llama", tmp_path / "out", [{"method": "magnitude", "sparsity": 0.5}],
                       offload="disk"), progress=False, echo=lambda *a: None)
    assert asked["repo"] == "someone/tiny-llama"
    assert "*.safetensors" in asked["patterns"] and not any("bin" in p or "pt" == p[-2:] for p in asked["patterns"])
    model, _ = load_pruned(tmp_path / "out")
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize("step, words", [
    ({"method": "lora", "steps": 1}, "steps.1: --offload disk prunes one block at a time; lora"),
    ({"method": "gblm", "sparsity": 0.5, "gradient": "model"}, "steps.1: .*gradient: model"),
])
def test_out_of_core_refuses_whole_model_steps_before_any_work(tmp_path, model_dir, step, words):
    recipe = _recipe(model_dir, tmp_path / "out", [{"method": "wanda", "sparsity": 0.5}, step], offload="disk")
    with pytest.raises(ValueError, match=words):
        run_recipe(recipe, progress=False, echo=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_cli_run_takes_offload_run_dir_and_resume(tmp_path, model_dir, capsys):
    import yaml
    from prunekit.cli import main
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_dir), "steps": CHAIN[:2],
                                    "calibration": {"samples": 4, "seqlen": 16}}))
    assert main(["run", str(path), "--offload", "disk", "--dry-run"]) == 0
    assert "offload: disk" in capsys.readouterr().out
    assert main(["run", str(path), "--resume"]) == 2
    assert "--resume continues a recorded run: give its --run-dir" in capsys.readouterr().err
