"""`prunekit bench`: inference speed and memory of a model, and of its dense baseline beside it.

For each model (the baseline first, when given) and each batch size this measures

* **prefill latency** -- one forward pass over ``prompt_len`` tokens with ``use_cache=True``
  (ms for the whole batch). With 512 tokens every weight is reused ``batch * 512`` times, so
  prefill is compute-bound: it follows the FLOPs a pruned model saves.
* **decode throughput** -- ``new_tokens`` greedy steps of one token each, reusing the KV cache
  that prefill built (tokens/s per sequence, and for the whole batch). At batch 1 a step
  multiplies one vector by every weight matrix: about 2 FLOPs per weight read, far below what
  a CPU or GPU computes per byte of memory traffic, so the step time is roughly *weight bytes /
  memory bandwidth*. Decode speed therefore follows the bytes a model stores, not its zeros:
  a structurally smaller model (fewer layers, narrower widths) decodes faster, while
  unstructured or N:M zeros kept in dense tensors give a speedup near 1.0. Larger batches
  reuse each weight read across sequences and move decode towards compute-bound.
* **peak memory** -- on CUDA ``torch.cuda.max_memory_allocated``, reset before each repeat;
  on CPU the peak resident set size (VmHWM) of a process that benchmarks only that model.
  Both include the weights.
* **parameter count** (and how many are nonzero), **layers**, and **weight bytes** of each
  model, read from the loaded model: a pruned checkpoint may have its own, smaller config.

Protocol and why:

* Prompts are uniform random token ids from a seeded generator (no tokenizer, no data
  download); both models get the same ids as long as they share a vocabulary, which pruning
  never changes. Content does not matter for timing: no early stop, every run does exactly
  ``new_tokens`` steps.
* Decoding is a plain loop -- call the model with its KV cache (`models.cache`) and the last token, take
  the argmax -- not ``model.generate``: generate adds logits processors, stopping criteria and
  per-step bookkeeping that change between transformers versions, and we want the time of the
  model and its KV cache, the minimum any serving loop pays. Prefill asks for the logits of the
  last position only (``logits_to_keep=1``, as generate does, when the model accepts it): the
  full-vocabulary logits of every prompt position (``prompt_len x vocab`` floats per sequence,
  100 MB for SmolLM2 at 512 tokens) are never needed to generate.
* ``warmup`` full runs (prefill + decode) are discarded (first-call allocations, kernel
  selection), then ``repeats`` runs are timed; we report the **median and the min-max range**.
  Timers are ``time.perf_counter``; on CUDA the device is synchronized before every read.
* On CPU each model runs in its own subprocess (``python -m prunekit.bench --worker``). Peak
  RSS is a property of a whole process: memory a first model freed is not necessarily given
  back to the OS, so a second model measured in the same process would inherit its footprint.
  Inside the worker the peak is reset (Linux ``/proc/self/clear_refs``) before each repeat, so
  a transient of loading does not count; where that is impossible the protocol says the peak
  is ``ru_maxrss`` over the whole worker, loading included. ``threads`` is applied there with
  ``torch.set_num_threads``. CUDA memory is per-allocator and resettable, so the CUDA path
  measures both models in this process, one after the other (``threads`` then sets this
  process's torch thread count).
* Times are only as good as the host is quiet: the protocol records the host's load average
  before and after. Pin ``--threads`` to at most the idle cores; with more threads than free
  cores, OpenMP threads wait on each other and times balloon.

``--runtime llama.cpp`` measures the GGUF form of both models in llama.cpp instead (prompt
processing and decode tok/s at batch 1, converting non-GGUF inputs with ``--outtype``); its
protocol is in `prunekit.bench_llama_cpp`. torch is imported only where it is used, so that
``prunekit --help`` and the llama.cpp workers do not load it.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .bench_host import check_run_shape, cpu_model, load_average, peak_rss, reset_peak_rss, run_worker, worker_main
from .bench_host import fmt_bytes as _bytes
from .bench_host import fmt_load as _load
from .bench_host import fmt_ratio as _ratio
from .bench_host import summary as _summary
from .io.atomic import write_json_atomic

if TYPE_CHECKING:
    import torch

log = logging.getLogger("prunekit")

PROMPT_SEED = 0
PROMPTS = ("random", "text")
ROLES = ("baseline", "model")
# Errors a worker reports that are re-raised as the same type (the user's input was wrong);
# anything else becomes a RuntimeError carrying the worker's error.
_USER_ERRORS = {e.__name__: e for e in (FileNotFoundError, ValueError, ImportError, TypeError)}


# --------------------------------------------------------------------------- public API

def benchmark(model_or_dir: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
              batches: Sequence[int] = (1,), prompt_len: int = 512, new_tokens: int = 128,
              device: str = "cpu", dtype: str = "float32", repeats: int = 5, warmup: int = 1,
              threads: int | None = None, trust_remote_code: bool = False,
              pruning: dict | None = None, prompt: str = "random") -> dict[str, Any]:
    """Benchmark `model_or_dir` (and `baseline` first, when given); return JSON-able data.

    `prompt` "random" (default): uniform random token ids; "text": the first tokens of the held-out split of
    the offline default corpus in the model's tokenizer (real text: what token and KV pruning at inference
    select from; random ids give flat attention, on which their ratios mean little).

    `pruning` (`prunekit.inference.cli.to_spec`: token and KV pruning at inference) runs the model under
    `prunekit.inference.pruning`; without a `baseline` the baseline is then the same model, stock.

    Returns ``{"protocol": {...}, "rows": [...]}`` with one row per (model, batch), baseline
    rows first. A row holds ``role`` ("baseline"/"model"), ``model``, ``batch``, the model's
    ``params``/``nonzero_params``/``layers``/``weight_bytes``/``dtype``/``attn_implementation``,
    ``prefill_ms`` and ``decode_ms_per_token`` (each ``{"median", "min", "max", "samples"}``),
    ``decode_tok_s_per_seq`` and ``decode_tok_s_total`` (``{"median", "min", "max"}``, derived
    from the decode times), ``peak_memory_bytes``, and ``speedup_prefill``/``speedup_decode``
    (baseline median time / model median time; None on baseline rows and without a baseline).

    Raises ValueError for bad arguments (naming the CLI flag), CUDA asked for but unavailable,
    or a prompt longer than a model's position limit; FileNotFoundError for a missing model path.
    """
    import torch

    from prunekit.io.loading import describe_source, resolve_dtype

    batches = _check_batches(batches)
    check_run_shape(prompt_len, new_tokens, repeats, warmup, threads)
    if prompt not in PROMPTS:
        raise ValueError(f"--prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
    dev = _check_device(device)
    resolve_dtype(dtype)  # ValueError for an unknown dtype, before any model is loaded
    if pruning and baseline is None:
        baseline = model_or_dir                   # inference-time pruning: the same model, stock, is the baseline
    models = {"baseline": baseline, "model": model_or_dir} if baseline is not None else {"model": model_or_dir}
    # Fails fast on a missing path (load's own FileNotFoundError), before minutes of benchmarking.
    sources = {role: describe_source(name) for role, name in models.items()}

    spec = {"batches": list(batches), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "device": str(dev), "dtype": dtype, "repeats": repeats, "warmup": warmup,
            "threads": threads, "seed": PROMPT_SEED, "trust_remote_code": trust_remote_code, "prompt": prompt}
    # Other processes on the machine distort every time measured here; the protocol records how busy it was.
    load_before = load_average()
    measured = {}
    for role, name in models.items():
        log.info("bench: %s %s, batch %s", role, name, ",".join(map(str, batches)))
        role_spec = {**spec, "pruning": pruning if role == "model" else None}
        if dev.type == "cpu":
            measured[role] = _measure_in_subprocess({"model": os.fspath(name), **role_spec})
        else:
            measured[role] = _measure_model(model=os.fspath(name), **role_spec)
            gc.collect()  # free this model's memory before the next one is loaded
            torch.cuda.empty_cache()

    rows = [_row(role, os.fspath(models[role]), out["info"], m)
            for role, out in measured.items() for m in out["measurements"]]
    _add_speedups(rows)
    any_worker = next(iter(measured.values()))
    protocol = {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": _device_name(dev),
        "torch_threads": any_worker["torch_threads"],
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": load_average()},
        "dtype": dtype,
        "batches": list(batches),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "prompt": (f"uniform random token ids, torch.Generator seed {PROMPT_SEED}, same for every model"
                   if prompt == "random" else
                   "the first prompt_len tokens of the held-out split of the offline default corpus (prunekit.data), "
                   "each model's own tokenizer, the same text in every row of a batch"),
        "prefill": "one forward over prompt_len tokens, use_cache=True; logits of the last position only "
                   "where the model accepts logits_to_keep (row field prefill_logits_to_keep)",
        "decode": "new_tokens greedy steps of 1 token with the model's default KV cache; a plain loop, no generate()",
        "inference_pruning": _pruning_text(pruning),
        "kv_cache": "bytes of the key/value tensors the cache holds after prefill and decode (row kv_cache_bytes)",
        "statistic": "median over repeats; spread = min-max",
        "memory": any_worker["memory_method"],
        "isolation": "one subprocess per model" if dev.type == "cpu" else "models run one after the other in-process",
        "attn_implementation": {role: out["info"]["attn_implementation"] for role, out in measured.items()},
        "models": {role: {"name": os.fspath(name), "source": sources[role]} for role, name in models.items()},
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
    }
    return {"protocol": protocol, "rows": rows}


def measure(lm: torch.nn.Module, *, batches: Sequence[int] = (1,), prompt_len: int = 512, new_tokens: int = 128,
            device: str = "cpu", repeats: int = 5, warmup: int = 1, name: str = "in-memory",
            ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Measure a model already in memory (on `device`), in this process: the same rows as
    `benchmark`, without speedups. For scripts that build or prune models in place (a 7B model
    is not worth a save/load round trip just to be timed). `ids` (1, n): this prompt instead of
    `prompt_len` random ids."""
    import torch

    dev = _check_device(device)
    memory_method = _reset_peak_memory(dev)
    info = _model_info(lm)
    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        prompt_len = ids.shape[1]
    rows = [_row("model", name, info, _measure_batch(lm, batch, prompt_len, new_tokens, dev, repeats, warmup,
                                                      PROMPT_SEED, ids=ids))
            for batch in _check_batches(batches)]
    protocol = {"device": str(dev), "device_name": _device_name(dev), "torch_threads": torch.get_num_threads(),
                "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
                "statistic": "median over repeats; spread = min-max", "memory": memory_method,
                "isolation": "in-process", "torch": torch.__version__, "transformers": _transformers_version()}
    return {"protocol": protocol, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    """The protocol as a few lines, then one markdown table: a column per model, and the speedup
    (baseline / model, from median times) for prefill and decode."""
    proto, rows = result["protocol"], result["rows"]
    roles = [r for r in ROLES if any(row["role"] == r for row in rows)]
    by_key = {(row["role"], row["batch"]): row for row in rows}
    first = {role: next(row for row in rows if row["role"] == role) for role in roles}
    compare = len(roles) == 2
    attn = sorted(set(proto["attn_implementation"].values()))

    lines = [
        f"prunekit bench, {proto['date']}",
        f"device: {proto['device']} ({proto['device_name']}), torch threads {proto['torch_threads']}, "
        f"dtype {proto['dtype']}",
        f"host: {proto['cpu_count']} CPUs; 1-min load average {_load(proto['load_average_1min']['before'])} before "
        f"the benchmark, {_load(proto['load_average_1min']['after'])} after",
        f"workload: batch {','.join(map(str, proto['batches']))}; prefill {proto['prompt_len']} tokens "
        f"(random ids); decode {proto['new_tokens']} greedy steps with KV cache",
        f"timing: {proto['warmup']} warm-up discarded, {proto['repeats']} repeats; median [min-max]",
        f"memory: {proto['memory']}",
        f"software: torch {proto['torch']}, transformers {proto['transformers']}, python {proto['python']}; "
        f"attention {'/'.join(attn)}",
        *(f"{role}: {proto['models'][role]['name']}" for role in roles),
        *([f"inference-time pruning of the model row: {proto['inference_pruning']}"]
          if proto.get("inference_pruning", "none (stock)") != "none (stock)" else []),
    ]
    load_before, threads, cpus = proto["load_average_1min"]["before"], proto["torch_threads"], proto["cpu_count"]
    if proto["device"] == "cpu" and load_before is not None and cpus and load_before + threads > cpus + 0.5:
        lines.append(f"WARNING: the host was busy (load {load_before:.2f} on {cpus} CPUs, {threads} torch threads): "
                     "threads wait on each other and times inflate, often several-fold; rerun on a quiet host "
                     "or with fewer --threads")
    lines.append("")
    header = ["batch", "metric", *roles] + (["speedup"] if compare else [])
    table = [header, ["---:", "---", *("---:" for _ in roles)] + (["---:"] if compare else [])]

    def add(batch: str, metric: str, cells: list[str], speedup: str = "") -> None:
        table.append([batch, metric, *cells] + ([speedup] if compare else []))

    add("", "parameters", [_count(first[r]["params"]) for r in roles])
    add("", "nonzero parameters", [_count(first[r]["nonzero_params"]) for r in roles])
    add("", "layers", [str(first[r]["layers"]) for r in roles])
    add("", "weights", [_bytes(first[r]["weight_bytes"]) for r in roles])
    memory_label = "peak GPU memory" if proto["device"].startswith("cuda") else "peak RSS"
    for batch in proto["batches"]:
        row = {r: by_key[(r, batch)] for r in roles}
        model_row = row["model"]
        b = str(batch)
        add(b, "prefill ms", [_spread(row[r]["prefill_ms"]) for r in roles], _ratio(model_row["speedup_prefill"]))
        add(b, "decode tok/s per sequence", [_spread(row[r]["decode_tok_s_per_seq"]) for r in roles],
            _ratio(model_row["speedup_decode"]))
        add(b, "decode tok/s, whole batch", [_spread(row[r]["decode_tok_s_total"]) for r in roles])
        add(b, memory_label, [_bytes(row[r]["peak_memory_bytes"]) for r in roles])
        if all(row[r].get("kv_cache_bytes") is not None for r in roles):
            add(b, "KV cache at the end", [_bytes(row[r]["kv_cache_bytes"]) for r in roles])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in table]
    return "\n".join(lines)


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8"`` -> ``(1, 8)``; ValueError naming ``--batch`` for anything else."""
    try:
        values = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"--batch expects comma-separated positive integers such as 1,8; got {text!r}") from None
    return _check_batches(values)


