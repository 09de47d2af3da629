"""What both benchmarks (`bench.py` for transformers, `bench_llama_cpp.py` for llama.cpp) share, without torch:
facts about the host (CPU model, load, the cores other processes keep busy, peak RSS), the one-process-per-
model worker plumbing, and the summary and number formats of their tables.

Each model is measured in a fresh interpreter (`run_worker`), because peak RSS is a property of a whole
process: memory a first model freed is not necessarily given back to the OS. The worker writes its result,
or its error, as JSON (`worker_main`); the parent re-raises a user's error (a missing file, a bad value) as
that error, anything else as a RuntimeError naming the model.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .io.atomic import write_json_atomic


def run_worker(module: str, spec: dict[str, Any], label: str, subject: str,
               user_errors: dict[str, type]) -> dict[str, Any]:
    """Run ``python -m MODULE --worker SPEC OUT`` and return the JSON it wrote; its error is raised again here
    (as the same type when it is one of `user_errors`)."""
    src = str(Path(__file__).resolve().parents[1])  # importable even from an uninstalled checkout
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec), str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if not out.is_file():  # killed (out of memory?) or crashed before it could report
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"{label} worker for {subject} exited with code {proc.returncode}:\n{tail}")
        result = json.loads(out.read_text())
    if "error" in result:
        kind, message = result["error"]["type"], result["error"]["message"]
        if kind in user_errors:
            raise user_errors[kind](message)
        raise RuntimeError(f"{label} of {subject} failed: {kind}: {message}")
    return result


def worker_main(measure: Callable[..., dict[str, Any]], spec_json: str, out_path: str) -> int:
    """The worker's side: `measure(**spec)`, its result (or its error) written as JSON to `out_path`."""
    try:
        result = measure(**json.loads(spec_json))
    except Exception as err:  # reported to the parent, which re-raises it
        result = {"error": {"type": type(err).__name__, "message": str(err)}}
    write_json_atomic(out_path, result)
    return 1 if "error" in result else 0


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def check_run_shape(prompt_len, new_tokens, repeats, warmup, threads) -> None:
    """ValueError, naming the CLI flag, for a count that is not an integer in range (both benchmarks)."""
    for flag, value, least in (("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 1),
                               ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")


def fmt_load(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


class OtherCpu:
    """``with OtherCpu() as others: ...`` then ``others.cores``: the mean number of cores that processes
    other than this one and its (finished, waited-for) children kept busy during the block; None
    where ``/proc/stat`` is missing. Busy = user + nice + system + irq + softirq + steal (a VM's stolen
    time is CPU this host could not have)."""

    def __enter__(self) -> OtherCpu:
        self.cores = None
        self._start = (time.perf_counter(), _host_busy_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        wall, host, own = (time.perf_counter(), _host_busy_seconds(), _own_cpu_seconds())
        if host is not None and self._start[1] is not None and wall > self._start[0]:
            others = (host - self._start[1]) - (own - self._start[2])
            self.cores = round(max(others, 0.0) / (wall - self._start[0]), 3)


def _host_busy_seconds() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[:1] != ["cpu"] or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def reset_peak_rss() -> str:
    """Start a new peak-RSS window for this process; return what `peak_rss` will then mean."""
    try:  # Linux >= 4.0: "5" resets this process's VmHWM (peak RSS) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return "peak RSS (VmHWM) of a per-model process, reset before each repeat (weights included)"
    except OSError:
        return "peak RSS (ru_maxrss) of a per-model process since it started, loading included"


def peak_rss() -> int:
    """Peak resident bytes of this process since the last `reset_peak_rss` (see its description)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere
