"""prunekit's ADMM weight update against the reference implementation on identical inputs.

    python bench/reference_admm.py --reference PATH/TO/admm-pruning      # a clone of fmfi-compbio/admm-pruning

Builds one layer problem (a weight and X^T X from correlated, unevenly scaled inputs, or from a
real SmolLM2 layer with `--smollm2`), runs the reference `AdmmPruner.fasterprune` (its source
imported unmodified from the clone) and `prunekit.updates.admm_update` with the same mask
rule, and prints the masks' agreement and both layers' relative reconstruction errors
||X (W - W')^T|| / ||X W^T||. Not part of the tests: the reference is not a dependency.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn


def problem(seed: int, out: int, inp: int, tokens: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g) * torch.rand(inp, generator=g) * 3
    W = torch.randn(out, inp, generator=g)
    return X, W


def smollm2_layer(name: str, windows: int):
    """A real layer's weight and calibration input (dense model, first `windows` windows)."""
    from prunekit.data import calibration_data
    from prunekit.io.loading import load
    model, tokenizer = load("default")
    calib = calibration_data(tokenizer, "default", samples=windows, seqlen=512)
    module = model.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for chunk in calib.split(4):
            model(chunk)
    handle.remove()
    return torch.cat(seen).float(), module.weight.detach().float().clone()


def reference_prune(AdmmPruner, W, XX, **kwargs):
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    pruner = AdmmPruner(layer)
    pruner.XX = XX.clone()
    pruner.fasterprune(**kwargs)
    return layer.weight.data.clone()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="a clone of fmfi-compbio/admm-pruning")
    parser.add_argument("--smollm2", default=None, metavar="MODULE",
                        help="use this SmolLM2 layer, e.g. model.layers.5.mlp.down_proj")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.6)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.reference))
    from lib.admm import AdmmPruner                                  # the reference, unmodified

    from prunekit.masks import lowest
    from prunekit.updates import admm_update

    if args.smollm2:
        X, W = smollm2_layer(args.smollm2, args.windows)
        label = f"{args.smollm2}, {X.shape[0]} tokens"
    else:
        X, W = problem(0, 256, 512, 4096)
        label = "synthetic 256 x 512, 4096 correlated tokens"
    XX = X.T @ X
    norm = XX.diagonal().sqrt() + 1e-8

    def error(W_new):
        return float((X @ (W - W_new).T).norm() / (X @ W.T).norm())

    print(f"layer: {label}; sparsity {args.sparsity}")
    # 1. fixed mask: the reference's iterative_prune=0 picks the layer-wise lowest |W| * ||X_j||
    ref = reference_prune(AdmmPruner, W, XX, sparsity=args.sparsity, iterative_prune=0, iters=20, percdamp=0.1)
    pruned = lowest(W.abs() * norm, args.sparsity, None, "layer")
    ours = admm_update(W, XX, pruned, iterations=20)
    agree = float(((ref == 0) == (ours == 0)).float().mean())
    print(f"fixed mask, 20 iterations: mask agreement {agree:.4%}; rel. error reference {error(ref):.6f}, "
          f"prunekit {error(ours):.6f}; max |difference| of kept weights {float((ref - ours).abs().max()):.2e}")
    # 2. gradual mask selection per output row (the reference's per_out mode, cubic schedule)
    ref = reference_prune(AdmmPruner, W, XX, sparsity=args.sparsity, iterative_prune=15, iters=20, percdamp=0.1,
                          per_out=True)
    ours = admm_update(W, XX, None, iterations=20, sparsity=args.sparsity, per="row")
    agree = float(((ref == 0) == (ours == 0)).float().mean())
    print(f"gradual, per row:          mask agreement {agree:.4%}; rel. error reference {error(ref):.6f}, "
          f"prunekit {error(ours):.6f}")
    print(f"no update (same mask):     rel. error {error(W.masked_fill(pruned, 0)):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
