"""ARMOR: a 2:4 sparse core between two block-diagonal wrappers (Liu, Liu, Wang, Zhao & Yang, "ARMOR:
High-Performance Semi-Structured Pruning via Adaptive Matrix Factorization", arXiv 2510.05528).

Each pruned weight W (out, in) is replaced by

    W_hat = A . (W' (.) M) . B          (the paper's factorisation)

with M an N:M mask (2:4 by default), S = W' (.) M the sparse core that the stock linear layer stores,
and A (out, out), B (in, in) block-diagonal with blocks of `block_size` (capped at the dimension):
the wrappers cost (out + in) x block_size parameters, a few percent of the layer at 128, and keep
the 2:4 kernel for the heavy product. The four unknowns are chosen by block coordinate descent on
the layer's proxy loss

    L(A, S, B) = || (W - A S B) X^T ||_F^2 = tr(E H E^T),   E = W - A S B,  H = X^T X

(X the layer's calibration inputs, H the engine's `Hessian`). We use the full H, as the task asks
and as SparseGPT does, where the paper weighs with its diagonal (NoWag's normalised proxy). The
alternation of continuous updates (A, B, W') with discrete ones (M) is the paper's; the steps are ours:

  init   S from SparseGPT's 2:4 sweep (or Wanda's mask), A = B = I: L equals SparseGPT's loss
  A      rows of E are independent under tr(E H E^T), so each output block of A has a closed form:
         A_k += (W_k H C_k^T - A_k G_k) (G_k + eps I)^-1 with C = S B, G_k = C_k H C_k^T
  B      the input blocks of B are coupled through H; one Gauss-Seidel sweep over them, each the
         exact minimiser B_k += (D_k^T D_k + eps)^-1 D_k^T (E H)_k (H_kk + eps)^-1 with D = A S
  S      the kept values, mask fixed: a few conjugate-gradient steps on the masked least squares
  M      the discrete step: one projected-gradient step (exact line search along the full
         gradient, then keep the M - N entries of every group with the largest w^2 (B H B^T)_jj),
         refitted by CG, kept only if the loss went down

Every ridge-damped block step is a descent step (the damped curvature dominates the true one), and
each iterate is kept only if L did not rise, so L never exceeds the initialisation: the paper's
monotone-descent guarantee, here enforced, and the best iterate is returned.

In the model (`attach`): the stock linear keeps the sparse core in its `weight`; A and B are two
`BlockDiagonal` child modules (`armor_out`, `armor_in`) and a forward hook makes the layer compute
A (S (B x)) + bias. The hook recomputes the product from the layer's input (the stock product is
discarded), so that it also holds for a call that was already under way when the factors were
attached (the engine prunes a group from inside its first layer's pre-hook). The export writes the
core and the blocks with the model's safetensors (`...q_proj.armor_in.weight`, (blocks, b, b)); a
stock `from_pretrained` loads the core alone and warns about the unused blocks; `prunekit.load_pruned`
(`attach_saved`, called from `io/loading.py`) re-attaches them. Folding A S B into one weight would be
exact but dense, which defeats the point of 2:4, so it is not done.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SparsityConfig
from ..masks import lowest
from ..models.spec import is_linear, weight_view
from ..registry import register
from ..stats import Hessian
from ..updates import OBS_DAMP, obs_sweep

RIDGE = 1e-4          # relative ridge of the wrapper solves (x the mean diagonal of each Gram matrix)
INITS = ("sparsegpt", "wanda")
IN_KEY, OUT_KEY = "armor_in", "armor_out"      # child modules of a wrapped linear: B and A


@dataclass(frozen=True)
class ArmorConfig(SparsityConfig):
    nm: tuple[int, int] | None = (2, 4)   # the core's pattern; ARMOR is an N:M method (no unstructured mode)
    block_size: int = 128          # wrapper blocks (capped at each dimension, which it must then divide)
    iterations: int = 4            # block coordinate descent rounds (0: the initialisation, A = B = I); the
                                   # first rounds gain most: ~1 s each for a 1536x576 layer on one CPU core
    cg_steps: int = 4              # conjugate-gradient steps on the core per round
    mask_updates: bool = True      # try one projected-gradient mask update per round
    init: str = "sparsegpt"        # initial core: SparseGPT's 2:4 sweep, or Wanda's mask
    damp: float = OBS_DAMP         # SparseGPT's dampening for the initialisation
    wraps_layers: ClassVar[bool] = True   # the engine attaches factors to nn.Linear layers (no fused MoE experts)

    def __post_init__(self):
        if self.nm is None:
            raise ValueError("armor prunes to an N:M pattern (its core feeds 2:4 kernels); give nm (--nm 2:4), "
                             "or use sparsegpt/wanda for unstructured sparsity")
        nm = tuple(self.nm)
        if len(nm) == 2 and all(isinstance(v, int) and v > 0 for v in nm) and nm[0] < nm[1]:
            pattern = nm[0] / nm[1]
            if self.sparsity not in (SparsityConfig.sparsity, pattern):
                raise ValueError(f"armor's sparsity is its N:M pattern ({nm[0]}:{nm[1]} = {pattern:g}); "
                                 f"sparsity={self.sparsity!r} asks for something else: drop --sparsity or change --nm")
            bad = {k: v for k, v in dict(self.overrides).items() if v not in (0, pattern)}
            if bad:
                raise ValueError(f"armor prunes every targeted layer to {nm[0]}:{nm[1]}; overrides {bad} ask for "
                                 "other sparsities: use ignore (--ignore) to keep layers dense")
        super().__post_init__()
        if self.update != "none":
            raise ValueError("armor re-fits its own core (block coordinate descent); update must be 'none'")
        for name, low in (("block_size", 1), ("iterations", 0), ("cg_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not 0 <= self.damp < 10:
            raise ValueError(f"damp must be in [0, 10), got {self.damp} (0.01 is SparseGPT's value)")


def wrapper_block(features: int, block_size: int, side: str = "") -> int:
    """The block size of one wrapper: block_size capped at `features`, which it must divide."""
    block = min(block_size, features)
    if features % block:
        raise ValueError(f"block_size {block_size} does not divide the {side + ' ' if side else ''}dimension "
                         f"{features}; use a divisor of every pruned layer's dimensions, such as --block-size "
                         f"{math.gcd(block_size, features)} (or a value >= the dimension for one dense block)")
    return block


def wrapper_parameters(out_features: int, in_features: int, block_size: int) -> int:
    """Parameters the two wrappers add to an (out, in) layer: blocks x block^2 per side."""
    bo, bi = wrapper_block(out_features, block_size), wrapper_block(in_features, block_size)
    return (out_features // bo) * bo * bo + (in_features // bi) * bi * bi


# ---------------------------------------------------------------------------------------------
# block-diagonal algebra: blocks (n, b, b) stand for the (n b, n b) matrix diag(blocks)

def left(A: Tensor, M: Tensor) -> Tensor:
    """A M for block-diagonal A (n, b, b) and M (n b, k)."""
    n, b, _ = A.shape
    return torch.bmm(A, M.reshape(n, b, -1)).reshape(M.shape)


def right(M: Tensor, B: Tensor) -> Tensor:
    """M B for M (k, n b) and block-diagonal B (n, b, b)."""
    n, b, _ = B.shape
    return torch.einsum("knj,njl->knl", M.reshape(M.shape[0], n, b), B).reshape(M.shape)


def dense(blocks: Tensor) -> Tensor:
    """The full block-diagonal matrix of `blocks` (n, b, b)."""
    return torch.block_diag(*blocks)


def identity_blocks(features: int, block: int, like: Tensor) -> Tensor:
    return torch.eye(block, dtype=like.dtype, device=like.device).repeat(features // block, 1, 1)


def proxy_loss(W: Tensor, A: Tensor, S: Tensor, B: Tensor, H: Tensor) -> float:
    """tr(E H E^T) with E = W - A S B: the layer's squared output error on its calibration inputs."""
    E = W - left(A, right(S, B))
    return float(((E @ H).double() * E.double()).sum())      # float32 product, float64 sum


