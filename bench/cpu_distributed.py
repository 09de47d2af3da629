"""CPU benchmark of distributed calibration (issue 6, part 3): SmolLM2-135M pruned with Wanda and
SparseGPT (and, with --method, the other calibrated methods) by 1 process and by 2 gloo processes
on the same machine (`prunekit prune --nproc N`): the pruning wall time, and whether the results
are equal.

    python bench/cpu_distributed.py                 # SmolLM2-135M, 64 windows x 512 tokens (the full run)
    python bench/cpu_distributed.py --method wanda-owl --method taylor --method sleb --method gblm
    python bench/cpu_distributed.py --tiny          # a 2-layer Llama built from its config (tests, seconds)

Protocol: float32 on CPU, 50% unstructured (`METHODS` gives each method's amount: OWL allocation
at 50%, taylor 20% of the block parameters, SLEB 1 block), true-sequential order; calibration = `samples`
windows of `seqlen` tokens from the offline default corpus (seed 0) in chunks of `batch-size`;
no perplexity (the point is equality with the 1-process model, compared weight by weight). Every
configuration gets the same cores: N processes run with OMP_NUM_THREADS = cores / N. Times:
`prune_s` is the engine's pruning time on rank 0 (capture + observe + prune + propagate, as in
the other benchmarks); `wall_s` is the whole command (interpreter and torchrun start-up, model
load, tokenization, export), the honest end-to-end number. Equality: over every tensor of the
saved model, the largest absolute difference, the largest difference relative to the tensor's
largest value, and the fraction of weights whose zero/non-zero state agrees (1.0 = identical masks).

Control row (`control: true`): 1 process with half the chunk size: the same data multiplied in
other chunk shapes, a mathematical no-op that changes float32 round-off, so it shows how far the
method's own float32 result moves. Wanda is insensitive to it; SparseGPT on a real model is not (its
OBS sweep on ill-conditioned Hessians amplifies round-off block after block). By default the
N-process run also uses cores / N threads per process, and float32 CPU kernels can round
differently with another thread count, so SparseGPT moves about as far as in the control.
`--threads 1` runs everything with one thread per process: then only the sharding differs, and the
2-process result should be identical (observers sum in float64, see prunekit/stats.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

# name -> the `prunekit prune` arguments of its step; the first two are the default run
METHODS = {
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "wanda-owl": ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"],
    "gblm": ["--method", "gblm", "--sparsity", "0.5", "--set", "steps.0.gradient_samples=8"],
    "taylor": ["--method", "taylor", "--sparsity", "0.2"],
    "sleb": ["--method", "sleb", "--layers", "1"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help='model to prune (default: the embedded SmolLM2-135M)')
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration chunk size (shards are whole chunks)")
    parser.add_argument("--nproc", type=int, action="append", help="process counts to compare (default 1 and 2)")
    parser.add_argument("--method", action="append", choices=list(METHODS), help="default: wanda and sparsegpt")
    parser.add_argument("--no-control", action="store_true", help="skip the half-chunk 1-process control run")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process for every run (default: cores / N, the same cores for each N); "
                             "the same value everywhere removes thread-count effects from the comparison")
    parser.add_argument("--tiny", action="store_true", help="a tiny 2-layer Llama, 8 windows x 32 tokens (tests)")
    parser.add_argument("--work", type=Path, default=None, help="where pruned models go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cpu_distributed.json"))
    args = parser.parse_args(argv)
    nprocs = args.nproc or [1, 2]
    if nprocs[0] != 1:
        parser.error("the first --nproc is the reference and must be 1")
    methods = args.method or ["wanda", "sparsegpt"]

    with tempfile.TemporaryDirectory(prefix="prunekit-bench-dist-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = args.model
        if args.tiny:
            model = str(_tiny_model(work / "tiny-llama"))
            args.samples, args.seqlen, args.batch_size = 8, 32, 2
        rows = []
        for method in methods:
            reference = None
            for nproc in nprocs:
                row = _prune(model, method, nproc, args, work)
                if reference is None:
                    reference = row["path"]
                else:
                    row.update(compare(reference, row["path"]))
                rows.append(row)
                print(format_row(row), flush=True)
            if not args.no_control and args.batch_size > 1:
                row = _prune(model, method, 1, args, work, batch_size=args.batch_size // 2)
                row.update(compare(reference, row["path"]), control=True)
                rows.append(row)
                print(format_row(row), flush=True)
        for row in rows:
            row.pop("path")
    result = {"machine": machine(), "date": date.today().isoformat(),
              "protocol": {"model": args.model if not args.tiny else "tiny 2-layer llama", "samples": args.samples,
                           "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "steps": {method: " ".join(METHODS[method]) for method in methods},
                           "sequential": "true", "backend": "gloo", "dtype": "float32",
                           "threads_per_process": args.threads or "cores / N",
                           "control": "1 process, half the chunk size" if not args.no_control else None},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    return 0


def _prune(model: str, method: str, nproc: int, args, work: Path, batch_size: int | None = None) -> dict:
    """One `prunekit prune` in a fresh interpreter (under torchrun when nproc > 1)."""
    batch_size = batch_size or args.batch_size
    out_dir, json_path = work / f"{method}-n{nproc}-b{batch_size}", work / f"{method}-n{nproc}-b{batch_size}.json"
    command = [sys.executable, "-m", "prunekit", "prune", model, *METHODS[method],
               "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--no-eval", "--out", str(out_dir),
               "--overwrite", "--json", str(json_path), "--set", f"calibration.batch_size={batch_size}",
               "--nproc", str(nproc)]
    threads = args.threads or max(1, _cores() // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR="127.0.0.1")
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    wall = time.perf_counter() - started
    step = json.loads(json_path.read_text())["steps"][0]
    return {"method": method, "nproc": nproc, "batch_size": batch_size, "threads_per_process": threads,
            "prune_s": round(step["seconds"], 2), "wall_s": round(wall, 2),
            "sparsity": round(step["sparsity_of_pruned_layers"], 4) if "sparsity_of_pruned_layers" in step else None,
            "removed_fraction": step.get("removed_fraction_of_block_params"), "path": str(out_dir)}


def compare(a: str | Path, b: str | Path) -> dict:
    """Weight-by-weight equality of two saved models (safetensors, same keys)."""
    from safetensors.torch import load_file

    def tensors(path):
        state = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            state.update(load_file(file))
        return state

    first, second = tensors(a), tensors(b)
    if first.keys() != second.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors")
    max_abs = max_rel = 0.0
    agree = total = 0
    for key, W in first.items():
        V = second[key]
        diff = float((W.float() - V.float()).abs().max())
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(W.float().abs().max()), 1e-12))
        agree += int(((W == 0) == (V == 0)).sum())
        total += W.numel()
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "mask_agreement": agree / total,
            "identical": bool(max_abs == 0.0)}


def format_row(row: dict) -> str:
    text = (f"{row['method']:<10} {row['nproc']} process(es) x {row['threads_per_process']} threads, "
            f"chunks of {row['batch_size']}{' (control)' if row.get('control') else ''}: "
            f"prune {row['prune_s']:8.2f} s, wall {row['wall_s']:8.2f} s")
    if "max_abs_diff" in row:
        text += (f"; vs 1 process: max |dW| {row['max_abs_diff']:.3g} (rel {row['max_rel_diff']:.3g}), "
                 f"mask agreement {row['mask_agreement']:.6f}")
    return text


def _tiny_model(path: Path) -> Path:
    """A 2-layer Llama with a word-level tokenizer, built offline (the tests' fixture)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from conftest import tiny_model, tiny_tokenizer
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine() -> dict:
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cores": _cores(), "python": platform.python_version(), "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
