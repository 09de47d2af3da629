"""llama.cpp benchmark of structured pruning (issue 16): SmolLM2-135M dense vs width- and depth-pruned,
as GGUF files run by llama.cpp on the CPU, with the transformers speed and the perplexity beside it.

    python bench/llama_cpp_smollm2.py                      # everything (about 40 min on 2 quiet cores)
    python bench/llama_cpp_smollm2.py --no-speed           # prune, export, perplexity (may share the machine)
    python bench/llama_cpp_smollm2.py --reuse              # then time: keeps the pruned models, GGUF files
                                                           # and perplexities that --work already holds

Runs (each pruned once with the CLI, `--samples 32 --seqlen 256 --no-eval`, calibration on the offline
default corpus, seed 0):

* `wanda-sp-20`, `wanda-sp-35`: width, uniform (`--method wanda-sp --sparsity S`): every block loses the
  same heads and FFN channels; written as a stock `llama` GGUF with smaller widths.
* `flap-20`, `flap-35`: width, non-uniform (`--method flap --sparsity S --non-uniform`): per-block widths,
  written as llama.cpp's `deci` architecture (the one graph with per-layer widths).
* `block-influence-35`: depth (`--method block-influence --sparsity 0.35`): whole blocks removed.
* `wanda-sp-35-r64`, `flap-35-r64`: as the 35% width runs with `--round-to 64` (kept FFN channels in whole
  multiples of 64).

For each: llama.cpp prompt processing (pp) and decode (tg) tok/s against the dense GGUF in the same
`prunekit.bench_llama_cpp.benchmark` call (so each ratio comes from one run: dense and pruned measured
back to back, each in its own process), f16 files; q8_0 for the dense model and the depth-pruned one;
transformers prefill/decode through `prunekit.bench.benchmark` against the dense checkpoint (float32);
perplexity with prunekit (transformers, float32) and in llama.cpp (`gguf_perplexity`, f16 KV cache) on
the first `--eval-tokens` tokens of the held-out default text, non-overlapping windows of `--seqlen`;
and the time to export SmolLM2-135M to GGUF (f16, q8_0).

Protocol of every number is stored beside it in the JSON; the markdown table repeats it. All speed
numbers are measured last, after a wait for the 1-minute load average to drop below `--quiet-load`
(up to `--wait-minutes`); the load average at each measurement is recorded.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "wanda-sp-20": ["--method", "wanda-sp", "--sparsity", "0.2"],
    "wanda-sp-35": ["--method", "wanda-sp", "--sparsity", "0.35"],
    "flap-20": ["--method", "flap", "--sparsity", "0.2", "--non-uniform"],
    "flap-35": ["--method", "flap", "--sparsity", "0.35", "--non-uniform"],
    # kept FFN widths in whole multiples of 64 (ggml's f16 dot products run in 32-wide steps; 998 channels
    # leave a tail every row): does the alignment, not the bytes, decide the last few percent of decode speed?
    "wanda-sp-35-r64": ["--method", "wanda-sp", "--sparsity", "0.35", "--round-to", "64"],
    "flap-35-r64": ["--method", "flap", "--sparsity", "0.35", "--non-uniform", "--round-to", "64"],
    "block-influence-35": ["--method", "block-influence", "--sparsity", "0.35"],
}
KIND = {"wanda-sp-20": "width, uniform", "wanda-sp-35": "width, uniform", "flap-20": "width, non-uniform",
        "flap-35": "width, non-uniform", "block-influence-35": "depth",
        "wanda-sp-35-r64": "width, uniform, round-to 64", "flap-35-r64": "width, non-uniform, round-to 64"}
Q8_RUNS = ("block-influence-35",)          # q8_0 beside the dense q8_0 (depth keeps every row a multiple of 32)
LLAMA_HEADER = ["| run | kind | removed (block params) | params | layers | GGUF MiB | pp tok/s dense | "
                "pp tok/s pruned | pp x | tg tok/s dense | tg tok/s pruned | tg x | weight bytes ratio | "
                "peak RSS MiB (dense / pruned) | load before/after | others' cores |", "|---|---|" + "---:|" * 14]
TARGET = {"runs": ("wanda-sp-35", "flap-35", "block-influence-35", "wanda-sp-35-r64", "flap-35-r64"),
          "decode_speedup": 1.3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256, help="calibration and perplexity window")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="llama.cpp timed repeats")
    parser.add_argument("--hf-repeats", type=int, default=3, help="transformers timed repeats")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--wait-minutes", type=float, default=20)
    parser.add_argument("--only", action="append", help=f"run only these ({', '.join(RUNS)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama-bench-work/smollm2"))
    parser.add_argument("--reuse", action="store_true", help="keep what --work already holds")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--no-speed", action="store_true", help="stop after the perplexities (nothing is timed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/llama_cpp_smollm2.json")
    args = parser.parse_args(argv)
    names = args.only or list(RUNS)
    args.work.mkdir(parents=True, exist_ok=True)

    runs = {name: prune(name, args) for name in names}
    exports = export_all(runs, args)
    quality = perplexities(exports, args)
    if args.no_speed:
        print(json.dumps(quality, indent=2))
        return 0
    speed = measure_speed(runs, exports, args)
    result = {
        "title": "SmolLM2-135M in llama.cpp: dense vs width/depth-pruned",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_head(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": runs, "exports": exports, "quality": quality, **speed,
    }
    result["target"] = verdict(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


# --------------------------------------------------------------------------- pruning and export

def prune(name: str, args) -> dict:
    """Prune with the CLI in its own process (no evaluation), once; what it removed."""
    out_dir, record = args.work / name, args.work / f"{name}.prune.json"
    command = [sys.executable, "-m", "prunekit", "prune", args.model, *RUNS[name], "--samples", str(args.samples),
               "--seqlen", str(args.seqlen), "--no-eval", "--out", str(out_dir), "--overwrite", "--json", str(record)]
    if not (args.reuse and record.is_file() and out_dir.is_dir()):
        print(f"prune {name}: {' '.join(command[2:])}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        data = json.loads(record.read_text())
        data["bench_wall_seconds"] = round(wall, 1)
        record.write_text(json.dumps(data, indent=2))
    data = json.loads(record.read_text())
    step = data["steps"][0]
    return {"kind": KIND[name], "command": "prunekit " + " ".join(command[3:]).replace(str(args.work) + "/", "WORK/"),
            "dir": str(out_dir), "removed_fraction_of_block_params": step.get("removed_fraction_of_block_params"),
            "removed_blocks": step.get("removed_blocks"), "parameters_before": data.get("parameters_before"),
            "parameters_after": data.get("parameters_after"), "prune_seconds": round(step.get("seconds", 0), 1),
            "wall_seconds": data.get("bench_wall_seconds"), "stock": data.get("structure", {}).get("stock")}


def export_all(runs: dict, args) -> dict:
    """Every GGUF file: dense f16/q8_0 (timed, the issue's export time) and each pruned model."""
    from prunekit.bench_llama_cpp import OtherCpu
    from prunekit.io.gguf_writer import export_gguf

    jobs = [("dense", args.model, "f16"), ("dense", args.model, "q8_0")]
    jobs += [(name, run["dir"], "f16") for name, run in runs.items()]
    jobs += [(name, runs[name]["dir"], "q8_0") for name in Q8_RUNS if name in runs]
    exports = {}
    for name, source, outtype in jobs:
        path = args.work / f"{name}.{outtype}.gguf"
        record = path.with_suffix(".json")
        if not (args.reuse and record.is_file() and path.is_file()):
            print(f"export {name} {outtype}", flush=True)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            with OtherCpu() as others:
                result = export_gguf(source, path, outtype=outtype, overwrite=True)
            wall = time.perf_counter() - started
            record.write_text(json.dumps({**result.to_dict(), "seconds_with_load": round(wall, 2),
                                          "load_average_1min": load, "other_cpu_cores": others.cores}))
            gc.collect()
        exports[f"{name}.{outtype}"] = {"name": name, "outtype": outtype, **json.loads(record.read_text())}
    return exports


# --------------------------------------------------------------------------- quality

def perplexities(exports: dict, args) -> dict:
    """prunekit's perplexity (transformers, float32) of each checkpoint and llama.cpp's of each GGUF,
    on the same tokens and windows; kept in --work/quality.json (deterministic, so --reuse keeps it)."""
    import torch

    from prunekit import evaluation_data, load, perplexity
    from prunekit.eval.llama_cpp import gguf_perplexity

    torch.set_num_threads(args.threads)
    _, tokenizer = load(args.model)
    ids = evaluation_data(tokenizer, "default", max_tokens=args.eval_tokens)  # pruning never changes the vocabulary
    record = args.work / "quality.json"
    quality = json.loads(record.read_text()) if args.reuse and record.is_file() else {}
    for key, export in exports.items():
        name = export["name"]
        entry = quality.setdefault(name, {})
        if f"llama.cpp {export['outtype']}" in entry:
            continue
        if "prunekit" not in entry:
            source = args.model if name == "dense" else str(args.work / name)
            model, _ = load(source)
            result = perplexity(model, ids, seqlen=args.seqlen)
            entry["prunekit"] = {"ppl": result.ppl, "protocol": result.protocol}
            del model
            gc.collect()
        print(f"perplexity {key}", flush=True)
        llama = gguf_perplexity(export["path"], ids, seqlen=args.seqlen, threads=args.threads)
        entry[f"llama.cpp {export['outtype']}"] = {"ppl": llama["ppl"], "protocol": llama["protocol"]}
        record.write_text(json.dumps(quality, indent=2))
    return {name: quality[name] for name in ["dense", *(n for n in quality if n != "dense")]
            if any(e["name"] == name for e in exports.values())}


# --------------------------------------------------------------------------- speed

def wait_for_quiet(args) -> dict:
    """Wait (up to --wait-minutes) until the 1-minute load average is below --quiet-load."""
    started, first = time.time(), os.getloadavg()[0]
    while os.getloadavg()[0] > args.quiet_load and time.time() - started < args.wait_minutes * 60:
        print(f"load average {os.getloadavg()[0]:.2f} > {args.quiet_load}: waiting", flush=True)
        time.sleep(30)
    return {"load_when_ready_to_time": first, "waited_s": round(time.time() - started),
            "load_at_start": os.getloadavg()[0]}


def measure_speed(runs: dict, exports: dict, args) -> dict:
    """llama.cpp pairs (pruned vs dense, one call each), then transformers pairs."""
    from prunekit import bench, bench_llama_cpp

    waited = wait_for_quiet(args)
    shape = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads}
    pairs = [(name, "f16") for name in runs] + [(name, "q8_0") for name in Q8_RUNS if name in runs]
    llama = {}
    for name, outtype in pairs:
        print(f"llama.cpp {name} {outtype} vs dense {outtype}", flush=True)
        result = bench_llama_cpp.benchmark(exports[f"{name}.{outtype}"]["path"],
                                           baseline=exports[f"dense.{outtype}"]["path"],
                                           repeats=args.repeats, warmup=1, **shape)
        print(bench_llama_cpp.format_table(result), flush=True)
        llama[f"{name}.{outtype}"] = result
    transformers = {}
    if not args.skip_transformers:
        for name, run in runs.items():
            print(f"transformers {name} vs dense", flush=True)
            with bench_llama_cpp.OtherCpu() as others:     # its workers are this process's children
                result = bench.benchmark(run["dir"], baseline=args.model, repeats=args.hf_repeats, warmup=1, **shape)
            result["protocol"]["other_cpu_cores"] = others.cores
            print(bench.format_table(result), flush=True)
            transformers[name] = result
    return {"speed_wait": waited, "llama_cpp": llama, "transformers": transformers}


