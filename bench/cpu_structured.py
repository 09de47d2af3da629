"""CPU benchmark of structured pruning (issue: "structured width and depth pruning"): on
SmolLM2-135M, for each width criterion and each depth criterion (plus layer collapse) at 20%, 25%
and 35% of the decoder blocks' parameters: perplexity, parameter count, prune wall time, and the speed
of the pruned model beside the dense one (`prunekit bench`: batch-1 decode, 512-token prefill).

    python bench/cpu_structured.py                           # the full table (about 1 h on 2 quiet cores)
    python bench/cpu_structured.py --only flap-20 --only block-influence-20
    python bench/cpu_structured.py --model DIR --samples 2 --seqlen 32 --max-eval-tokens 256 \\
        --prompt-len 16 --new-tokens 4 --repeats 1          # tiny (tests)
    python bench/cpu_structured.py --gen2 --no-speed --max-eval-tokens 8192 \\
        --out bench/results/cpu_structured_gen2.json         # the second-generation methods, perplexity only

Second-generation methods (run only when named with --only or selected with --gen2; the default run
list is unchanged): width amp, bonsai; depth mka, streamline, reverse-order, at 25% and 35%. The
structured LLM Surgeon runs when named: --only llm-surgeon-sp-20 --only llm-surgeon-sp-35.
--no-speed skips the speed timing (for a shared machine, whose timings would not be valid): the
table then has perplexity, parameters and prune time only.

Protocol: float32 on CPU; calibration = `samples` windows of `seqlen` tokens from the offline
default corpus (seed 0); perplexity on its held-out evaluation split at the same seqlen
(non-overlapping windows). Each prune runs in its own process. Speed: `prunekit.bench.benchmark`
(each model in its own process, warm-up 1, median of `repeats`), batch 1, random prompt of
`prompt-len` tokens, `new-tokens` greedy decode steps with the KV cache. Pruned models are
written under --work (not the repository).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

WIDTH = ("magnitude-sp", "wanda-sp", "flap", "taylor")
DEPTH = ("block-influence", "angular", "sleb", "last-k", "laco")
RATIOS = {"20": 0.2, "25": 0.25, "35": 0.35}   # 25%: the speed targets
RUNS = {f"{method}-{name}": (method, ratio) for name, ratio in RATIOS.items() for method in (*WIDTH, *DEPTH)}
# Settings that make a method run in reasonable time on 2 cores, or at all on a 135M model (stated in BENCHMARKS.md):
# SLEB's greedy search evaluates every remaining block at every step (each candidate runs the LM head, 28M
# parameters here), so it searches on 2 windows; LaCo's default 4-block merges drop SmolLM2's output
# similarity below 0.08 (no merge passes the 0.65 threshold), so it merges pairs.
SETTINGS = {"sleb": ["steps.0.samples=2"], "laco": ["steps.0.merge=2"]}

# Second generation (arXiv 2504.21174 AMP, 2402.05406 Bonsai, 2406.16330 MKA, 2403.19135 LLM-Streamline,
# 2411.15558 reverse-order), at the two ratios that compare with FLAP and the structure search. Kept out
# of the default run list so that `python bench/cpu_structured.py` measures what it always did.
GEN2_WIDTH = ("amp", "bonsai")
GEN2_DEPTH = ("mka", "streamline", "reverse-order")
GEN2_RATIOS = {"25": 0.25, "35": 0.35}
GEN2_RUNS = {f"{method}-{name}": (method, ratio) for name, ratio in GEN2_RATIOS.items()
             for method in (*GEN2_WIDTH, *GEN2_DEPTH)}
# The structured LLM Surgeon (arXiv 2312.17244: heads and channels by their Kronecker-factored cost, 5 shots,
# correlated update), at the ratios of the LIAR comparison (bench/liar_vs_bias.py: 20% and 35%, uniform).
SURGEON_RUNS = {f"llm-surgeon-sp-{name}": ("llm-surgeon-sp", ratio) for name, ratio in (("20", 0.2), ("35", 0.35))}
ALL_RUNS = {**RUNS, **GEN2_RUNS, **SURGEON_RUNS}
WIDTH_METHODS = (*WIDTH, *GEN2_WIDTH, "llm-surgeon-sp")
# Bonsai's default is 256 sub-models, each a full forward pass with the LM head over 8 windows of 512
# tokens: measured at 35-39 s per sub-model on the shared 2 cores (2.5 h a run), and still 10 s per
# sub-model on 2 windows (43 min). So it measures each sub-model's loss on 2 windows (1,024 tokens) and
# draws 128 sub-models (about 20 min); for its 990 units (heads and 64-channel groups) the regression is
# underdetermined either way (256 or 128), so the ridge decides the rest.
# The others run with their defaults: AMP scores in the driver's one calibration pass; MKA re-runs the
# blocks after each merge (<= k L block forwards); streamline trains its replacement block for 200 steps
# on 8-window chunks; reverse-order is data-free.
SETTINGS.update({"bonsai": ["steps.0.windows=2", "steps.0.samples=128"]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", action="append", help=f"run only these ({', '.join(ALL_RUNS)})")
    parser.add_argument("--gen2", action="store_true",
                        help=f"run the second-generation methods ({', '.join(GEN2_RUNS)}), with any --only")
    parser.add_argument("--no-speed", action="store_true",
                        help="skip the speed timing (perplexity, parameters and prune time only)")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-bench-structured"))
    parser.add_argument("--reuse", action="store_true", help="keep pruned models already in --work (re-time only)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_structured.json"))
    args = parser.parse_args(argv)

    from prunekit.bench import benchmark

    names = [*(args.only or []), *(n for n in GEN2_RUNS if args.gen2 and n not in (args.only or []))]
    names = names or list(RUNS)
    unknown = [n for n in names if n not in ALL_RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(ALL_RUNS)}")
    # Prune everything first, then time all models back to back, so that the speed columns are
    # measured close together (and pruning, whose perplexity is deterministic, can share the machine).
    ppl, dense_parameters = dense_perplexity(args)
    rows = [{"name": "dense", "ppl": ppl}]
    for name in names:
        rows.append(prune_one(name, args))
        print(f"{name:<22} ppl {rows[-1]['ppl']:>10.2f}  params {rows[-1]['parameters'] / 1e6:6.1f}M  "
              f"prune {rows[-1]['prune_s']} s", flush=True)
    if args.no_speed:
        rows[0]["parameters"] = dense_parameters
        for row in rows[1:]:
            row.pop("path")
    else:
        speed = dict(batches=(1,), prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                     warmup=1)
        dense = benchmark(args.model, **speed)["rows"][0]
        rows[0].update(parameters=dense["params"], **_speed(dense, dense))
        print(format_row(rows[0]), flush=True)
        for row in rows[1:]:
            row.update(_speed(benchmark(row.pop("path"), **speed)["rows"][0], dense))
            print(format_row(row), flush=True)
    result = {"machine": machine(), "date": date.today().isoformat(),
              "protocol": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n" + markdown(result))
    return 0


def dense_perplexity(args) -> tuple[float, int | None]:
    """The input model's perplexity and parameter count, once (each prune run skips its own dense evaluation)."""
    json_path = args.work / "dense.json"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.reuse and json_path.is_file():
        return _dense_from(json.loads(json_path.read_text()))
    command = [sys.executable, "-m", "prunekit", "eval", args.model, "--seqlen", str(args.seqlen),
               "--json", str(json_path)]
    if args.max_eval_tokens:
        command += ["--max-tokens", str(args.max_eval_tokens)]
    subprocess.run(command, check=True)
    return _dense_from(json.loads(json_path.read_text()))


