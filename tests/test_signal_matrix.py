"""Issue 21: SIGINT and SIGTERM at random points of every long command, in every mode (the cells
tests/test_interrupt.py does not cover).

The matrix: prune (in memory, --offload disk, --nproc 2), run (in memory, --offload disk), recover, eval and
sweep, each x {SIGINT, SIGTERM}. A cell runs the command once uninterrupted (the reference, which also counts
the points where a signal may arrive), then again with the signal sent at one of those points, drawn at
random, and checks:

* exit 130 (SIGINT) or 143 (SIGTERM), no traceback, and one line on stderr after the progress output: the
  `prunekit: interrupted ...` line, which is the last one;
* nothing half-written: --out and --json are absent, or, where the line says they had been written
  completely, equal to the reference; no `.NAME.tmp-*` / `.NAME.old-*` / `.NAME.steps-*` staging folder or
  temporary file is left beside them (or, for a sweep, inside its folder), and a sweep's rows are whole;
* where the command records its progress (--run-dir for prune and run, the checkpoint folder of recover, the
  sweep folder), the same command with --resume (a sweep: the same command) finishes with the reference's
  weights (a sweep: its rows), bit for bit.

The points ("ticks") are deterministic, not timed: every forward of a decoder block in the main thread and
every rename into place (os.replace / os.rename, counted after the rename). The in-process cells send the
signal to this process from the tick itself (`os.kill`, so the handler `prunekit.cli.main` installed raises
right there); the --nproc 2 cells run the real launcher, torchrun and two workers, and rank 0 pauses at its
tick (a sitecustomize hook) until the test has sent the signal to the launcher, as a user's Ctrl-C or
`kill` would. PRUNEKIT_SIGNAL_SEED=N replays the points of a failed run (each failure message names its
seed).
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import llama, saved_tensors, tiny_tokenizer
from prunekit.cli import main

SEED = int(os.environ.get("PRUNEKIT_SIGNAL_SEED", random.SystemRandom().randrange(2**32)))
SIGNALS = {"SIGINT": (signal.SIGINT, 130, "interrupted"), "SIGTERM": (signal.SIGTERM, 143, "interrupted (SIGTERM)")}
SRC = Path(__file__).resolve().parents[1] / "src"

pytestmark = pytest.mark.usefixtures("default_signal_dispositions")


def rng_for(cell: str) -> random.Random:
    return random.Random(f"{SEED}-{cell}")


# --------------------------------------------------------------------------------------------- ticks

class Ticker:
    """Counts the points where a signal may arrive; at tick number `fire` (if any) sends `signum` to this
    process. Only the main thread counts (a signal sent from a worker thread would arrive a moment later)."""

    def __init__(self, fire: int | None = None, signum: int | None = None):
        self.count, self.fire, self.signum, self.where = 0, fire, signum, None

    def tick(self, where: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.count += 1
        if self.count == self.fire:
            self.where = where
            os.kill(os.getpid(), self.signum)          # the handler raises here, in the main thread


def run_ticking(argv: list[str], ticker: Ticker, monkeypatch, capsys) -> tuple[int, str]:
    """`main(argv)` with `ticker` counting block forwards and renames; returns (exit status, stderr)."""
    real_call, real_replace, real_rename = torch.nn.Module.__call__, os.replace, os.rename

    def call(module, *args, **kwargs):
        if type(module).__name__.endswith("DecoderLayer"):
            ticker.tick(f"forward of {type(module).__name__}")
        return real_call(module, *args, **kwargs)

    def replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        ticker.tick(f"after os.replace(..., {Path(target).name})")

    def rename(source, target, *args, **kwargs):
        real_rename(source, target, *args, **kwargs)
        ticker.tick(f"after os.rename(..., {Path(target).name})")

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "__call__", call)
        patch.setattr(os, "replace", replace)
        patch.setattr(os, "rename", rename)
        code = main(argv)
    return code, capsys.readouterr().err


def lines_after_progress(err: str) -> list[str]:
    """The non-empty lines after the last progress-bar output (a bar redraws with \\r, ends with \\n)."""
    lines = err.replace("\r", "\n").split("\n")
    last = max((i for i, line in enumerate(lines) if re.search(r"\d+%\|", line)), default=-1)
    return [line.strip() for line in lines[last + 1:] if line.strip()]


def check_one_line(err: str, name: str, code: int, command: str, why: str) -> str:
    signum, status, word = SIGNALS[name]
    assert code == status, f"{why}: exit {code}\n{err}"
    assert "Traceback" not in err and "error:" not in err, f"{why}\n{err}"
    after = lines_after_progress(err)
    assert len(after) == 1 and after[0].startswith(f"prunekit: {word} during {command}"), f"{why}\n{err}"
    return after[0]


def written_paths(line: str) -> list[Path]:
    """The outputs the interrupted line says were written completely ("after A and B had been written ...")."""
    found = re.search(r", after (.+?) had been written completely", line)
    return [Path(text) for text in found.group(1).split(" and ")] if found else []


def leftovers(folder: Path, name: str) -> list[str]:
    """Staging folders and temporary files of `name` beside it, in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def same_weights(a: Path, b: Path, why: str) -> None:
    expected, got = saved_tensors(a), saved_tensors(b)
    assert sorted(got) == sorted(expected), why
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{why}: {key}"


