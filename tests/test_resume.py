"""Resumable runs: a killed run continues from its last finished block and ends bit-identical."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import llama, saved_tensors, tiny_tokenizer
from prunekit.api import run_recipe
from prunekit.recipe import recipe_from_dict
from prunekit.io.runs import Recorded

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """An 8-block Llama: enough blocks to interrupt a run in the middle."""
    path = tmp_path_factory.mktemp("models") / "deep-llama"
    llama(num_hidden_layers=8).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _recipe(model, out, offload="none", sparsity=0.5, method="sparsegpt"):
    return recipe_from_dict({"model": str(model), "offload": offload,
                             "calibration": {"samples": 4, "seqlen": 16, "seed": 0},
                             "steps": [{"method": method, "sparsity": sparsity}],
                             "export": {"path": str(out)}})


def _quiet(*_):
    pass


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_interrupted_run_resumes_identically(tmp_path, deep_model_dir, monkeypatch, offload):
    run_recipe(_recipe(deep_model_dir, tmp_path / "whole", offload), progress=False, echo=_quiet)
    expected = saved_tensors(tmp_path / "whole")

    original = Recorded.done

    def crash_after_block_2(self, index, records, hidden):
        original(self, index, records, hidden)
        if index == 2:
            raise KeyboardInterrupt                     # Ctrl-C right after block 2 was recorded
    monkeypatch.setattr(Recorded, "done", crash_after_block_2)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(deep_model_dir, tmp_path / "out", offload), progress=False, echo=_quiet, run_dir=run)
    monkeypatch.setattr(Recorded, "done", original)
    manifest = json.loads((run / "manifest.json").read_text())
    assert sorted(manifest["steps"]["0"], key=int) == ["0", "1", "2"]
    assert not (tmp_path / "out").exists()

    with pytest.raises(ValueError, match="--resume"):
        run_recipe(_recipe(deep_model_dir, tmp_path / "out", offload), progress=False, echo=_quiet, run_dir=run)
    result = run_recipe(_recipe(deep_model_dir, tmp_path / "out", offload), progress=False, echo=_quiet,
                        run_dir=run, resume=True)
    layers = result["steps"][0]["layers"]                        # blocks 0..2 restored from the manifest
    assert [layer["block"] for layer in layers] == [b for b in range(8) for _ in range(7)]
    got = saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_crash_between_the_activations_and_the_manifest_resumes_identically(tmp_path, deep_model_dir, monkeypatch):
    """Killed after block 3's activations were written but before the manifest named block 3:
    the resumption must start at block 3 from the activations after block 2, not from the newer file."""
    from prunekit.io.runs import Run
    run_recipe(_recipe(deep_model_dir, tmp_path / "whole"), progress=False, echo=_quiet)
    original = Run._save

    def crash_when_block_3_is_recorded(self):
        if "3" in self.manifest["steps"].get("0", {}):
            raise KeyboardInterrupt
        original(self)
    monkeypatch.setattr(Run, "_save", crash_when_block_3_is_recorded)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(deep_model_dir, tmp_path / "out"), progress=False, echo=_quiet, run_dir=run)
    monkeypatch.setattr(Run, "_save", original)
    assert sorted(p.name for p in run.glob("activations-*")) == [
        "activations-step0-block2-rank0.safetensors", "activations-step0-block3-rank0.safetensors"]
    run_recipe(_recipe(deep_model_dir, tmp_path / "out"), progress=False, echo=_quiet, run_dir=run, resume=True)
    expected, got = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert [p.name for p in run.glob("activations-*")] == ["activations-step0-block7-rank0.safetensors"]


def test_resume_refuses_changed_recipe_or_weights(tmp_path, deep_model_dir):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(deep_model_dir, model)
    run = tmp_path / "run"
    run_recipe(_recipe(model, tmp_path / "a", method="magnitude"), progress=False, echo=_quiet, run_dir=run)
    with pytest.raises(ValueError, match=r"recipe changed \(steps\).*new --run-dir"):
        run_recipe(_recipe(model, tmp_path / "b", sparsity=0.6, method="magnitude"), progress=False,
                   echo=_quiet, run_dir=run, resume=True)
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    from safetensors.torch import save_file
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"inputs changed \(model.safetensors\)"):
        run_recipe(_recipe(model, tmp_path / "c", method="magnitude"), progress=False, echo=_quiet,
                   run_dir=run, resume=True)
    # nothing recorded there yet (a run interrupted before its first block): --resume starts from the beginning
    run_recipe(_recipe(model, tmp_path / "d", method="magnitude"), progress=False, echo=_quiet,
               run_dir=tmp_path / "empty", resume=True)
    assert (tmp_path / "empty" / "manifest.json").is_file() and (tmp_path / "d" / "model.safetensors").is_file()


def _tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    order, todo = [], [root]
    while todo:
        pid = todo.pop()
        order.append(pid)
        todo += children.get(pid, [])
    return order


def _kill_when(cmd, env, run: Path, out: Path, ready) -> None:
    """Start `cmd`; once `ready(run, steps)` holds (steps: the manifest's finished blocks per
    step), SIGKILL it and every process it started (torchrun and its workers). A run that
    finishes first is cleared away and started again, three times at most."""
    import shutil
    for _attempt in range(3):
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            try:
                steps = json.loads((run / "manifest.json").read_text())["steps"]
            except (OSError, ValueError):
                steps = {}
            if ready(run, steps):
                for pid in _tree(proc.pid):     # torchrun starts its workers in sessions of their own
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                return
            time.sleep(0.005)
    pytest.fail("the run finished before it could be killed three times")


def test_sigkill_then_resume(tmp_path, deep_model_dir):
    """SIGKILL a CLI run once block 1 is recorded, resume it, compare with an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "prunekit", "prune", str(deep_model_dir), "--method", "sparsegpt",
            "--sparsity", "0.5", "--samples", "8", "--seqlen", "16", "--no-eval"]
    subprocess.run(base + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    cmd = base + ["--out", str(tmp_path / "out"), "--run-dir", str(run)]
    _kill_when(cmd, env, run, tmp_path / "out", lambda run, steps: len(steps.get("0", {})) >= 2)
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True)
    expected, got = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_sigkill_of_a_2_process_run_then_resume(tmp_path, deep_model_dir, offload):
    """`prunekit prune --nproc 2 --run-dir`: kill torchrun and both workers once block 2 is
    recorded, resume with 2 processes: equal to one uninterrupted process (same thread count).
    Resuming with another number of processes is refused."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("WORLD_SIZE", None)
    base = [sys.executable, "-m", "prunekit", "prune", str(deep_model_dir), "--method", "sparsegpt",
            "--sparsity", "0.5", "--samples", "8", "--seqlen", "16", "--no-eval", "--offload", offload,
            "--set", "calibration.batch_size=2"]
    subprocess.run(base + ["--out", str(tmp_path / "whole")], env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    cmd = base + ["--out", str(tmp_path / "out"), "--run-dir", str(run), "--nproc", "2"]
    _kill_when(cmd, env, run, tmp_path / "out", lambda run, steps: len(steps.get("0", {})) >= 3)
    assert not (tmp_path / "out").exists()
    kept = {p.name.rsplit("-", 1)[1] for p in run.glob("activations-*")}
    assert kept == {"rank0.safetensors", "rank1.safetensors"}           # each process's own windows
    one = subprocess.run(base + ["--out", str(tmp_path / "out"), "--run-dir", str(run), "--resume"], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 2 and "inputs changed (processes)" in one.stderr
    two = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    expected, got = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_run_dir_refuses_unmerged_eora_and_resume_without_a_run_dir(tmp_path, deep_model_dir):
    recipe = recipe_from_dict({"model": str(deep_model_dir), "steps": [{"method": "wanda", "sparsity": 0.5},
                                                                       {"method": "eora", "rank": 2}]})
    with pytest.raises(ValueError, match="merge: false.*set merge: true"):
        run_recipe(recipe, progress=False, echo=_quiet, run_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="run_dir"):
        run_recipe(recipe, progress=False, echo=_quiet, resume=True)


CHAIN = [{"method": "flap", "sparsity": 0.2, "round_to": 4}, {"method": "sparsegpt", "sparsity": 0.5},
         {"method": "block-influence", "layers": 2}]


def _chain(model, out, offload="none"):
    return recipe_from_dict({"model": str(model), "offload": offload,
                             "calibration": {"samples": 4, "seqlen": 16, "seed": 0},
                             "steps": CHAIN, "export": {"path": str(out)}})


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_multi_step_run_resumes_after_its_last_finished_step(tmp_path, deep_model_dir, monkeypatch, offload):
    """Width, then unstructured, then depth, with --run-dir: interrupted in the middle of the
    unstructured step (after two of its blocks), resumed from the width step's checkpoint and the
    recorded blocks, the result is the uninterrupted one."""
    run_recipe(_chain(deep_model_dir, tmp_path / "whole", offload), progress=False, echo=_quiet)
    expected = saved_tensors(tmp_path / "whole")
    original = Recorded.done

    def stop_after_two_blocks(self, index, records, hidden):
        original(self, index, records, hidden)
        if index == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Recorded, "done", stop_after_two_blocks)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_chain(deep_model_dir, tmp_path / "out", offload), progress=False, echo=_quiet, run_dir=run)
    assert (run / "step0" / "prunekit.json").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(Recorded, "done", original)
    lines = []
    result = run_recipe(_chain(deep_model_dir, tmp_path / "out", offload), progress=False, echo=lines.append,
                        run_dir=run, resume=True)
    assert any("steps 0..0: finished in an earlier session" in line for line in lines)
    got = saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert [s["method"] for s in result["steps"]] == ["flap", "sparsegpt", "block-influence"]
    assert not (run / "step0").exists() and (run / "step1" / "prunekit.json").is_file()   # only the latest


def test_out_of_core_export_records_the_step_and_a_model_card(tmp_path, deep_model_dir):
    """`--offload disk` writes the same prunekit.json step record (per-layer sparsity) as the
    in-memory run, and the model card, inside the atomic export."""
    memory = run_recipe(_recipe(deep_model_dir, tmp_path / "memory"), progress=False, echo=_quiet)
    run_recipe(_recipe(deep_model_dir, tmp_path / "disk", offload="disk"), progress=False, echo=_quiet)
    record = json.loads((tmp_path / "disk" / "prunekit.json").read_text())
    [step] = record["steps"]
    assert step["method"] == "sparsegpt" and step["sparsity_of_pruned_layers"] == pytest.approx(0.5)
    layers = {layer["name"]: layer["zeros"] for layer in step["layers"]}
    assert layers == {layer["name"]: layer["zeros"] for layer in memory["steps"][0]["layers"]}
    card = (tmp_path / "disk" / "README.md").read_text()
    assert "library_name: transformers" in card and "50.00% of the pruned layers' weights are zero" in card


def test_sigkill_in_a_multi_step_out_of_core_run_then_resume(tmp_path, deep_model_dir):
    """`prunekit run` of width + unstructured + depth out of core, SIGKILLed once the width step's
    checkpoint and a block of the unstructured step are recorded; `--resume` ends identical."""
    import yaml
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}

    def recipe(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({"model": str(deep_model_dir), "offload": "disk",
                                        "calibration": {"samples": 8, "seqlen": 16, "seed": 0},
                                        "steps": CHAIN, "export": {"path": str(tmp_path / out)}}))
        return [sys.executable, "-m", "prunekit", "run", str(path)]
    subprocess.run(recipe("whole"), env=env, check=True, capture_output=True)
    run = tmp_path / "run"
    cmd = recipe("out") + ["--run-dir", str(run)]
    _kill_when(cmd, env, run, tmp_path / "out",
               lambda run, steps: (run / "step0" / "prunekit.json").is_file() and len(steps.get("1", {})) >= 1)
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True)
    expected, got = saved_tensors(tmp_path / "whole"), saved_tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
