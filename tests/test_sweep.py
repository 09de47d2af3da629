"""`prunekit sweep`: grid parsing, validation before work, resume without recomputation, results tables."""
import csv
import json

import pytest

import prunekit.sweep as sweep
from prunekit.cli import main
from prunekit.sweep import expand_grid, parse_axis, point_id, split_values


def _recipe(tmp_path, model_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {model_dir}\ncalibration: {{samples: 4, seqlen: 32}}\n"
                    "steps: [{method: wanda, sparsity: 0.5}]\neval: {seqlen: 32, max_tokens: 640}\n")
    return path


def test_values_split_outside_brackets_and_parse_as_yaml():
    assert split_values("null,[2,4],0.5") == ["null", "[2,4]", "0.5"]
    assert parse_axis("steps.0.nm=null,[2,4]") == ("steps.0.nm", [None, [2, 4]])
    with pytest.raises(ValueError, match="unbalanced"):
        split_values("[2,4")
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_axis("steps.0.sparsity")


def test_grids_are_products_and_their_union_without_duplicates():
    points = expand_grid([["steps.0.method=a,b", "steps.0.sparsity=0.1,0.5"],
                          ["steps.0.method=a,b", "steps.0.nm=[2,4]"],
                          ["steps.0.sparsity=0.5,0.1", "steps.0.method=b"]])     # all duplicates
    assert [point_id(p) for p in points] == [
        "steps.0.method=a steps.0.sparsity=0.1", "steps.0.method=a steps.0.sparsity=0.5",
        "steps.0.method=b steps.0.sparsity=0.1", "steps.0.method=b steps.0.sparsity=0.5",
        "steps.0.method=a steps.0.nm=[2,4]", "steps.0.method=b steps.0.nm=[2,4]"]


def test_a_bad_point_fails_before_any_work(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("prunekit.io.loading.load", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "sweep"
    assert main(["sweep", str(_recipe(tmp_path, tiny_model_dir)), "--grid", "steps.0.sparsity=0.5,1.5",
                 "--out", str(out)]) == 2
    assert "grid point 'steps.0.sparsity=1.5'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["sweep", str(_recipe(tmp_path, tiny_model_dir)), "--grid", "model=a,b", "--out", str(out)]) == 2
    assert "changes 'model'" in capsys.readouterr().err


GRID = [["steps.0.method=wanda,magnitude", "steps.0.sparsity=0.5"], ["steps.0.method=wanda", "steps.0.nm=[2,4]"]]


def test_sweep_resumes_without_recomputing_finished_points(tiny_model_dir, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, tiny_model_dir)
    whole = sweep.run_sweep(recipe, GRID, tmp_path / "whole", echo=lambda *_: None)
    assert len(whole) == 3

    real = sweep.run_point
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt                      # the user presses Ctrl-C during the second point
        return real(*args, **kwargs)
    monkeypatch.setattr(sweep, "run_point", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(recipe, GRID, out, echo=lambda *_: None)
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 1
    assert (out / "reference").is_dir()

    calls.clear()
    messages = []
    monkeypatch.setattr(sweep, "run_point", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    monkeypatch.setattr("prunekit.eval.suites.reference", lambda *a, **k: pytest.fail("recomputed the reference"))
    rows = sweep.run_sweep(recipe, GRID, out, echo=messages.append)
    done = json.loads(first)["id"]
    assert f"skip {done}: done" in messages
    assert done not in calls and len(calls) == 2
    assert (out / "results.jsonl").read_text().startswith(first)      # the finished row is untouched
    assert [r["id"] for r in rows] == [r["id"] for r in whole]
    for a, b in zip(rows, whole):
        assert a["metrics"]["ppl"] == pytest.approx(b["metrics"]["ppl"], rel=1e-6)
        assert a["achieved_sparsity"] == b["achieved_sparsity"]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [t["id"] for t in table] == [r["id"] for r in whole]
    assert table[2]["nm"] == "2:4" and float(table[2]["achieved_sparsity"]) == 0.5
    assert int(table[2]["parameters_after"]) == rows[2]["parameters"] == 78_144     # the tiny Llama, zeros kept

    calls.clear()                                          # a third run has nothing left to do
    assert len(sweep.run_sweep(recipe, GRID, out, echo=lambda *_: None)) == 3 and calls == []


def test_partial_last_line_is_dropped_and_another_grid_is_refused(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir)
    out = tmp_path / "s"
    grid = [["steps.0.sparsity=0.25"]]
    rows = sweep.run_sweep(recipe, grid, out, echo=lambda *_: None)
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"id": "steps.0.spars')                    # killed mid-write
    assert sweep.read_rows(out) == rows
    assert (out / "results.jsonl").read_text().endswith("}\n")
    with pytest.raises(ValueError, match="another grid"):
        sweep.run_sweep(recipe, [["steps.0.sparsity=0.75"]], out, echo=lambda *_: None)
    with pytest.raises(ValueError, match="another suites"):
        sweep.run_sweep(recipe, grid, out, suites="perplexity,fidelity", echo=lambda *_: None)


QUESTIONS = [{"id": "q1", "category": "geo", "question": "What is the capital of France?", "answers": ["Paris"],
              "choices": ["Paris", "Rome", "Oslo", "Lima"], "correct": 0},
             {"id": "q2", "category": "sci", "question": "What gas do plants take in?", "answers": ["carbon dioxide"],
              "choices": ["oxygen", "carbon dioxide", "helium", "neon"], "correct": 1}]


def test_fidelity_knowledge_and_saved_models(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    assert main(["sweep", str(_recipe(tmp_path, tiny_model_dir)), "--grid", "steps.0.sparsity=0.25,0.5",
                 "--out", str(out), "--suite", "perplexity,fidelity,knowledge", "--save-models",
                 "--protocol", "fidelity_tokens=128", "--protocol", "prompts=2", "--protocol", "new_tokens=4",
                 "--protocol", f"knowledge_data={questions}"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    light, pruned = rows
    for row in rows:
        assert row["metrics"]["kl_mean"] > 0 and 0 <= row["metrics"]["top1_agreement"] <= 1
        assert row["metrics"]["mc_accuracy"] in (0.0, 0.5, 1.0)               # two questions
        assert set(row["metrics"]) == {column for column, _, _ in sweep.METRICS}
    assert light["metrics"]["kl_mean"] < pruned["metrics"]["kl_mean"]
    assert set(pruned["protocol"]) == {"perplexity", "fidelity", "knowledge"}
    model_dir = out / "models" / "steps.0.sparsity=0.5"
    assert (model_dir / "README.md").is_file() and (model_dir / "prunekit.json").is_file()


def test_a_width_point_counts_removed_weights_as_achieved_sparsity(tiny_model_dir, tmp_path):
    rows = sweep.run_sweep(_recipe(tmp_path, tiny_model_dir), [["steps.0.method=wanda-sp", "steps.0.sparsity=0.25"]],
                           tmp_path / "s", echo=lambda *_: None)
    (row,) = rows
    assert row["zero_fraction"] == 0.0
    assert row["parameters_after"] < row["parameters"]
    assert row["achieved_sparsity"] == row["removed_fraction"] > 0.1


def test_sweep_refuses_disk_offload():
    with pytest.raises(ValueError, match="offload: disk is for single runs"):
        sweep.plan({"model": "default", "offload": "disk", "steps": [{"method": "wanda", "sparsity": 0.5}]},
                   [["steps.0.sparsity=0.3,0.5"]])