# --------------------------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-block tiny Llama with a tokenizer, and a magnitude-pruned copy of it (what recover starts from)."""
    root = tmp_path_factory.mktemp("signals")
    model = root / "llama4"
    llama(num_hidden_layers=4).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    pruned = root / "pruned"
    assert main(["prune", str(model), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out",
                 str(pruned)]) == 0
    return {"model": model, "pruned": pruned, "references": {}}


CALIB = ["--samples", "4", "--seqlen", "16"]


def recipe_file(folder: Path, model: Path, out: Path) -> Path:
    """Width, then unstructured, then depth: a run with a step checkpoint between steps."""
    path = folder / "recipe.yaml"
    path.write_text(f"model: {model}\ncalibration: {{samples: 4, seqlen: 16}}\n"
                    "steps:\n- {method: flap, sparsity: 0.2, round_to: 4}\n- {method: sparsegpt, sparsity: 0.5}\n"
                    "- {method: block-influence, layers: 1}\n"
                    f"export: {{path: {out}}}\n")
    return path


def command(kind: str, models, folder: Path) -> dict:
    """argv of one command, the paths it writes (out, json, progress) and how it is resumed."""
    model, out, report, run_dir = models["model"], folder / "out", folder / "report.json", folder / "run"
    if kind in ("prune", "prune-disk"):
        argv = ["prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5", *CALIB, "--set",
                "eval.max_tokens=64", "--out", str(out), "--json", str(report), "--run-dir", str(run_dir)]
        argv += ["--offload", "disk"] if kind == "prune-disk" else []
        return {"argv": argv, "out": out, "json": report, "resume": argv + ["--resume"], "name": "prune (sparsegpt)"}
    if kind in ("run", "run-disk"):
        argv = ["run", str(recipe_file(folder, model, out)), "--json", str(report), "--run-dir", str(run_dir)]
        argv += ["--offload", "disk"] if kind == "run-disk" else []
        return {"argv": argv, "out": out, "json": report, "resume": argv + ["--resume"], "name": "run"}
    if kind == "recover":
        argv = ["recover", str(models["pruned"]), "--method", "lora", "--steps", "6", "--checkpoint-every", "2",
                "--batch-size", "2", "--seqlen", "16", "--rank", "2", "--lr", "1.0e-3", "--out", str(out),
                "--json", str(report)]
        return {"argv": argv, "out": out, "json": report, "resume": argv + ["--resume"], "name": "recover (lora)"}
    if kind == "eval":
        argv = ["eval", str(model), "--suite", "perplexity,fidelity", "--baseline", str(model), "--seqlen", "16",
                "--max-tokens", "128", "--fidelity-tokens", "32", "--json", str(report)]
        return {"argv": argv, "out": None, "json": report, "resume": None, "name": "eval"}
    recipe = folder / "sweep.yaml"
    recipe.write_text(f"model: {model}\ncalibration: {{samples: 4, seqlen: 16}}\n"
                      "steps: [{method: wanda, sparsity: 0.5}]\neval: {seqlen: 16, max_tokens: 64}\n")
    argv = ["sweep", str(recipe), "--grid", "steps.0.sparsity=0.3,0.5", "steps.0.method=wanda,magnitude", "--out",
            str(out)]
    return {"argv": argv, "out": out, "json": None, "resume": argv, "name": "sweep"}


