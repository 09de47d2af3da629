"""Weight updates for a pruning mask: re-fit the kept weights so the layer's output moves least.

Any mask-producing method (magnitude, Wanda, RIA, GBLM, ...) can be followed by one of these
(`update: obs | admm` in its config); the engine calls `apply_update` after the method.

    obs    SparseGPT's column sweep with the mask fixed (Frantar & Alistarh, arXiv 2301.00774):
           each pruned weight's error is spread over the not-yet-visited columns through the
           Cholesky factor of H^-1. One pass, greedy in the column order.
    admm   the least-squares problem  min ||X W^T - X W0^T||^2  subject to the mask, solved with
           ADMM (Boza, "Fast and Optimal Weight Update for Pruned Large Language Models", arXiv
           2401.02938). Converges to the optimal kept weights for the mask, which the OBS sweep
           does not reach. With `admm_gradual` the mask is also chosen inside the iterations,
           by |W + U| on the normalised problem, with the sparsity rising on a cubic schedule.

ADMM, as in the reference (fmfi-compbio/admm-pruning, `lib/admm.py`): normalise the problem so
diag(H) = 1 (columns of W scaled by ||X_j||), dampen H by 0.1 x its mean diagonal, rho = 1, 20
iterations of
    W <- (W0 H + rho (Z - U)) (H + rho I)^-1        (exact minimiser, one matmul per iteration)
    Z <- mask * (W + U)                             (projection onto the mask)
    U <- U + W - Z
and return Z. Differences from the reference: the mask in gradual mode follows the cubic
schedule in every comparison group (the reference applies the schedule only in its per-output
mode), counts are exact (`masks.lowest`, no thresholds), and the weight keeps the (out, in)
orientation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masks import lowest

OBS_DAMP = 0.01      # SparseGPT's dampening, a fraction of the mean diagonal of H (the paper's value)
OBS_BLOCKSIZE = 128  # columns per lazy-update block (the paper's B)
LAZY_STEP = 16       # columns per rank-1 sub-block inside a block (see obs_sweep)
ADMM_DAMP = 0.1     # the reference's percdamp for ADMM, on the normalised H (mean diagonal 1)
ADMM_RHO = 1.0
GRADUAL_SHARE = 0.75  # gradual mode: the mask is re-chosen over the first 15 of 20 iterations


def apply_update(W: Tensor, W_pruned: Tensor, stats, cfg, method_updates: bool = False) -> Tensor:
    """The weights to store, given the dense `W` and the method's output `W_pruned` (its zeros
    are the mask). `stats` is a Hessian observer; `cfg` the layer's config; `method_updates`: the
    method's own function already applied the OBS update (registered with `updates_weights`)."""
    if cfg.update == "none":
        return W_pruned
    pruned = W_pruned == 0                                            # (out, in), True = pruned
    if cfg.update == "obs":
        if method_updates:
            return W_pruned                                           # e.g. SparseGPT: its own sweep did it
        return obs_sweep(W, stats, sparsity=cfg.sparsity, nm=cfg.nm, per=cfg.per, fixed=pruned)
    if cfg.update == "admm":
        if cfg.admm_gradual:
            return admm_update(W, stats.H, None, iterations=cfg.admm_iterations,
                               sparsity=cfg.sparsity, nm=cfg.nm, per=cfg.per)
        return admm_update(W, stats.H, pruned, iterations=cfg.admm_iterations)
    raise ValueError(f"unknown update {cfg.update!r}")


