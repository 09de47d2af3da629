"""MKA: merge the most similar adjacent blocks, similarity by manifold alignment of activations.

Liu et al., "Pruning via Merging: Compressing LLMs via Manifold Alignment Based Layer Merging",
arXiv 2406.16330 (Manifold-based Knowledge Alignment). Three steps, repeated once per removed block:

1. Manifold of a block's activations (diffusion maps, Coifman & Lafon). X (n, hidden): the
   block's output at n sampled token positions of the calibration windows.
       D2 = squared pairwise distances                        # (n, n)
       K  = exp(-D2 / eps),  eps = median of D2 off the diagonal (a scale-free bandwidth)
       K  = K / (q q^T)^a,   q = row sums of K, a = 1/2       # density normalisation
       A  = d^-1/2 K d^-1/2, d = row sums of K                # symmetric form of P = d^-1 K
       Y  = [lambda_k psi_k], k = 1..dims                     # (n, dims), psi_k = d^-1/2 phi_k
   with (lambda_k, phi_k) the eigenpairs of A below the trivial one (lambda_0 = 1): one diffusion
   step (t = 1), dims = 2 as in the authors' pipeline.
2. Similarity of two blocks l, m: the normalised pairwise information bottleneck
       S_lm = NPIB(Y_l, Y_m) = I(Y_l; Y_m) / sqrt(H(Y_l) H(Y_m))              in [0, 1]
   computed, as the paper writes it, on discrete distributions p(x), p(y), p(x, y): every
   coordinate of Y is cut into `bins` equal-count bins by rank, a token's cell is its tuple of
   bins, and p are the cell frequencies over the n tokens. Identical activations give S = 1
   exactly; the measure ignores the arbitrary sign of eigenvectors (a sign flip relabels bins).
3. Merge the adjacent pair (l, m = the next kept block) with the highest S_lm into l:
       theta_l <- alpha theta_l + (1 - alpha) theta_m,     alpha = S_lm (the paper's choice)
   on every parameter of the block, norms included; block m is removed.

Iteratively: after a merge the blocks from l on are re-run on the cached calibration states, their
manifolds re-measured, and the next pair chosen on the merged model, until the requested number of
blocks is gone (ties: the deeper pair). The model is changed only at the end, like LaCo.

What differs from the paper / the authors' pipeline:
  * the token sample: n = `tokens` positions drawn once (seeded) from the calibration windows,
    the first position of every window left out (its activations are attention-sink outliers
    that would set the kernel's scale); the authors embed every token of a few prompts padded to
    512 positions, which costs an (N*512)^2 kernel. The paper's similarity on a subsample.
  * NPIB from binned frequencies (bounded, exact 1 for identical activations) instead of the
    pipeline's k-nearest-neighbour mutual-information and entropy estimators (unbounded).
  * the pipeline merges the last two blocks every time and uses the similarity only for the ratio
    (a sigmoid of the pair's mean similarities), and merges only the seven linear weights; this
    file chooses the most similar adjacent pair and uses alpha = S_lm on every parameter.
  * the similarity is re-measured after every merge (the pipeline measures once).

Cost: one dense pass that caches the hidden states at every block boundary (`depth.BlockCache`,
L+1 copies of the windows used, `samples`); per block an (n, hidden) sample, an n x n float64
kernel and its eigendecomposition, O(n^3) (n = 512: 2 MiB and a few milliseconds); a merge re-runs
the blocks from the merged one on (at most L block forwards) and re-embeds them, so k merges cost
at most k L block forwards and k L eigendecompositions.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..depth import BlockCache, BlockChoice, DepthConfig, first_windows, onloaded
from ..registry import register

DENSITY_NORMALISATION = 0.5     # a in K / (q q^T)^a: 0 is the classical kernel, 1 Laplace-Beltrami


@dataclass(frozen=True)
class MKAConfig(DepthConfig):
    tokens: int = 512                 # n: token positions sampled per block (the kernel is n x n)
    dims: int = 2                     # diffusion-map coordinates kept per token (the authors' d = 2)
    bins: int = 4                     # equal-count bins per coordinate for the discrete NPIB
    weight: float | None = None       # alpha of the kept (shallower) block; None: the pair's similarity (paper)
    samples: int | None = None        # use only the first N calibration windows; None: all
    seed: int = 0                     # which token positions are sampled

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("tokens", 4), ("dims", 1), ("bins", 2), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.tokens < self.bins or self.tokens < self.dims + 2:
            raise ValueError(f"tokens={self.tokens} is too few for bins={self.bins} and dims={self.dims}: "
                             f"use tokens >= {max(self.bins, self.dims + 2)}")
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not 0 <= self.weight <= 1):
            raise ValueError(f"weight is the kept block's share of the merge, in [0, 1] (or None: the pair's "
                             f"similarity), got {self.weight!r}")
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 1):
            raise ValueError(f"samples must be a positive number of calibration windows or None (all), "
                             f"got {self.samples!r}")


# ----------------------------------------------------------------------------------------------
# The math: pure functions on tensors
# ----------------------------------------------------------------------------------------------

def diffusion_map(X: Tensor, dims: int = 2) -> Tensor:
    """Diffusion-map coordinates of the rows of X: (n, hidden) -> (n, dims), float64 (module docstring, step 1)."""
    n = X.shape[0]
    if n < dims + 2:
        raise ValueError(f"a diffusion map with {dims} coordinates needs at least {dims + 2} points, got {n}")
    X = X.double()
    D2 = torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist").square()     # (n, n)
    off_diagonal = D2[~torch.eye(n, dtype=torch.bool, device=D2.device)]
    eps = float(off_diagonal.median())
    K = torch.exp(-D2 / (eps if eps > 0 else 1.0))                                   # (n, n)
    q = K.sum(1)
    K = K / torch.outer(q, q).pow(DENSITY_NORMALISATION)
    d = K.sum(1)                                                                     # (n,)
    A = K / torch.outer(d, d).sqrt()                                                 # symmetric
    eigenvalues, eigenvectors = torch.linalg.eigh(A)                                 # ascending
    order = torch.arange(n - 2, n - 2 - dims, -1)                                    # below the trivial top one
    psi = eigenvectors[:, order] / d.sqrt()[:, None]                                 # (n, dims)
    return psi * eigenvalues[order]


def quantile_cells(Y: Tensor, bins: int) -> Tensor:
    """Each row's cell: every coordinate cut into `bins` equal-count bins by rank.

    (n, dims) -> (n,) integers in [0, bins^dims)."""
    n, dims = Y.shape
    ranks = Y.argsort(dim=0, stable=True).argsort(dim=0, stable=True)          # (n, dims)
    codes = ranks * bins // n                                                        # (n, dims), in [0, bins)
    return (codes * bins ** torch.arange(dims, device=Y.device)).sum(1)


def npib(x: Tensor, y: Tensor) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) of two discrete labels of the same n samples.  x, y: (n,) integers.

    1 when one label determines the other (identical ones included), 0 when they are independent
    or one is constant."""
    if x.shape != y.shape:
        raise ValueError(f"the two labelings must label the same samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    _, x = x.unique(return_inverse=True)
    _, y = y.unique(return_inverse=True)
    nx, ny = int(x.max()) + 1, int(y.max()) + 1
    joint = torch.bincount(x * ny + y, minlength=nx * ny).double().view(nx, ny) / x.numel()    # p(x, y)
    px, py = joint.sum(1), joint.sum(0)                                              # every cell occurs
    hx, hy = float(-(px * px.log()).sum()), float(-(py * py.log()).sum())
    if hx <= 0 or hy <= 0:
        return 0.0
    seen = joint > 0
    mi = float((joint[seen] * (joint[seen] / torch.outer(px, py)[seen]).log()).sum())
    return min(1.0, max(0.0, mi / math.sqrt(hx * hy)))


def manifold_cells(X: Tensor, dims: int, bins: int) -> Tensor:
    """A block's sampled activations (n, hidden) -> the NPIB cell of every token (n,)."""
    return quantile_cells(diffusion_map(X, dims), bins)


def manifold_similarity(X: Tensor, Y: Tensor, dims: int = 2, bins: int = 4) -> float:
    """S = NPIB of the diffusion-map manifolds of two blocks' activations at the same n tokens.  (n, h) each."""
    return npib(manifold_cells(X, dims, bins), manifold_cells(Y, dims, bins))


def merge(A: dict[str, Tensor], B: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    """weight * theta_A + (1 - weight) * theta_B for every parameter, in float32, in A's dtype."""
    return {name: (weight * W.float() + (1 - weight) * B[name].float()).to(W.dtype) for name, W in A.items()}


def merged_block(kept: nn.Module, removed: nn.Module, weight: float) -> nn.Module:
    """A copy of `kept` whose parameters are `merge`d with those of `removed`."""
    block = copy.deepcopy(kept)
    merged = merge(dict(kept.named_parameters()), dict(removed.named_parameters()), weight)
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.copy_(merged[name])
    return block


def adjacent_choice(similarities: list[float]) -> int:
    """The adjacent pair to merge: the highest similarity, ties to the deeper pair."""
    return max(range(len(similarities)), key=lambda j: (similarities[j], j))


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def token_sample(windows: int, seqlen: int, tokens: int, bins: int, seed: int) -> Tensor:
    """Flat indices (into windows x seqlen) of the sampled token positions, ascending: every
    position but each window's first, at most `tokens` of them, a multiple of `bins` (equal bins)."""
    first = 1 if seqlen > 1 else 0
    candidates = (torch.arange(windows)[:, None] * seqlen + torch.arange(first, seqlen)[None, :]).flatten()
    count = min(tokens, candidates.numel()) // bins * bins
    if count < bins:
        raise ValueError(f"the calibration windows hold {candidates.numel()} usable token positions, fewer than "
                         f"bins={bins}; use more windows or fewer bins")
    chosen = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))[:count]
    return candidates[chosen].sort().values