def _dense_from(result: dict) -> tuple[float, int | None]:
    return round(result["perplexity"]["ppl"], 3), result.get("sparsity", {}).get("parameters")


def prune_one(name: str, args) -> dict:
    """Prune in a fresh interpreter (the CLI, with its own evaluation) and collect the numbers."""
    method, ratio = ALL_RUNS[name]
    out_dir = args.work / name
    json_path = args.work / f"{name}.json"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.reuse and json_path.is_file() and out_dir.is_dir():
        return _row_from(name, method, ratio, json.loads(json_path.read_text()), out_dir)
    command = [sys.executable, "-m", "prunekit", "prune", args.model, "--method", method, "--sparsity", str(ratio),
               "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--out", str(out_dir), "--overwrite",
               "--json", str(json_path), "--set", "eval.dense=false"]
    if args.max_eval_tokens:
        command += ["--set", f"eval.max_tokens={args.max_eval_tokens}"]
    for override in [*SETTINGS.get(method, []), *args.set]:
        command += ["--set", override]
    subprocess.run(command, check=True)
    return _row_from(name, method, ratio, json.loads(json_path.read_text()), out_dir)


def _row_from(name: str, method: str, ratio: float, result: dict, out_dir: Path) -> dict:
    step = result["steps"][0]
    return {"name": name, "method": method, "kind": "width" if method in WIDTH_METHODS else "depth", "requested": ratio,
            "settings": SETTINGS.get(method, []),
            "removed": round(step["removed_fraction_of_block_params"], 4),
            "removed_blocks": step.get("removed_blocks", []),
            "parameters": result["parameters_after"], "prune_s": round(step["seconds"], 1),
            "ppl": round(result["pruned_perplexity"]["ppl"], 3),
            "protocol": result["pruned_perplexity"]["protocol"], "stock": result["structure"]["stock"],
            "path": str(out_dir)}


