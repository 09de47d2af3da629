"""Issue 21: a harness that keeps probing the command line with bad input (hypothesis).

Random combinations of `prunekit prune`, `prunekit eval` and `prunekit run --dry-run` flags, valid and not
(out of range, conflicting, wrong types, missing or unreadable files, an --out that exists, is a file, or is
the input model), run in-process on a tiny 2-block Llama. Every run must end one of two ways:

* exit 0 with exactly what was asked: the achieved sparsity recorded in prunekit.json is the requested one
  (and is what the saved weights hold; N:M patterns hold), the blocks or sublayers removed are the number asked
  for, the removed share of a width step is the requested one up to one rounding unit, the perplexity protocol
  has the requested seqlen, stride and token budget, a dry run prints a recipe that loads back to itself;
* exit 2 with one `prunekit: error:` line (argparse's own usage error, also exit 2, for flags it cannot parse)
  and no traceback.

Either way the input model and every file the run was handed stay byte-identical, and nothing is left behind
that was not asked for: no half-written --out, no `.NAME.tmp-*` staging folder beside it, no --json after a
failure, nothing in the working directory.

PRUNEKIT_FUZZ_SCALE=10 multiplies the number of cases (a longer hunt; the default keeps the file near a minute
on two slow cores). The bugs this harness found have plain regression tests at the end of the file.
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from prunekit.cli import main

SCALE = float(os.environ.get("PRUNEKIT_FUZZ_SCALE", "1"))
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
ERROR = re.compile(r"^prunekit(?: [a-z]+)?: error: \S")

LINEAR = ["magnitude", "wanda", "sparsegpt", "ria", "gblm", "pruner-zero"]
WIDTH = ["magnitude-sp", "wanda-sp", "flap", "taylor"]
DEPTH = ["block-influence", "angular", "sleb", "last-k", "laco", "sublayer-drop"]

# the tiny Llama (conftest.LLAMA): 2 blocks, hidden 64, FFN 96, 4 query heads of 16 in 2 KV groups
BLOCKS, HIDDEN, FFN, HEAD_DIM = 2, 64, 96, 16
BLOCK_PARAMS = 4 * HIDDEN * HEAD_DIM * 3 + 3 * HIDDEN * FFN + 2 * HIDDEN   # q,o (64x64), k,v (64x32), MLP, norms


def cases(n: int) -> int:
    return max(1, round(n * SCALE))


# --------------------------------------------------------------------------------------------- the world

@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A private copy of the tiny model, the files a case may be handed, and a working directory."""
    from prunekit.data import load_text
    root = tmp_path_factory.mktemp("fuzz")
    model = Path(shutil.copytree(tiny_model_dir, root / "model"))
    files = root / "files"
    files.mkdir()
    text, _ = load_text("default", "calibration")
    (files / "text.txt").write_text(text[:40_000])
    (files / "empty.txt").write_text("")
    (files / "table.csv").write_text("a,b\n1,2\n")
    (files / "binary.txt").write_bytes(b"\x00\xff" * 64)
    (files / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in text[:40_000].split("\n\n")))
    (files / "bad.jsonl").write_text('{"text": 1}\n')
    (files / "folder").mkdir()
    (files / "folder" / "a.txt").write_text(text[40_000:80_000])
    shutil.copy(Path(__file__).parent / "eval" / "knowledge_small.jsonl", files / "knowledge.jsonl")
    cwd = root / "cwd"
    cwd.mkdir()
    return {"root": root, "model": model, "files": files, "cwd": cwd, "count": [0]}


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too): files by content hash, folders as such."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def fresh_work(world) -> Path:
    world["count"][0] += 1
    work = world["root"] / f"case-{world['count'][0]}"
    work.mkdir()
    return work


