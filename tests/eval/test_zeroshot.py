"""The lm-eval suite really runs through upstream lm-evaluation-harness, offline, on a local task."""
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import tiny_model, word_tokenizer
from prunekit.eval.zeroshot import run_lm_eval

TASK_DIR = Path(__file__).with_name("lm_eval_task")


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, target)
    yaml = target / "prunekit_tiny.yaml"
    yaml.write_text(yaml.read_text().replace("DATA_FILE", str(target / "prunekit_tiny.jsonl")))
    return target


def test_local_task_runs_through_lm_eval(task_dir):
    lines = [line for line in (task_dir / "prunekit_tiny.jsonl").read_text().splitlines()]
    tokenizer = word_tokenizer(["The sun rises in the east west cold hot animal plant four five water trees dark "
                                "bright stone fly swim Two plus two is Fish live in At night the sky is Ice is made "
                                "of Birds can A cat is an Water freezes when it is"] + lines)
    out = run_lm_eval(tiny_model("llama"), tokenizer, ["prunekit_tiny"], limit=None, batch_size=4,
                      include=str(task_dir), trust_remote_code=True)
    assert 0.0 <= out["prunekit_tiny"]["acc"] <= 1.0
    assert out["tasks"] == ["prunekit_tiny"] and out["samples"] == {"prunekit_tiny": 8}
    assert "lm-eval 0.4" in out["protocol"] and "prunekit_tiny" in out["protocol"]


def test_unknown_task_names_the_fix(task_dir):
    with pytest.raises(ValueError, match="--lm-eval-include"):
        run_lm_eval(tiny_model("llama"), None, ["no_such_task_xyz"], include=str(task_dir), trust_remote_code=True)


def _planting_task(task_dir, marker):
    """A task whose YAML names a Python function of its directory; importing that module writes `marker`."""
    (task_dir / "utils.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                       "def doc_to_text(doc):\n    return doc['question']\n")
    yaml = task_dir / "prunekit_tiny.yaml"
    text = yaml.read_text()
    key = next(line.split(":")[0] for line in text.splitlines() if line.startswith("doc_to_text"))
    yaml.write_text("\n".join(f"{key}: !function utils.doc_to_text" if line.startswith("doc_to_text") else line
                              for line in text.splitlines()) + "\n")


def test_a_task_directory_runs_no_code_without_consent(task_dir, tmp_path):
    """The probe: a task YAML's `!function` ran Python from the directory. Without trust_remote_code the
    directory is refused before lm-eval reads it; with it, the function is used (consent given)."""
    marker = tmp_path / "ran.txt"
    _planting_task(task_dir, marker)
    with pytest.raises(ValueError, match="--trust-remote-code"):
        run_lm_eval(tiny_model("llama"), None, ["prunekit_tiny"], include=str(task_dir))
    assert not marker.exists()
    tokenizer = word_tokenizer((task_dir / "prunekit_tiny.jsonl").read_text().splitlines())
    run_lm_eval(tiny_model("llama"), tokenizer, ["prunekit_tiny"], limit=2, batch_size=2, include=str(task_dir),
                trust_remote_code=True)
    assert marker.read_text() == "ran"                # the planted code is real: only consent lets it run


def test_the_cli_refuses_a_task_directory_before_loading_anything(task_dir, tmp_path, capsys, monkeypatch):
    from prunekit.cli import main
    marker = tmp_path / "ran.txt"
    _planting_task(task_dir, marker)
    monkeypatch.setattr("prunekit.io.loading.load", lambda *a, **k: pytest.fail("loaded a model first"))
    assert main(["eval", "default", "--suite", "lm-eval", "--lm-eval-tasks", "prunekit_tiny",
                 "--lm-eval-include", str(task_dir)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()