# ---------------------------------------------------------------------------------------------
# the optimisation

@dataclass
class ArmorFactors:
    """The factorised layer: A (out/b_o, b_o, b_o) blocks, the N:M core S (out, in), B (in/b_i, b_i, b_i).
    `losses`: the proxy loss of the initialisation and of the kept iterate after each round."""
    A: Tensor
    core: Tensor
    B: Tensor
    losses: list[float]

    def dense(self) -> Tensor:
        """A S B as one (out, in) matrix (what the layer computes; dense)."""
        return left(self.A, right(self.core, self.B))

    @property
    def parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    def attach(self, module: nn.Module) -> None:
        """Give the stock linear `module` (its weight already the core) the wrappers; see `attach`."""
        attach(module, self.A, self.B)

    def note(self) -> str:
        (na, bo, _), (nb, bi, _) = self.A.shape, self.B.shape
        drop = 1 - self.losses[-1] / self.losses[0] if self.losses[0] > 0 else 0.0
        return (f"armor: wrappers {na}x{bo}^2 + {nb}x{bi}^2 = {self.parameters} parameters; after "
                f"{len(self.losses) - 1} rounds the proxy loss is {drop:.1%} below the initialisation's")


def initial_core(W: Tensor, stats: Hessian, cfg: ArmorConfig) -> Tensor:
    """The N:M core ARMOR starts from (A = B = I): SparseGPT's sweep, or Wanda's mask on W."""
    if cfg.init == "sparsegpt":
        return obs_sweep(W, stats, sparsity=cfg.sparsity, nm=cfg.nm, damp=cfg.damp)
    score = W.abs() * stats.sq_norm.sqrt()                                # (out, in)
    return W.masked_fill(lowest(score, cfg.sparsity, cfg.nm), 0)