def outcome(argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `main(argv)`; argparse's usage errors are SystemExit(2)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def check_the_ending(code, err, argv):
    """Exit 0, or exit 2 with one error line at the end (and argparse's usage above it), never a traceback."""
    assert "Traceback" not in err, f"{argv}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    if code == 0:
        assert not errors, f"{argv}\n{err}"
        return
    assert code == 2, f"exit {code}: {argv}\n{err}"
    assert len(errors) == 1 and ERROR.match(lines[-1]), f"{argv}\n{err}"        # one error line, the last
    if not lines[-1].startswith("prunekit: error:"):          # argparse: usage lines, then its error line
        assert any(line.startswith("usage: prunekit") for line in lines), f"{argv}\n{err}"


def check_nothing_else_changed(before: dict, after: dict, allowed: set[str], argv):
    """`after` is `before` except for the top-level entries named in `allowed` (and what lies under them)."""
    def outside(snap):
        return {k: v for k, v in snap.items() if k.split("/")[0] not in allowed}
    assert outside(after) == outside(before), f"{argv}: unexpected changes {set(outside(after)) ^ set(outside(before))}"


def pick(*groups) -> st.SearchStrategy:
    """One value of `groups`, each a (weight, values) pair: a weight-3 group is drawn three times as often."""
    pool = []
    for weight, values in groups:
        for value in values:
            pool += [value] * weight
    return st.sampled_from(pool)


# --------------------------------------------------------------------------------------------- prune

# What a hostile case may change, flag -> values: out of range, conflicting, of the wrong type, unreadable.
HOSTILE = {
    "method": ["wandaa", "reap", "eora", "lora", "", "WANDA"],
    "sparsity": ["0", "1", "-0.1", "1.5", "nan", "inf", "abc", "", "1e-9", "0.999"],
    "nm": ["3:4", "4:4", "0:4", "2-4", "2:3", "a:b", "2/4", "64:128"],
    "layers": ["0", "-1", "2", "3", "x", "1.5"],
    "sublayers": ["ffn"],
    "experts": ["2"],
    "heads": ["all", "kv"],
    "round_to": ["0", "-8", "1000", "x"],
    "uniform": ["--non-uniform"],
    "per": ["column"],
    "allocation": ["random", "owl"],
    "update": ["sgd", "admm"],
    "eora_rank": ["0", "-1", "100000", "x", "2"],
    "samples": ["0", "-1", "x", "1000000000"],
    "seqlen": ["0", "1", "4096", "x"],
    "calib": ["empty.txt", "table.csv", "binary.txt", "bad.jsonl", "missing.txt", "nope"],
    "out": ["foreign", "file", "input", "parent-file", "export"],
    "export_format": ["gguf", "onnx"],
    "json": ["folder"],
    "offload": ["tape", "disk"],
    "dtype": ["int8"],
    "device": ["cuda:7", "xyz"],
    "cache_device": ["xyz"],
    "sequential": ["yes"],
    "sets": [["calibration.batch_size=0"], ["steps.0.sparsty=0.3"], ["steps.9.sparsity=0.5"], ["steps.0.damp=0.05"],
             ["steps.0.formula=__import__('os')"], ["steps.0.uniform=no"], ["trust_remote_code='no'"],
             ["allow_pickle=yes"], ["calibration.seed=1.5"], ["export.path=3"], ["steps.0.sparsity.x=1"],
             ["model=null"], ["="], ["steps"], ["calibration.seed=!!python/name:os.system"]],
    "model": ["missing", "file", "empty-dir"],
}


@st.composite
def prune_case(draw) -> dict:
    """A valid command line of one kind of method; a hostile case then changes one to three of its flags."""
    kind = draw(pick((4, ["linear"]), (2, ["width"]), (2, ["depth"])))
    method = draw(st.sampled_from({"linear": LINEAR, "width": WIDTH, "depth": DEPTH}[kind]))
    case = {"method": method, "kind": kind}
    if kind == "linear":
        case["nm"] = draw(pick((3, [None]), (1, ["2:4", "4:8", "1:4"])))
        if case["nm"] is None:
            case["sparsity"] = draw(st.sampled_from(["0.5", "0.3", "0.25", "0.6", "0.05", "0.9"]))
        case["per"] = draw(pick((4, [None]), (1, ["row", "layer"])))
        case["allocation"] = draw(pick((4, [None]), (1, ["uniform", "owl", "sensitivity"])))
        case["update"] = draw(pick((4, [None]), (1, ["none", "obs", "admm"])))
        case["eora_rank"] = draw(pick((6, [None]), (1, ["1", "2"])))
        if method == "sparsegpt" and draw(st.booleans()):
            case["sets"] = ["steps.0.damp=0.05"]
        if method == "pruner-zero" and draw(st.booleans()):
            case["sets"] = ["steps.0.formula=abs(W) * X"]
    elif kind == "width":
        case["sparsity"] = draw(st.sampled_from(["0.2", "0.3", "0.1", "0.05", "0.4"]))
        case["heads"] = draw(pick((4, [None]), (1, ["auto", "query", "kv"])))
        case["round_to"] = draw(pick((4, [None]), (1, ["1", "8", "16"])))
        case["uniform"] = draw(pick((3, [None]), (1, ["--uniform", "--non-uniform"])))
    else:
        case["sublayers"] = draw(st.sampled_from([None, "attention", "mlp", "both"])) \
            if method == "sublayer-drop" else None
        most = 3 if case["sublayers"] == "both" else 1
        if draw(st.booleans()):
            case["layers"] = str(draw(st.integers(1, most)))
        else:
            case["sparsity"] = draw(st.sampled_from(["0.5", "0.4", "0.6"] + (["0.25", "0.7"] if most == 3 else [])))
    case["samples"] = draw(pick((4, ["2"]), (1, ["1", "3"])))
    case["seqlen"] = draw(pick((4, ["16"]), (1, ["8", "2"])))
    case["calib"] = draw(pick((4, [None]), (1, ["text.txt", "code", "docs.jsonl", "folder"])))
    case["eval"] = draw(pick((4, [False]), (1, [True])))
    case["out"] = draw(pick((4, ["new"]), (1, [None, "nested", "export"])))
    case["overwrite"] = case["out"] == "export" or draw(pick((4, [False]), (1, [True])))
    case["json"] = draw(pick((4, [None]), (2, ["file"]), (1, ["missing-parent"])))
    if case["out"] is None and case["json"] is None:
        case["json"] = "file"
    case["export_format"] = draw(pick((6, [None]), (1, ["safetensors"])))
    case["offload"] = draw(pick((8, [None]), (1, ["none", "cpu"])))
    case["dtype"] = draw(pick((8, [None]), (1, ["float32", "bfloat16"])))
    case["device"] = draw(pick((8, [None]), (1, ["cpu", "auto"])))
    case["cache_device"] = draw(pick((8, [None]), (1, ["cpu"])))
    case["sequential"] = draw(pick((8, [None]), (1, ["true", "block"])))
    case["dry_run"] = draw(pick((12, [False]), (1, [True])))
    case["model"] = "model"
    case.setdefault("sets", [])
    if draw(pick((3, [False]), (2, [True]))):                           # hostile
        for flag in draw(st.lists(st.sampled_from(sorted(HOSTILE)), min_size=1, max_size=3, unique=True)):
            case[flag] = draw(st.sampled_from(HOSTILE[flag]))
            if flag == "out" and case["out"] == "export":
                case["overwrite"] = False                             # an earlier export, and no --overwrite
            if flag == "method":
                case["kind"] = "bad"
    return case


def prune_argv(case: dict, world, work: Path) -> tuple[list[str], dict]:
    """The command line of `case`, and the paths it names (out, json)."""
    files = world["files"]
    model = {"model": world["model"], "missing": work / "no-model", "file": files / "text.txt",
             "empty-dir": work / "empty-dir"}[case["model"]]
    if case["model"] == "empty-dir":
        model.mkdir()
    argv = ["prune", str(model), "--method", case["method"]]
    for flag in ("sparsity", "nm", "layers", "sublayers", "heads", "round_to", "per", "allocation", "update",
                 "eora_rank", "experts", "samples", "seqlen", "export_format", "offload", "dtype", "device",
                 "cache_device", "sequential"):
        if case.get(flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", case[flag]]
    if case.get("uniform"):
        argv.append(case["uniform"])
    if case["calib"] is not None:
        argv += ["--calib", case["calib"] if case["calib"] in ("code", "nope") else str(files / case["calib"])]
    argv += ["--set", "eval.max_tokens=64"] if case["eval"] else ["--no-eval"]
    paths: dict = {}
    out = {"new": work / "out", "nested": work / "a" / "b" / "out", "export": work / "out", "foreign": work / "out",
           "file": work / "out", "input": world["model"], "parent-file": work / "f" / "out"}.get(case["out"])
    if case["out"] == "export":                   # an earlier prunekit export: --overwrite may replace it
        out.mkdir()
        (out / "prunekit.json").write_text(json.dumps({"versions": {"prunekit": "0"}}))
        (out / "config.json").write_text("{}")
        (out / "old.txt").write_text("the previous export")
    elif case["out"] == "foreign":                # someone's folder: never replaced
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case["out"] in ("file", "parent-file"):
        (work / ("out" if case["out"] == "file" else "f")).write_text("a file")
    if out is not None:
        argv += ["--out", str(out)]
        paths["out"] = out
    if case["overwrite"]:
        argv.append("--overwrite")
    report = {"file": work / "result.json", "folder": work, "missing-parent": work / "nowhere" / "r.json"}.get(
        case["json"])
    if report is not None:
        argv += ["--json", str(report)]
        paths["json"] = report
    for override in case["sets"]:
        argv += ["--set", override]
    if case["dry_run"]:
        argv.append("--dry-run")
    return argv, paths


def check_prune_result(case, argv, paths, out_text):
    """A successful prune did exactly what `case` asked for."""
    if case["dry_run"]:
        from prunekit.recipe import dump_recipe, load_recipe
        from prunekit.registry import method_for_config
        recipe = load_recipe(out_text)
        assert dump_recipe(recipe) == out_text, argv
        assert method_for_config(recipe.steps[0]).name == case["method"], argv
        assert (recipe.calibration.samples, recipe.calibration.seqlen) == (int(case["samples"]), int(case["seqlen"]))
        return
    out = paths.get("out")
    if out is not None:
        record = json.loads((out / "prunekit.json").read_text())
        assert "old.txt" not in {p.name for p in out.iterdir()}          # a replaced export is the new one only
    elif paths.get("json") is not None:
        record = json.loads(paths["json"].read_text())
    else:
        return                                                           # nothing written to compare with
    step = record["steps"][0]
    assert step["method"] == case["method"], argv
    kind = case["kind"]
    if kind == "linear":
        asked = nm_fraction(case["nm"]) if case.get("nm") else float(case["sparsity"])
        assert abs(step["sparsity_of_pruned_layers"] - asked) <= 1 / HIDDEN + 1e-9, (argv, step)
        if out is not None and case["offload"] != "disk":
            from prunekit.masks import nm_violations
            saved = {}
            for path in out.glob("*.safetensors"):
                saved.update(load_file(str(path)))
            for layer in step["layers"]:
                weight = saved[layer["name"] + ".weight"]
                assert int((weight == 0).sum()) == layer["zeros"], (argv, layer["name"])
                if case.get("nm"):
                    # a non-uniform allocation gives each block its own N of the same M, around the asked N
                    n, m = (int(v) for v in re.split("[:/]", case["nm"]))
                    if case.get("allocation") in ("owl", "sensitivity"):
                        n = round(layer["requested"] * m)
                    assert layer["requested"] == n / m and nm_violations(weight, n, m) == 0, (argv, layer)
        if case.get("eora_rank") and out is not None:
            adapter = json.loads((out / record["adapter"] / "adapter_config.json").read_text())
            assert adapter["r"] == int(case["eora_rank"]), argv
    elif kind == "width":
        asked = float(case["sparsity"])
        round_to = int(case.get("round_to") or 8)
        # one rounding unit of each group: a KV group (2 query heads + k + v, the largest head unit) and
        # `round_to` FFN channels, as a share of a block
        unit = (2 * 2 * HIDDEN * HEAD_DIM + 2 * HIDDEN * HEAD_DIM + round_to * 3 * HIDDEN) / BLOCK_PARAMS
        assert abs(step["removed_fraction_of_block_params"] - asked) <= unit + 1e-9, (argv, step)
        for width in record["structure"]["widths"]:
            assert width["channels"] % round_to == 0 or width["channels"] == FFN, (argv, width)
            assert width["heads"] % width["kv_heads"] == 0, (argv, width)
        assert record.get("parameters_after", step["model_params_after"]) == step["model_params_after"], argv
    elif kind == "depth":
        candidates = BLOCKS * (2 if case["method"] == "sublayer-drop" and case.get("sublayers") == "both" else 1)
        count = int(case["layers"]) if case.get("layers") else int(float(case["sparsity"]) * candidates + 0.5)
        if case["method"] == "sublayer-drop":
            widths = record["structure"]["widths"]
            gone = 2 * (BLOCKS - len(widths)) + sum((w["heads"] == 0) + (w["channels"] == 0) for w in widths)
            assert gone == count, (argv, record["structure"])
        else:
            assert len(step["removed_blocks"]) == count, (argv, step["removed_blocks"])
            assert record["structure"]["num_blocks"] == BLOCKS - count, argv
    if case["eval"] and kind != "bad" and case["offload"] != "disk":
        protocol = record["pruned_perplexity"]["protocol"]
        assert f"seqlen={case['seqlen']}," in protocol and "first 64 of" in protocol, (argv, protocol)
    calibration = record.get("calibration")
    if calibration is not None:
        assert (calibration["samples"], calibration["seqlen"]) == (int(case["samples"]), int(case["seqlen"])), argv


def nm_fraction(text: str) -> float:
    """"2:4" (or "2/4") -> 0.5, the share of zeros an N:M pattern holds."""
    n, m = (int(v) for v in re.split("[:/]", text))
    return n / m


@settings(max_examples=cases(80), **FUZZ)
@given(case=prune_case())
def test_prune_fuzz(world, case, capsys, monkeypatch):
    monkeypatch.chdir(world["cwd"])
    work = fresh_work(world)
    argv, paths = prune_argv(case, world, work)
    before = {name: snapshot(world[name]) for name in ("model", "files", "cwd")}
    work_before = snapshot(work)
    code, out_text, err = outcome(argv, capsys)
    event(f"exit {code}" + (f" ({case['kind']})" if code == 0 else ""))     # --hypothesis-show-statistics
    check_the_ending(code, err, argv)
    for name, snap in before.items():
        assert snapshot(world[name]) == snap, f"{argv} changed {name}"
    written = {p.relative_to(work).parts[0] for key, p in paths.items() if key in ("out", "json") and code == 0
               and not case["dry_run"] and work in p.parents}
    check_nothing_else_changed(work_before, snapshot(work), written, argv)
    if code == 0:
        check_prune_result(case, argv, paths, out_text)


# --------------------------------------------------------------------------------------------- eval

EVAL_HOSTILE = {
    "suite": ["lm-eval", "bogus", ",", "perplexity,perplexity", "knowledge,", "all"],
    "baseline": ["missing", "pruned"],
    "data": ["empty.txt", "missing.txt", "nope", "table.csv"],
    "domains": [True],
    "seqlen": ["0", "1", "4096", "x"],
    "stride": ["0", "32", "-1"],
    "max_tokens": ["16", "0", "1", "x"],
    "fidelity_tokens": ["0", "-5", "x"],
    "knowledge": ["text.txt", "missing.jsonl", "bad.jsonl"],
    "batch_size": ["0", "-3"],
    "include": ["missing", "folder"],
    "dtype": ["int8"],
    "json": ["folder"],
}


@st.composite
def eval_case(draw) -> dict:
    """A valid `prunekit eval` command line; a hostile case then changes one to three of its flags."""
    case = {"suite": draw(pick((10, ["perplexity"]), (1, ["fidelity", "knowledge", "perplexity,fidelity"])))}
    case["baseline"] = "model" if "fidelity" in case["suite"] or case["suite"] == "all" else \
        draw(st.sampled_from([None, "model"]))
    case["data"] = draw(pick((4, [None]), (1, ["default", "code", "text.txt"])))
    case["domains"] = case["data"] is None and draw(pick((6, [False]), (1, [True])))
    case["seqlen"] = draw(pick((4, ["16"]), (1, ["8", "2"])))
    case["stride"] = draw(pick((4, [None]), (1, ["1", "8", "16"]))) if case["seqlen"] == "16" else None
    case["max_tokens"] = draw(pick((4, ["64"]), (1, ["17", "100"])))
    case["fidelity_tokens"] = draw(pick((4, ["32"]), (1, ["16"])))
    case["knowledge"] = "knowledge.jsonl"
    case["batch_size"] = draw(pick((6, [None]), (1, ["1", "4"])))
    case["include"], case["trust"] = None, False
    case["dtype"] = draw(pick((6, [None]), (1, ["bfloat16"])))
    case["json"] = draw(pick((3, ["file"]), (1, [None, "missing-parent"])))
    if draw(pick((3, [False]), (2, [True]))):                           # hostile
        for flag in draw(st.lists(st.sampled_from(sorted(EVAL_HOSTILE)), min_size=1, max_size=3, unique=True)):
            case[flag] = draw(st.sampled_from(EVAL_HOSTILE[flag]))
            if flag == "include":
                case["trust"] = draw(st.booleans())
    return case


def eval_argv(case, world, work) -> tuple[list[str], dict]:
    files, paths = world["files"], {}
    argv = ["eval", str(world["model"]), "--suite", case["suite"], "--seqlen", case["seqlen"], "--max-tokens",
            case["max_tokens"], "--fidelity-tokens", case["fidelity_tokens"], "--knowledge-data",
            str(files / case["knowledge"])]
    if case["baseline"] is not None:
        argv += ["--baseline", {"model": str(world["model"]), "missing": str(work / "no-model"),
                                "pruned": str(files / "text.txt")}[case["baseline"]]]
    if case["data"] is not None:
        argv += ["--data", case["data"] if case["data"] in ("default", "code", "nope") else str(files / case["data"])]
    if case["domains"]:
        argv.append("--domains")
    for flag in ("stride", "batch_size", "dtype"):
        if case[flag] is not None:
            argv += [f"--{flag.replace('_', '-')}", case[flag]]
    if case["include"] is not None:
        # a real task folder runs lm-eval (seconds to import): only without consent, where it is refused first
        folder = work / "no-tasks" if case["include"] == "missing" else files / "folder"
        argv += ["--lm-eval-include", str(folder)]
    if case["trust"] and case["include"] != "folder":
        argv.append("--trust-remote-code")
    if "lm-eval" in case["suite"] and not (case["include"] == "missing" or case["include"] and not case["trust"]):
        argv[argv.index("--suite") + 1] = "perplexity"      # lm-eval's Hub tasks need the network: not here
    report = {"file": work / "result.json", "folder": work, "missing-parent": work / "nowhere" / "r.json"}.get(
        case["json"])
    if report is not None:
        argv += ["--json", str(report)]
        paths["json"] = report
    return argv, paths


def check_eval_result(case, argv, paths, out_text):
    from prunekit.eval.suites import parse_suites
    asked = set(parse_suites(argv[argv.index("--suite") + 1]))
    assert "sparsity: 0.00% of decoder-block linear weights" in out_text, argv
    if "json" not in paths:
        return
    data = json.loads(paths["json"].read_text())
    perplexities = list((data.get("domains") or {}).values())
    if case["domains"]:
        assert set(data["domains"]) == {"code", "prose"}, argv
        asked.discard("perplexity")
    elif "perplexity" in asked:
        perplexities.append(data["perplexity"])
        asked.discard("perplexity")
    if asked:
        assert set(data["suites"]) - {"perplexity"} == asked, (argv, list(data["suites"]))
    seqlen = int(case["seqlen"])
    for ppl in perplexities:
        protocol = ppl["protocol"]
        assert f"seqlen={seqlen}, stride={case['stride'] or seqlen}," in protocol, (argv, protocol)
        scored = int(re.search(r"tokens scored=(\d+)", protocol).group(1))
        assert 0 < scored <= int(case["max_tokens"]), (argv, protocol)


@settings(max_examples=cases(30), **FUZZ)
@given(case=eval_case())
def test_eval_fuzz(world, case, capsys, monkeypatch):
    monkeypatch.chdir(world["cwd"])
    work = fresh_work(world)
    argv, paths = eval_argv(case, world, work)
    before = {name: snapshot(world[name]) for name in ("model", "files", "cwd")}
    work_before = snapshot(work)
    code, out_text, err = outcome(argv, capsys)
    event(f"exit {code}")
    check_the_ending(code, err, argv)
    for name, snap in before.items():
        assert snapshot(world[name]) == snap, f"{argv} changed {name}"
    written = {paths["json"].relative_to(work).parts[0]} if code == 0 and work in paths.get("json", work).parents \
        else set()
    check_nothing_else_changed(work_before, snapshot(work), written, argv)
    if code == 0:
        check_eval_result(case, argv, paths, out_text)


# --------------------------------------------------------------------------------------------- run --dry-run

VALUES = {   # recipe key -> values a case may give it (valid ones first)
    "model": ["MODEL", "default", None, 3, ["a"]],
    "dtype": ["float32", "bfloat16", "float64", 1],
    "device": ["cpu", "auto", "cuda:1", "tpu", 0],
    "sequential": ["true", "block", True, "false"],
    "offload": ["none", "cpu", "disk", "gpu"],
    "trust_remote_code": [False, True, "no", 0],
    "allow_pickle": [False, "false", 1],
    "calibration.source": ["default", "code", 3, None],
    "calibration.samples": [2, 128, 0, -1, 2.0, True, "2"],
    "calibration.seqlen": [16, 2, 1, "16"],
    "calibration.seed": [0, 7, 1.5, "x", None],
    "calibration.batch_size": [1, 8, 0],
    "eval.seqlen": [16, 1, "x"],
    "eval.stride": [None, 8, 0, 100, "x"],
    "eval.max_tokens": [None, 64, 1, -5],
    "eval.dense": [True, False, "maybe"],
    "export.path": ["out/x", 3, None],
    "export.overwrite": [False, True, "yes please"],
    "export.format": ["safetensors", "gguf", "onnx"],
    "steps.0.sparsity": [0.5, 0.3, 0, 1, -0.5, "0.5", [0.5], None],
    "steps.0.nm": [[2, 4], [4, 8], [4, 4], [2.0, 4], [True, 4], "2:4", [2, 4, 8]],
    "steps.0.per": ["row", "layer", "column"],
    "steps.0.ignore": [["mlp"], "o_proj", [3], "["],
    "steps.0.overrides": [{"o_proj": 0.3}, {"o_proj": 2}, 3, [["a", 0.5]]],
    "steps.0.allocation": ["owl", "random"],
    "steps.0.update": ["obs", "admm", "sgd"],
    "steps.0.method": ["wanda", "sparsegpt", "flap", "block-influence", 3, ["wanda"], "WANDA"],
    "steps.0.layers": [1, 0, 1.0, "1"],
    "steps.0.uniform": [True, False, "no"],
    "steps.0.round_to": [8, 0, 8.0],
    "steps.0.formula": ["abs(W) * X", "W.__class__", "__import__('os')", "(lambda: 1)()", "W ** 2"],
    "steps.1": [{"method": "eora", "rank": 2}, {"method": "eora", "rank": 2.5}, {"method": "eora", "merge": "yes"},
                {"method": "eora", "adapter_dir": "../x"}, "eora"],
}


def _set(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node.extend([None] * (int(parts[-1]) + 1 - len(node)))
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


@st.composite
def recipe_case(draw) -> tuple[dict, list[str], str]:
    """(raw recipe, --set overrides, how the file is written: yaml / binary / tag)."""
    raw = {"model": "MODEL", "steps": [{"method": "wanda", "sparsity": 0.5}]}
    for key in draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True)):
        values = VALUES[key]
        # the first two values of each key are valid: pick them about half of the time
        value = draw(st.sampled_from(values[:2] * max(1, len(values) - 2) + values[2:]))
        if key == "steps.0.nm":
            raw["steps"][0].pop("sparsity", None)
        _set(raw, key, value)
    overrides = []
    for key in draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=2, unique=True)):
        value = draw(st.sampled_from(VALUES[key]))
        overrides.append(f"{key}={json.dumps(value)}")
    overrides += draw(st.lists(st.sampled_from(["steps.0.sparsty=0.3", "steps.5.sparsity=0.5", "steps.0.sparsity.x=1",
                                                "eval.seqlen=[", "steps", "a.b=!!python/object/apply:os.system [x]"]),
                               max_size=1))
    form = draw(pick((12, ["yaml"]), (1, ["binary", "tag", "duplicate", "folder", "missing"])))
    return raw, overrides, form


