"""The LLM Surgeon: multi-shot pruning with Kronecker-factored curvature and correlated weight
updates (van der Ouderaa, Nagel, van Baalen, Asano, Blankevoort, arXiv 2312.17244).

Curvature (the paper's Sec. 3.2, Eq. 4-6). The Fisher of one linear layer's vec(W) (row-major,
W (out, in)) is approximated by a Kronecker product,

    F ~= G (x) A,   A = E[x x^T] (in, in),   G = E[g g^T] (out, out),   g = dL/dy,

exact when every sample contributes one (x, g) pair (then dL/dW = g x^T and F = g g^T (x) x x^T),
and exact for any number of samples when L is the layer's squared reconstruction error (then
g g^T averages to G = I and F = I (x) A: the layer-wise OBS problem of SparseGPT).
Its inverse is F^-1 = G^-1 (x) A^-1, so [F^-1]_(ij),(kl) = [G^-1]_ik [A^-1]_jl.

Cost and update (Sec. 3.3; Eq. 9 for one weight, Eq. 10-11 for a set Q of weights removed
together, E_Q the unit vectors of Q):

    cost_ij = w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)                                            (Eq. 9)
    dW      = -G^-1 M A^-1,  M = Q-entries of (C^-1 w_Q),  C = [G^-1]_QrQr o [A^-1]_QcQc  (Eq. 11)

(o the elementwise product). Every weight that is zero already belongs to Q with cost 0, so an
update keeps earlier removals at zero. With a diagonal G (or G = I) the rows decouple and a per-row
solve is exact: row i's update is the multi-weight OBS update -w_Q^T [A^-1]_QQ^-1 [A^-1]_Q,: with A
alone. With a full G, a joint solve over all of Q is out of reach (|Q| is half the layer). Two ways:
  correlate None (default)  conjugate gradients on the kept weights: minimise 1/2 tr(G dW A dW^T) with
              dW_Q = -W_Q, whose gradient G dW A needs two matmuls a step; preconditioned by the
              diagonal G_ii A_jj and started from the per-row (G = I) solution, until the residual
              is `cg_tol` (1%) of the first (or `cg_steps`, 300). On SmolLM2's block-10 attention
              output projection at 50% the quadratic is then within 0.1% of its minimum (which takes
              ~1,000 steps to reach a residual of 1e-3); a step costs 2 x out x in x (out + in) flops
              in float64.
  correlate N  the reference's scheme (`max_correlate` with `addupdate`): Q in chunks of whole rows of
              at most N removed weights, each chunk solved jointly on the weights the earlier chunks
              moved. A later chunk moves the zeros of the earlier ones, which are then forced back to
              zero, so it ends above the joint minimum of the quadratic it minimises (by how much on
              SmolLM2's layers: bench/surgeon_layer.py, BENCHMARKS.md); hence CG by default.

Shots (Sec. 3.5): `shots` rounds on a linear schedule; round k prunes to k/shots of the target
(unstructured: of the zeros per row or per layer; N:M: of the groups of M, each chosen group
getting its N lowest-cost zeros at once, ranked by the sum of those N costs as the reference's
semi-structured threshold does). After each round the costs are recomputed on the updated
weights. The paper also re-estimates G and A between shots on the pruned model; inside one
layer's step our engine hands the method statistics once, so the factors are re-used across
shots. For A that loses nothing: a layer's inputs do not depend on its own weights, and with
`sequential: true` they already come from the pruned earlier layers. G would move a little as
the layer's weights change; it is not re-measured.

Where G comes from (`curvature`):
  "kfac"      the paper's full G (out, out) of every pruned layer, summed over the tokens of the
              first `gradient_samples` windows from one whole-model backward pass each
              (`gradients.output_covariances`: a hook on each layer's output reads g = dL/dy, L the
              causal LM loss), measured on the dense model before the block loop, as the gradients
              of GBLM are. Rows couple through G: the update is the conjugate-gradient solve
              (above), two (out x out x in) + (out x in x in) matmuls a step.
  "gradient"  (default) a diagonal G from the gradient pass that GBLM uses (`gradients.py`,
              `gradient: model` backpropagates the causal LM loss of the whole model; `block` the
              block-local estimate): that pass gives sqrt(sum_s (dL_s/dW_ij)^2) per weight, and
              under the Kronecker model (dL/dW_ij)^2 ~ G_ii A_jj, so G_ii is estimated (up to one
              constant, which cancels) by the row sums of the squared gradients. A diagonal G
              changes which rows lose weights under `per: layer` (it scales each row's costs);
              with `per: row`, or N:M in one shot, it cancels out: the method then skips the
              gradient pass and equals its "identity" form.
  "identity"  G = I: costs and updates from A alone (the OBS update of SparseGPT without its
              left-to-right column order); no gradient pass.

Row and column removal (the structured LLM Surgeon) is the width method `llm-surgeon-sp`
(`methods/llm_surgeon_sp.py`): removing a row or column for real couples producers and consumers
across layers (q/k/v with o, gate/up with down), which is the width driver's job.

Damping: A gets `damp` x mean diag(A) on its diagonal (the Hessian solver's retries and fallback
apply, `stats.Hessian.inverse_cholesky`), G gets `damp_g` x mean diag(G) (the reference's
damp_g 0.1). A is used as the sum X^T X: its scale cancels in the update and scales every cost alike.

Cost against SparseGPT on one 576 x 1536 layer (SmolLM2-135M's FFN down-projection shape; 2048 correlated
random calibration tokens, sparsity 0.5, float32, CPU, OMP_NUM_THREADS=2 on a shared 2-core host
whose load average was 10-11, so absolute seconds are inflated and noisy; two runs of sparsegpt
took 5.5 s and 22 s):
                               seconds   peak RSS over the Hessian   ||X(W - W')|| / ||X W||
  sparsegpt (0.5)                  5.5          +50 MB                       0.214
  llm-surgeon G = I, 1 shot      103            +153 MB                      0.203
  llm-surgeon G = I, 5 shots     181            +147 MB                      0.171
  llm-surgeon diag G, 5 shots    180            +180 MB                      0.246 (*)
  sparsegpt 2:4                   13            +49 MB                       0.296
  llm-surgeon 2:4, G = I, 5 shots 169           +167 MB                      0.261
  (*) a synthetic gradient that weights rows unequally: it trades plain output error for the
      rows that move the loss most, so this column is not its objective.
Memory: A^-1 (in^2 floats, 9 MB here) beside the Hessian both methods keep, the costs and masks
(out x in), and one batch of per-row systems (at most 16 MB, `_BATCH_BYTES`, with its Cholesky
factor); a full G would add out^2. Time: every shot solves, for each row, a system of its |Q_i|
removed weights (|Q_i|^3 / 3 flops, 87 GFLOP for the last shot here) where SparseGPT makes one
column sweep (about out x in^2 flops): here llm-surgeon was 19x (1 shot) to 33x (5 shots) slower; its per-row solves
are exact, which is where the lower error comes from even at one shot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..gradients import GradientScoreConfig, WithGradient, output_covariances
from ..masks import lowest
from ..registry import register
from ..stats import Hessian
from ..updates import OBS_DAMP

CURVATURES = ("gradient", "kfac", "identity")
_BATCH_BYTES = 2**24        # at most 16 MB of (rows, |Q|, |Q|) systems solved at once


@dataclass(frozen=True)
class LLMSurgeonConfig(GradientScoreConfig):
    per: str = "layer"            # the paper ranks costs globally; "layer" is the nearest linear-scope group
    shots: int = 5                # rounds on the linear sparsity schedule (the paper's 5)
    curvature: str = "gradient"   # G: "gradient" (diagonal), "kfac" (full, output-gradient hooks), "identity" (G = I)
    damp: float = OBS_DAMP        # dampening of A, a fraction of its mean diagonal
    damp_g: float = 0.1           # dampening of G, a fraction of its mean diagonal (the reference's damp_g)
    correlate: int | None = None  # kfac: None = exact (conjugate gradients); N = the reference's chunks of N weights
    cg_steps: int = 300           # kfac, correlate None: at most this many conjugate-gradient steps per update
    cg_tol: float = 0.01          # ... or until the residual is this share of the first
    update: str = "obs"           # the correlated update is built in; "admm" re-fits the final mask instead

    def __post_init__(self):
        super().__post_init__()
        if self.update == "none":
            raise ValueError("llm-surgeon chooses its masks together with its weight update; use update 'obs' "
                             "(the default, its own update) or 'admm', or another method for a mask alone")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or not 1 <= self.shots <= 100:
            raise ValueError(f"shots must be an integer in [1, 100], got {self.shots!r} "
                             "(5 is the paper's; 1 prunes in one round)")
        if self.curvature not in CURVATURES:
            raise ValueError(f"curvature must be 'gradient' (diagonal G from the gradient pass), 'kfac' (the full "
                             f"output-gradient covariance G, the paper's) or 'identity' (G = I, no gradients), got "
                             f"{self.curvature!r}")
        if self.curvature == "kfac" and self.gradient != "model":
            raise ValueError("curvature 'kfac' measures G = E[g g^T] at each layer's output from the whole model's "
                             "loss; the block-local estimate (gradient 'block') has no such output gradient: use "
                             "gradient 'model' or curvature 'gradient'")
        for name, value in (("damp", self.damp), ("damp_g", self.damp_g)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 10:
                raise ValueError(f"{name} must be a number in [0, 10), got {value!r} (0.01 for damp, 0.1 for "
                                 "damp_g are the usual values)")
        if self.correlate is not None and (isinstance(self.correlate, bool) or not isinstance(self.correlate, int)
                                           or self.correlate < 1):
            raise ValueError(f"correlate must be an integer >= 1 or null, got {self.correlate!r} (null: the exact "
                             "conjugate-gradient update; 2000: the reference's chunks)")
        if isinstance(self.cg_steps, bool) or not isinstance(self.cg_steps, int) or self.cg_steps < 1:
            raise ValueError(f"cg_steps must be an integer >= 1, got {self.cg_steps!r}")
        if isinstance(self.cg_tol, bool) or not isinstance(self.cg_tol, (int, float)) or not 0 < self.cg_tol < 1:
            raise ValueError(f"cg_tol must be a number in (0, 1), got {self.cg_tol!r} (0.01: the residual falls to "
                             "1% of the first)")

    @property
    def uses_gradient(self) -> bool:
        """A diagonal G only scales each row's costs, so it matters only where rows compete: per layer,
        and for N:M only while shots choose which groups go first. Elsewhere the backward pass is skipped."""
        return self.curvature == "gradient" and self.per == "layer" and (self.nm is None or self.shots > 1)


def damped_factor(G: Tensor, damp: float) -> Tensor:
    """G + damp * mean(diag G) * I for a covariance factor, (n, n) or its diagonal (n,); float32."""
    G = G.float()
    if G.dim() == 1:
        return G.clamp_min(0) + damp * G.mean().clamp_min(torch.finfo(G.dtype).tiny)
    damped = G.clone()
    damped.diagonal().add_(damp * damped.diagonal().mean().clamp_min(torch.finfo(G.dtype).tiny))
    return damped


def inverse_factor(G: Tensor, damp: float) -> Tensor:
    """(G + damp * mean(diag G) * I)^-1 of a covariance factor, (n, n) or its diagonal (n,)."""
    damped = damped_factor(G, damp)
    if damped.dim() == 1:
        return 1.0 / damped
    return torch.cholesky_inverse(torch.linalg.cholesky(damped))


def kronecker_costs(W: Tensor, Ginv: Tensor | None, Ainv: Tensor) -> Tensor:
    """Eq. 9: cost of removing each weight alone, w_ij^2 / (2 [G^-1]_ii [A^-1]_jj), (out, in).
    Ginv: (out, out), its diagonal (out,), or None for G = I."""
    cost = W.square() / (2 * Ainv.diagonal())[None, :]
    if Ginv is not None:
        cost = cost / (Ginv.diagonal() if Ginv.dim() == 2 else Ginv)[:, None]
    return cost


def kronecker_update(W: Tensor, pruned: Tensor, Ginv: Tensor | None, Ainv: Tensor, correlate: int | None = None,
                     cg_steps: int = 300, cg_tol: float = 0.01) -> Tensor:
    """Eq. 10-11: the weights after removing every `pruned` weight (True = zero), the others moved to
    keep the Kronecker-quadratic loss lowest. Exact per row for G = I or diagonal G; with a full G,
    conjugate gradients over the whole layer (correlate None) or the reference's chunks of whole rows
    of at most `correlate` removed weights."""
    W = W.clone()
    if Ginv is None or Ginv.dim() == 1:
        _update_rows(W, pruned, Ainv)                  # the diagonal of G cancels inside each row
    elif correlate is None:
        W = _update_cg(W, pruned, Ginv, Ainv, cg_steps, cg_tol)
    else:
        _update_coupled(W, pruned, Ginv, Ainv, correlate)
    return W.masked_fill_(pruned, 0)


def _update_cg(W: Tensor, pruned: Tensor, Ginv: Tensor, Ainv: Tensor, steps: int, tol: float = 1e-2) -> Tensor:
    """Full G: minimise 1/2 tr(G dW A dW^T) over the kept weights with the pruned ones at zero, by conjugate
    gradients (the operator X -> G X A on the kept entries is symmetric positive definite), preconditioned by
    its diagonal G_ii A_jj, from the per-row update with G = I, until the residual is `tol` of the first one
    (or `steps`). In float64; G and A are the inverses of the damped inverses it is given."""
    G = torch.cholesky_inverse(torch.linalg.cholesky(Ginv.double()))                # (out, out)
    A = torch.cholesky_inverse(torch.linalg.cholesky(Ainv.double()))                # (in, in)
    keep = (~pruned).double()
    jacobi = keep / (G.diagonal()[:, None] * A.diagonal()[None, :])                 # (out, in), 0 where pruned
    start = W.clone()
    _update_rows(start, pruned, Ainv)
    W0, V = W.double(), start.double().masked_fill_(pruned, 0)
    r = -(G @ (V - W0) @ A) * keep                                                  # minus the gradient
    z = r * jacobi
    d, rz = z.clone(), (r * z).sum()
    stop = tol * tol * float(r.square().sum())
    for _ in range(steps):
        if float(r.square().sum()) <= stop:
            break
        Md = (G @ d @ A) * keep
        alpha = rz / (d * Md).sum()
        V += alpha * d
        r -= alpha * Md
        z = r * jacobi
        rz, previous = (r * z).sum(), rz
        d = z + (rz / previous) * d
    return V.to(W.dtype)


def _update_rows(W: Tensor, pruned: Tensor, Ainv: Tensor) -> None:
    """Row by row, in batches: w_i -= lambda^T [A^-1]_Q,:  with  [A^-1]_QQ lambda = w_Q."""
    counts = pruned.sum(dim=1)
    rows = torch.nonzero(counts * (W * pruned).abs().sum(dim=1).gt(0)).flatten()   # something to remove
    if rows.numel() == 0:
        return
    order = rows[torch.argsort(counts[rows], descending=True)]     # similar |Q| together: little padding
    start = 0
    while start < order.numel():
        q = int(counts[order[start]])
        batch = max(1, _BATCH_BYTES // (4 * q * q))
        chunk = order[start:start + batch]                            # (b,) row indices
        start += batch
        # each row's pruned columns first (stable sort keeps column order), padded to q
        columns = torch.argsort((~pruned[chunk]).to(torch.int8), dim=1, stable=True)[:, :q]    # (b, q)
        valid = torch.gather(pruned[chunk], 1, columns)                                      # (b, q)
        C = Ainv[columns[:, :, None], columns[:, None, :]]                                    # (b, q, q)
        pair = valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(q, device=W.device, dtype=W.dtype).expand_as(C)
        C = torch.where(pair, C, eye)                                 # padding: identity rows, zero right side
        w = torch.gather(W[chunk], 1, columns) * valid                                       # (b, q)
        lam = _solve_spd(C, w)                                                               # (b, q)
        Lam = torch.zeros(chunk.numel(), W.shape[1], device=W.device, dtype=W.dtype)
        Lam.scatter_add_(1, columns, lam * valid)
        W[chunk] -= Lam @ Ainv


def _update_coupled(W: Tensor, pruned: Tensor, Ginv: Tensor, Ainv: Tensor, correlate: int) -> None:
    """Full G: chunks of whole rows; C = [G^-1]_QrQr o [A^-1]_QcQc, dW = -G^-1[:, R] (Lambda A^-1)."""
    counts = pruned.sum(dim=1).tolist()
    row = 0
    while row < W.shape[0]:
        end, size = row, 0
        while end < W.shape[0] and (end == row or size + counts[end] <= correlate):
            size += counts[end]
            end += 1
        if size:
            r, c = torch.nonzero(pruned[row:end], as_tuple=True)      # row-major, rows local to the chunk
            C = Ginv[row + r][:, row + r] * Ainv[c][:, c]                                   # (q, q)
            lam = _solve_spd(C[None], W[row + r, c][None])[0]                               # (q,)
            Lam = torch.zeros(end - row, W.shape[1], device=W.device, dtype=W.dtype)
            Lam.index_put_((r, c), lam)
            W -= Ginv[:, row:end] @ (Lam @ Ainv)
        row = end


def _solve_spd(C: Tensor, b: Tensor) -> Tensor:
    """Solve C x = b for a batch of symmetric positive definite C (b, q, q); LU where Cholesky fails."""
    L, info = torch.linalg.cholesky_ex(C)
    if bool((info == 0).all()):
        return torch.cholesky_solve(b[..., None], L)[..., 0]
    return torch.linalg.solve(C, b)


def _mask_for_shot(cost: Tensor, pruned: Tensor, fraction: float, sparsity: float, nm, per: str) -> Tensor:
    """Removed weights after a round that reaches `fraction` of the target; earlier removals stay."""
    cost = cost.masked_fill(pruned, -1.0)                            # costs are >= 0: taken first
    if nm is None:
        return lowest(cost, sparsity * fraction, None, per) | pruned
    n, m = nm
    out_features, in_features = cost.shape
    elements = cost.reshape(out_features, in_features // m, m)
    chosen_in_group = lowest(cost, 0.0, nm).reshape(elements.shape)  # the n lowest of each group
    group_cost = (elements * chosen_in_group).sum(dim=2)             # (out, groups): sum of those n costs
    done = pruned.reshape(elements.shape).any(dim=2)
    group_cost = group_cost.masked_fill(done, -1.0)
    groups = lowest(group_cost, fraction, None, per)                 # whole groups, N zeros at once
    return (chosen_in_group & groups[:, :, None]).reshape(cost.shape) | pruned


def surgeon_prune(W: Tensor, Ainv: Tensor, Ginv: Tensor | None, *, sparsity: float, nm=None, per: str = "layer",
                  shots: int = 5, correlate: int | None = None, cg_steps: int = 300,
                  cg_tol: float = 0.01) -> Tensor:
    """Multi-shot LLM Surgeon on one (out, in) weight. Ainv: (A + damping)^-1 (in, in); Ginv: (G +
    damping)^-1 as (out, out), its diagonal (out,), or None (G = I). Returns the pruned, updated weight."""
    if nm is not None and W.shape[1] % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs the input dimension ({W.shape[1]}) to be a multiple of {nm[1]}")
    W = W.float().clone()                                            # (out, in)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for shot in range(1, shots + 1):
        fraction = 1.0 if shot == shots else shot / shots            # exact target in the last round
        mask = _mask_for_shot(kronecker_costs(W, Ginv, Ainv), pruned, fraction, sparsity, nm, per)
        if bool((mask & ~pruned).any()):
            W = kronecker_update(W, mask, Ginv, Ainv, correlate, cg_steps, cg_tol)
        pruned = mask
    return W


def llm_surgeon_prescore(model, calib: Tensor, cfg: LLMSurgeonConfig, *, names: list[str], device=None,
                         progress: bool = True, **_) -> dict[str, Tensor]:
    """curvature 'kfac': the full output-gradient covariance G (out, out) of every pruned layer, from the
    whole model's loss on the first `gradient_samples` windows; {} for the other curvatures."""
    if cfg.curvature != "kfac":
        return {}
    return output_covariances(model, calib, names, samples=cfg.gradient_samples, device=device, progress=progress,
                              first_window=distributed.offset(calib.shape[0]))


