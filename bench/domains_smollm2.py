"""Domain pruning on SmolLM2-135M (issue 20): D-Pruner, contextual pruning and SEAP at 20% and 50%, each
calibrated on code and on prose, against the plain method of the same kind on the same domain, every
result scored on BOTH domains (what pruning for one domain costs on the other).

    python bench/domains_smollm2.py                                   # the whole table (about an hour, 2 cores)
    python bench/domains_smollm2.py --only d-pruner --only wanda      # some methods
    python bench/domains_smollm2.py --model DIR --samples 2 --seqlen 32 --max-eval-tokens 256   # tiny (tests)

Protocol: float32 on CPU. Each prune: `prunekit prune MODEL --method M --domain D --sparsity S` on
`samples` windows of `seqlen` tokens of the offline domain D (seed 0; D-Pruner draws its general windows
from the other domain, same count and length), `--no-eval`; then `prunekit eval OUT --domains`: perplexity
on the held-out split of each domain (code: the stdlib's .py files; prose: its documentation), `seqlen`-token
non-overlapping windows, the first `max-eval-tokens` tokens. The same for the dense model. Kinds:
unstructured (D-Pruner against Wanda) and width, physically removed channels/heads (contextual and SEAP
against Wanda-SP), `sparsity` = the share of the block linears' weights removed (zeroed or cut).
Each prune and each evaluation is its own process; a row whose JSON exists is read back, not re-run.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

METHODS = {"d-pruner": "unstructured", "wanda": "unstructured", "contextual": "width", "seap": "width",
           "wanda-sp": "width"}
BASELINE = {"d-pruner": "wanda", "contextual": "wanda-sp", "seap": "wanda-sp"}
DOMAINS = ("code", "prose")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument("--seap-protect", default=None, metavar="FIRST,LAST",
                        help="SEAP's protected first and last blocks (default: the paper's 2,2; tiny models: 0,0)")
    parser.add_argument("--only", action="append", choices=list(METHODS), help="run only these methods")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-bench-domains"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/domains_smollm2.md"))
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    dense = evaluate(args.model, args.work / "dense.eval.json", args)
    rows = []
    for method in args.only or list(METHODS):
        for domain in DOMAINS:
            for sparsity in sparsities:
                name = f"{method}-{domain}-{sparsity:g}"
                out = args.work / name
                prune_command = ["prune", args.model, "--method", method, "--domain", domain, "--sparsity",
                                 str(sparsity), "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                                 "--no-eval", "--out", str(out), "--overwrite", "--json", str(out) + ".json"]
                if method == "seap" and args.seap_protect:
                    first, last = args.seap_protect.split(",")
                    prune_command += ["--set", f"steps.0.protect_first={first}", "--set",
                                      f"steps.0.protect_last={last}"]
                if not Path(str(out) + ".json").exists():
                    run(prune_command)
                pruned = json.loads(Path(str(out) + ".json").read_text())
                scores = evaluate(str(out), args.work / f"{name}.eval.json", args)
                rows.append({"name": name, "method": method, "kind": METHODS[method], "domain": domain,
                             "sparsity": sparsity, "ppl": {d: scores[d]["ppl"] for d in DOMAINS},
                             "parameters": pruned.get("parameters_after"),
                             "seconds": pruned["steps"][0].get("seconds"),
                             "command": "prunekit " + " ".join(prune_command)})
                print(json.dumps(rows[-1]), flush=True)
    write(args, dense, rows)
    return 0


def run(command: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "prunekit", *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"prunekit {' '.join(command)} failed:\n{done.stderr[-3000:]}")


def evaluate(model: str, record: Path, args) -> dict:
    """Perplexity of `model` on each domain (read back when `record` exists)."""
    if not record.exists():
        run(["eval", model, "--domains", "--seqlen", str(args.seqlen), "--max-tokens", str(args.max_eval_tokens),
             "--json", str(record)])
    return json.loads(record.read_text())["domains"]


def write(args, dense: dict, rows: list[dict]) -> None:
    from prunekit.bench_host import cpu_model
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    by_name = {row["name"]: row for row in rows}
    lines = ["# Domain pruning on SmolLM2-135M", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='minutes')}; commit {commit}",
             f"- command: `python bench/domains_smollm2.py {' '.join(sys.argv[1:])}`",
             f"- machine: {cpu_model()}; Python {platform.python_version()}",
             f"- calibration: {args.samples} windows x {args.seqlen} tokens of the pruning domain (seed 0)",
             *[f"- perplexity protocol ({d}): {dense[d]['protocol']}" for d in DOMAINS],
             f"- dense: code {dense['code']['ppl']:.2f}, prose {dense['prose']['ppl']:.2f}", "",
             "| method | kind | calibrated on | removed | parameters | ppl code | ppl prose | in-domain vs "
             "baseline | other domain vs baseline | prune s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = by_name.get(row["name"].replace(row["method"], BASELINE.get(row["method"], ""), 1))
        other = "prose" if row["domain"] == "code" else "code"
        ratios = [f"{row['ppl'][d] / base['ppl'][d]:.3f}x" if base else "-" for d in (row["domain"], other)]
        params = f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "-"
        seconds = f"{row['seconds']:.0f}" if row["seconds"] is not None else "-"
        lines.append(f"| {row['method']} | {row['kind']} | {row['domain']} | {row['sparsity']:.0%} | {params} | "
                     f"{row['ppl']['code']:.2f} | {row['ppl']['prose']:.2f} | {ratios[0]} | {ratios[1]} | "
                     f"{seconds} |")
    lines += ["", "Baselines: D-Pruner against Wanda, contextual and SEAP against Wanda-SP, same domain and "
              "sparsity. Commands: each row's `prunekit prune` is in the JSON next to this file."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
