"""LIAR's least-squares reconstruction vs FLAP's bias compensation, on the same masks (issue 17, part 4).

SmolLM2-135M (the embedded default model) pruned by width with wanda-sp and flap, uniformly (every
block loses the same share), at 20% and 35% of the decoder blocks' parameters, three times each:
without compensation, with FLAP's mean-bias compensation, and with LIAR. Held-out perplexity of each.

    python bench/liar_vs_bias.py                       # the table (12 prunes; tens of minutes on 2 cores)
    python bench/liar_vs_bias.py --samples 4 --seqlen 64 --max-eval-tokens 1024 --out /tmp/t.md   # quick

Same masks: the compensate=none run records every block's unit scores as the method computed them
(in uniform mode on the outputs of the pruned earlier blocks); the bias and liar runs replay those
scores through the width driver's `prescore` hook, so each of the three removes exactly the same
heads and channels and differs only in how the consumers (o_proj, down_proj) are compensated. The
compensation statistics (mean, X^T X) are observed in the replay's own calibration pass, on the
outputs of the already pruned and compensated earlier blocks.

Protocol: float32 on CPU; calibration = `samples` windows of `seqlen` tokens from the offline default
corpus (seed 0); perplexity on its held-out evaluation split (the first `max-eval-tokens` tokens),
non-overlapping windows of `seqlen` (`prunekit.eval.perplexity`, its protocol line is printed).
LIAR's ridge is the default `liar_damp` = 0.01 x mean diag(X_K^T X_K).
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

METHODS = ("wanda-sp", "flap")
RATIOS = (0.2, 0.35)
MODES = ("none", "bias", "liar")


def recording_method(name: str, captured: dict):
    """A copy of method `name` under a bench-only name and config class that stores every block's
    scores in `captured` ({block: [scores per coupled group]}) as it hands them to the driver."""
    from prunekit.catalog import get_method
    from prunekit.registry import register
    original = get_method(name)
    config_cls = dataclass(frozen=True)(type(f"Recorded{original.config_cls.__name__}", (original.config_cls,), {}))

    def record(group, stats, cfg):
        scores = original.fn(group, stats, cfg)
        captured.setdefault(group.block, []).append(scores.detach().clone())
        return scores

    register(f"bench-record-{name}", config_cls, stats=original.stats, scope="width",
             calibrated=original.calibrated)(record)
    return config_cls


def replay_method(replayed: dict):
    """A width method whose scores are `replayed` ({block: [scores per group]}), via `prescore`."""
    from prunekit.registry import register
    from prunekit.structured import WidthConfig

    @dataclass(frozen=True)
    class ReplayConfig(WidthConfig):
        pass

    register("bench-replay", ReplayConfig, scope="width", calibrated=True,
             prescore=lambda model, calib, cfg, **kwargs: replayed)(lambda group, scores, cfg: scores)
    return ReplayConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/liar_vs_bias.md"))
    args = parser.parse_args(argv)

    from prunekit import prune_
    from prunekit.data import calibration_data, evaluation_data
    from prunekit.eval.perplexity import perplexity
    from prunekit.io.loading import load

    dense, tokenizer = load(args.model, dtype="float32")
    calib = calibration_data(tokenizer, "default", samples=args.samples, seqlen=args.seqlen, seed=0)
    eval_text = evaluation_data(tokenizer, "default", max_tokens=args.max_eval_tokens)
    base = perplexity(dense, eval_text, seqlen=args.seqlen)
    protocol = base.protocol
    print(f"dense: ppl {base.ppl:.3f} [{protocol}]", flush=True)
    print(f"calibration: source=default, {args.samples} windows x {args.seqlen} tokens, seed 0", flush=True)

    captured: dict = {}
    replayed: dict = {}
    recorders = {name: recording_method(name, captured) for name in METHODS}
    replay = replay_method(replayed)
    rows = []
    for name in METHODS:
        for ratio in RATIOS:
            row = {"method": name, "ratio": ratio}
            masks = None
            for mode in MODES:
                model = copy.deepcopy(dense)
                started = time.perf_counter()
                if mode == "none":
                    captured.clear()
                    config = recorders[name](sparsity=ratio, uniform=True, compensate="none")
                else:
                    config = replay(sparsity=ratio, uniform=True, compensate=mode)
                report = prune_(model, config, calib, batch_size=args.batch_size, progress=False)
                seconds = time.perf_counter() - started
                if mode == "none":
                    replayed.clear()
                    replayed.update({block: list(scores) for block, scores in captured.items()})
                    masks = (report.widths, report.scores)
                elif (report.widths, report.scores) != masks:
                    raise RuntimeError(f"{name} {ratio}: the {mode} run removed other units than the none run")
                result = perplexity(model, eval_text, seqlen=args.seqlen)
                if result.protocol != protocol:
                    raise RuntimeError(f"evaluation protocol changed: {result.protocol}")
                row[mode] = result.ppl
                row[f"{mode}_s"] = round(seconds, 1)
                if mode == "none":     # bias adds zero-initialised biases to Llama's layers: count the masks' size
                    row["removed"] = report.removed_fraction
                    row["parameters"] = sum(p.numel() for p in model.parameters())
                print(f"{name:<9} {ratio:.0%}  compensate={mode:<4}  ppl {result.ppl:10.3f}  removed "
                      f"{report.removed_fraction:.2%}  prune {seconds:6.1f} s", flush=True)
                del model
            rows.append(row)

    text = markdown(rows, base.ppl, protocol, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    return 0


def markdown(rows: list[dict], dense_ppl: float, protocol: str, args) -> str:
    command = "python bench/liar_vs_bias.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "out" and v != {"model": "default", "samples": 32, "seqlen": 512, "max_eval_tokens": 8192,
                                "batch_size": 8}[k])
    lines = [
        "# LIAR vs bias compensation on the same masks (SmolLM2-135M, uniform width pruning)",
        "",
        f"`{command}` ({date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()})",
        "",
        f"- model: {args.model}, float32, CPU; dense perplexity {dense_ppl:.3f}",
        f"- calibration: source=default, {args.samples} windows x {args.seqlen} tokens, seed 0",
        f"- perplexity protocol: {protocol}",
        "- masks: the unit scores of the compensate=none run are replayed for bias and liar (identical widths "
        "and scores checked), so the three columns differ only in the compensation",
        "- bias: FLAP's W[:, removed] @ mean(X_removed) into the consumer's bias (Llama gets "
        "attention_bias/mlp_bias); liar: W_K += ((X_K^T X_K + 0.01 mean diag I)^-1 X_K^T X_R W_R^T)^T",
        "",
        "| method | requested | removed (block params) | parameters | ppl none | ppl bias | ppl liar | "
        "prune s (none / bias / liar) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        best = min(MODES, key=lambda m: row[m])
        cells = [f"**{row[m]:.2f}**" if m == best else f"{row[m]:.2f}" for m in MODES]
        lines.append(f"| {row['method']} | {row['ratio']:.0%} | {row['removed']:.2%} | "
                     f"{row['parameters'] / 1e6:.1f}M | {' | '.join(cells)} | "
                     f"{row['none_s']} / {row['bias_s']} / {row['liar_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