# --------------------------------------------------------------------------- report

def verdict(result: dict) -> dict:
    rows = {}
    for name in TARGET["runs"]:
        pair = result["llama_cpp"].get(f"{name}.f16")
        if pair:
            rows[name] = round(pair["rows"][1]["speedup_tg"], 3)
    met = {name: value >= TARGET["decode_speedup"] for name, value in rows.items()}
    return {"statement": "width and depth pruning at 35% give >= 1.3x decode tok/s in llama.cpp on CPU",
            "decode_speedup_f16": rows, "met": met, "all_met": bool(met) and all(met.values())}


def _ppl(quality: dict, name: str, key: str) -> str:
    value = quality.get(name, {}).get(key, {}).get("ppl")
    return "-" if value is None else f"{value:.2f}"


def _cell(stat: dict) -> str:
    return f"{stat['median']:.1f} [{stat['min']:.1f}-{stat['max']:.1f}]"


def markdown(result: dict) -> str:
    m, runs, exports, quality = result["machine"], result["runs"], result["exports"], result["quality"]
    llama, hf = result["llama_cpp"], result["transformers"]
    any_pair = next(iter(llama.values()))
    proto = any_pair["protocol"]
    lines = [f"# {result['title']}", "",
             f"- date: {result['date']}; git HEAD `{result['git_commit']}` when run (uncommitted files in the work "
             "tree, such as this benchmark while it was written, are not part of that commit)",
             f"- command: `{result['command']}`",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}, llama-cpp-python {m['llama_cpp_python']} "
             f"({proto['llama_cpp_system_info']})",
             f"- load average: {result['speed_wait']['load_when_ready_to_time']:.2f} when the timing stage began, "
             f"{result['speed_wait']['load_at_start']:.2f} after waiting {result['speed_wait']['waited_s']} s; "
             "per pair below (before/after; a pair with 2 threads on 2 cores raises it towards 2 by itself). "
             "\"others' cores\": the mean number of cores that processes other than the benchmark kept busy while "
             "the pair ran (/proc/stat busy time minus the benchmark's own CPU time, over the wall time)", ""]
    target = result["target"]
    verdicts = ", ".join(f"{name} {value:.3f}x ({'met' if target['met'][name] else 'missed'})"
                         for name, value in target["decode_speedup_f16"].items())
    missed = [name for name, ok in target["met"].items() if not ok]
    lines += [f"**Target** ({target['statement']}; f16 GGUF, decode tok/s pruned / dense, same run): {verdicts}. "
              + ("**Met** by every 35% run." if target["all_met"] else f"**Not met** by {', '.join(missed)}."), ""]

    lines += ["## llama.cpp speed (f16 GGUF), each pruned model against the dense one in the same run", "",
              f"Protocol: {proto['text'].split('; 1-min load')[0]}. Speedup = pruned / dense median tok/s.", "",
              *LLAMA_HEADER]
    for key, pair in llama.items():
        name, outtype = key.rsplit(".", 1)
        if outtype != "f16":
            continue
        lines.append(_llama_line(name, runs[name], pair))
    lines += ["", reading(llama)]
    q8 = {k: v for k, v in llama.items() if not k.endswith(".f16")}
    if q8:
        lines += ["", "## llama.cpp speed, q8_0 GGUF (dense q8_0 vs pruned q8_0, same run)", "",
                  *LLAMA_HEADER]
        for key, pair in q8.items():
            name = key.rsplit(".", 1)[0]
            lines.append(_llama_line(name, runs[name], pair))
    if hf:
        hp = next(iter(hf.values()))["protocol"]
        lines += ["", "## transformers speed (float32), each pruned checkpoint against the dense one in the same run",
                  "", f"Protocol: `prunekit.bench.benchmark`, {hp['device_name']}, torch threads "
                  f"{hp['torch_threads']}, batch 1, prefill {hp['prompt_len']} random ids (last-position logits), "
                  f"decode {hp['new_tokens']} greedy steps with the KV cache, {hp['warmup']} warm-up, "
                  f"{hp['repeats']} repeats, median [min-max], one process per model.", "",
                  "| run | prefill ms dense | prefill ms pruned | prefill x | decode tok/s dense | "
                  "decode tok/s pruned | decode x | load before/after | others' cores |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, res in hf.items():
            base, model = res["rows"]
            load = res["protocol"]["load_average_1min"]
            lines.append(f"| {name} | {_cell(base['prefill_ms'])} | {_cell(model['prefill_ms'])} | "
                         f"{model['speedup_prefill']:.2f} | {_cell(base['decode_tok_s_per_seq'])} | "
                         f"{_cell(model['decode_tok_s_per_seq'])} | {model['speedup_decode']:.2f} | "
                         f"{load['before']:.2f} / {load['after']:.2f} | {res['protocol']['other_cpu_cores']} |")

    q_proto = quality.get("dense", {})
    lines += ["", "## Quality: perplexity, prunekit (transformers float32) and llama.cpp, same tokens and windows", "",
              f"prunekit: {q_proto.get('prunekit', {}).get('protocol', '-')}", "",
              f"llama.cpp: {q_proto.get('llama.cpp f16', {}).get('protocol', '-')} (the q8_0 files likewise)", "",
              "| run | prunekit ppl | llama.cpp f16 ppl | llama.cpp q8_0 ppl |", "|---|---:|---:|---:|"]
    for name in ["dense", *runs]:
        lines.append(f"| {name} | {_ppl(quality, name, 'prunekit')} | {_ppl(quality, name, 'llama.cpp f16')} | "
                     f"{_ppl(quality, name, 'llama.cpp q8_0')} |")

    lines += ["", "## GGUF export time (`prunekit.io.gguf_writer.export_gguf`)", "",
              "Seconds with load = the whole call (loading the checkpoint, for `default` the cached dequantized "
              "safetensors, then writing); write = planning, encoding and writing the file.", "",
              "| model | outtype | file MiB | seconds with load | write seconds | load avg | others' cores | notes |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for export in exports.values():
        lines.append(f"| {export['name']} | {export['outtype']} | {export['bytes'] / 2**20:.1f} | "
                     f"{export['seconds_with_load']:.1f} | {export['seconds']:.1f} | "
                     f"{export['load_average_1min']:.2f} | {export.get('other_cpu_cores', '-')} | "
                     f"{'; '.join(export['notes']) or '-'} |")

    lines += ["", "## Pruning commands", "", "| run | command | removed blocks | prune s |", "|---|---|---|---:|"]
    for name, run in runs.items():
        lines.append(f"| {name} | `{run['command']}` | {run['removed_blocks'] or '-'} | {run['prune_seconds']} |")
    return "\n".join(lines) + "\n"


def reading(llama: dict) -> str:
    """How to read the f16 decode ratios, with this run's numbers: decode at batch 1 reads every weight once
    per token, so the weight bytes ratio is what a purely bandwidth-bound step would gain."""
    parts = []
    for key, pair in llama.items():
        if key.endswith(".f16") and key.split(".")[0] in TARGET["runs"]:
            base, model = pair["rows"]
            parts.append(f"{key.split('.')[0]} decodes {model['speedup_tg']:.2f}x faster for "
                         f"{base['tensor_bytes'] / model['tensor_bytes']:.2f}x fewer weight bytes")
    return ("Reading: \"weight bytes ratio\" is dense / pruned tensor bytes in the GGUF, the decode speedup a "
            "purely bandwidth-bound step would give. The tied embedding / LM head (49152 x 576 = 28.3M parameters, "
            "21% of SmolLM2-135M) is read at every step and never pruned, which caps that ratio near 1.4x at 35% of "
            "the blocks removed. At 35%: " + "; ".join(parts) + ". Our reading (not profiled): depth pruning beats "
            "its bytes ratio because it also removes whole layers' per-step costs that do not shrink with width "
            "(the KV cache and attention over it, norms, rope, a thread barrier per op); width pruning keeps all 30 "
            "layers and those costs, so it lands below its bytes ratio.")


def _llama_line(name: str, run: dict, pair: dict) -> str:
    base, model = pair["rows"]
    load = pair["protocol"]["load_average_1min"]
    removed = run["removed_fraction_of_block_params"]
    return (f"| {name} | {run['kind']} | {removed:.1%} | {model['params'] / 1e6:.1f}M (dense "
            f"{base['params'] / 1e6:.1f}M) | {model['layers']} | {model['file_bytes'] / 2**20:.1f} (dense "
            f"{base['file_bytes'] / 2**20:.1f}) | {_cell(base['pp_tok_s'])} | {_cell(model['pp_tok_s'])} | "
            f"{model['speedup_pp']:.2f} | {_cell(base['tg_tok_s'])} | {_cell(model['tg_tok_s'])} | "
            f"**{model['speedup_tg']:.2f}** | {base['tensor_bytes'] / model['tensor_bytes']:.2f} | "
            f"{base['peak_rss_bytes'] / 2**20:.0f} / "
            f"{model['peak_rss_bytes'] / 2**20:.0f} | {load['before']:.2f} / {load['after']:.2f} | "
            f"{pair['protocol']['other_cpu_cores']} |")


def machine() -> dict:
    import torch
    import transformers

    from prunekit.bench_llama_cpp import cpu_model, require_llama_cpp
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llama_cpp_python": require_llama_cpp()}


def git_head() -> str:
    """The checked-out commit (read-only `git rev-parse HEAD`); "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