def reference(kind: str, models, tmp_path_factory, monkeypatch, capsys) -> dict:
    """The uninterrupted run of `kind` (once per module), with the number of ticks it passes."""
    if kind not in models["references"]:
        folder = tmp_path_factory.mktemp(f"reference-{kind}")
        cmd = command(kind, models, folder)
        ticker = Ticker()
        code, err = run_ticking(cmd["argv"], ticker, monkeypatch, capsys)
        assert code == 0, err
        models["references"][kind] = {**cmd, "ticks": ticker.count}
    return models["references"][kind]


def sweep_rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return sorted(({k: row[k] for k in ("id", "metrics", "achieved_sparsity")} for row in rows), key=str)


# --------------------------------------------------------------------------------------------- in process

KINDS = ["prune", "prune-disk", "run", "run-disk", "recover", "eval", "sweep"]


@pytest.mark.parametrize("name", sorted(SIGNALS))
@pytest.mark.parametrize("kind", KINDS)
def test_a_signal_at_a_random_point(kind, name, models, tmp_path, tmp_path_factory, monkeypatch, capsys):
    ref = reference(kind, models, tmp_path_factory, monkeypatch, capsys)
    fire = rng_for(f"{kind}-{name}").randint(1, ref["ticks"])
    cmd = command(kind, models, tmp_path)
    ticker = Ticker(fire, SIGNALS[name][0])
    code, err = run_ticking(cmd["argv"], ticker, monkeypatch, capsys)
    why = f"{kind} {name} at tick {fire} of {ref['ticks']} ({ticker.where}; PRUNEKIT_SIGNAL_SEED={SEED})"
    assert ticker.where is not None, why
    line = check_one_line(err, name, code, cmd["name"], why)

    for key in ("out", "json"):
        path = cmd[key]
        if path is None:
            continue
        assert leftovers(path.parent, path.name) == [], why
        if kind == "sweep":
            continue                                    # a sweep keeps its finished rows, by design
        if path in written_paths(line):
            assert path.exists(), why
            if key == "out":
                same_weights(ref["out"], path, why)
        else:
            assert not path.exists(), f"{why}: {path} exists\n{line}"
    if kind == "sweep" and cmd["out"].exists():
        assert not [p.name for p in cmd["out"].rglob(".*")], why          # no temporary file inside
        text = (cmd["out"] / "results.jsonl").read_text() if (cmd["out"] / "results.jsonl").exists() else ""
        assert text == "" or text.endswith("\n"), why                         # whole rows only

    if cmd["resume"] is None or (cmd["out"] is not None and cmd["out"].exists() and kind != "sweep"):
        return                                          # eval records nothing; a finished export needs no resume
    capsys.readouterr()
    code = main(cmd["resume"])
    assert code == 0, f"{why}: the resumption failed\n{capsys.readouterr().err}"
    if kind == "sweep":
        assert sweep_rows(cmd["out"]) == sweep_rows(ref["out"]), why
    else:
        same_weights(ref["out"], cmd["out"], why)


# --------------------------------------------------------------------------------------------- --nproc 2

# rank 0 of a torchrun worker pauses at its PRUNEKIT_TICK-th decoder-block forward in its main thread: it writes
# the marker file, then waits (up to a minute) for the signal the test sends to the launcher
SITECUSTOMIZE = '''
import os
if os.environ.get("PRUNEKIT_TICK") and os.environ.get("RANK") == "0":
    import threading
    import time
    import torch
    _fire, _marker = os.environ["PRUNEKIT_TICK"].split(":", 1)
    _real, _count = torch.nn.Module.__call__, [0]

    def _call(module, *args, **kwargs):
        if type(module).__name__.endswith("DecoderLayer") and threading.current_thread() is threading.main_thread():
            _count[0] += 1
            if _count[0] == int(_fire):
                open(_marker, "w").close()
                for _ in range(600):
                    time.sleep(0.1)
        return _real(module, *args, **kwargs)

    torch.nn.Module.__call__ = _call
'''