@settings(max_examples=cases(200), **FUZZ)
@given(case=recipe_case())
def test_run_dry_run_fuzz(world, case, capsys, monkeypatch):
    import yaml

    from prunekit.recipe import dump_recipe, load_recipe
    raw, overrides, form = case
    monkeypatch.chdir(world["cwd"])
    work = fresh_work(world)
    path = work / "recipe.yaml"
    text = yaml.safe_dump(raw, sort_keys=False).replace("MODEL", str(world["model"]))
    if form == "binary":
        path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    elif form == "tag":
        path.write_text(text + "eval: !!python/object/apply:os.system ['touch pwned']\n")
    elif form == "duplicate":
        path.write_text(text + f"steps: [{{method: magnitude, sparsity: 0.5}}]\nmodel: {world['model']}\n")
    elif form == "folder":
        path.mkdir()
    elif form == "yaml":
        path.write_text(text)
    argv = ["run", str(path), "--dry-run", *[item for o in overrides for item in ("--set", o)]]
    before, work_before = snapshot(world["cwd"]), snapshot(work)
    code, out_text, err = outcome(argv, capsys)
    event(f"exit {code}")
    check_the_ending(code, err, argv)
    assert snapshot(world["cwd"]) == before and snapshot(work) == work_before, argv
    if code == 0:
        assert form == "yaml", (form, argv)
        recipe = load_recipe(out_text)
        assert dump_recipe(recipe) == out_text                                 # it loads back to itself
        assert recipe == load_recipe(path, overrides), argv                    # and is what was asked for
        for key in ("trust_remote_code", "allow_pickle"):
            assert isinstance(getattr(recipe, key), bool), argv


