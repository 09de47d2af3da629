"""Concept-cluster selection after Abbas et al., "Effective pruning of web-scale datasets based on
complexity of concept clusters" (arXiv 2401.04578): cluster the pool in embedding space and keep each
cluster in proportion to its complexity, so that redundant concepts give up samples first and varied
ones keep theirs.

    embed       `embed.embed_batch`: the reference model's mean last hidden state per sample, stored
                projected to a few dozen float16 dimensions (see select.py), centred and unit-scaled
                before clustering (`embed.prepare`).
    k-means     `kmeans`: k-means++ seeding from `options["seed"]`, then a fixed number of Lloyd
                iterations; deterministic. k = `options["clusters"]`, by default sqrt(N) capped at 64
                (and never more than the pool's distinct points).
    complexity  per cluster, d_intra (mean distance of its members to the centroid) x d_inter (distance
                of its centroid to the nearest other centroid), as in the paper. Quotas are proportional
                to complexity, mixed with a uniform share (`options["floor"]`, default 0.1) so that no
                concept, even a single repeated text, is starved of its one representative. The paper
                turns complexity into quotas with a softmax at a temperature; plain proportions need no
                temperature to tune.
    duplicates  before quotas, the SemDeDup step the paper starts with: inside a cluster, a sample within
                `options["duplicate_distance"]` (default 0.02 on the unit sphere, cosine > 0.9998) of an
                earlier one in the cluster's order is a duplicate; every duplicate is ordered after every
                non-duplicate of the pool, so a budget drops copies before any distinct text.
    in-cluster  farthest from the centroid first: the samples nearest the centroid are the most
                prototypical, the concept is already represented by the others, so they are dropped
                first (the paper's choice, after self-supervised-prototype pruning). Random order inside
                a cluster would also be defensible; distance is deterministic and needs no extra seed.
    order       clusters take turns by stride scheduling: the r-th kept sample of cluster j gets the time
                (r + 0.5) / share_j and the pool is ordered by time (ties: cluster, then rank), so every
                prefix of the order, whatever the budget, follows the quotas as closely as whole samples
                allow, and a cluster that runs out leaves its share to the others.

`order_and_labels` also returns each sample's cluster, written beside the kept samples and counted per
cluster in the report.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import embed as embedding
from .embed import embed_batch  # noqa: F401  (the selector's embedding hook, see select.py)

NEEDS_MODEL = True
STORED_AS = "embedding"    # it stores only embed.py's vectors, as entropy does: one run directory serves both
MAX_CLUSTERS = 64
ITERATIONS = 25


def default_clusters(count: int) -> int:
    """sqrt(N) rounded, at least 1, at most MAX_CLUSTERS."""
    return max(1, min(MAX_CLUSTERS, round(math.sqrt(count))))


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, distance) of each row of `x` to its nearest centroid (ties: the lower centroid)."""
    labels = torch.empty(x.shape[0], dtype=torch.long)
    distances = torch.empty(x.shape[0])
    for start, block in embedding.pairwise_chunks(x, centroids, squared=True):
        best, which = block.min(1)
        labels[start:start + len(block)], distances[start:start + len(block)] = which, best
    return labels, distances.sqrt()


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k', d), labels (N,)) of `x` (N, d): k-means++ seeding with a generator seeded by `seed`,
    then `iterations` Lloyd steps (fewer when the labels stop changing). k' < k when `x` has fewer than k
    distinct points; an emptied cluster keeps its previous centroid."""
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means of an empty pool")
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    closest = ((x - x[first]) ** 2).sum(1)
    while len(centroids) < min(k, n):
        total = float(closest.sum())
        if total <= 0:
            break                                        # every point coincides with a centroid already
        pick = int(torch.multinomial(closest / total, 1, generator=generator))
        centroids.append(x[pick])
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1))
    centroids = torch.stack(centroids)
    labels, _ = _nearest(x, centroids)
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=len(centroids)).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new_labels, _ = _nearest(x, centroids)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centroids, labels


def complexity(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per cluster: mean distance of its members to the centroid x distance to the nearest other centroid
    (a lone cluster's inter-cluster distance counts as 1)."""
    k = len(centroids)
    distance = (x - centroids[labels]).norm(dim=1)
    counts = torch.bincount(labels, minlength=k).float()
    intra = torch.zeros(k).index_add_(0, labels, distance) / counts.clamp(min=1)
    if k == 1:
        return intra
    between = torch.cdist(centroids, centroids)
    between.fill_diagonal_(math.inf)
    return intra * between.min(1).values


