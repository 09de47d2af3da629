"""CPU benchmark of expert pruning (issue: "Mixture-of-Experts pruning") on the MoEfied SmolLM2,
a PROXY MoE built by `bench/make_moe.py` from the dense SmolLM2-135M (not a trained MoE: every
number here is measured on that proxy).

    python bench/make_moe.py --out /tmp/moe-smollm2                # once
    python bench/moe_experts.py --model /tmp/moe-smollm2           # the full table (~30 min on 2 cores)
    python bench/moe_experts.py --model DIR --only reap-50 --samples 2 --seqlen 32 --eval-tokens 512 --kl-tokens 128

Runs (each on a fresh copy of the unpruned MoE):
    experts   every expert score, expert-merge and random removal (3 seeds) at 25% and 50% of the routed
              experts removed, calibrated on prose
    weights   moe-pruner vs plain wanda inside the experts (and every other linear) at 50% and 2:4
    domains   REAP 50% calibrated on code vs on prose, each evaluated on both domains

Protocol: float32 on CPU; calibration = `samples` windows of `seqlen` tokens (seed 0) from the offline
"prose" (default) or "code" corpus; perplexity on the held-out evaluation split of each domain, first
`eval-tokens` tokens, non-overlapping windows of `seqlen`; KL(unpruned MoE || pruned) per token, mean over the
first `kl-tokens` positions of the prose evaluation split; prune time is the wall time of `prune_`;
checkpoint size is the safetensors bytes `save_pretrained` writes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

EXPERT_METHODS = ("reap", "expert-frequency", "expert-output", "expert-loo", "easy-ep", "naee", "expert-merge")
RATIOS = {"25": 0.25, "50": 0.5}


def runs() -> dict:
    """name -> (recipe step, calibration domain, evaluate on code too)."""
    table = {}
    for name, ratio in RATIOS.items():
        for method in EXPERT_METHODS:
            table[f"{method}-{name}"] = ({"method": method, "sparsity": ratio}, "prose", False)
        for seed in range(3):
            table[f"expert-random-{name}-seed{seed}"] = ({"method": "expert-random", "sparsity": ratio, "seed": seed},
                                                         "prose", False)
    for method in ("moe-pruner", "wanda"):
        table[f"{method}-50%"] = ({"method": method, "sparsity": 0.5}, "prose", False)
        table[f"{method}-2:4"] = ({"method": method, "nm": [2, 4]}, "prose", False)
    table["reap-50-prose-calibrated"] = ({"method": "reap", "sparsity": 0.5}, "prose", True)
    table["reap-50-code-calibrated"] = ({"method": "reap", "sparsity": 0.5}, "code", True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/moe-smollm2"),
                        help="the MoEfied SmolLM2 (bench/make_moe.py)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--kl-tokens", type=int, default=4096)
    parser.add_argument("--only", action="append", help="run only these (see runs())")
    parser.add_argument("--out", type=Path, default=Path("bench/results/moe_experts.json"))
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import prunekit.catalog  # noqa: F401  (registers the methods)
    from prunekit.data import calibration_data, evaluation_data
    from prunekit.eval.fidelity import dense_logprobs, fidelity_windows, token_kl, window_logits
    from prunekit.eval.perplexity import perplexity
    from prunekit.prune import prune_
    from prunekit.recipe import step_from_dict

    table = runs()
    names = args.only or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(table)}")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib = {d: calibration_data(tokenizer, d, samples=args.samples, seqlen=args.seqlen, seed=0)
             for d in ("prose", "code")}
    texts = {d: evaluation_data(tokenizer, d, max_tokens=args.eval_tokens) for d in ("prose", "code")}
    kl_windows = fidelity_windows(texts["prose"].ids, args.seqlen, args.kl_tokens)
    reference = dense_logprobs(base, kl_windows, args.kl_tokens, 4, "cpu")

    def measure(model, both: bool) -> dict:
        row = {"ppl_prose": perplexity(model, texts["prose"], seqlen=args.seqlen).ppl}
        if both:
            row["ppl_code"] = perplexity(model, texts["code"], seqlen=args.seqlen).ppl
        logits = torch.cat(window_logits(model, kl_windows, args.kl_tokens, 4, "cpu"))
        row["kl"] = float(token_kl(reference, logits).mean())
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            row["checkpoint_mb"] = round(sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20, 1)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        return row

    rows = [{"name": "unpruned MoE", **measure(base, True)}]
    print(_line(rows[0]), flush=True)
    for name in names:
        step_raw, domain, both = table[name]
        model = copy.deepcopy(base)
        step = step_from_dict(dict(step_raw))
        started = time.perf_counter()
        prune_(model, step, calib[domain], progress=False)
        row = {"name": name, "calibration": domain, "prune_s": round(time.perf_counter() - started, 1),
               **measure(model, both)}
        rows.append(row)
        print(_line(row), flush=True)
        del model
    result = {"machine": machine(), "date": date.today().isoformat(), "commit": commit(),
              "model": str(args.model), "proxy": "MoEfied SmolLM2-135M (bench/make_moe.py), not a trained MoE",
              "protocol": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    moefication = args.model / "moefication.json"
    if moefication.is_file():
        result["moefication"] = json.loads(moefication.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print("\n" + markdown(result))
    return 0


def _line(row: dict) -> str:
    code = f"  code {row['ppl_code']:8.2f}" if "ppl_code" in row else ""
    return (f"{row['name']:<34} prose {row['ppl_prose']:8.2f}{code}  KL {row['kl']:.4f}  "
            f"{row['checkpoint_mb']:7.1f} MB  prune {row.get('prune_s', '-')} s")


def markdown(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]
    lines = ["| run | calibration | ppl prose | x unpruned | ppl code | KL | checkpoint MB | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        code = f"{row['ppl_code']:.2f}" if "ppl_code" in row else ""
        lines.append(f"| {row['name']} | {row.get('calibration', '')} | {row['ppl_prose']:.2f} | "
                     f"{row['ppl_prose'] / base['ppl_prose']:.3f} | {code} | {row['kl']:.4f} | "
                     f"{row['checkpoint_mb']} | {row.get('prune_s', '')} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    from prunekit.bench_host import cpu_model
    return f"{cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