# --------------------------------------------------------------------------------------------- the oracle bites

def test_the_oracle_catches_a_leftover_and_a_traceback(tmp_path):
    """The harness's checks are not vacuous: a staging folder left beside --out, a changed input and a
    traceback each fail them."""
    before = snapshot(tmp_path)
    (tmp_path / ".out.tmp-123").mkdir()
    with pytest.raises(AssertionError, match="unexpected changes"):
        check_nothing_else_changed(before, snapshot(tmp_path), {"out"}, ["prune"])
    with pytest.raises(AssertionError):
        check_the_ending(2, "Traceback (most recent call last):\nValueError: x\n", ["prune"])
    with pytest.raises(AssertionError):
        check_the_ending(2, "prune wanda: 0%| 0/2 [00:00<?]prunekit: error: x\n", ["prune"])
    with pytest.raises(AssertionError):
        check_the_ending(1, "", ["prune"])
    check_the_ending(2, "prune wanda: 0%| 0/2 [00:00<?]\nprunekit: error: N:M 2:3 needs ...\n", ["prune"])


# --------------------------------------------------------------------------------------------- what it found

def test_huge_samples_are_refused_before_any_window_is_drawn(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--samples 1000000000 spent 44 s drawing windows, then failed with the allocator's own words; the
    memory check now runs before the windows (and the dense perplexity) are computed."""
    import prunekit.data as data
    monkeypatch.setattr(data, "calibration_windows", lambda *a, **k: pytest.fail("drew the windows first"))
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "1000000000",
                 "--seqlen", "16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1000000000 windows x 16 tokens do not fit. Use --samples" in err.splitlines()[-1]
    assert not out.exists()


def test_an_error_after_a_progress_bar_starts_its_own_line(tiny_model_dir, tmp_path, capsys):
    """`--nm 2:3` fails inside the pruning pass; its message was glued to the progress bar's line."""
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--nm", "2:3", "--samples", "2", "--seqlen", "16",
                 "--no-eval", "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("prunekit: error: N:M 2:3 needs the input dimension (64) to be a multiple of 3")


@pytest.mark.parametrize("text, message", [
    ("trust_remote_code: 'no'", "trust_remote_code must be true or false, got 'no' (write true or false"),
    ("allow_pickle: 'false'", "allow_pickle must be true or false, got 'false'"),
    ("model: [1, 2]", "model must be a string, got [1, 2]"),
    ("model:", "model must be a string, got None"),
    ("device: 3", "device must be a string, got 3"),
    ("device: tpu", "device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    ("cache_device: xyz", "cache_device must be cpu, cuda or cuda:N, got 'xyz'"),
    ("calibration: {seed: x}", "calibration.seed must be an integer, got 'x'"),
    ("calibration: {samples: true}", "calibration.samples must be an integer, got True"),
    ("calibration: {source: 3}", "calibration.source must be a string, got 3"),
    ("eval: {stride: x}", "eval.stride must be an integer or null, got 'x'"),
    ("eval: {dense: maybe}", "eval.dense must be true or false, got 'maybe'"),
    ("export: {overwrite: true}", "export needs a path"),
    ("export: {path: 3}", "export.path must be a string, got 3"),
    ("steps: [{method: 3}]", "steps.0.method must be a method name such as wanda"),
    ("steps: [{method: [wanda]}]", "steps.0.method must be a method name"),
    ("steps: [{method: flap, sparsity: 0.2, uniform: 'no'}]", "steps.0.uniform must be true or false, got 'no'"),
    ("steps: [{method: sparsegpt, sparsity: 0.5, damp: x}]", "steps.0.damp must be a number, got 'x'"),
    ("steps: [{method: sparsegpt, sparsity: 0.5, damp: 1e-2}]", "YAML reads 1e-4 as text, 1.0e-4 as a number"),
    ("steps: [{method: wanda, nm: [true, 4]}]", "steps.0.nm must be a pair of integers such as [2, 4] or null"),
    ("steps: [{method: wanda, sparsity: 0.5, ignore: [3]}]", "steps.0.ignore must be a string or a list of strings"),
    ("steps: [{method: wanda, sparsity: 0.5, overrides: 3}]", "steps.0.overrides must be a mapping"),
    ("steps: [{method: wanda, sparsity: 0.5}, {method: eora, rank: 2, merge: 'yes'}]",
     "steps.1.merge must be true or false, got 'yes'"),
    ("steps: [{method: wanda, sparsity: 0.5}]\nsteps: [{method: magnitude, sparsity: 0.9}]",
     "the key 'steps' is given twice in one mapping"),
])
def test_values_of_the_wrong_type_are_refused_by_name(text, message):
    """Found by the harness: these ran with Python's words as the message ("'int' object is not iterable",
    "'<' not supported between instances of 'int' and 'str'"), failed only after the model was loaded
    (calibration.seed: x), or were accepted: `trust_remote_code: 'no'` and `allow_pickle: 'false'` are
    non-empty strings, so they counted as true and would have let a checkpoint run code."""
    from prunekit.recipe import load_recipe
    if not text.startswith("steps"):
        text += "\nsteps: [{method: wanda, sparsity: 0.5}]"
    with pytest.raises(ValueError) as info:
        load_recipe(text)
    assert message in str(info.value)


def test_a_path_object_is_a_string_in_a_recipe(tmp_path):
    from prunekit.recipe import recipe_from_dict
    recipe = recipe_from_dict({"model": tmp_path, "steps": [{"method": "wanda"}], "export": {"path": tmp_path / "o"}})
    assert recipe.model == str(tmp_path) and recipe.export.path == str(tmp_path / "o")


def test_set_into_a_number_and_a_recipe_that_is_not_text(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: wanda, sparsity: 0.5}]\n")
    assert main(["run", str(recipe), "--dry-run", "--set", "steps.0.sparsity.x=1"]) == 2
    assert "--set steps.0.sparsity.x: steps.0.sparsity is 0.5, not a mapping" in capsys.readouterr().err
    recipe.write_bytes(b"\xff\xfe" + "steps: []".encode("utf-16-le"))
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert f"recipe {recipe} is not UTF-8 text" in capsys.readouterr().err


def test_sublayer_drop_counts_sublayers_in_its_messages(tiny_model_dir, tmp_path, capsys):
    """It said "would remove 4 of the model's 4 blocks" of a 2-block model (4 sublayers)."""
    assert main(["prune", str(tiny_model_dir), "--method", "sublayer-drop", "--layers", "4", "--sublayers", "both",
                 "--samples", "2", "--seqlen", "16", "--no-eval"]) == 2
    assert ("layers=4 would remove 4 of the model's 4 sublayers (attention and FFN); at least one must stay (at most "
            "layers=3)") in capsys.readouterr().err


def test_a_missing_lm_eval_task_folder_is_named_before_anything_loads(tmp_path, capsys, monkeypatch):
    """With --trust-remote-code, a --lm-eval-include folder that does not exist was ignored: lm-eval imported
    for seconds, then failed on the Hub's standard tasks."""
    monkeypatch.setattr("prunekit.io.loading.load", lambda *a, **k: pytest.fail("loaded a model first"))
    assert main(["eval", "default", "--suite", "lm-eval", "--trust-remote-code", "--lm-eval-include",
                 str(tmp_path / "tasks")]) == 2
    assert f"--lm-eval-include {tmp_path / 'tasks'}: no such directory" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--grid", "steps.0.sparsity=!!python/object/apply:os.system ['touch pwned']"],
                                   ["--grid", "steps.0.sparsity=0.5", "--protocol", "seqlen=!!python/name:os.system"]],
                         ids=["grid", "protocol"])