def nproc_env(tmp_path: Path, tick: str | None = None) -> dict:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(SRC)]), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1"}
    env.pop("WORLD_SIZE", None)
    env.pop("PRUNEKIT_TICK", None)
    if tick:
        env["PRUNEKIT_TICK"] = tick
    return env


def nproc_argv(model: Path, out: Path, run_dir: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "prunekit", "prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5",
            *CALIB, "--no-eval", "--set", "calibration.batch_size=1", "--out", str(out)]
    return argv + (["--run-dir", str(run_dir)] if run_dir else [])


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_signal_to_a_2_process_prune(name, models, tmp_path):
    """The launcher passes the signal on to torchrun, which stops both workers: exit 130/143, one line from the
    launcher after the workers' own, nothing written. With --run-dir (the SIGTERM cell), `--nproc 2 --resume`
    ends equal to one uninterrupted process (same OMP_NUM_THREADS)."""
    signum, status, word = SIGNALS[name]
    # rank 0 runs 10 block forwards in its main thread (4 blocks, 2 windows of its own, the lockstep threads
    # run the others)
    fire = rng_for(f"nproc-{name}").randint(1, 10)
    out, marker = tmp_path / "out", tmp_path / "paused"
    run_dir = tmp_path / "run" if name == "SIGTERM" else None
    argv = nproc_argv(models["model"], out, run_dir) + ["--nproc", "2"]
    why = f"--nproc 2 {name} at rank 0's block forward {fire} (PRUNEKIT_SIGNAL_SEED={SEED})"
    proc = subprocess.Popen(argv, env=nproc_env(tmp_path, f"{fire}:{marker}"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        while not marker.exists():
            assert proc.poll() is None, f"{why}: ended before its tick\n{proc.stderr.read()}"
            assert time.monotonic() - started < 120, f"{why}: no tick in 120 s"
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, f"{why}: exit {proc.returncode}\n{err}"
    assert "Traceback" not in err, f"{why}\n{err}"
    # rank 0's line (what was interrupted, what was written), then the launcher's; rank 1 and torchrun are quiet
    assert lines_after_progress(err) == [
        f"prunekit: {word} during prune (sparsegpt); nothing was written to {out}" + (
            " (rerun with --run-dir DIR to be able to --resume)" if run_dir is None else
            f"; the finished blocks are recorded in {run_dir}: rerun the same command with --resume to continue "
            "from the last finished block"),
        f"prunekit: {word} during prune --nproc; torchrun stopped its processes (their lines above)"], f"{why}\n{err}"
    assert not out.exists() and leftovers(tmp_path, "out") == [], why
    if run_dir is None:
        return
    one = subprocess.run(nproc_argv(models["model"], tmp_path / "whole", None), env=nproc_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    resumed = subprocess.run(argv + ["--resume"], env=nproc_env(tmp_path), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, f"{why}: the resumption failed\n{resumed.stderr[-3000:]}"
    same_weights(tmp_path / "whole", out, why)
    shutil.rmtree(run_dir, ignore_errors=True)


def test_torchrun_answers_a_signal_with_an_exit_status_not_a_traceback(monkeypatch):
    """Found by this matrix: after Ctrl-C or SIGTERM, torchrun stopped the workers, then raised SignalException,
    whose traceback (and a timestamped warning per worker) ended the output of `prunekit prune --nproc 2`."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from prunekit import distributed

    def interrupted(argv):
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)
    monkeypatch.setattr(torch.distributed.run, "main", interrupted)
    monkeypatch.setenv("LOGLEVEL", "WARNING")            # as a user may set it: left as it is
    assert distributed.torchrun(["--standalone", "-m", "prunekit"]) == 143
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command, env: launched.append(command) or 0)
    assert distributed.launch(["prune", "m"], 2) == 0
    assert launched[0][1:3] == ["-m", "prunekit.distributed"]
