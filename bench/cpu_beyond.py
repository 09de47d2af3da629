"""CPU benchmark of prunekit's combinations beyond the reference methods (issue: "Beyond the
reference methods"): allocation (OWL) x score (Wanda, SparseGPT, RIA, GBLM, Pruner-Zero) x weight
update (OBS, ADMM) x EoRA, against plain magnitude / Wanda / SparseGPT on SmolLM2-135M.

    python bench/cpu_beyond.py                         # the whole table (hours on 2 cores; resumable)
    python bench/cpu_beyond.py --only sparsegpt-70 --only owl-admm-70
    python bench/cpu_beyond.py --samples 32 --seqlen 256 --max-eval-tokens 16384 --out bench/results/second_wave.json \
        --only sparsegpt-2:4 --only armor-2:4 --only sparsegpt-70 --only llm-surgeon-70 ...   # issue 20's rows
    python bench/cpu_beyond.py --model DIR --samples 2 --seqlen 32 --max-eval-tokens 256 --only ...   # tiny (tests)

Protocol: the core benchmark's (bench/cpu_smollm2.py): float32 on CPU, `samples` calibration
windows of `seqlen` tokens from the offline default corpus (seed 0), perplexity on its held-out
evaluation split at the same seqlen. Each run is its own process and writes its JSON next to
`--out`; a run whose JSON exists is read back, not re-run (`--fresh` re-runs), so an interrupted
table resumes where it stopped.

EoRA at equal total parameters: an "eora" row prunes to a higher sparsity, chosen so that the
nonzero block weights plus the adapter's parameters equal the nonzero weights of the plain row
it is compared with (`--eora-rank`, default 16).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_smollm2 import run_table

PATTERNS = {"50": ["--sparsity", "0.5"], "60": ["--sparsity", "0.6"], "70": ["--sparsity", "0.7"],
            "2:4": ["--nm", "2:4"]}
COMBOS = {
    # name: (extra arguments, patterns)
    "magnitude": (["--method", "magnitude"], PATTERNS),
    "wanda": (["--method", "wanda"], PATTERNS),
    "sparsegpt": (["--method", "sparsegpt"], PATTERNS),
    "ria": (["--method", "ria"], PATTERNS),
    "ria-permute": (["--method", "ria", "--set", "steps.0.permute=true"], {"2:4": PATTERNS["2:4"]}),
    "gblm": (["--method", "gblm"], PATTERNS),
    "pruner-zero": (["--method", "pruner-zero"], PATTERNS),
    "sparsegpt-owl": (["--method", "sparsegpt", "--allocation", "owl"], PATTERNS),
    "sparsegpt-admm": (["--method", "sparsegpt", "--update", "admm"], PATTERNS),
    "wanda-admm": (["--method", "wanda", "--update", "admm"], PATTERNS),
    "admm-gradual": (["--method", "wanda", "--update", "admm", "--set", "steps.0.admm_gradual=true"], PATTERNS),
    "owl-admm-gradual": (["--method", "wanda", "--allocation", "owl", "--update", "admm",
                          "--set", "steps.0.admm_gradual=true"], PATTERNS),
    "owl-sparsegpt-admm": (["--method", "sparsegpt", "--allocation", "owl", "--update", "admm"], PATTERNS),
    # second-wave methods (issue 20): SmolLM2's 576/192 widths need ARMOR blocks of 64 (128 does not divide them)
    "armor": (["--method", "armor", "--block-size", "64"], {"2:4": PATTERNS["2:4"]}),
    # blocks of 16: wrappers of 3.7% of the dense block weights, the paper's overhead (2.4-5% at d_block 128 on 7B+)
    "armor-b16": (["--method", "armor", "--block-size", "16"], {"2:4": PATTERNS["2:4"]}),
    "llm-surgeon": (["--method", "llm-surgeon", "--set", "steps.0.shots=3"], PATTERNS),
    # the full output-gradient covariance G (curvature kfac); 40 CG steps per update to fit a CPU (a full solve on
    # SmolLM2 is ~1,000 steps, 300 by default: about 11 h single-threaded for the whole model)
    "llm-surgeon-kfac": (["--method", "llm-surgeon", "--set", "steps.0.shots=3", "--set", "steps.0.curvature=kfac",
                          "--set", "steps.0.cg_steps=40"], {"70": PATTERNS["70"]}),
    "wanda-owl": (["--method", "wanda", "--allocation", "owl"], {"70": PATTERNS["70"]}),
    "wanda-fdtm": (["--method", "wanda", "--allocation", "fdtm"], {"70": PATTERNS["70"]}),
    "sparsegpt-fdtm": (["--method", "sparsegpt", "--allocation", "fdtm"], {"70": PATTERNS["70"]}),
}
RUNS = {f"{combo}-{pattern}": [*extra, *PATTERNS[pattern]]
        for combo, (extra, patterns) in COMBOS.items() for pattern in patterns}
# EoRA rows: "<combo>-<pattern>-eora" prunes harder by the adapter's share (see equal_parameter_sparsity)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--eora-rank", type=int, default=16)
    parser.add_argument("--only", action="append", help="run only these (names as in the table; "
                                                         "append -eora to a 50/60/70 run for its EoRA row)")
    parser.add_argument("--fresh", action="store_true", help="re-run rows whose JSON exists")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_beyond.json"))
    args = parser.parse_args(argv)

    names = args.only or [*RUNS, "owl-admm-gradual-70-eora", "owl-admm-gradual-60-eora", "owl-admm-gradual-50-eora"]
    run_table(names, args, run_one, format_row, markdown)
    return 0


def command_for(name: str, args) -> list[str]:
    eora = name.endswith("-eora")
    base = name[: -len("-eora")] if eora else name
    if base not in RUNS:
        raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS)} (or a 50/60/70 run + '-eora')")
    extra = list(RUNS[base])
    if eora:
        if "--sparsity" not in extra:
            raise SystemExit(f"{name}: EoRA at equal parameters needs an unstructured run (50/60/70)")
        at = extra.index("--sparsity") + 1
        extra[at] = f"{equal_parameter_sparsity(args.model, float(extra[at]), args.eora_rank):.6f}"
        extra += ["--eora-rank", str(args.eora_rank)]
    return ["prune", args.model, *extra, "--samples", str(args.samples), "--seqlen", str(args.seqlen),
            "--set", "eval.dense=false"] + (["--set", f"eval.max_tokens={args.max_eval_tokens}"]
                                            if args.max_eval_tokens else [])


def equal_parameter_sparsity(model: str, sparsity: float, rank: int) -> float:
    """The sparsity at which the nonzero block weights plus rank-r adapters on every block linear
    equal the nonzero weights at `sparsity` without adapters."""
    from prunekit.io.loading import load
    from prunekit.models import spec_for
    from prunekit.models.spec import get_module, weight_view
    loaded, _ = load(model)
    spec = spec_for(loaded)
    total = adapters = 0
    for block in get_module(loaded, spec.blocks):
        for group in spec.groups:
            for name in group:
                out_features, in_features = weight_view(get_module(block, name)).shape
                total += out_features * in_features
                adapters += min(rank, out_features, in_features) * (out_features + in_features)
    return sparsity + adapters / total


def run_one(name: str, args) -> dict:
    json_path = args.out.parent / f"{args.out.stem}.{name.replace(':', 'of')}.json"
    command = command_for(name, args) + ["--json", str(json_path)]
    row = {"name": name, "command": "prunekit " + " ".join(command[:-2])}
    if args.fresh or not json_path.exists():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "prunekit", *command], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        row["process_seconds"] = round(time.perf_counter() - started, 1)
    data = json.loads(json_path.read_text())
    step = data["steps"][0]
    row.update(ppl=data["pruned_perplexity"]["ppl"], protocol=data["pruned_perplexity"]["protocol"],
               prune_seconds=step["seconds"], sparsity=step["sparsity_of_pruned_layers"],
               adapter_parameters=data.get("adapter_parameters", 0),
               # parameters a method adds to the model (ARMOR's block-diagonal wrappers), beside the nonzeros
               wrapper_parameters=max(0, data["parameters_after"] - data["parameters"]),
               nonzero_block_weights=sum(r["numel"] - r["zeros"] for r in step["layers"]))
    if "pruned_perplexity_without_adapter" in data:
        row["ppl_without_adapter"] = data["pruned_perplexity_without_adapter"]["ppl"]
    if "allocation" in step:
        row["block_sparsity"] = step["allocation"]["block_sparsity"]
    return row


def added(row: dict) -> int:
    """Parameters added beside the nonzero block weights: EoRA's adapter, ARMOR's wrappers."""
    return row["adapter_parameters"] + row.get("wrapper_parameters", 0)


def format_row(row: dict) -> str:
    extra = f"  (+{added(row) / 1e6:.2f}M adapter/wrappers)" if added(row) else ""
    return (f"{row['name']:<28} ppl {row['ppl']:10.3f}  prune {row['prune_seconds']:7.1f} s  "
            f"sparsity {row['sparsity']:.2%}  nonzero {(row['nonzero_block_weights'] + added(row)) / 1e6:.2f}M"
            + extra)


def markdown(result: dict) -> str:
    rows = {row["name"]: row for row in result["rows"]}
    lines = [f"Machine: {result['machine']}; date {result['date']}.", "",
             "| run | perplexity | vs plain SparseGPT | sparsity | nonzero block weights + added | prune (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        pattern = name.removesuffix("-eora").rsplit("-", 1)[-1]
        plain = rows.get(f"sparsegpt-{pattern}")
        ratio = f"{row['ppl'] / plain['ppl']:.3f}x" if plain else "-"
        params = (row["nonzero_block_weights"] + added(row)) / 1e6
        lines.append(f"| {name} | {row['ppl']:.3f} | {ratio} | {row['sparsity']:.2%} | {params:.2f}M | "
                     f"{row['prune_seconds']:.1f} |")
    lines += ["", f"Perplexity protocol: {result['rows'][0]['protocol']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