def armor_factorize(W: Tensor, H: Tensor, core: Tensor, nm: tuple[int, int], *, block_size: int = 128,
                    iterations: int = 4, cg_steps: int = 4, mask_updates: bool = True) -> ArmorFactors:
    """Block coordinate descent on tr(E H E^T), E = W - A S B, from S = `core` and A = B = I.

    W, core: (out, in); H: (in, in); `core` must hold the N:M pattern `nm`, which S keeps (its kept
    positions: the M - N largest |core| of every group). Returns the best iterate (never worse than
    the initialisation; with iterations=0 exactly the initialisation)."""
    W, H = W.float(), H.float()
    out_features, in_features = W.shape
    A = identity_blocks(out_features, wrapper_block(out_features, block_size, "output"), W)
    B = identity_blocks(in_features, wrapper_block(in_features, block_size, "input"), W)
    S = core.float().clone()
    keep = ~lowest(S.abs(), 0.0, nm)                                        # (out, in), the mask M
    S = S * keep
    loss = proxy_loss(W, A, S, B, H)
    losses = [loss]
    WH = W @ H                                                              # (out, in), fixed
    for _ in range(iterations):
        for step in (_update_A, _update_B):
            A_new, B_new = step(W, WH, A, S, B, H)
            new = proxy_loss(W, A_new, S, B_new, H)
            if new <= loss:
                A, B, loss = A_new, B_new, new
        S_new = _refit_core(W, A, S, B, H, keep, cg_steps)
        new = proxy_loss(W, A, S_new, B, H)
        if new <= loss:
            S, loss = S_new, new
        if mask_updates:
            keep_new, S_new = _mask_step(W, A, S, B, H, nm, cg_steps)
            new = proxy_loss(W, A, S_new, B, H)
            if new < loss:
                keep, S, loss = keep_new, S_new, new
        losses.append(loss)
    return ArmorFactors(A, S, B, losses)