# --------------------------------------------------------------------------- command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to an argparse ``subparsers`` object (handler: run_bench_cli)."""
    parser = subparsers.add_parser(
        "bench", help="prefill/decode speed and peak memory, pruned vs dense side by side",
        description="Prefill latency, decode throughput and peak memory of a model (and of --baseline beside it).")
    _add_arguments(parser)
    parser.set_defaults(handler=run_bench_cli)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help='hub id, local directory, .gguf file, or "default" (embedded SmolLM2-135M)')
    parser.add_argument("--baseline", default=None, help="the dense model to compare with (benchmarked first)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prefill tokens per sequence (default 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps (default 128)")
    parser.add_argument("--prompt", default="random", choices=list(PROMPTS),
                        help="transformers: random token ids (default) or text: the default corpus's held-out "
                             "text (what inference-time pruning selects from)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="transformers runtime: run the checkpoint's own modeling code (only if you trust it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the benchmark (llama.cpp: its threads, default all cores)")
    parser.add_argument("--runtime", default="transformers", choices=["transformers", "llama.cpp"],
                        help="transformers (default), or llama.cpp: the GGUF form of both models, batch 1 on the CPU, "
                             "prompt processing and decode tok/s (needs pip install 'prunekit[llama]')")
    parser.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                        help="llama.cpp: weight type when a model is not a .gguf file and is converted first "
                             "(default f16)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    from .inference.cli import add_arguments
    add_arguments(parser, prompt=False)


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed arguments describe, print the table, write --json. Returns 0."""
    runtime = getattr(args, "runtime", "transformers")
    from .inference.cli import configs_from_args, to_spec
    token, kv, _ = configs_from_args(args)
    pruning = to_spec(token, kv)
    if runtime == "llama.cpp" and pruning:
        raise ValueError("--token-pruning/--kv-pruning run in transformers; drop --runtime llama.cpp")
    if runtime == "llama.cpp":
        from . import bench_llama_cpp

        _check_llama_cpp_flags(args)
        result = bench_llama_cpp.benchmark(args.model, baseline=args.baseline, prompt_len=args.prompt_len,
                                           new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                                           threads=args.threads, outtype=args.outtype or "f16",
                                           trust_remote_code=getattr(args, "trust_remote_code", False))
        print(bench_llama_cpp.format_table(result))
    else:
        if getattr(args, "outtype", None) is not None:
            raise ValueError("--outtype applies to --runtime llama.cpp (the GGUF weight type); transformers "
                             "measures the checkpoint in --dtype")
        result = benchmark(args.model, baseline=args.baseline, batches=parse_batches(args.batch),
                           prompt_len=args.prompt_len, new_tokens=args.new_tokens, device=args.device,
                           dtype=args.dtype, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                           trust_remote_code=args.trust_remote_code, pruning=pruning, prompt=args.prompt)
        print(format_table(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m prunekit.bench ...``: the bench command on its own (and the CPU worker entry)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(*argv[1:])
    parser = argparse.ArgumentParser(prog="python -m prunekit.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run_bench_cli(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"prunekit bench: error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- validation

def _check_llama_cpp_flags(args: argparse.Namespace) -> None:
    """Flags of the transformers runtime that llama.cpp cannot honour are refused, not ignored."""
    if parse_batches(args.batch) != (1,):
        raise ValueError(f"--runtime llama.cpp measures batch 1 (one sequence, as llama.cpp serves it); "
                         f"--batch {args.batch} applies to --runtime transformers")
    if args.device != "cpu":
        raise ValueError(f"--runtime llama.cpp runs on the CPU (llama-cpp-python's CPU build); --device "
                         f"{args.device} applies to --runtime transformers")
    if args.dtype != "float32":
        raise ValueError(f"--runtime llama.cpp takes the GGUF file's weight types (--outtype when it converts); "
                         f"--dtype {args.dtype} applies to --runtime transformers")
    if getattr(args, "prompt", "random") != "random":
        raise ValueError("--runtime llama.cpp times prompts of random token ids; --prompt text applies to "
                         "--runtime transformers")


def _check_batches(batches: Sequence[int]) -> tuple[int, ...]:
    values = tuple(batches)
    if not values or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ValueError(f"--batch expects positive integers such as 1,8; "
                         f"got {','.join(map(str, values)) or 'nothing'}")
    return values


def _check_device(device: str) -> torch.device:
    from prunekit.io.loading import resolve_device

    try:
        return resolve_device(device)
    except RuntimeError as err:  # CUDA asked for but not there: the user's input, not a crash
        raise ValueError(f"--device {device}: {err}") from None


# --------------------------------------------------------------------------- measurement

def _measure_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Run `_measure_model(**spec)` in a fresh interpreter; return its result or raise its error."""
    return run_worker("prunekit.bench", spec, "benchmark", spec["model"], _USER_ERRORS)


def _worker_main(spec_json: str, out_path: str) -> int:
    """Worker process: measure one model, write the result (or the error) as JSON to `out_path`."""
    return worker_main(_measure_model, spec_json, out_path)


def _measure_model(model: str, batches: list[int], prompt_len: int, new_tokens: int, device: str, dtype: str,
                   repeats: int, warmup: int, threads: int | None, seed: int,
                   trust_remote_code: bool = False, pruning: dict | None = None,
                   prompt: str = "random") -> dict[str, Any]:
    """Load one model and measure every batch size; ``{"info", "measurements", "torch_threads",
    "memory_method"}``. With `pruning`, every run is under `prunekit.inference.pruning` with its own cache."""
    import torch

    from prunekit.io.loading import load

    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    lm, tokenizer = load(model, dtype=dtype, device=device, place=True, trust_remote_code=trust_remote_code)
    ids = _text_prompt(tokenizer, prompt_len, model) if prompt == "text" else None
    if pruning:
        from contextlib import ExitStack

        from prunekit.inference.cli import from_spec
        from prunekit.inference.generation import pruning as inference_pruning
        token, kv = from_spec(pruning)
        with ExitStack() as stack:
            state = stack.enter_context(inference_pruning(lm, token, kv, tokenizer=tokenizer))
            return _measure_loaded(lm, model, batches, prompt_len, new_tokens, dev, repeats, warmup, seed,
                                   state.new_cache, ids)
    return _measure_loaded(lm, model, batches, prompt_len, new_tokens, dev, repeats, warmup, seed, None, ids)


def _text_prompt(tokenizer, prompt_len: int, model: str):
    """The first `prompt_len` tokens of the default corpus's held-out split, (1, prompt_len)."""
    from prunekit.data import evaluation_data

    if tokenizer is None:
        raise ValueError(f"--prompt text needs a tokenizer and {model} has none; use --prompt random")
    ids = evaluation_data(tokenizer, "default", max_tokens=prompt_len).ids
    if ids.numel() < prompt_len:
        raise ValueError(f"--prompt text: the default corpus's held-out split has {ids.numel()} tokens in this "
                         f"tokenizer, fewer than --prompt-len {prompt_len}; lower it or use --prompt random")
    return ids.view(1, -1)


def _measure_loaded(lm, model: str, batches, prompt_len: int, new_tokens: int, dev, repeats: int, warmup: int,
                    seed: int, new_cache, ids=None) -> dict[str, Any]:
    import torch
    info = _model_info(lm)
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and prompt_len + new_tokens > limit:
        raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the "
                         f"{limit} positions of {model}")
    memory_method = _reset_peak_memory(dev)
    measurements = [_measure_batch(lm, batch, prompt_len, new_tokens, dev, repeats, warmup, seed, new_cache, ids)
                    for batch in batches]
    return {"info": info, "measurements": measurements, "torch_threads": torch.get_num_threads(),
            "memory_method": memory_method}


