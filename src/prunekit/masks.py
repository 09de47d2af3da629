"""Pure mask functions: which weights to zero, given a score (lower score = pruned first).

All functions return a bool tensor, True where the weight is pruned, with *exact* counts:
ties are broken by `topk`, never by a threshold (a threshold over-prunes on ties).
"""
from __future__ import annotations

import torch
from torch import Tensor


def lowest(score: Tensor, sparsity: float, nm: tuple[int, int] | None = None, per: str = "row") -> Tensor:
    """Mask of the lowest-scoring weights of an (out, in) score.

    nm=(n, m): in every m consecutive inputs of each row, the n lowest (`sparsity` is ignored).
    per="row": the int(in * sparsity) lowest of each row (Wanda's comparison group).
    per="layer": the int(out * in * sparsity) lowest of the whole matrix (magnitude pruning's).
    """
    out_features, in_features = score.shape
    if nm is not None:
        n, m = nm
        if in_features % m:
            raise ValueError(f"N:M {n}:{m} needs the input dimension ({in_features}) to be a multiple of {m}")
        groups = score.reshape(out_features, in_features // m, m)
        return _scatter_lowest(groups, n, dim=2).reshape(out_features, in_features)
    if per == "row":
        return _scatter_lowest(score, int(in_features * sparsity), dim=1)
    if per == "layer":
        return _scatter_lowest(score.reshape(-1), int(score.numel() * sparsity), dim=0).reshape(score.shape)
    raise ValueError(f"per must be 'row' or 'layer', got {per!r}")


def _scatter_lowest(score: Tensor, k: int, dim: int) -> Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        index = torch.topk(score, k, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, index, True)
    return mask


def nm_violations(W: Tensor, n: int, m: int) -> int:
    """Number of m-wide groups in an (out, in) weight that hold fewer than n zeros."""
    out_features, in_features = W.shape
    if in_features % m:
        return out_features * (in_features // m + 1)
    zeros = (W.reshape(out_features, in_features // m, m) == 0).sum(dim=2)
    return int((zeros < n).sum())


def check_pruned(W: Tensor, sparsity: float, nm: tuple[int, int] | None, per: str, zeros_before: int = 0,
                 layer_zeros: int | None = None) -> str | None:
    """Verify an (out, in) weight holds what was asked. Returns a reason string, or None if it is right.

    The achieved zero count must be at least the requested count (per row, for per="row") and
    at most requested + the zeros that were already there before pruning. `layer_zeros` is the
    requested count for per="layer" when the method selects in pieces (default int(numel * sparsity)).
    """
    out_features, in_features = W.shape
    zeros = int((W == 0).sum())
    if nm is not None:
        bad = nm_violations(W, *nm)
        if bad:
            return f"{bad} groups of {nm[1]} hold fewer than {nm[0]} zeros"
        wanted = out_features * (in_features // nm[1]) * nm[0]
    elif per == "row":
        per_row = int(in_features * sparsity)
        short = int(((W == 0).sum(dim=1) < per_row).sum())
        if short:
            return f"{short} rows hold fewer than {per_row} zeros"
        wanted = per_row * out_features
    else:
        wanted = int(W.numel() * sparsity) if layer_zeros is None else layer_zeros
    if zeros < wanted:
        return f"{zeros} zeros, expected {wanted} ({sparsity:.2%})"
    if zeros > wanted + zeros_before:
        return f"{zeros} zeros, expected {wanted} (+{zeros_before} already zero): over-pruned"
    return None
