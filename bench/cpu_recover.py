"""Recovery benchmark: how much of the dense-vs-pruned perplexity gap mask-preserving fine-tuning
closes at 2:4 on SmolLM2-135M, for a stated token budget, with the sparsity after merging.

    python bench/cpu_recover.py                          # sparsegpt 2:4, then lora / perp / kd
    python bench/cpu_recover.py --steps 100 --batch-size 4 --seqlen 256 --only lora
    python bench/cpu_recover.py --model DIR --samples 2 --seqlen 32 --steps 2 --max-eval-tokens 256   # tiny (tests)

Protocol: the pruned model is `prunekit prune MODEL --method sparsegpt --nm 2:4` with the core
benchmark's calibration (`--samples` windows of 512 tokens, seed 0; reused if `--work`/pruned
exists). Recovery trains on the calibration split of the offline default corpus (`--steps` x
`--batch-size` windows of `--seqlen` tokens, seed 0); perplexity is measured before and after on
the held-out evaluation split (seqlen 512, non-overlapping windows), the same text as the core
table. A method whose report and evaluation exist under --work is read back, not re-run.
Gap closed = (ppl_pruned - ppl_recovered) / (ppl_pruned - ppl_dense).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_smollm2 import machine

# lr 1e-3 for all (not tuned: one value that moves every method within a 100-step budget)
METHODS = {"lora": ["--method", "lora", "--rank", "16", "--lr", "1e-3"],
           "lora-rslora": ["--method", "lora", "--rank", "16", "--rslora", "--lr", "1e-3"],
           "perp": ["--method", "perp", "--lr", "1e-3"],
           "kd": ["--method", "kd", "--rank", "16", "--lr", "1e-3"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows for pruning")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation seqlen")
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="override the table's learning rate")
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--only", action="append", help=f"recovery methods to run ({', '.join(METHODS)})")
    parser.add_argument("--work", type=Path, default=Path("bench/work/recover"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_recover.json"))
    args = parser.parse_args(argv)

    eval_args = ["--seqlen", str(args.seqlen)] + (["--max-tokens", str(args.max_eval_tokens)]
                                                  if args.max_eval_tokens else [])
    pruned = args.work / "pruned"
    dense = evaluate(args.model, args.work / "dense.json", eval_args)
    if not (pruned / "prunekit.json").exists():
        run(["prune", args.model, "--method", "sparsegpt", "--nm", "2:4", "--samples", str(args.samples),
             "--seqlen", str(args.seqlen), "--no-eval", "--out", str(pruned), "--overwrite"])
    before = evaluate(str(pruned), args.work / "pruned.json", eval_args)
    rows = []
    for name in args.only or METHODS:
        out = args.work / f"recovered-{name}"
        report_path = args.work / f"recover-{name}.json"
        command = ["recover", str(pruned), "--data", "default", *METHODS[name], "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--seqlen", str(args.train_seqlen), "--out", str(out),
                   "--overwrite", "--no-progress", "--json", str(report_path)]
        if args.lr is not None:
            command += ["--lr", str(args.lr)]
        eval_path = args.work / f"recovered-{name}.eval.json"
        if not (report_path.exists() and eval_path.exists()):       # finished runs are read back
            run(command)
        after = evaluate(str(out), eval_path, eval_args)
        report = json.loads(report_path.read_text())
        report = report.get("recovery", report)
        seconds = report.get("seconds")
        gap = (before["ppl"] - after["ppl"]) / (before["ppl"] - dense["ppl"])
        rows.append({"method": name, "command": "prunekit " + " ".join(command), "ppl": after["ppl"],
                     "gap_closed": gap, "tokens": report.get("tokens"), "seconds": round(seconds, 1),
                     "sparsity_before": report.get("sparsity_before"), "sparsity_after": report.get("sparsity_after"),
                     "sparsity_after_eval": after["sparsity"]})
        print(f"{name:<12} ppl {after['ppl']:.3f} (pruned {before['ppl']:.3f}, dense {dense['ppl']:.3f}): "
              f"gap closed {gap:.1%}, {report.get('tokens')} tokens, {seconds:.0f} s training, sparsity after merge "
              f"{after['sparsity']:.2%}", flush=True)
    result = {"machine": machine(), "date": date.today().isoformat(), "protocol": vars(args) | {"work": str(args.work),
              "out": str(args.out)}, "dense": dense, "pruned": before, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def run(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "prunekit", *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"prunekit {' '.join(command)} failed:\n{done.stderr[-3000:]}")


def evaluate(model: str, path: Path, eval_args: list[str]) -> dict:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        run(["eval", model, *eval_args, "--json", str(path)])
    data = json.loads(path.read_text())
    return {"ppl": data["perplexity"]["ppl"], "protocol": data["perplexity"]["protocol"],
            "sparsity": data["sparsity"]["block_linear_sparsity"]}


if __name__ == "__main__":
    sys.exit(main())
