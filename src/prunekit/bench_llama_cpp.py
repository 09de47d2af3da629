"""`prunekit bench --runtime llama.cpp`: the speed of a GGUF model in llama.cpp, beside its dense baseline.

What a user of llama.cpp sees of a pruned model is its GGUF file run by llama.cpp's own CPU kernels,
not transformers. For each model (the baseline first, when given) this measures, at batch 1:

* **prompt processing (pp) tok/s** -- ``prompt_len`` tokens evaluated in one call from an empty KV
  cache, asking for the logits of the last position only (``logits_all=False``: llama.cpp runs the
  LM head on that one row, as a server does before it samples the first new token). Every weight is
  reused ``prompt_len`` times, so pp is compute-bound and follows the FLOPs pruning removed.
* **decode (tg) tok/s** -- ``new_tokens`` single-token evaluations through the KV cache that pp
  built, each with its logits. A step reads every weight once for one token, so it is bound by memory
  bandwidth and follows the bytes the model stores (and the attention over the growing context).
  The token fed at each step is a seeded pseudo-random id, not the argmax of the previous logits:
  the cost of a step does not depend on which token it is, and no sampler runs inside the timer.
* **peak RSS** of a process that runs only that model (``/proc/self/status`` VmHWM, reset before each
  timed repeat where Linux allows it, else ``ru_maxrss`` since the process started). The GGUF file is
  memory-mapped (llama.cpp's default), so the weights count once they are touched.
* **file bytes**, **parameters** and **layers** of the GGUF, as llama.cpp reads them.

Protocol and why:

* Prompt ids are uniform random ids from ``random.Random(seed)``; both models get the same ids, as
  pruning never changes the vocabulary. Content does not matter for timing.
* Both pp and tg use the same ``threads`` (``n_threads`` and ``n_threads_batch``; default all cores,
  ``os.cpu_count()``), for both models. The KV cache is f16 and flash attention off (llama-cpp-python's
  defaults); ``n_batch`` = ``prompt_len``, so the prompt is one ``llama_decode`` call (split into
  llama.cpp's micro-batches of ``n_ubatch`` 512 tokens).
* ``warmup`` full runs (pp + tg) are discarded (first-call graph and buffer allocation), then
  ``repeats`` runs are timed with ``time.perf_counter`` (``llama_synchronize`` before every read). We
  report the **median and the min-max range** of tok/s over the repeats; the speedups are
  model / baseline of the median tok/s.
* Each model runs in its own subprocess (``python -m prunekit.bench_llama_cpp --worker``), which
  imports llama_cpp and the standard library only -- not torch -- so that one model's memory (or
  torch's ~200 MB) never lands in the other's peak RSS.
* A model that is not a ``.gguf`` file (``default``, a prunekit export folder, a checkpoint
  directory, a hub id) is first converted with `prunekit.io.gguf_writer.export_gguf` into a temporary
  folder, with ``outtype`` (default f16) for its 2-D weights; the protocol says which, and the row
  holds the conversion time (loading included). The files are removed afterwards.
* Times are only as good as the host is quiet: the protocol records the 1-minute load average before
  and after, the CPU model from ``/proc/cpuinfo``, and (Linux) how many cores *other* processes kept
  busy on average while the workers ran: the host's busy time from ``/proc/stat`` (steal included)
  minus this process's and its workers' CPU time, over the wall time. The load average alone cannot
  tell: a benchmark with ``threads`` = all cores raises it to about the core count by itself.

The host helpers (`cpu_model`, `load_average`, `reset_peak_rss`, `peak_rss`, `OtherCpu`) and the worker
plumbing live in `bench_host`, which `prunekit.bench` shares; none of them imports torch.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .bench_host import (OtherCpu, check_run_shape, cpu_model, load_average, peak_rss, reset_peak_rss, run_worker,
                         worker_main)
from .bench_host import fmt_bytes as _bytes
from .bench_host import fmt_load as _load
from .bench_host import fmt_ratio as _ratio
from .bench_host import summary as _summary

log = logging.getLogger("prunekit")

PROMPT_SEED = 0
ROLES = ("baseline", "model")
N_UBATCH = 512                      # llama.cpp's default micro-batch
OTHERS_BUSY = 0.25                  # cores other processes may keep busy before the table warns
INSTALL_HINT = "pip install 'prunekit[llama]' (scripts/setup.sh builds llama-cpp-python from source)"
# Errors the worker reports that are re-raised as the same type (the input was wrong); anything else
# becomes a RuntimeError carrying the worker's message.
_USER_ERRORS = {e.__name__: e for e in (FileNotFoundError, ValueError, ImportError)}


# --------------------------------------------------------------------------- public API

def benchmark(model: str | os.PathLike, *, baseline: str | os.PathLike | None = None, prompt_len: int = 512,
              new_tokens: int = 128, repeats: int = 5, warmup: int = 1, threads: int | None = None,
              outtype: str = "f16", trust_remote_code: bool = False) -> dict[str, Any]:
    """Benchmark `model` (and `baseline` first, when given) in llama.cpp; return JSON-able data.

    Returns ``{"protocol": {...}, "rows": [...]}``, one row per model, baseline first. A row holds
    ``role``, ``model`` (as given), ``batch`` (1), ``gguf`` (the file measured, or None when it was a
    temporary conversion), ``converted`` (``{"outtype", "seconds", "arch", "notes"}`` or None),
    ``file_bytes``, ``params``, ``layers``, ``arch``, ``description`` (``llama_model_desc``: architecture,
    llama.cpp's size class, weight type; e.g. "llama 256M F16" for SmolLM2-135M),
    ``pp_tok_s`` and ``tg_tok_s`` (``{"median", "min", "max", "samples"}``), ``pp_ms`` and
    ``tg_ms_per_token`` (the same from the times), ``peak_rss_bytes``, and ``speedup_pp`` /
    ``speedup_tg`` (model / baseline of the median tok/s; None on the baseline and without one).

    trust_remote_code: lets the conversion of a checkpoint run its own modeling code (as `prunekit export`).

    Raises ImportError (naming ``pip install 'prunekit[llama]'``) without llama-cpp-python,
    FileNotFoundError for a missing path, ValueError for bad arguments, a file that is not GGUF, or a
    prompt past the model's context length.
    """
    from prunekit.io.gguf_writer import OUTTYPES
    from prunekit.io.loading import classify_source

    check_run_shape(prompt_len, new_tokens, repeats, warmup, threads)
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    version = require_llama_cpp()
    threads = threads or os.cpu_count() or 1
    models = {"baseline": baseline, "model": model} if baseline is not None else {"model": model}
    # Every input is checked before minutes of converting and measuring.
    kinds = {role: classify_source(name)[0] for role, name in models.items()}
    for role, name in models.items():
        if kinds[role] == "gguf":
            _check_gguf_magic(Path(name))

    spec = {"threads": threads, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "warmup": warmup, "seed": PROMPT_SEED}
    measured, converted = {}, {}
    with tempfile.TemporaryDirectory(prefix="prunekit-bench-gguf-") as tmp:
        paths = {}
        for role, name in models.items():
            if kinds[role] == "gguf":
                paths[role] = Path(name)
            else:
                paths[role] = Path(tmp) / f"{role}.gguf"
                converted[role] = _convert(name, paths[role], outtype, trust_remote_code)
        # The load average is read after converting: converting is not part of what is timed.
        load_before = load_average()
        with OtherCpu() as others:
            for role, name in models.items():
                log.info("bench (llama.cpp): %s %s", role, name)
                measured[role] = _measure_in_subprocess({"path": str(paths[role]), **spec})
        load_after = load_average()

    rows = [_row(role, os.fspath(models[role]), None if role in converted else str(paths[role]),
                 converted.get(role), out) for role, out in measured.items()]
    _add_speedups(rows)
    worker = next(iter(measured.values()))
    protocol = {
        "runtime": "llama.cpp",
        "llama_cpp_python": version,
        "llama_cpp_system_info": worker["system_info"],
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": "cpu",
        "device_name": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "batch": 1,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "seed": PROMPT_SEED,
        "kv_cache": "f16 (llama.cpp default)",
        "flash_attn": "off (llama-cpp-python default)",
        "n_batch": prompt_len,
        "n_ubatch": min(N_UBATCH, prompt_len),
        "prompt": f"uniform random token ids, random.Random({PROMPT_SEED}), the same for every model",
        "pp": "prompt_len tokens in one call from an empty KV cache, logits of the last position only "
              "(logits_all=False)",
        "tg": "new_tokens single-token evaluations through the KV cache, each fed a seeded pseudo-random id "
              "(a step's cost does not depend on the token), logits every step; Llama.eval, no sampler",
        "statistic": "median over repeats; spread = min-max; speedup = model / baseline median tok/s",
        "memory": worker["memory_method"],
        "isolation": ("one subprocess per model that imports llama_cpp only (no torch)"
                      if not any(out["torch_imported"] for out in measured.values()) else
                      "one subprocess per model; torch was imported there, its memory is in the peak RSS"),
        "conversion": (f"non-GGUF inputs converted by prunekit.io.gguf_writer.export_gguf, outtype {outtype} "
                       "(norms and biases f32), into a temporary folder; seconds include loading the checkpoint"
                       if converted else "none: every input was a .gguf file"),
        "outtype": outtype if converted else None,
        "load_average_1min": {"before": load_before, "after": load_after},
        "other_cpu_cores": others.cores,
        "models": {role: {"name": os.fspath(name), "kind": kinds[role]} for role, name in models.items()},
        "python": platform.python_version(),
    }
    protocol["text"] = protocol_text(protocol)
    return {"protocol": protocol, "rows": rows}


def require_llama_cpp() -> str:
    """Import llama_cpp here (not in a worker) so a missing install is one clear error; return its version."""
    try:
        import llama_cpp  # noqa: F401  (the import is the check)
    except ImportError as err:
        raise ImportError(f"--runtime llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from err
    from importlib import metadata
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:        # an uninstalled build on sys.path
        return getattr(sys.modules["llama_cpp"], "__version__", "unknown")


def protocol_text(proto: dict[str, Any]) -> str:
    """The protocol in one line, to print or store beside every number."""
    load = proto["load_average_1min"]
    return (f"llama.cpp (llama-cpp-python {proto['llama_cpp_python']}) on {proto['device_name']}, "
            f"threads {proto['threads']} (pp and tg), batch 1; pp: {proto['prompt_len']} random token ids from an "
            f"empty KV cache, last-position logits only; tg: {proto['new_tokens']} single-token steps through the KV "
            f"cache fed seeded pseudo-random ids; KV cache {proto['kv_cache'].split()[0]}, flash attention "
            f"{proto['flash_attn'].split()[0]}; {proto['warmup']} warm-up discarded, {proto['repeats']} repeats, "
            f"median [min-max]; one process per model; "
            + (f"non-GGUF inputs converted to {proto['outtype']} GGUF; " if proto.get("outtype") else "")
            + f"1-min load average {_load(load['before'])} before, {_load(load['after'])} after; "
            + f"other processes kept {_load(proto.get('other_cpu_cores'))} cores busy meanwhile")


def format_table(result: dict[str, Any]) -> str:
    """The protocol as a few lines, then one markdown table laid out as `prunekit.bench.format_table`'s:
    a column per model and the speedup (model / baseline median tok/s)."""
    proto, rows = result["protocol"], result["rows"]
    by_role = {row["role"]: row for row in rows}
    roles = [r for r in ROLES if r in by_role]
    compare = len(roles) == 2
    load = proto["load_average_1min"]
    lines = [
        f"prunekit bench --runtime llama.cpp, {proto['date']}",
        f"runtime: llama.cpp via llama-cpp-python {proto['llama_cpp_python']}, threads {proto['threads']} "
        f"(pp and tg), batch 1; KV cache {proto['kv_cache']}, flash attention {proto['flash_attn']}",
        f"host: {proto['device_name']}, {proto['cpu_count']} CPUs; 1-min load average {_load(load['before'])} before "
        f"the benchmark, {_load(load['after'])} after; other processes kept {_load(proto.get('other_cpu_cores'))} "
        "cores busy on average while it ran",
        f"workload: pp {proto['prompt_len']} tokens (random ids) from an empty KV cache, last-position logits only; "
        f"tg {proto['new_tokens']} single-token steps through the KV cache, fed seeded pseudo-random ids",
        f"timing: {proto['warmup']} warm-up discarded, {proto['repeats']} repeats; median [min-max]",
        f"memory: {proto['memory']}",
        f"conversion: {proto['conversion']}",
    ]
    for role in roles:
        row = by_role[role]
        source = row["gguf"] or f"converted to a temporary {row['converted']['outtype']} GGUF"
        lines.append(f"{role}: {row['model']} ({source}; {row['description']})")
    if _busy(proto):
        lines.append(f"WARNING: the host was busy ({_busy(proto)}, {proto['threads']} threads on "
                     f"{proto['cpu_count']} CPUs): threads wait on each other and times inflate; rerun on a quiet "
                     "host or with fewer --threads")
    lines.append("")
    header = ["batch", "metric", *roles] + (["speedup"] if compare else [])
    table = [header, ["---:", "---", *("---:" for _ in roles)] + (["---:"] if compare else [])]

    def add(batch: str, metric: str, cells: list[str], speedup: float | None = None) -> None:
        table.append([batch, metric, *cells] + ([_ratio(speedup)] if compare else []))

    model = by_role["model"]
    add("", "parameters", [_count(by_role[r]["params"]) for r in roles])
    add("", "layers", [str(by_role[r]["layers"]) for r in roles])
    add("", "GGUF file", [_bytes(by_role[r]["file_bytes"]) for r in roles])
    add("", "conversion s", [f"{by_role[r]['converted']['seconds']:.1f}" if by_role[r]["converted"] else "-"
                             for r in roles])
    add("1", "prompt processing tok/s", [_spread(by_role[r]["pp_tok_s"]) for r in roles], model["speedup_pp"])
    add("1", "decode tok/s", [_spread(by_role[r]["tg_tok_s"]) for r in roles], model["speedup_tg"])
    add("1", "peak RSS", [_bytes(by_role[r]["peak_rss_bytes"]) for r in roles])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in table]
    return "\n".join(lines)


def _busy(proto: dict[str, Any]) -> str:
    """Why the host counts as busy ("" if it does not): other processes' cores while measuring where
    known, else the load average before (which a previous benchmark may have raised by itself)."""
    others, cpus, threads = proto.get("other_cpu_cores"), proto["cpu_count"], proto["threads"]
    if others is not None:
        return f"other processes kept {others:.2f} cores busy" if others > OTHERS_BUSY else ""
    before = proto["load_average_1min"]["before"]
    if before is not None and cpus and before + threads > cpus + 0.5:
        return f"load {before:.2f} before"
    return ""


# --------------------------------------------------------------------------- inputs

def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")


def _convert(name: str | os.PathLike, out: Path, outtype: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """Write `name` as the GGUF file `out`; what and how long, loading the checkpoint included."""
    import gc

    from prunekit.io.gguf_writer import export_gguf

    log.info("bench (llama.cpp): converting %s to %s GGUF", name, outtype)
    started = time.perf_counter()
    result = export_gguf(name, out, outtype=outtype, trust_remote_code=trust_remote_code)
    seconds = time.perf_counter() - started
    gc.collect()  # the loaded checkpoint is garbage now; give its memory back before anything is timed
    return {"outtype": outtype, "seconds": round(seconds, 2), "write_seconds": round(result.seconds, 2),
            "arch": result.arch, "notes": result.notes}


# --------------------------------------------------------------------------- measurement (worker)

def _measure_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """`_measure(**spec)` in a fresh interpreter that imports llama_cpp only (`bench_host.run_worker`)."""
    return run_worker("prunekit.bench_llama_cpp", spec, "llama.cpp benchmark", spec["path"], _USER_ERRORS)


def _worker_main(spec_json: str, out_path: str) -> int:
    """Worker process: measure one GGUF file, write the result (or the error) as JSON to `out_path`."""
    return worker_main(_measure, spec_json, out_path)


def _measure(path: str, threads: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int,
             seed: int) -> dict[str, Any]:
    """Load one GGUF file in llama.cpp and time `warmup` + `repeats` runs of pp then tg."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"--runtime llama.cpp needs llama-cpp-python: {INSTALL_HINT}") from err

    llm = llama_cpp.Llama(path, n_ctx=prompt_len + new_tokens, n_batch=prompt_len, n_ubatch=min(N_UBATCH, prompt_len),
                          n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False, seed=seed)
    try:
        info = _gguf_info(llama_cpp, llm, path)
        if prompt_len + new_tokens > info["n_ctx_train"] > 0:
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the "
                             f"{info['n_ctx_train']} positions of {path}")
        rng = random.Random(seed)
        prompt = [rng.randrange(info["n_vocab"]) for _ in range(prompt_len)]
        fed = [rng.randrange(info["n_vocab"]) for _ in range(new_tokens)]
        for _ in range(warmup):
            _pp_and_tg(llama_cpp, llm, prompt, fed)
        pp_s, tg_s, peaks = [], [], []
        for _ in range(repeats):
            memory_method = reset_peak_rss()
            pp, tg = _pp_and_tg(llama_cpp, llm, prompt, fed)
            peaks.append(peak_rss())
            pp_s.append(pp)
            tg_s.append(tg)
    finally:
        llm.close()
    return {"info": info, "pp_s": pp_s, "tg_s": tg_s, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "peak_rss_bytes": max(peaks), "memory_method": memory_method,
            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(" |"),
            "torch_imported": "torch" in sys.modules}