def _model_info(lm: torch.nn.Module) -> dict[str, Any]:
    """What the loaded model is: sizes come from the model itself, not from any shared config."""
    import torch

    params = list(lm.parameters())  # tied weights appear once
    return {
        "params": sum(p.numel() for p in params),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "layers": getattr(lm.config, "num_hidden_layers", None),
        "dtype": str(params[0].dtype).removeprefix("torch."),
        "attn_implementation": getattr(lm.config, "_attn_implementation", None),
        "vocab": lm.get_input_embeddings().num_embeddings,
    }


def _measure_batch(lm, batch: int, prompt_len: int, new_tokens: int, dev: torch.device,
                   repeats: int, warmup: int, seed: int, new_cache=None, ids=None) -> dict[str, Any]:
    """`warmup` untimed runs, then `repeats` timed ones; times in seconds, peak memory in bytes. `ids`
    (1, prompt_len): the prompt (repeated per row); None: random ids from `seed`."""
    import torch

    if ids is not None:
        prompt = ids.expand(batch, -1).contiguous().to(dev)                        # (batch, prompt_len)
    else:
        vocab = lm.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(dev)  # (batch, prompt_len)
    # Prefill only needs the last position's logits to pick the first new token.
    prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    for _ in range(warmup):
        _prefill_and_decode(lm, prompt, new_tokens, prefill_kwargs, dev, new_cache)
    prefill_s, decode_s, peaks = [], [], []
    for _ in range(repeats):
        _reset_peak_memory(dev)
        p, d, kv_bytes = _prefill_and_decode(lm, prompt, new_tokens, prefill_kwargs, dev, new_cache)
        peaks.append(_peak_memory(dev))
        prefill_s.append(p)
        decode_s.append(d)
    return {"batch": batch, "new_tokens": new_tokens, "prefill_s": prefill_s, "decode_s": decode_s,
            "peak_memory_bytes": max(peaks), "kv_cache_bytes": kv_bytes,
            "prefill_logits_to_keep": prefill_kwargs.get("logits_to_keep")}


