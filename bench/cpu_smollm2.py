"""CPU benchmark of the core (issue: "prunekit core"): perplexity, prune wall time and peak RSS
of magnitude / Wanda / SparseGPT at 50%, 2:4, 4:8 and 70% on SmolLM2-135M.

    python bench/cpu_smollm2.py                       # the full table (about an hour on 2 cores)
    python bench/cpu_smollm2.py --only wanda-50 --samples 16
    python bench/cpu_smollm2.py --model DIR --samples 2 --seqlen 32 --max-eval-tokens 256   # tiny (tests)

Protocol: float32 on CPU, `samples` calibration windows of `seqlen` tokens from the offline
default corpus (seed 0), perplexity on its held-out evaluation split at the same seqlen
(non-overlapping windows). Every run is its own process, so peak RSS is that run's alone;
the wall time is `prune_`'s (capture, calibration forward passes, statistics, pruning,
verification), not model loading or evaluation. The memory budget printed beside each run
is (interpreter + loaded model) + one block + the cached block inputs/outputs, plus 20%.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PATTERNS = {"50": ["--sparsity", "0.5"], "2:4": ["--nm", "2:4"], "4:8": ["--nm", "4:8"], "70": ["--sparsity", "0.7"]}
RUNS = {f"{method}-{name}": ["--method", method, *args]
        for name, args in PATTERNS.items() for method in ("magnitude", "wanda", "sparsegpt")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--sequential", default="true", choices=["true", "block"])
    parser.add_argument("--only", action="append", help=f"run only these ({', '.join(RUNS)}, dense)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_smollm2.json"))
    args = parser.parse_args(argv)

    run_table(args.only or ["dense", *RUNS], args, run_one, format_row, markdown)
    return 0


def run_table(names, args, run_one, format_row, markdown) -> dict:
    """Run each named row (printing it as it finishes), write the table to `args.out`, print it."""
    rows = []
    for name in names:
        rows.append(run_one(name, args))
        print(format_row(rows[-1]), flush=True)
    result = {"machine": machine(), "date": date.today().isoformat(), "protocol": vars(args) | {"out": str(args.out)},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print("\n" + markdown(result))
    return result


def run_one(name: str, args) -> dict:
    """Run one configuration in a fresh interpreter and collect its numbers."""
    json_path = args.out.parent / f"{args.out.stem}.{name.replace(':', 'of')}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    common = ["--seqlen", str(args.seqlen), "--json", str(json_path)]
    if name == "dense":
        command = ["eval", args.model, *common]
        if args.max_eval_tokens:
            command += ["--max-tokens", str(args.max_eval_tokens)]
    else:
        command = ["prune", args.model, *RUNS[name], "--samples", str(args.samples), "--sequential", args.sequential,
                   *common, "--set", "eval.dense=false"]
        if args.max_eval_tokens:
            command += ["--set", f"eval.max_tokens={args.max_eval_tokens}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prunekit", *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    data = json.loads(json_path.read_text())
    row = {"name": name, "process_seconds": round(time.perf_counter() - started, 1)}
    if name == "dense":
        row["ppl"] = data["perplexity"]["ppl"]
        row["protocol"] = data["perplexity"]["protocol"]
        return row
    step = data["steps"][0]
    last_block = step["blocks"][-1]
    row.update(ppl=data["pruned_perplexity"]["ppl"], protocol=data["pruned_perplexity"]["protocol"],
               prune_seconds=step["seconds"], sparsity=step["sparsity_of_pruned_layers"],
               peak_rss_mb=last_block.get("peak_rss_mb"), budget_mb=step["memory_budget"].get("budget_mb"))
    return row


def format_row(row: dict) -> str:
    if row["name"] == "dense":
        return f"{'dense':<15} ppl {row['ppl']:8.3f}"
    return (f"{row['name']:<15} ppl {row['ppl']:8.3f}  prune {row['prune_seconds']:7.1f} s  "
            f"peak RSS {row['peak_rss_mb']} MB (budget {row['budget_mb']} MB)  sparsity {row['sparsity']:.2%}")


def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']}; date {result['date']}.",
             "", "| run | perplexity | prune wall time (s) | peak RSS (MB) | budget (MB) |",
             "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if row["name"] == "dense":
            lines.append(f"| dense | {row['ppl']:.3f} | - | - | - |")
        else:
            lines.append(f"| {row['name']} | {row['ppl']:.3f} | {row['prune_seconds']:.1f} | "
                         f"{row['peak_rss_mb']:.0f} | {row['budget_mb']} |")
    lines += ["", f"Perplexity protocol: {result['rows'][0]['protocol']}"]
    return "\n".join(lines)


def machine() -> str:
    import os

    import torch
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


if __name__ == "__main__":
    sys.exit(main())