def _speed(row: dict, dense: dict) -> dict:
    prefill = row["prefill_ms"]["median"]
    decode = row["decode_tok_s_per_seq"]["median"]
    return {"prefill_ms": round(prefill, 1), "decode_tok_s": round(decode, 2),
            "prefill_speedup": round(dense["prefill_ms"]["median"] / prefill, 3),
            "decode_speedup": round(decode / dense["decode_tok_s_per_seq"]["median"], 3),
            "peak_memory_mb": round(row["peak_memory_bytes"] / 2**20, 1) if row.get("peak_memory_bytes") else None}


def format_row(row: dict) -> str:
    ppl = f"{row['ppl']:.2f}" if "ppl" in row else "-"
    return (f"{row['name']:<22} ppl {ppl:>8}  params {row['parameters'] / 1e6:6.1f}M  "
            f"prefill {row['prefill_ms']:7.1f} ms ({row['prefill_speedup']:.2f}x)  "
            f"decode {row['decode_tok_s']:6.1f} tok/s ({row['decode_speedup']:.2f}x)")


def markdown(result: dict) -> str:
    if not any("prefill_ms" in r for r in result["rows"]):          # --no-speed
        lines = ["| run | removed (block params) | parameters | perplexity | prune s |", "|---|---|---|---|---|"]
        for r in result["rows"]:
            removed = f"{r['removed']:.1%}" if "removed" in r else "-"
            parameters = f"{r['parameters'] / 1e6:.1f}M" if r.get("parameters") else "-"
            lines.append(f"| {r['name']} | {removed} | {parameters} | {r['ppl']:.2f} | {r.get('prune_s', '-')} |")
        return "\n".join(lines)
    lines = ["| run | removed (block params) | parameters | perplexity | prune s | prefill ms | decode tok/s | "
             "prefill x | decode x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        removed = f"{r['removed']:.1%}" if "removed" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"| {r['name']} | {removed} | {r['parameters'] / 1e6:.1f}M | {ppl} | {r.get('prune_s', '-')} | "
                     f"{r['prefill_ms']} | {r['decode_tok_s']} | "
                     f"{r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |")
    return "\n".join(lines)


def machine() -> dict:
    import os

    import torch
    from prunekit.bench import _device_name
    return {"cpu": _device_name(torch.device("cpu")), "cores": os.cpu_count(), "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