def _prefill_and_decode(lm, prompt: torch.Tensor, new_tokens: int, prefill_kwargs: dict,
                        dev: torch.device, new_cache=None) -> tuple[float, float, int]:
    """One prefill over `prompt` (batch, prompt_len), then `new_tokens` greedy one-token steps
    with the KV cache (a fresh one from `new_cache` when given). Returns (prefill seconds, decode seconds
    for all steps, bytes the cache holds at the end)."""
    import torch

    from prunekit.inference.runtime import cache_bytes
    from prunekit.models.cache import cache_keyword, returned_cache

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    keyword = cache_keyword(lm)
    extra = {keyword: new_cache()} if new_cache is not None else {}
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        out = lm(input_ids=prompt, use_cache=True, **prefill_kwargs, **extra)
        token = out.logits[:, -1:].argmax(-1)  # (batch, 1)
        sync()
        prefilled = time.perf_counter()
        cache = returned_cache(out)
        for _ in range(new_tokens):
            out = lm(input_ids=token, use_cache=True, **{keyword: cache})
            cache = returned_cache(out)
            token = out.logits[:, -1:].argmax(-1)  # (batch, 1)
        sync()
    return prefilled - start, time.perf_counter() - prefilled, cache_bytes(cache)


def _reset_peak_memory(dev: torch.device) -> str:
    """Start a new peak-memory window; return what the peak will mean (for the protocol)."""
    if dev.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(dev)
        return "torch.cuda.max_memory_allocated, reset before each repeat (weights included)"
    return reset_peak_rss()


