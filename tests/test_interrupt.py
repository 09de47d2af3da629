"""Ctrl-C and SIGTERM stop any command cleanly (issue 21, part 2).

Exit 130 (SIGINT) or 143 (SIGTERM) within a second or two, one line on stderr after the progress
output (what was interrupted, that nothing was written, how to continue) and no traceback, no
"terminate called without an active exception" (SIGABRT, the lockstep threads outliving the
interrupt), and nothing half-written: no --out, no `.OUT.tmp-*` staging folder.

The subprocess tests interrupt a real `prunekit prune` while its lockstep threads work: the model
is 16 blocks deep and wide enough (384) that SparseGPT spends a few seconds in them, and the
signal is sent once the progress bar shows a finished block. The in-process tests interrupt the
save (where a library may turn the KeyboardInterrupt into an error of its own) and the lockstep.
"""
import faulthandler
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import _thread
from pathlib import Path

import pytest

from conftest import llama
from prunekit.cli import main
from prunekit.io import export
from prunekit.lockstep import Lockstep

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCKS = 16


pytestmark = pytest.mark.usefixtures("default_signal_dispositions")


@pytest.fixture(scope="module")
def deep_model_dir(tiny_model_dir, tmp_path_factory):
    """16 blocks of width 384 (SparseGPT: about a quarter of a second per block on a slow core), with the
    tiny model's tokenizer."""
    path = tmp_path_factory.mktemp("models") / "deep-llama"
    llama(num_hidden_layers=BLOCKS, hidden_size=384, intermediate_size=768).save_pretrained(path)
    for file in tiny_model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, path / file.name)
    return path


def _prune_command(model, out, *extra):
    return [sys.executable, "-m", "prunekit", "prune", str(model), "--method", "sparsegpt", "--sparsity", "0.5",
            "--samples", "8", "--seqlen", "32", "--no-eval", "--out", str(out), *extra]


