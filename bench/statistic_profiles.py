"""How close does the `statistic` calibration selector bring the chosen windows' activation statistic to the
whole pool's, and how many stored dimensions does it need? (prunekit.selection.statistic; issue 19, (a).)

Protocol: N calibration windows of 512 tokens from the default corpus (seed 0, as `prunekit prune` draws
them) on the embedded SmolLM2-135M (float32, CPU); each window's full activation profile (log mean square
input per channel of every distinct linear-layer input, 97,920 values; `statistic.profile_batch`). A
choice of K windows is scored by its mismatch with the pool, in the full profile space:

    geometric   || mean_S(log m) - mean_pool(log m) ||    (what the selector matches)
    arithmetic  || log mean_S(m) - log mean_pool(m) ||    (what Wanda's ||X_j||^2 and H's diagonal sum)

for `--draws` random K-subsets (mean and best), for the selector's greedy order on the stored projection of
each dimension in `--dims` (seeds 0 and 1 of the projection, float16 as stored) and on the full profiles
(no projection). Also: how much of the profiles' variance the top principal components hold.

    python bench/statistic_profiles.py [--windows 192] [--keep 48] [--cache profiles.pt]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import torch


def profiles(windows: int, cache: Path | None) -> torch.Tensor:
    if cache is not None and cache.is_file():
        return torch.load(cache)
    from prunekit.data import calibration_windows
    from prunekit.io.loading import load
    from prunekit.selection import statistic
    model, tokenizer = load("default")
    model.eval()
    ids, _ = calibration_windows(tokenizer, "default", samples=windows, seqlen=512, seed=0)
    texts = [tokenizer.decode(row.tolist()) for row in ids]
    rows = [statistic.profile_batch(texts[i:i + 8], model, tokenizer, {}) for i in range(0, windows, 8)]
    out = torch.cat(rows)
    if cache is not None:
        torch.save(out, cache)
    return out


def mismatch(logs: torch.Tensor, moments: torch.Tensor, chosen) -> tuple[float, float]:
    geometric = float((logs[chosen].mean(0) - logs.mean(0)).norm())
    arithmetic = float((moments[chosen].mean(0).log() - moments.mean(0).log()).norm())
    return geometric, arithmetic


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=192, help="the pool: calibration windows of 512 tokens")
    p.add_argument("--keep", type=int, default=48, help="windows chosen")
    p.add_argument("--draws", type=int, default=200, help="random choices to compare with")
    p.add_argument("--dims", default="32,64,256,1024", help="stored dimensions to try")
    p.add_argument("--cache", type=Path, default=None, help="keep (or reuse) the full profiles in this .pt file")
    p.add_argument("--out", type=Path, default=Path("bench/results/statistic_profiles.md"))
    args = p.parse_args(argv)
    from prunekit.bench_host import cpu_model
    from prunekit.selection import embed, statistic
    started = time.perf_counter()
    logs = profiles(args.windows, args.cache).double()
    moments = logs.exp()
    n, k = logs.shape[0], args.keep
    centred = logs - logs.mean(0)
    singular = torch.linalg.svdvals(centred) ** 2
    share = {top: float(singular[:top].sum() / singular.sum()) for top in (8, 32, 64)}
    generator = torch.Generator().manual_seed(1)
    draws = torch.tensor([mismatch(logs, moments, torch.randperm(n, generator=generator)[:k])
                          for _ in range(args.draws)])
    rows = [(f"random {k} of {n} ({args.draws} draws): mean", *draws.mean(0).tolist()),
            ("random: best draw (each column's own)", *draws.min(0).values.tolist())]
    for dim in [int(d) for d in args.dims.split(",")]:
        for seed in (0, 1):
            stored = embed.project(logs.float(), dim, seed)
            chosen = statistic.order(None, [1] * n, {"embeddings": stored})[:k]
            rows.append((f"statistic, {dim} stored dims, projection seed {seed}", *mismatch(logs, moments, chosen)))
    chosen = statistic.order(None, [1] * n, {"embeddings": logs})[:k]
    rows.append((f"statistic on the full {logs.shape[1]:,} dims (no projection)", *mismatch(logs, moments, chosen)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = cpu_model()
    lines = [f"# statistic selector: profile mismatch of {k} chosen of {n} windows", "",
             f"`python bench/statistic_profiles.py --windows {n} --keep {k}`; {cpu}; "
             f"{datetime.date.today()}; commit {commit}; {time.perf_counter() - started:.0f} s.", "",
             "Protocol: windows of 512 tokens of the default corpus (seed 0), SmolLM2-135M float32; mismatch with "
             "the whole pool in the full profile space (lower is closer): geometric = ||mean log m - pool's||, "
             "arithmetic = ||log mean m - pool's|| (m: per-channel mean square input of every linear layer).", "",
             "Variance of the centred profiles in the top 8 / 32 / 64 principal components: "
             + " / ".join(f"{share[t]:.1%}" for t in (8, 32, 64)), "",
             "| choice | geometric | arithmetic |", "|---|---:|---:|"]
    lines += [f"| {name} | {g:.2f} | {a:.2f} |" for name, g, a in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"windows": n, "keep": k, "draws": args.draws, "pc_share": share, "commit": commit, "cpu": cpu,
         "rows": [{"choice": name, "geometric": g, "arithmetic": a} for name, g, a in rows]}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
