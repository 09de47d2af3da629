"""Observers: running statistics of a linear layer's input, accumulated in float64.

A method declares the observer it needs (`@register(..., stats=Hessian)`); the engine creates one
per group of layers that read the same input (q/k/v share one), feeds it every calibration
batch through `update(X)`, hands it to the method, and frees it at the end of the block.

Every observer keeps plain sums over tokens and names them in `SUMS` (with the count in
`tokens`): observers of disjoint windows then combine by addition, which is how distributed
calibration merges the processes' statistics (`distributed.reduce_stats_`).

Each chunk's contribution is computed in float32 (BLAS speed) and added into a float64 sum; the
float32 statistic the methods read (`Hessian.H`, `InputNorm.sq_norm`) is that sum rounded once
(cached until the next update). Why: a float32 running sum depends on the order the chunks are
added in, and 2 processes add ((c0+c1)+(c2+c3)) where 1 process adds (((c0+c1)+c2)+c3);
SparseGPT's sequential OBS updates amplify those last-bit differences. The float64 sums of the
same float32 chunk products differ between groupings only at ~1e-16 relative, so their float32
rounding is (almost always) bit-identical and the distributed result equals the 1-process one.
The cost is memory: the float64 sum plus the float32 copy take 3x a float32 accumulator (for a
Hessian of 11008 inputs, 1.45 GB instead of 0.48 GB), freed with the observer after its block.
"""
from __future__ import annotations

import torch
from torch import Tensor