def _pp_and_tg(llama_cpp, llm, prompt: list[int], fed: list[int]) -> tuple[float, float]:
    """One pp from an empty KV cache, then one tg step per id of `fed`; (pp seconds, tg seconds)."""
    llm.reset()  # n_tokens = 0: the next eval drops every KV cell (kv_cache_seq_rm from position 0)
    start = time.perf_counter()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm.ctx)
    prompted = time.perf_counter()
    for token in fed:
        llm.eval([token])
    llama_cpp.llama_synchronize(llm.ctx)
    return prompted - start, time.perf_counter() - prompted


def _gguf_info(llama_cpp, llm, path: str) -> dict[str, Any]:
    """What llama.cpp loaded: sizes as it counts them, and its one-line description ("llama 256M F16")."""
    buffer = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(llm.model, buffer, len(buffer))
    return {
        "arch": llm.metadata.get("general.architecture"),
        "description": buffer.value.decode(errors="replace"),
        "params": int(llama_cpp.llama_model_n_params(llm.model)),
        "layers": int(llama_cpp.llama_model_n_layer(llm.model)),
        "tensor_bytes": int(llama_cpp.llama_model_size(llm.model)),
        "file_bytes": os.path.getsize(path),
        "n_vocab": int(llm.n_vocab()),
        "n_ctx_train": int(llama_cpp.llama_model_n_ctx_train(llm.model)),
    }