def _interrupt_while_pruning(command, signum, cwd):
    """Start `command`, send `signum` once the bar shows a finished block (the lockstep threads are
    working on the next one); returns (exit status, stderr, seconds from the signal to the exit)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    err, started = b"", time.monotonic()
    try:
        while not re.search(rb"prune sparsegpt:[^\r\n]*\| *[1-9]\d*/%d" % BLOCKS, err):
            chunk = proc.stderr.read()
            err += chunk or b""
            assert proc.poll() is None, f"the run ended before it could be interrupted:\n{err.decode()}"
            assert time.monotonic() - started < 60, f"no pruning progress in 60 s:\n{err.decode()}"
            time.sleep(0.01)
        sent = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
        seconds = time.monotonic() - sent
        os.set_blocking(proc.stderr.fileno(), True)
        err += proc.stderr.read() or b""
        return proc.returncode, err.decode(errors="replace"), seconds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _lines_after_progress(err: str) -> list[str]:
    """The non-empty lines after the last progress bar output."""
    lines = err.split("\n")
    last = max((i for i, line in enumerate(lines) if "%|" in line), default=-1)
    return [line.strip() for line in lines[last + 1:] if line.strip()]


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted during"),
                                                  (signal.SIGTERM, 143, "interrupted (SIGTERM) during")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_lockstep_threads_prune_stops_cleanly(deep_model_dir, tmp_path, signum, status, word):
    out = tmp_path / "out"
    code, err, seconds = _interrupt_while_pruning(_prune_command(deep_model_dir, out), signum, tmp_path)
    assert code == status, err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert _lines_after_progress(err) == [
        f"prunekit: {word} prune (sparsegpt); nothing was written to {out} "
        "(rerun with --run-dir DIR to be able to --resume)"], err
    assert seconds < 10, f"took {seconds:.1f} s to stop"          # about 1 s; generous for 2 shared cores
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------ in process: the save, the message, the handlers

def _prune_args(model, out, *extra):
    return ["prune", str(model), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out", str(out),
            *extra]


def _interrupt_the_save(monkeypatch, how):
    """Replace the weights writer with one that writes half a shard, then is interrupted by `how`."""
    def save(model, path):
        (path / "model.safetensors").write_bytes(b"half a shard")
        how()
    monkeypatch.setattr(export, "_save_model", save)


def _raise(exc):
    def how():
        raise exc
    return how


def _signal_self(signum):
    def how():
        os.kill(os.getpid(), signum)
        time.sleep(5)                     # the handler raises in here
        raise AssertionError("the signal handler did not raise")
    return how


def _last_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.split("\n") if line.strip()]
    return lines[-1]


def test_ctrl_c_during_the_save_writes_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupt_the_save(monkeypatch, _raise(KeyboardInterrupt))
    assert main(_prune_args(tiny_model_dir, out)) == 130
    assert _last_line(capsys) == (f"prunekit: interrupted during prune (magnitude); nothing was written to {out} "
                                  "(rerun with --run-dir DIR to be able to --resume)")
    assert list(tmp_path.iterdir()) == []                       # no out, no .out.tmp-*


def test_an_interrupt_that_a_library_turns_into_its_own_error_is_still_the_interrupt(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """safetensors (Rust) can turn the KeyboardInterrupt into a panic of its own; after a signal,
    whatever ends the command is the interrupt: exit 130 and the one line, not exit 1 with a traceback."""
    out = tmp_path / "out"
    signal_then_panic = _signal_self(signal.SIGINT)

    def how():
        try:
            signal_then_panic()
        except KeyboardInterrupt:
            raise RuntimeError("PanicException: called `Result::unwrap()` on an `Err` value") from None
    _interrupt_the_save(monkeypatch, how)
    assert main(_prune_args(tiny_model_dir, out)) == 130
    line = _last_line(capsys)
    assert line.startswith("prunekit: interrupted during prune (magnitude); nothing was written")
    assert "Panic" not in line
    assert list(tmp_path.iterdir()) == []


def test_sigterm_exits_143_and_the_handlers_are_restored(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _interrupt_the_save(monkeypatch, _signal_self(signal.SIGTERM))
    assert main(_prune_args(tiny_model_dir, out, "--run-dir", str(run_dir))) == 143
    assert _last_line(capsys) == (
        f"prunekit: interrupted (SIGTERM) during prune (magnitude); nothing was written to {out}; the finished "
        f"blocks are recorded in {run_dir}: rerun the same command with --resume to continue from the last "
        "finished block")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_an_interrupt_after_the_export_says_it_was_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the export was renamed into place (while --json is written): the line must not say
    that nothing was written."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    monkeypatch.setattr("prunekit.cli.write_json_atomic", lambda *args, **kwargs: _raise(KeyboardInterrupt)())
    assert main(_prune_args(tiny_model_dir, out, "--json", str(report))) == 130
    assert _last_line(capsys) == (f"prunekit: interrupted during prune (magnitude), after {out} had been written "
                                  f"completely; nothing was written to {report}")
    assert (out / "prunekit.json").is_file() and not report.exists()


# ------------------------------------------------------------------------------------------- the lockstep

def _interrupt_main_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, _thread.interrupt_main)       # a SIGINT for the main thread
    timer.start()
    return timer


@pytest.mark.parametrize("where", ["waiting", "pruning"])
def test_an_interrupt_stops_every_lockstep_thread(where):
    """KeyboardInterrupt in the main thread (in Lockstep.run) while the workers wait at a meeting point,
    or while the last one runs the pruning action: run re-raises it only after every worker has
    stopped, and no further action runs. A hang fails the test (faulthandler exits after 20 s)."""
    n, actions = 3, []
    lockstep = Lockstep(n)
    points = [object() for _ in range(2_000)]      # meeting points are compared by identity
    busy = threading.Event()

    def action():
        actions.append(threading.current_thread().name)
        busy.set()
        if where == "pruning":
            time.sleep(0.6)                # the interrupt arrives in here

    def fn(i):
        for point in points:               # 2000 x 3 x 1 ms: still running when the interrupt comes
            time.sleep(0.001)              # the others are suspended at their meeting point meanwhile
            lockstep.meet(point, action)

    faulthandler.dump_traceback_later(20, exit=True)
    timer = _interrupt_main_after(0.3)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            lockstep.run(fn)
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()
    assert time.monotonic() - started < 5
    assert lockstep.aborted and lockstep.exited == n and lockstep.failure is None
    assert busy.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("lockstep-") and t.is_alive()]
    if where == "pruning":
        assert len(actions) == 1           # the action in progress finished; no further one ran
