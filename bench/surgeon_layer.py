"""The LLM Surgeon on real SmolLM2-135M layers, per layer: SparseGPT against LLM Surgeon with G = I, a diagonal G
and the full output-gradient covariance G (`curvature: kfac`), time, memory and the two errors that matter.

    python bench/surgeon_layer.py                                   # o_proj and down_proj of block 10, 50%
    python bench/surgeon_layer.py --layers 10.mlp.down_proj --sparsity 0.7 --shots 5
    python bench/surgeon_layer.py --model DIR --windows 2 --seqlen 16 --layers 0.mlp.down_proj   # tiny (tests)

Protocol: float32 on CPU; `windows` calibration windows of `seqlen` tokens from the offline default corpus
(seed 0). A = X^T X of the layer's input over those windows (the dense model's), G = sum of g g^T of the
loss gradient at the layer's output over the same windows (`gradients.output_covariances`, one whole-model
backward pass per window); the diagonal G is diag(G) of that same matrix (the per-weight gradient pass that
`curvature: gradient` uses estimates it up to a constant). Every method prunes the same weight from the same
statistics, one after another, each in its own Python process (the layer saved to a temporary file); seconds
are wall time of the pruning call alone, and `extra MB` is the peak resident memory the call added over what
that process held before it. Errors, relative to the dense layer:
  output   ||X (W - W')^T|| / ||X W^T||            (what SparseGPT minimises)
  fisher   tr(G dW A dW^T) / tr(G W A W^T)         (the Kronecker quadratic the LLM Surgeon minimises)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--layers", default="10.self_attn.o_proj,10.mlp.down_proj",
                   help="BLOCK.module, comma-separated")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--correlate", default="cg,2000",
                   help="kfac updates, comma-separated: cg (conjugate gradients, the default) or N (the reference's "
                        "chunks of N removed weights)")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)         # internal: run one method on a saved layer
    p.add_argument("--child-run", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    from prunekit.data import calibration_data
    from prunekit.gradients import output_covariances
    from prunekit.io.loading import load
    from prunekit.stats import Hessian

    torch.manual_seed(0)
    model, tokenizer = load(args.model)
    calib = calibration_data(tokenizer, "default", args.windows, args.seqlen, seed=0)
    names = [f"model.layers.{layer}" for layer in args.layers.split(",")]
    hessians = {name: Hessian(model.get_submodule(name).in_features, torch.device("cpu")) for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: hessians[n].update(a[0]))
               for name in names]
    with torch.no_grad():
        for i in range(calib.shape[0]):
            model(calib[i:i + 1])
    for handle in handles:
        handle.remove()
    started = time.perf_counter()
    covariances = output_covariances(model, calib, names, samples=args.windows, progress=False)
    g_seconds = time.perf_counter() - started
    rows = []
    for name in names:
        W = model.get_submodule(name).weight.detach().float().clone()
        rows.extend(measure(name, W, hessians[name], covariances[name], args))
        for row in rows[-(3 + len(args.correlate.split(","))):]:
            print(f"{name:<32} {row['method']:<30} {row['seconds']:>8.1f} s  {row['extra_mb']:>7.0f} MB  "
                  f"output {row['output_error']:.4f}  fisher {row['fisher_error']:.4f}", flush=True)
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
              "protocol": vars(args) | {"out": str(args.out)}, "g_pass_seconds": round(g_seconds, 1), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    print(f"G pass (all layers, {args.windows} windows): {g_seconds:.1f} s")
    return 0


def runs(W: torch.Tensor, hessian, G: torch.Tensor, args) -> list[tuple[str, object]]:
    """(label, function returning the pruned weight) for every method compared."""
    from prunekit.gradients import WithGradient
    from prunekit.methods.llm_surgeon import LLMSurgeonConfig, llm_surgeon
    from prunekit.methods.sparsegpt import SparseGPTConfig, sparsegpt
    from prunekit.updates import apply_update

    grad = (G.diagonal().clamp_min(0).sqrt()[:, None] * torch.ones_like(W))   # row i: sum of squares = in x G_ii
    sparse = SparseGPTConfig(sparsity=args.sparsity)
    out = [("sparsegpt", lambda: apply_update(W, sparsegpt(W, hessian, sparse), hessian, sparse, method_updates=True)),
           ("llm-surgeon G=I", lambda: llm_surgeon(W, hessian, LLMSurgeonConfig(
               sparsity=args.sparsity, shots=args.shots, curvature="identity"))),
           ("llm-surgeon diag G", lambda: llm_surgeon(W, WithGradient(hessian, grad, windows=args.windows),
                                                       LLMSurgeonConfig(sparsity=args.sparsity, shots=args.shots)))]
    for correlate in (None if c == "cg" else int(c) for c in args.correlate.split(",")):
        label = "CG" if correlate is None else f"chunks of {correlate}"
        out.append((f"llm-surgeon full G ({label})",
                    lambda c=correlate: llm_surgeon(W, WithGradient(hessian, G, windows=args.windows),
                                                    LLMSurgeonConfig(sparsity=args.sparsity, shots=args.shots,
                                                                     curvature="kfac", correlate=c))))
    return out


def measure(name: str, W: torch.Tensor, hessian, G: torch.Tensor, args) -> list[dict]:
    """Every method on one layer, each in its own Python process (so that its peak RSS is its own)."""
    import subprocess
    import tempfile
    A = hessian.H64.double()
    Gd = G.double()
    dense_fisher = float(torch.trace(Gd @ W.double() @ A @ W.double().T))
    dense_output = float(torch.trace(W.double() @ A @ W.double().T))
    rows = []
    with tempfile.TemporaryDirectory(prefix="surgeon_layer_") as work:
        problem = Path(work) / "problem.pt"
        torch.save({"W": W, "H64": hessian.H64, "tokens": torch.tensor(hessian.tokens), "G": G}, problem)
        for index, (method, _) in enumerate(runs(W, hessian, G, args)):
            result = Path(work) / f"result{index}.pt"
            subprocess.run([sys.executable, __file__, "--child", str(problem), "--child-run", str(index),
                            "--child-out", str(result), "--sparsity", str(args.sparsity), "--shots", str(args.shots),
                            "--windows", str(args.windows), "--correlate", args.correlate], check=True)
            done = torch.load(result)
            W_new = done["W"]
            dW = (W_new - W).double()
            rows.append({"layer": name, "method": method, "sparsity": round(float((W_new == 0).float().mean()), 4),
                         "seconds": round(float(done["seconds"]), 2), "extra_mb": round(float(done["extra_mb"]), 1),
                         "output_error": round((float(torch.trace(dW @ A @ dW.T)) / dense_output) ** 0.5, 5),
                         "fisher_error": round(float(torch.trace(Gd @ dW @ A @ dW.T)) / dense_fisher, 6)})
    return rows


def child(args) -> int:
    """One method on a saved layer problem: the pruned weight, its wall seconds and the peak RSS it added."""
    from prunekit.stats import Hessian
    problem = torch.load(args.child)
    hessian = Hessian(problem["W"].shape[1], torch.device("cpu"))
    hessian.H = problem["H64"]
    hessian.tokens = int(problem["tokens"])
    _, run = runs(problem["W"], hessian, problem["G"], args)[args.child_run]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    W = run()
    seconds = time.perf_counter() - started
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    torch.save({"W": W, "seconds": torch.tensor(seconds), "extra_mb": torch.tensor(extra)}, args.child_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