# --------------------------------------------------------------------------- results

def _row(role: str, name: str, gguf: str | None, converted: dict | None, out: dict[str, Any]) -> dict[str, Any]:
    """One model's row: raw seconds become ms and tok/s summaries (tok/s per repeat, then the median)."""
    info = out["info"]
    return {
        "role": role, "model": name, "batch": 1, "gguf": gguf, "converted": converted,
        "file_bytes": info["file_bytes"], "tensor_bytes": info["tensor_bytes"], "params": info["params"],
        "layers": info["layers"], "arch": info["arch"], "description": info["description"], "n_vocab": info["n_vocab"],
        "pp_tok_s": _summary([out["prompt_len"] / s for s in out["pp_s"]]),
        "tg_tok_s": _summary([out["new_tokens"] / s for s in out["tg_s"]]),
        "pp_ms": _summary([s * 1e3 for s in out["pp_s"]]),
        "tg_ms_per_token": _summary([s * 1e3 / out["new_tokens"] for s in out["tg_s"]]),
        "peak_rss_bytes": out["peak_rss_bytes"],
        "speedup_pp": None,
        "speedup_tg": None,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """The model row gets model / baseline of the median tok/s, for pp and for tg."""
    base = next((row for row in rows if row["role"] == "baseline"), None)
    if base is None:
        return
    for row in rows:
        if row["role"] == "model":
            row["speedup_pp"] = row["pp_tok_s"]["median"] / base["pp_tok_s"]["median"]
            row["speedup_tg"] = row["tg_tok_s"]["median"] / base["tg_tok_s"]["median"]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else str(n)


def _spread(stat: dict[str, float]) -> str:
    """median [min-max], tok/s to one decimal"""
    return f"{stat['median']:.1f} [{stat['min']:.1f}-{stat['max']:.1f}]"


def main(argv: list[str] | None = None) -> int:
    """``python -m prunekit.bench_llama_cpp --worker SPEC OUT``: the per-model worker. Users run
    ``prunekit bench DIR --runtime llama.cpp``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"] and len(argv) == 3:
        return _worker_main(*argv[1:])
    argparse.ArgumentParser(prog="python -m prunekit.bench_llama_cpp", description=main.__doc__).print_usage()
    print("this module is the worker of `prunekit bench --runtime llama.cpp`; run that instead", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
