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
                      include=str(task_dir))
    assert 0.0 <= out["prunekit_tiny"]["acc"] <= 1.0
    assert out["tasks"] == ["prunekit_tiny"] and out["samples"] == {"prunekit_tiny": 8}
    assert "lm-eval 0.4" in out["protocol"] and "prunekit_tiny" in out["protocol"]


def test_unknown_task_names_the_fix(task_dir):
    with pytest.raises(ValueError, match="--lm-eval-include"):
        run_lm_eval(tiny_model("llama"), None, ["no_such_task_xyz"], include=str(task_dir))