def admm_update(W: Tensor, H: Tensor, pruned: Tensor | None, *, iterations: int = 20,
                sparsity: float = 0.5, nm: tuple[int, int] | None = None, per: str = "row") -> Tensor:
    """Kept weights that minimise ||X (W0 - W)^T|| under the mask (ADMM, see module docstring).

    W: (out, in) dense weights; H = X^T X (in, in); pruned: (out, in) bool mask (True = zero), or
    None to choose it gradually (`sparsity`, `nm`, `per` then say what it must hold).
    """
    W0 = W.float()                                                    # (out, in)
    norm = H.diagonal().clamp_min(0).sqrt() + 1e-8                    # (in,) ||X_j||
    Hn = H / norm[:, None] / norm[None, :]                            # (in, in), unit diagonal
    Hn.diagonal().add_(ADMM_DAMP * Hn.diagonal().mean())
    Wn = W0 * norm                                                    # (out, in), normalised weights
    target = Wn @ Hn                                                  # (out, in) = W0 X^T X, normalised
    Hn.diagonal().add_(ADMM_RHO)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(Hn))       # (H + rho I)^-1
    schedule = max(1, int(round(GRADUAL_SHARE * iterations)))
    keep = None if pruned is None else ~pruned
    Z = Wn.clone()
    U = torch.zeros_like(Wn)
    for step in range(iterations):
        if pruned is None and step < schedule:                        # gradual mask selection
            current = sparsity * (1 - (1 - (step + 1) / schedule) ** 3)
            keep = ~_gradual_mask(Wn + U, current, sparsity, nm, per)
        Z = (Wn + U) * keep
        U = U + Wn - Z
        Wn = (target + ADMM_RHO * (Z - U)) @ inverse
    Z = (Wn + U) * keep
    return Z / norm


def _gradual_mask(score: Tensor, current: float, final: float, nm, per: str) -> Tensor:
    """Pruned mask at sparsity `current` on the way to `final`: the lowest |score| in each
    comparison group; for N:M, only weights that the final N:M mask would prune are candidates."""
    score = score.abs()
    if nm is None:
        return lowest(score, current, None, per)
    candidates = lowest(score, 0.0, nm)                               # the final N:M choice
    if current >= final:
        return candidates
    ranked = torch.where(candidates, score, torch.full_like(score, float("inf")))
    return lowest(ranked, current, None, "layer") & candidates


LAZY_STEP = 16


def obs_sweep(W: Tensor, stats, *, sparsity: float, nm: tuple[int, int] | None = None, per: str = "layer",
              blocksize: int = OBS_BLOCKSIZE, damp: float = OBS_DAMP, fixed: Tensor | None = None) -> Tensor:
    """SparseGPT's column sweep (`methods/sparsegpt.py` explains it): choose the mask block by block
    (`sparsity` or `nm`, compared `per` row or layer) and spread each pruned weight's error over the
    columns not yet visited. `fixed` (out, in) bool, True = pruned: use that mask instead of
    choosing one (the OBS update for another method's mask, `update: obs`). `stats`: a Hessian observer."""
    W = W.clone().float()                                            # (out, in)
    W[:, stats.dead] = 0
    U, _, _ = stats.inverse_cholesky(damp)                        # (in, in), upper: U^T U = H^-1
    out_features, columns = W.shape
    m = nm[1] if nm else 1
    step = m * -(-LAZY_STEP // m)                                     # sub-block width, a multiple of M
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        d = U.diagonal()[i1:i2]                                       # (B,)
        if fixed is not None:
            mask = fixed[:, i1:i2]
        elif nm is None:                                          # adaptive mask selection
            mask = lowest(W[:, i1:i2].square() / d.square(), sparsity, None, per)
        else:
            mask = torch.zeros(out_features, i2 - i1, dtype=torch.bool, device=W.device)
        Err = torch.zeros(out_features, i2 - i1, device=W.device)     # (out, B): scaled errors
        for j1 in range(i1, i2, step):
            j2 = min(j1 + step, i2)
            W1, U1 = W[:, j1:j2], U[j1:j2, j1:j2]                     # views, updated in place
            for i in range(j2 - j1):
                c = j1 - i1 + i                                       # column within the mask block
                if nm is not None and fixed is None and c % m == 0:
                    score = W1[:, i:i + m].square() / U1.diagonal()[i:i + m].square()   # (out, m)
                    mask[:, c:c + m] = lowest(score, 0.0, nm)
                err = torch.where(mask[:, c], W1[:, i], 0.0) / U1[i, i]              # (out,)
                W1[:, i:].sub_(err[:, None] * U1[i, i:][None, :])
                W1[:, i].masked_fill_(mask[:, c], 0)
                Err[:, c] = err
            W[:, j2:i2].sub_(Err[:, j1 - i1:j2 - i1] @ U[j1:j2, j2:i2])   # lazy update, rest of the block
        W[:, i2:].sub_(Err @ U[i1:i2, i2:])                           # lazy update, later blocks
    return W
