"""bench/peers.py's ratio and table formatting on hand-made numbers (no peer venv, no model)."""
import pytest
from conftest import load_bench


def _peers():
    return load_bench("peers")


ROWS = [
    {"method": "wanda", "peer": "reference", "prune_s": 100.0, "wall_s": 120.0, "peak_mib": 1000.0, "ppl": 20.0,
     "sparsity": 0.5},
    {"method": "wanda", "peer": "prunekit", "prune_s": 25.0, "wall_s": 40.0, "peak_mib": 1500.0, "ppl": 20.2,
     "sparsity": 0.5},
    {"method": "wanda", "peer": "llmcompressor", "error": "rc 1: boom", "wall_s": 3.0, "peak_mib": 200.0},
    {"method": "sparsegpt", "peer": "prunekit", "prune_s": 10.0, "wall_s": 12.0, "peak_mib": 900.0, "ppl": 18.0,
     "sparsity": 0.5},
]


def test_ratios_against_the_reference_of_the_same_method():
    rows = _peers().add_ratios(ROWS)
    ref, pk, failed, no_ref = rows
    assert ref["time_x"] == ref["peak_x"] == ref["ppl_x"] == 1.0
    assert pk["time_x"] == pytest.approx(0.25) and pk["peak_x"] == pytest.approx(1.5)
    assert pk["ppl_x"] == pytest.approx(1.01)
    assert failed["time_x"] is None and failed["ppl_x"] is None and failed["peak_x"] == pytest.approx(0.2)
    assert no_ref["time_x"] is None and no_ref["peak_x"] is None    # no reference row for sparsegpt
    assert "ratio" not in ROWS[0] and "time_x" not in ROWS[1]         # the input rows are not modified


def test_table_lists_every_row_with_dashes_and_failures():
    text = _peers().format_table(_peers().add_ratios(ROWS))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["method", "peer"] and set(lines[1]) <= {"-", " "}
    pk = next(line for line in lines if "prunekit" in line and line.startswith("wanda"))
    assert pk.split() == ["wanda", "prunekit", "25.0", "40.0", "1500", "20.2000", "50.0000%", "0.25", "1.50", "1.0100"]
    failed = next(line for line in lines if line.startswith("wanda") and "llmcompressor" in line)
    assert failed.split()[2] == "-" and failed.split()[-1] == "-"
    assert lines[-2] == "failed or skipped:" and lines[-1].strip() == "wanda/llmcompressor: rc 1: boom"
