"""Ctrl-C and SIGTERM for the command line: stop any command cleanly and say so in one line.

`cli.main` runs every command inside `signals(state)`: SIGINT raises KeyboardInterrupt and SIGTERM
`Terminated` in the main thread; the workers are joined (`lockstep.py`), temporary folders are
removed by the `finally` blocks that own them, and `interrupted_line` says what was interrupted,
what was (not) written, and how to continue (`--run-dir` / `--resume`). Exit status 128 + signal
(130, 143). `state` is a small dict the command line fills as it goes (command, args, outputs).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM arrived (raised in the main thread by `main`'s handler). A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def signals(state: dict):
    """SIGINT raises KeyboardInterrupt and SIGTERM `Terminated` in the main thread, the first time; a
    second signal while the first one unwinds is only recorded (so that the `finally` blocks removing
    temporary folders run to the end), a third one raises again. Yields the list of signals received.
    A SIGINT that was ignored when we started (nohup) stays ignored.

    The `--nproc` launcher (state["forward"]) raises nothing: it passes the signal on to torchrun, which
    stops its workers (they run in sessions of their own, so a terminal's Ctrl-C reaches only torchrun),
    and waits for it; killing torchrun instead would leave the workers running, and writing.

    Once the command has finished (state["finished"]) a caller in Python gets its own handlers back;
    the `prunekit` program keeps ours until it exits, and a signal while the interpreter shuts down
    (half a second with torch) ends it at once with 128 + the signal, instead of a traceback from an
    atexit hook."""
    received: list[int] = state.setdefault("received", [])

    def handler(signum, frame):
        received.append(signum)
        if state.get("forward"):
            _forward(signum)
        elif state.get("finished"):
            if state.get("program"):
                _exit_now(signum, reported=len(received) > 1)
        elif not state.get("reporting") and len(received) != 2:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if current is not (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL):
            continue                   # ignored (nohup), or whoever embeds us handles it themselves
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:             # not the main thread: signals cannot be handled here
            pass
    try:
        yield received
    finally:
        state["finished"] = True
        if not state.get("program"):
            for signum, old in previous.items():
                signal.signal(signum, old)


def _exit_now(signum: int, reported: bool) -> None:
    """A signal after the command finished: its output is complete; leave now, with 128 + the signal."""
    try:
        sys.stdout.flush()
        if not reported:
            print(f"prunekit: {_how(signum)} while exiting, after the command had finished", file=sys.stderr,
                  flush=True)
    except Exception:
        pass
    os._exit(128 + int(signum))


def _how(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"interrupted ({signal.Signals(signum).name})"


def _forward(signum: int) -> None:
    """Pass a signal on to our child processes (torchrun), unless a terminal's Ctrl-C reached them already."""
    if signum == signal.SIGINT:
        try:
            if os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp():
                return                 # we are the terminal's foreground group: torchrun got it too
        except (OSError, ValueError, AttributeError):
            pass
    try:
        import psutil
        for child in psutil.Process().children():
            child.send_signal(signum)
    except Exception:
        pass


def close_progress_bars(collect: bool = True) -> None:
    """Close the progress bars the interrupted work left open now, so that they print their last
    state before the one line, not after it (from their finalizers at exit). `collect`: first free the
    bars nothing refers to any more (a garbage collection: a fraction of a second with torch loaded;
    not needed while the traceback that holds them is alive)."""
    import gc
    if collect:
        gc.collect()
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:
            pass


def _outputs(state: dict) -> list[Path]:
    """What the command would write: --out (a prune or recover export; a recipe's export path) and --json."""
    args, command, paths = state["args"], state.get("command"), []
    if command in ("prune", "recover") and getattr(args, "out", None):
        paths.append(Path(args.out))
    elif command == "run":
        try:
            from .recipe import load_recipe
            recipe = load_recipe(args.recipe, list(args.set))
            if recipe.export is not None:
                paths.append(Path(recipe.export.path))
        except Exception:              # an invalid recipe fails in the command itself, with its message
            pass
    if getattr(args, "json", None):
        paths.append(Path(args.json))
    return [Path(os.path.abspath(path.expanduser())) for path in paths]


def _identity(path: Path):
    """Which file or folder is at `path` now (None: nothing): a replaced export is another inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def output_states(state: dict) -> dict:
    return {path: _identity(path) for path in _outputs(state)}


def interrupted_line(signum: int, state: dict) -> str:
    """One line: what was interrupted, what was written (nothing, normally) and how to continue."""
    args, command = state.get("args"), state.get("command") or "startup"
    how = _how(signum)
    if args is None:                   # the --nproc launcher, or before the arguments were read
        if state.get("forward"):
            return f"prunekit: {how} during {command} --nproc; torchrun stopped its processes (their lines above)"
        return f"prunekit: {how} during {command}; nothing was written"
    what = {"prune": f"prune ({getattr(args, 'method', '')})", "recover": f"recover ({getattr(args, 'method', '')})",
            "run": f"run {getattr(args, 'recipe', '')}"}.get(command, command)
    outputs = state.get("outputs") or {}
    written = [path for path, before in outputs.items() if _identity(path) != before and _identity(path) is not None]
    untouched = [path for path in outputs if path not in written]
    line = f"prunekit: {how} during {what}"
    if command == "sweep":
        return (f"{line}; the points finished so far are kept in {args.out} (one row each): rerun the same command "
                "to continue with the others")
    if written:
        line += f", after {' and '.join(map(str, written))} had been written completely"
        if untouched:
            line += f"; nothing was written to {' or '.join(map(str, untouched))}"
        return line
    line += f"; nothing was written{' to ' + ' or '.join(map(str, untouched)) if untouched else ''}"
    if command in ("prune", "run"):
        run_dir = getattr(args, "run_dir", None)
        if run_dir is None:
            line += " (rerun with --run-dir DIR to be able to --resume)"
        else:
            done = "blocks" if command == "prune" else "steps and blocks"
            line += (f"; the finished {done} are recorded in {run_dir}: rerun the same command with --resume to "
                     "continue from the last finished block")
    elif command == "recover":
        if getattr(args, "checkpoint_every", None) == 0:
            line += " (rerun with --checkpoint-every N to be able to --resume)"
        else:
            out = Path(args.out)
            run_dir = args.run_dir or out.with_name(out.name + ".checkpoints")
            line += f"; rerun the same command with --resume to continue from the last checkpoint in {run_dir}, if any"
    return line