def _peak_memory(dev: torch.device) -> int:
    """Peak bytes since the last `_reset_peak_memory`, see its description."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(dev)
    return peak_rss()


# --------------------------------------------------------------------------- results

def _row(role: str, name: str, info: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    """One (model, batch) row: raw seconds become ms and tokens/s summaries."""
    batch = m["batch"]
    step_ms = _summary([s * 1e3 / m["new_tokens"] for s in m["decode_s"]])
    # tokens/s decreases with time: the slowest run gives the min, the median maps to the median
    per_seq = {"median": 1e3 / step_ms["median"], "min": 1e3 / step_ms["max"], "max": 1e3 / step_ms["min"]}
    return {
        "role": role, "model": name, "batch": batch, **info,
        "prefill_ms": _summary([s * 1e3 for s in m["prefill_s"]]),
        "decode_ms_per_token": step_ms,
        "decode_tok_s_per_seq": per_seq,
        "decode_tok_s_total": {k: v * batch for k, v in per_seq.items()},
        "peak_memory_bytes": m["peak_memory_bytes"],
        "kv_cache_bytes": m.get("kv_cache_bytes"),
        "prefill_logits_to_keep": m["prefill_logits_to_keep"],
        "speedup_prefill": None,
        "speedup_decode": None,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """Model rows get baseline / model of the median prefill time and decode step time."""
    base = {row["batch"]: row for row in rows if row["role"] == "baseline"}
    for row in rows:
        if row["role"] == "model" and row["batch"] in base:
            ref = base[row["batch"]]
            row["speedup_prefill"] = ref["prefill_ms"]["median"] / row["prefill_ms"]["median"]
            row["speedup_decode"] = ref["decode_ms_per_token"]["median"] / row["decode_ms_per_token"]["median"]


def _pruning_text(pruning: dict | None) -> str:
    if not pruning:
        return "none (stock)"
    from prunekit.inference.cli import describe, from_spec
    return describe(*from_spec(pruning))


def _device_name(dev: torch.device) -> str:
    """The CUDA device name, or the CPU model (/proc/cpuinfo, else platform)."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    return cpu_model()


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _count(n: int) -> str:
    """134515008 -> "134.52M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _spread(stat: dict[str, float]) -> str:
    """median [min-max]"""
    return f"{_num(stat['median'])} [{_num(stat['min'])}-{_num(stat['max'])}]"


if __name__ == "__main__":
    sys.exit(main())