def gather_tokens(hidden: list[Tensor], flat: Tensor) -> Tensor:
    """Rows `flat` of the chunks' (windows*seqlen, hidden) view, without concatenating every token.  -> (n, hidden)"""
    rows, start = [], 0
    for h in hidden:                                    # (batch, seq, hidden)
        stop = start + h.shape[0] * h.shape[1]
        mine = flat[(flat >= start) & (flat < stop)] - start
        rows.append(h.reshape(-1, h.shape[-1])[mine.to(h.device)].float().cpu())
        start = stop
    return torch.cat(rows)


@register("mka", MKAConfig, scope="depth", calibrated=True)
def mka(model, calib: Tensor, cfg: MKAConfig, *, device=None, batch_size: int = 8, cache_device=None,
        progress: bool = True) -> BlockChoice:
    """k merges of the most similar adjacent blocks (module docstring); writes the merged blocks at the end.

    scores: {"similarity": [S(0,1), S(1,2), ...] of the unpruned model,
             "merges": [{"kept": l, "merged": m, "similarity": S_lm, "weight": alpha,
                         "pairs": [[l, m, S_lm] for every adjacent pair of the model at that merge]}]},
    in the input model's numbering.
    """
    distributed.refuse("mka (its manifold needs every sampled token in one process)")
    windows = first_windows(calib, cfg.samples)
    picks = token_sample(windows.shape[0], windows.shape[1], cfg.tokens, cfg.bins, cfg.seed)
    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="cache mka")
    count = cfg.blocks_to_remove(cache.num_blocks)
    blocks = [step.block for step in cache.steps]
    current = list(range(cache.num_blocks))          # the merged model's blocks, as input indices
    outputs = {i: cache.inputs[i + 1] if i + 1 < cache.num_blocks else cache.output for i in current}
    embedded = cache.inputs[0]                        # block 0's input: never changes (block 0 is never merged away)
    for step in cache.steps:                          # `outputs` holds the only reference to every boundary, so a
        step.inputs = step.outputs = None             # re-run boundary replaces the cached one instead of doubling it
    cache.inputs, cache.output = [], None             # (only `cache.block` is used from here on)
    cells = {i: manifold_cells(gather_tokens(outputs[i], picks), cfg.dims, cfg.bins) for i in current}
    replaced: dict[int, nn.Module] = {}              # kept input index -> its merged block
    merges = []
    initial: list[float] = []
    for number in range(count):
        similarities = [npib(cells[a], cells[b]) for a, b in zip(current, current[1:])]
        initial = initial or similarities              # the unpruned model's, for the report
        j = adjacent_choice(similarities)
        kept, gone = current[j], current[j + 1]
        weight = similarities[j] if cfg.weight is None else float(cfg.weight)
        parts = [replaced.get(kept, blocks[kept]), replaced.get(gone, blocks[gone])]
        with onloaded(torch.device("cpu"), *parts):          # out of core: read them from disk
            replaced[kept] = merged_block(parts[0], parts[1], weight)
        replaced.pop(gone, None)
        merges.append({"kept": kept, "merged": gone, "similarity": similarities[j], "weight": weight,
                       "pairs": [[a, b, s] for a, b, s in zip(current, current[1:], similarities)]})
        current.remove(gone)
        del outputs[gone], cells[gone]
        if number + 1 < count:                       # re-run and re-embed the blocks from the merged one on
            hidden = outputs[current[j - 1]] if j > 0 else embedded
            for index in current[j:]:
                hidden = outputs[index] = cache.block(index, hidden, replaced.get(index))
                cells[index] = manifold_cells(gather_tokens(hidden, picks), cfg.dims, cfg.bins)
    for kept, block in replaced.items():
        with torch.no_grad(), onloaded(torch.device("cpu"), blocks[kept], block, changed=True):
            for target, merged in zip(blocks[kept].parameters(), block.parameters()):
                target.copy_(merged)
    removed = [m["merged"] for m in merges]
    described = "; ".join(f"{m['merged']} into {m['kept']} (S={m['similarity']:.3f}, alpha={m['weight']:.3f})"
                          for m in merges)
    notes = [f"MKA merged {described} (the kept blocks were changed in place); manifolds of {picks.numel()} "
             f"tokens, {cfg.dims} diffusion coordinates, {cfg.bins} bins each"]
    return BlockChoice(removed, {"similarity": initial, "merges": merges}, notes)
