"""Coverage selection: a greedy minimum set cover of embedding neighbourhoods, after the information-
theoretic dataset compression of arXiv 2511.10561. A sample says little that its neighbours do not
already say; a selection that covers every neighbourhood of the pool keeps the pool's information with
few samples, and one that keeps many near-identical samples wastes its budget.

    embed      `embed.embed_batch` (the reference model's mean last hidden state), stored projected to a
               few dozen float16 dimensions, centred and unit-scaled (`embed.prepare`).
    radius     r = the `radius_quantile` (default 0.5) quantile of the samples' distances to their nearest
               other sample: with the median, half the samples have a neighbour within r, so r is the
               scale at which the pool is locally dense, whatever the embedding's units; exact duplicates
               (distance 0) always cover one another.
    cover      sample i covers every sample within r of it (itself included).
    greedy     repeatedly take the sample covering the most still-uncovered samples (ties: the lowest
               index), lazily re-evaluated (coverage gains only shrink, so a stale gain is an upper
               bound). When everything is covered, a new round starts over the samples not yet taken, so
               the order continues with second representatives; after `max_rounds` (default 16) rounds
               the rest follow by index. The fill in select.py takes this order until the budget is
               spent: the first picks are one per dense group, duplicates come last.

Cost: neighbourhoods are found block by block (a few dozen MB at a time) and kept as index lists, so
memory grows with the number of neighbour pairs within r, which the quantile keeps small.
"""
from __future__ import annotations

import heapq

import numpy as np
import torch

from . import embed as embedding
from .embed import embed_batch  # noqa: F401  (the selector's embedding hook, see select.py)

NEEDS_MODEL = True
STORED_AS = "embedding"    # it stores only embed.py's vectors, as clusters does: one run directory serves both
MAX_ROUNDS = 16


def neighbourhoods(x: torch.Tensor, quantile: float) -> tuple[list[np.ndarray], float]:
    """(the indices within r of each sample, r) for `x` (N, d), r the `quantile` of nearest-neighbour
    distances."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"radius_quantile must be in [0, 1], got {quantile}")
    n = x.shape[0]
    if n == 1:
        return [np.array([0])], 0.0
    nearest = torch.empty(n)
    for start, block in embedding.pairwise_chunks(x, x, squared=True):
        rows = torch.arange(start, start + len(block))
        block[torch.arange(len(block)), rows] = float("inf")
        nearest[start:start + len(block)] = block.min(1).values
    radius = float(torch.quantile(nearest, quantile)) ** 0.5
    reach = (radius + 1e-3) ** 2                          # float noise: exact copies at "0" always meet
    covers = []
    for _, block in embedding.pairwise_chunks(x, x, squared=True):
        for row in block <= reach:
            covers.append(torch.nonzero(row).flatten().numpy())
    return covers, radius


def greedy_cover(covers: list[np.ndarray], max_rounds: int = MAX_ROUNDS) -> list[int]:
    """Every index, ordered by greedy set cover rounds (see the module's docstring)."""
    n = len(covers)
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    for _ in range(max_rounds):
        if len(order) == n:
            break
        uncovered = ~taken
        heap = [(-len(covers[i]), i) for i in range(n) if not taken[i]]   # a first bound: every neighbour
        heapq.heapify(heap)
        while heap:
            stale, i = heapq.heappop(heap)
            gain = int(uncovered[covers[i]].sum())
            if gain == 0:
                continue                                   # nothing left for it this round
            if -stale != gain:
                heapq.heappush(heap, (-gain, i))
                continue
            order.append(i)
            taken[i] = True
            uncovered[covers[i]] = False
    order.extend(i for i in range(n) if not taken[i])
    return order


def order(scores, lengths, options: dict) -> list[int]:
    """The pool's indices in greedy-cover order; `options["embeddings"]` holds the stored (N, d) vectors.
    Writes the radius used to `options["radius"]`."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths):
        raise ValueError("entropy orders samples by their embeddings: options['embeddings'] must hold one "
                         "vector per sample")
    x = embedding.prepare(torch.as_tensor(stored))
    covers, radius = neighbourhoods(x, float(options.get("radius_quantile", 0.5)))
    options["radius"] = round(radius, 6)
    return greedy_cover(covers, int(options.get("max_rounds", MAX_ROUNDS)))