def _factors(stats, cfg: LLMSurgeonConfig, out_features: int) -> tuple[Tensor, Hessian, Tensor | None]:
    """(A^-1, the Hessian observer, G^-1 or its diagonal or None) from what the engine passes."""
    hessian = stats.stats if isinstance(stats, WithGradient) else stats
    if not isinstance(hessian, Hessian):
        raise TypeError("llm-surgeon needs the input covariance: the engine must pass a stats.Hessian observer "
                        f"(or WithGradient around one), got {type(stats).__name__}")
    U, _, _ = hessian.inverse_cholesky(cfg.damp)                     # U^T U = (A + lambda I)^-1
    Ainv = U.T @ U                                                   # (in, in)
    Ginv = None
    if cfg.curvature == "kfac":
        G = getattr(stats, "grad", None)
        if G is None or tuple(G.shape) != (out_features, out_features):
            raise TypeError("llm-surgeon with curvature 'kfac' needs the output-gradient covariance G "
                            f"({out_features} x {out_features}) from its prescore pass as WithGradient(stats, G, "
                            f"...), got {None if G is None else tuple(G.shape)}")
        Ginv = inverse_factor(G.to(Ainv.device), cfg.damp_g)
    elif cfg.uses_gradient:
        if not isinstance(stats, WithGradient):
            raise TypeError("llm-surgeon with curvature 'gradient' needs the gradient pass: the engine must pass "
                            "WithGradient(stats, grad, windows=...), or use curvature 'identity' (G = I)")
        diagonal = stats.grad.to(Ainv.device).float().square().sum(dim=1)    # (out,) ~ G_ii up to a constant
        Ginv = inverse_factor(diagonal, cfg.damp_g)
    return Ainv, hessian, Ginv


@register("llm-surgeon", LLMSurgeonConfig, stats=Hessian, updates_weights=True, prescore=llm_surgeon_prescore)
def llm_surgeon(W: Tensor, stats, cfg: LLMSurgeonConfig) -> Tensor:
    Ainv, hessian, Ginv = _factors(stats, cfg, W.shape[0])
    W = W.clone()
    W[:, hessian.dead.to(W.device)] = 0                              # inputs that never fired carry nothing
    return surgeon_prune(W, Ainv.to(W.device), None if Ginv is None else Ginv.to(W.device),
                         sparsity=cfg.sparsity, nm=cfg.nm, per=cfg.per, shots=cfg.shots, correlate=cfg.correlate,
                         cg_steps=cfg.cg_steps, cg_tol=cfg.cg_tol)