def _duplicates(x: torch.Tensor, members: torch.Tensor, radius: float) -> torch.Tensor:
    """For the cluster `members` (in their in-cluster order): True where a member lies within `radius` of
    an earlier member."""
    points = x[members]
    flags = torch.zeros(len(members), dtype=torch.bool)
    for start, block in embedding.pairwise_chunks(points, points):
        rows = torch.arange(start, start + len(block)).unsqueeze(1)
        earlier = torch.arange(len(members)).unsqueeze(0) < rows
        flags[start:start + len(block)] = ((block <= radius) & earlier).any(1)
    return flags


def order_and_labels(scores, lengths, options: dict) -> tuple[list[int], list[int]]:
    """(priority over the pool's indices, cluster of each sample); `options["embeddings"]` holds the
    stored (N, d) vectors. Writes each cluster's complexity to `options["complexity"]` for the report.
    Cost: k-means is O(N * k) per iteration; the duplicate search compares each cluster's members
    pairwise, O(N^2 / k) in blocks of a few dozen MB."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths):
        raise ValueError("clusters orders samples by their embeddings: options['embeddings'] must hold one "
                         "vector per sample")
    n = len(lengths)
    k = options.get("clusters") or default_clusters(n)
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    floor = float(options.get("floor", 0.1))
    if not 0 <= floor <= 1:
        raise ValueError(f"the uniform floor of the cluster quotas must be in [0, 1], got {floor}")
    x = embedding.prepare(torch.as_tensor(stored))
    centroids, labels = kmeans(x, k, options.get("seed", 0), options.get("iterations", ITERATIONS))
    k = len(centroids)
    weight = complexity(x, centroids, labels)
    share = weight / weight.sum() if float(weight.sum()) > 0 else torch.full((k,), 1.0 / k)
    share = (1 - floor) * share + floor / k
    to_centroid = (x - centroids[labels]).norm(dim=1).numpy()
    label_np = labels.numpy()
    index = np.arange(n)
    ranked = np.lexsort((index, -to_centroid, label_np))     # by cluster, farthest first, then index
    radius = float(options.get("duplicate_distance", 0.02))
    copy = np.zeros(n, dtype=bool)
    rank = np.zeros(n, dtype=np.int64)
    bounds = np.searchsorted(label_np[ranked], np.arange(k + 1))
    for j in range(k):
        members = ranked[bounds[j]:bounds[j + 1]]
        if len(members) == 0:
            continue
        flags = _duplicates(x, torch.from_numpy(members), radius).numpy()
        copy[members] = flags
        # ranks counted separately among the cluster's distinct samples and among its copies
        rank[members[~flags]] = np.arange(int((~flags).sum()))
        rank[members[flags]] = np.arange(int(flags.sum()))
    with np.errstate(divide="ignore"):                       # a zero share (floor 0): never, until the copies
        stride = 1.0 / share.double().numpy()
    time = (rank + 0.5) * stride[label_np]
    priority = np.lexsort((rank, label_np, time, copy))       # distinct before copies, then by time
    options["complexity"] = [round(float(c), 6) for c in weight]
    return priority.tolist(), labels.tolist()


def order(scores, lengths, options: dict) -> list[int]:
    """The pool's indices by priority (see `order_and_labels`)."""
    return order_and_labels(scores, lengths, options)[0]