class InputNorm:
    """Squared L2 norm of each input feature over all calibration tokens: sum_t x_tj^2 (Wanda)."""
    SUMS = ("sq_norm64",)

    def __init__(self, in_features: int, device: torch.device):
        self.sq_norm64 = torch.zeros(in_features, dtype=torch.float64, device=device)  # (in,)
        self.tokens = 0
        self._sq_norm: Tensor | None = None

    def update(self, X: Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()                                      # (tokens, in)
        self.sq_norm64 += X.square().sum(dim=0)     # the chunk's float32 sum, added in float64
        self.tokens += X.shape[0]
        self.sums_changed()

    @property
    def sq_norm(self) -> Tensor:
        """sum_t x_tj^2 in float32 (the float64 sum rounded once), (in,)."""
        if self._sq_norm is None:
            self._sq_norm = self.sq_norm64.float()
        return self._sq_norm

    @sq_norm.setter
    def sq_norm(self, value: Tensor) -> None:
        self.sq_norm64 = value.double()
        self.sums_changed()

    def sums_changed(self) -> None:
        """The float64 sums were modified (update, permutation, cross-process reduction)."""
        self._sq_norm = None

    def permute_(self, perm: Tensor) -> None:
        """The input features were reordered (N:M channel permutation): follow them."""
        self.sq_norm64 = self.sq_norm64[perm.to(self.sq_norm64.device)]
        self.sums_changed()


DAMP_RETRIES = (1.0, 10.0, 100.0)   # factors on the requested dampening before the diagonal fallback


class Hessian:
    """H = X^T X over all calibration tokens (the layer-wise reconstruction Hessian, up to 2/n).

    `inverse_cholesky(damp)` returns the upper Cholesky factor of (H + damp*mean(diag H)*I)^-1,
    computed once and shared by every layer of the group (q/k/v read the same input).

    The sum is kept in float64 (`H64`, see the module docstring) and `H` is its float32 rounding,
    cached: memory is 12 bytes per entry (in^2), 3x a plain float32 accumulator.
    """
    SUMS = ("H64",)

    def __init__(self, in_features: int, device: torch.device):
        self.H64 = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)  # (in, in)
        self.tokens = 0
        self._H: Tensor | None = None
        self._inverse: dict[float, tuple[Tensor, float, str | None]] = {}

    def update(self, X: Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()                                      # (tokens, in)
        if X.device.type == "cpu":
            # numpy recognises A.T @ A and calls BLAS syrk: half the flops of a general matmul,
            # measured 1.8-2.5x faster than addmm on 2 CPU cores.
            X = X.contiguous().numpy()
            chunk = torch.from_numpy(X.T @ X)
        else:
            chunk = X.T @ X
        self.H64 += chunk                   # the chunk's float32 product, added in float64
        self.tokens += X.shape[0]
        self.sums_changed()

    @property
    def H(self) -> Tensor:
        """X^T X in float32 (the float64 sum rounded once), (in, in). Treat as read-only: an in-place
        change would be lost at the next update; assign `H` instead."""
        if self._H is None:
            self._H = self.H64.float()
        return self._H

    @H.setter
    def H(self, value: Tensor) -> None:
        self.H64 = value.double()
        self.sums_changed()

    def sums_changed(self) -> None:
        """The float64 sum was modified (update, permutation, cross-process reduction): the float32
        copy and the cached factorisations are stale."""
        self._H = None
        self._inverse.clear()

    @property
    def sq_norm(self) -> Tensor:
        return self.H.diagonal()

    def permute_(self, perm: Tensor) -> None:
        """The input features were reordered (N:M channel permutation): follow them."""
        perm = perm.to(self.H64.device)
        self.H64 = self.H64[perm][:, perm].contiguous()
        self.sums_changed()

    @property
    def dead(self) -> Tensor:
        """Inputs that were always zero: their weights carry no signal and are zeroed."""
        return self.H.diagonal() == 0

    def inverse_cholesky(self, damp: float) -> tuple[Tensor, float, str | None]:
        """(U, damp_used, note): U upper-triangular with U^T U = (H + lambda I)^-1.

        If the factorisation fails (H not positive definite in float32, seen on Mistral), retry
        with 10x and 100x the dampening (DAMP_RETRIES); if that fails too, fall back to a diagonal
        H: U = diag(H_jj + lambda)^-1/2, so the mask score w^2 / U_jj^2 becomes w^2 (H_jj + lambda),
        Wanda's score, and the sweep has no cross terms to spread errors through (no OBS update).
        The mask keeps the requested pattern either way; `note` says which path was taken, and
        the engine logs it and stores it in the layer's record (prunekit.json).
        """
        if damp in self._inverse:
            return self._inverse[damp]
        H = self.H.clone()
        H[self.dead, self.dead] = 1.0
        mean_diag = H.diagonal().mean()
        result = None
        for factor in DAMP_RETRIES:
            damped = H.clone()
            damped.diagonal().add_(damp * factor * mean_diag)
            L, info = torch.linalg.cholesky_ex(damped)
            if info == 0:
                inverse = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(inverse, upper=True)
                if info == 0 and torch.isfinite(U).all():
                    note = None if factor == 1.0 else f"Cholesky failed; dampening raised to {damp * factor:g}"
                    result = (U, damp * factor, note)
                    break
        if result is None:
            damped = H.diagonal().clamp_min(0) + damp * mean_diag.abs() + torch.finfo(H.dtype).tiny
            tried = ", ".join(f"{damp * factor:g}" for factor in DAMP_RETRIES)
            result = (torch.diag(damped.rsqrt()), damp,
                      f"Cholesky failed at dampening {tried} (x mean diag H); fallback: diagonal H "
                      "(Wanda-like score w^2 H_jj, no OBS update)")
        self._inverse[damp] = result
        return result


class MeanVar:
    """Mean and variance of each input feature over all calibration tokens (FLAP's fluctuation
    metric and its bias compensation). Sums are kept in float64: E[x^2] - E[x]^2 of activations
    with large means loses every digit in float32."""
    SUMS = ("sum", "sq_sum")

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)      # (in,)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)   # (in,)
        self.tokens = 0

    def update(self, X: Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).double()                                     # (tokens, in)
        self.sum += X.sum(dim=0)
        self.sq_sum += X.square().sum(dim=0)
        self.tokens += X.shape[0]

    @property
    def mean(self) -> Tensor:
        return (self.sum / max(self.tokens, 1)).float()

    @property
    def var(self) -> Tensor:
        """Unbiased sample variance (n - 1), as FLAP's running estimate."""
        n = max(self.tokens, 2)
        mean = self.sum / max(self.tokens, 1)
        return ((self.sq_sum - self.tokens * mean.square()) / (n - 1)).clamp_min(0).float()

    @property
    def sq_norm(self) -> Tensor:
        return self.sq_sum.float()


class OutputGradientCovariance:
    """G = sum_t g_t g_t^T over tokens, g_t = dL/dy_t the loss gradient at one linear layer's output
    (out,): the output factor of the Kronecker-factored Fisher F ~= G (x) A (K-FAC; The LLM Surgeon,
    arXiv 2312.17244, Eq. 5), A being `Hessian`'s X^T X. Per layer, not per group: layers that share
    an input have different outputs. Fed with `update(dY)` (dY: (..., out)) by a hook on the layer's
    output; `gradients.output_covariances` computes the same sums for many layers in one whole-model
    backward pass per window. Summed in float64 like the other observers."""
    SUMS = ("G64",)

    def __init__(self, out_features: int, device: torch.device):
        self.G64 = torch.zeros(out_features, out_features, dtype=torch.float64, device=device)   # (out, out)
        self.tokens = 0

    def update(self, dY: Tensor) -> None:
        dY = dY.reshape(-1, dY.shape[-1]).float()                                   # (tokens, out)
        self.G64 += dY.T @ dY
        self.tokens += dY.shape[0]

    @property
    def G(self) -> Tensor:
        """sum_t g_t g_t^T in float32, (out, out)."""
        return self.G64.float()
