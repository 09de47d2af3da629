"""bench/selection_smollm2.py end to end with tiny shapes: (a) calibration selection, (b) recovery data
selection, (c) Light-PEFT, each with its commands (the real run is the lead's, on SmolLM2-135M)."""
import json

import pytest
from conftest import load_bench


def _load():
    return load_bench("selection_smollm2")


def test_selector_lists_are_what_the_commands_accept():
    """(a) runs every selector `prune --calib-select` accepts; (b) every one `recover --data-select` runs."""
    from prunekit.cli import _parser
    from prunekit.selection.select import SELECTORS
    bench = _load()
    prune = next(a for a in _parser()._subparsers._group_actions[0].choices["prune"]._actions
                 if "--calib-select" in a.option_strings)
    assert tuple(prune.choices) == bench.CALIB_SELECTORS
    assert set(bench.RECOVER_SELECTORS) == set(SELECTORS)


def test_selection_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    bench = _load()
    work, out_json, out_md = tmp_path / "work", tmp_path / "sel.json", tmp_path / "sel.md"
    common = ["--tiny", "--model", str(tiny_model_dir), "--in-process", "--work", str(work), "--json", str(out_json),
              "--out", str(out_md)]
    # (a) on one method and pattern with every calibration selector; (b) and (c) prune their own base (wanda 2:4)
    assert bench.main([*common, "--methods", "sparsegpt", "--patterns", "50"]) == 0
    result = json.loads(out_json.read_text())
    assert set(result) >= {"dense", "a", "b", "c", "commands"}

    rows = result["a"]["rows"]
    assert [r["calibration"] for r in rows] == ["plain", *bench.CALIB_SELECTORS]
    assert all(r["sparsity"] == pytest.approx(0.5) and r["ppl"] > 1 for r in rows)
    assert rows[0]["ppl_vs_plain"] == 1.0
    assert "--calib-select" not in rows[0]["prune_command"]
    for row in rows[1:]:
        assert f"--calib-select {row['calibration']} --calib-pool 16" in row["prune_command"]
        assert "chosen by" in row["calib_protocol"]
    assert all(0 <= r["mc_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1 for r in rows)   # knowledge ran

    b = result["b"]
    assert b["base"]["name"] == "wanda-2of4-plain" and "--nm 2:4" in b["base"]["prune_command"]
    pool = b["pool"]
    assert pool["budget_tokens"] == int(0.2 * pool["tokens"])
    assert b["full"]["budget"] == f"{pool['samples']} samples" and b["full"]["share_closed"] == 1.0
    assert b["full"]["windows"] == pool["tokens"] // 32                  # all of the pool, packed
    assert [r["selector"] for r in b["rows"]] == list(bench.RECOVER_SELECTORS)
    for row in b["rows"]:
        assert row["tokens_selected"] <= pool["budget_tokens"] and row["windows"] >= 1
        assert row["steps"] == bench.one_pass_steps(pool["budget_tokens"], bench.parse_args(common))
        assert row["sparsity_after"] == pytest.approx(0.5)                 # the mask survives recovery
        assert f"--data-select {row['selector']} --budget '{pool['budget_tokens']} tokens'" in row["recover_command"]
    assert b["target"]["best"] in bench.RECOVER_SELECTORS or b["target"]["met"] is None

    c = result["c"]
    assert c["light"]["recover_command"].replace(" --light-peft --light-peft-steps 1", "").replace(
        "lora-random-20-light-peft", "lora-random-20") == c["plain"]["recover_command"]
    assert c["trainable"]["light_before"] == c["trainable"]["plain"] > c["trainable"]["light_after"] > 0

    text = out_md.read_text()
    for entry in result["commands"]:                                       # every command is in the markdown
        assert entry["command"] in text
    for section in ("## (a)", "## (b)", "## (c)", "perplexity protocol: source=default", "knowledge protocol:"):
        assert section in text

    # --reuse: nothing runs again; --only picks the parts
    assert bench.main([*common, "--methods", "sparsegpt", "--patterns", "50", "--only", "c", "--reuse"]) == 0
    again = json.loads(out_json.read_text())
    assert "a" not in again and "b" not in again and again["c"]["light"]["ppl"] == c["light"]["ppl"]
    assert all(entry.get("reused") for entry in again["commands"])

    # --equal-steps: the 20% runs train as long as the 100% run, their data repeated (the 100% run is reused)
    assert bench.main([*common, "--only", "b", "--recover-selectors", "random", "--equal-steps", "--reuse"]) == 0
    equal = json.loads(out_json.read_text())["b"]
    assert equal["full"]["ppl"] == b["full"]["ppl"]
    [row] = equal["rows"]
    assert row["steps"] == b["full"]["steps"] > b["rows"][0]["steps"]
    assert f"--steps {row['steps']} " in row["recover_command"] and "passes over" in row["train_protocol"]
    assert f"random 20%, {row['steps']} steps" in out_md.read_text()


def test_selection_bench_refuses_bad_settings(tiny_model_dir):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny"])                                        # the tiny mode needs a tiny model
    with pytest.raises(SystemExit):
        bench.parse_args(["--calib-selectors", "magic"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--samples", "128", "--calib-pool", "128"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--recover-selectors", "perplexity"])             # random is (b)'s baseline
