"""Structure search on SmolLM2-135M (issue 17): the searched model against FLAP at equal parameters, and a
latency target met on this machine.

    python bench/search_smollm2.py                        # 25% and 35% of the block parameters, latency=0.75
                                                          # (timed in transformers, and in llama.cpp)
    python bench/search_smollm2.py --only params-25 --budget-minutes 5
    python bench/search_smollm2.py --model DIR --samples 4 --seqlen 16 --budget-minutes 0.05 \\
        --max-eval-tokens 256 --eval-seqlen 32 --context 32   # tiny (tests)

Protocol: float32 on CPU. Each search: `prunekit search` on `samples` windows of `seqlen` tokens of the
offline default corpus (seed 0; the fitness is the KL to the dense model on them, selection on the first 2),
space width,depth,sublayer, width score flap, `budget-minutes` for the whole search (library, seed scores and
cost table included), LIAR after it. Perplexity on the held-out split of the default corpus, `eval-seqlen`-token
non-overlapping windows, the first `max-eval-tokens` tokens: the protocol of bench/cpu_structured.py, whose
FLAP rows (non-uniform, bias compensation, 32 x 512 calibration windows) are the comparison when the
protocol strings match (else FLAP is run here with the same settings). Each run is its own process.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RUNS = {"params-25": "params=0.75", "params-35": "params=0.65", "latency-75": "latency=0.75",
        "latency-75-llama.cpp": "latency=0.75"}
RUNTIME = {"latency-75-llama.cpp": "llama.cpp"}     # where the latency is measured (default: transformers)
FLAP = {"params-25": "flap-25", "params-35": "flap-35"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--only", action="append", help=f"run only these ({', '.join(RUNS)})")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-bench-search"))
    parser.add_argument("--reference", type=Path, action="append",
                        help="bench/cpu_structured.py results with the FLAP rows (default: its 20/35% and 25% files)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/search_smollm2.md"))
    args = parser.parse_args(argv)
    names = args.only or list(RUNS)
    args.work.mkdir(parents=True, exist_ok=True)
    reference = {}
    for path in args.reference or [Path("bench/results/cpu_structured.json"),
                                   Path("bench/results/cpu_structured_25.json")]:
        if path.is_file():
            reference.update({row["name"]: row for row in json.loads(path.read_text())["rows"]})

    rows = []
    for name in names:
        out, record = args.work / name, args.work / f"{name}.json"
        command = [sys.executable, "-m", "prunekit", "search", args.model, "--target", RUNS[name],
                   "--budget-minutes", str(args.budget_minutes), "--samples", str(args.samples), "--seqlen",
                   str(args.seqlen), "--context", str(args.context), "--out", str(out), "--overwrite", "--json",
                   str(record), "--set", f"eval.seqlen={args.eval_seqlen}", "--set",
                   f"eval.max_tokens={args.max_eval_tokens}"]
        if name in RUNTIME:
            command += ["--runtime", RUNTIME[name]]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        result = json.loads(record.read_text())
        body = json.loads((out / "search.json").read_text())
        flap = reference.get(FLAP.get(name, ""))
        protocol = result["pruned_perplexity"]["protocol"]
        rows.append({"name": name, "target": RUNS[name], "runtime": RUNTIME.get(name, "transformers"),
                     "ppl": result["pruned_perplexity"]["ppl"],
                     "dense_ppl": result["dense_perplexity"]["ppl"], "protocol": protocol,
                     "params": result["parameters_after"], "dense_params": result["parameters"],
                     "removed_block_params": 1 - body["best"]["block_params"] / body["dense"]["block_params"],
                     "generations": body["generation"], "candidates": len(body["candidates"]),
                     "kl": body["best"]["fitness_kl"], "seconds": result["seconds"],
                     "latency_table": (body["best"]["latency_s"] / body["dense"]["latency_s"]
                                       if body["best"].get("latency_s") else None),
                     "latency_measured": body["best"].get("latency_measured_ratio"),
                     "widths": [tuple(k) for k in body["best"]["kept"]],
                     "flap_ppl": flap["ppl"] if flap and flap.get("protocol") == protocol else None})
    _write(args, rows)
    return 0


def _write(args, rows) -> None:
    from prunekit.bench_host import cpu_model
    cpu = cpu_model()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Structure search on SmolLM2-135M", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}; commit {commit}",
             f"- command: `python bench/search_smollm2.py {' '.join(sys.argv[1:])}`",
             f"- machine: {cpu}; Python {platform.python_version()}",
             f"- search: {args.samples} windows x {args.seqlen} tokens (fitness: KL to dense), "
             f"{args.budget_minutes} min for the whole search (setup included), KV context {args.context}",
             f"- perplexity protocol: {rows[0]['protocol'] if rows else '-'}", "",
             "| run | target | removed (block params) | parameters | ppl searched | ppl FLAP (same params) | "
             "searched / FLAP | KL | generations / candidates | latency x (table / measured) | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ppl'] / r['flap_ppl']:.3f}" if r["flap_ppl"] else "-"
        latency = (f"{r['latency_table']:.3f} / {r['latency_measured']:.3f}" if r["latency_measured"] else "-")
        lines.append(f"| {r['name']} | {r['target']} | {r['removed_block_params']:.1%} | {r['params'] / 1e6:.1f}M | "
                     f"{r['ppl']:.2f} | {r['flap_ppl'] if r['flap_ppl'] else '-'} | {ratio} | {r['kl']:.4f} | "
                     f"{r['generations']} / {r['candidates']} | {latency} | {r['seconds']:.0f} |")
    lines += ["", f"Dense perplexity {rows[0]['dense_ppl']:.2f}." if rows else "", "",
              "Kept (heads, FFN channels) per block of each result:", ""]
    lines += [f"- {r['name']}: {r['widths']}" for r in rows]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