def test_sweep_refuses_python_tags_in_one_line(tmp_path, capsys, monkeypatch, flags):
    """`prunekit sweep` read its recipe, --grid and --protocol values with yaml.safe_load directly: a Python tag
    (refused, nothing ran) ended in a YAML traceback instead of the recipes' one-line refusal."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: magnitude, sparsity: 0.5}]\n")
    assert main(["sweep", str(recipe), *flags, "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert "refused a YAML tag" in err.splitlines()[-1] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_a_low_target_with_an_allocation_keeps_its_budget(method, tiny_model_dir, tmp_path):
    """`--sparsity 0.05 --allocation owl` gave blocks 13% and 0% (OWL's +/- 0.08 clipped at zero after the
    budget was balanced): 6.5% of the weights in all, reported as 13% for magnitude (per layer), whose
    0% block was left out of the pruned layers."""
    from prunekit.allocation import spread
    sparsity = spread([0.0, 1.0], [1, 1], 0.05, 0.08)
    assert sparsity == pytest.approx([0.10, 0.0]) and sum(sparsity) / 2 == pytest.approx(0.05)
    high = spread([0.0, 1.0, 0.5], [1, 2, 1], 0.95, 0.08)                # near the top: at most 0.999 each
    assert max(high) <= 0.999 and (high[0] + 2 * high[1] + high[2]) / 4 == pytest.approx(0.95)
    report = tmp_path / "r.json"
    assert main(["prune", str(tiny_model_dir), "--method", method, "--sparsity", "0.05", "--allocation", "owl",
                 "--samples", "2", "--seqlen", "16", "--no-eval", "--json", str(report)]) == 0
    step = json.loads(report.read_text())["steps"][0]
    assert step["allocation"]["planned"] == pytest.approx(0.05, abs=1 / HIDDEN)
    assert step["sparsity_of_pruned_layers"] == pytest.approx(0.05, abs=1 / HIDDEN) and len(step["layers"]) == 14