def _solve_damped(G: Tensor, R: Tensor) -> Tensor:
    """(G + eps I)^-1 R for a batch of symmetric PSD G (n, b, b); eps = RIDGE x mean diagonal."""
    eps = RIDGE * G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(G.dtype).tiny)   # (n,)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    for factor in (1.0, 100.0, 1e4):
        L, info = torch.linalg.cholesky_ex(G + (factor * eps)[:, None, None] * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(R, L)
    return torch.zeros_like(R)                                              # no step on a hopeless block


def _update_A(W, WH, A, S, B, H):
    """Each output block of A: A_k += (W_k H C_k^T - A_k G_k)(G_k + eps)^-1, C = S B, G_k = C_k H C_k^T."""
    n, b, _ = A.shape
    C = right(S, B)                                                        # (out, in)
    CH = (C @ H).reshape(n, b, -1)
    C = C.reshape(n, b, -1)
    G = torch.bmm(CH, C.transpose(1, 2))                                   # (n, b, b) = C_k H C_k^T
    residual = torch.bmm(WH.reshape(n, b, -1), C.transpose(1, 2)) - torch.bmm(A, G)   # W_k H C_k^T - A_k G_k
    step = _solve_damped(G, residual.transpose(1, 2)).transpose(1, 2)     # G symmetric: R G^-1 = (G^-1 R^T)^T
    return A + step, B


def _update_B(W, WH, A, S, B, H):
    """One Gauss-Seidel sweep over the input blocks of B, each the damped exact minimiser."""
    B = B.clone()
    n, b, _ = B.shape
    D = left(A, S)                                                         # (out, in)
    E = W - right(D, B)
    P = E @ H                                                              # (out, in), kept current
    for k in range(n):
        cols = slice(k * b, (k + 1) * b)
        Dk = D[:, cols]                                                    # (out, b)
        gradient = Dk.T @ P[:, cols]                                       # (b, b)
        half = _solve_damped((Dk.T @ Dk)[None], gradient[None])[0]         # (D_k^T D_k)^-1 D_k^T P_k
        step = _solve_damped(H[cols, cols][None], half.T[None])[0].T       # ... H_kk^-1
        B[k] += step
        P -= (Dk @ step) @ H[cols, :]
    return A, B


def _refit_core(W, A, S, B, H, keep, steps: int) -> Tensor:
    """Conjugate gradient on min_S tr(E H E^T) with S's support fixed to `keep`."""
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)

    def normal(V):                                                        # A^T (V H) B^T on the mask
        return left(At, right(V @ H, Bt)) * keep

    S = S.clone()
    r = normal(W - left(A, right(S, B)))                                   # minus half the gradient
    p = r.clone()
    rs = float(r.square().sum())
    for _ in range(steps):
        if rs <= 0:
            break
        Q = left(A, right(p, B))                                           # A p B
        QH = Q @ H
        curvature = float((QH.double() * Q.double()).sum())
        if not curvature > 0:
            break
        alpha = rs / curvature
        S = S + alpha * p
        r = r - alpha * (left(At, right(QH, Bt)) * keep)
        rs_new = float(r.square().sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    return S


def _mask_step(W, A, S, B, H, nm, cg_steps: int) -> tuple[Tensor, Tensor]:
    """A projected-gradient step: move S along the unmasked gradient (exact line search), keep the
    M - N entries of each group with the largest w^2 (B H B^T)_jj, refit the values by CG."""
    At, Bt = A.transpose(1, 2), B.transpose(1, 2)
    G = left(At, right((W - left(A, right(S, B))) @ H, Bt))               # (out, in), minus half the gradient
    Q = left(A, right(G, B))
    curvature = float(((Q @ H).double() * Q.double()).sum())
    t = float(G.double().square().sum()) / curvature if curvature > 0 else 0.0
    T = S + t * G
    n, b, _ = B.shape
    BHB = torch.einsum("nij,njk,nik->ni", B, H.reshape(n, b, n, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1), B)
    keep = ~lowest(T.square() * BHB.reshape(-1).clamp_min(0), 0.0, nm)
    return keep, _refit_core(W, A, T * keep, B, H, keep, cg_steps)


@register("armor", ArmorConfig, stats=Hessian)
def armor(W: Tensor, stats: Hessian, cfg: ArmorConfig) -> tuple[Tensor, ArmorFactors]:
    """(the N:M core to store in the layer's weight, the factors the engine attaches to the layer)."""
    core = initial_core(W, stats, cfg)
    factors = armor_factorize(W, stats.H, core, cfg.nm, block_size=cfg.block_size, iterations=cfg.iterations,
                              cg_steps=cfg.cg_steps, mask_updates=cfg.mask_updates)
    return factors.core, factors


# ---------------------------------------------------------------------------------------------
# in the model: block-diagonal child modules and a forward hook on the stock linear

class BlockDiagonal(nn.Module):
    """x -> x diag(blocks)^T along the last dimension: a linear layer whose (n b, n b) weight is
    block-diagonal, stored as its `weight` (n, b, b)."""

    def __init__(self, blocks: Tensor):
        super().__init__()
        self.weight = nn.Parameter(blocks, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        n, b, _ = self.weight.shape
        y = torch.einsum("...nj,nij->...ni", x.reshape(*x.shape[:-1], n, b), self.weight.to(x.dtype))
        return y.reshape(x.shape)


def _wrapped_forward(module: nn.Module, args, output):
    """The forward hook of a wrapped linear: A (S (B x)) + bias, S the stored core."""
    x = getattr(module, IN_KEY)(args[0])
    y = getattr(module, OUT_KEY)(F.linear(x, weight_view(module)))
    return y if module.bias is None else y + module.bias


def attach(module: nn.Module, A: Tensor, B: Tensor) -> None:
    """Make the stock linear `module` compute A (W x) + bias with W its stored weight (the core)
    and x wrapped by B: adds the child modules `armor_in` (B) and `armor_out` (A), in the weight's
    dtype and device, and the forward hook. Refuses a layer that is already wrapped."""
    if not is_linear(module):
        raise TypeError(f"armor wraps linear layers, not {type(module).__name__}")
    if hasattr(module, IN_KEY) or hasattr(module, OUT_KEY):
        raise ValueError("this layer already carries ARMOR wrappers")
    out_features, in_features = weight_view(module).shape
    if A.shape[0] * A.shape[1] != out_features or B.shape[0] * B.shape[1] != in_features \
            or A.shape[1] != A.shape[2] or B.shape[1] != B.shape[2]:
        raise ValueError(f"wrappers A {tuple(A.shape)} and B {tuple(B.shape)} do not fit an ({out_features}, "
                         f"{in_features}) layer")
    weight = weight_view(module)
    module.add_module(IN_KEY, BlockDiagonal(B.detach().to(weight.device, weight.dtype)))
    module.add_module(OUT_KEY, BlockDiagonal(A.detach().to(weight.device, weight.dtype)))
    module.register_forward_hook(_wrapped_forward)


def wrapped_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every ARMOR-wrapped linear of `model`: name -> (output block, input block)."""
    return {name: (getattr(module, OUT_KEY).weight.shape[1], getattr(module, IN_KEY).weight.shape[1])
            for name, module in model.named_modules() if is_linear(module) and hasattr(module, IN_KEY)}


def overhead(model: nn.Module) -> int:
    """Parameters the wrappers add to `model`."""
    return sum(getattr(module, key).weight.numel() for module in model.modules()
               if is_linear(module) and hasattr(module, IN_KEY) for key in (IN_KEY, OUT_KEY))


def attach_saved(model: nn.Module, path: str | Path) -> int:
    """Re-attach the wrappers an ARMOR export carries (the `load_pruned` hook); returns how many
    layers were wrapped (0 for any other export). The blocks are read from the export's safetensors
    (keys `<layer>.armor_in.weight` / `<layer>.armor_out.weight`, each (blocks, b, b)); where its
    prunekit.json records armor steps, their layers must be exactly the wrapped ones."""
    from safetensors import safe_open

    path = Path(path)
    found: dict[str, dict[str, Tensor]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key, layer, side in _wrapper_keys(handle.keys()):
                found.setdefault(layer, {})[side] = handle.get_tensor(key)
    recorded = _recorded_layers(path)
    if recorded and set(found) != recorded:
        raise ValueError(f"{path}: prunekit.json records ARMOR wrappers on {len(recorded)} layers but the "
                         f"safetensors hold them for {len(found)} (e.g. {sorted(set(found) ^ recorded)[:3]}); "
                         "the export is incomplete: prune it again")
    for layer, pair in found.items():
        if set(pair) != {IN_KEY, OUT_KEY}:
            raise ValueError(f"{path}: {layer} holds only {sorted(pair)} of its two ARMOR wrappers "
                             f"({IN_KEY}, {OUT_KEY}); the export is incomplete: prune it again")
        attach(model.get_submodule(layer), pair[OUT_KEY], pair[IN_KEY])
    return len(found)


def is_armor_export(path: str | Path) -> bool:
    """`path` is a local export with ARMOR wrappers (recorded in its prunekit.json, or present in its
    safetensors): `load_pruned` then rebuilds them before it loads the weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        return False
    if _recorded_layers(path):
        return True
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if any(True for _ in _wrapper_keys(handle.keys())):
                return True
    return False


def _wrapper_keys(keys):
    """(key, layer name, "armor_in" | "armor_out") of every wrapper tensor among a checkpoint's keys."""
    for key in keys:
        for side in (IN_KEY, OUT_KEY):
            if key.endswith(f".{side}.weight"):
                yield key, key[:-len(f".{side}.weight")], side


def _recorded_layers(path: Path) -> set[str]:
    """The layers of the armor steps recorded in the export's prunekit.json (empty if none)."""
    meta = path / "prunekit.json"
    if not meta.is_file():
        return set()
    steps = json.loads(meta.read_text()).get("steps") or []
    return {layer["name"] for step in steps if isinstance(step, dict) and step.get("method") == "armor"
            for layer in step.get("layers", [])}


__all__ = ["ArmorConfig", "ArmorFactors", "BlockDiagonal", "armor", "armor_factorize", "attach", "attach_saved",
           "initial_core", "is_armor_export", "overhead", "proxy_loss", "wrapped_layers", "wrapper_block",
           "wrapper_parameters"]

