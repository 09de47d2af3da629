"""PASER selection after He et al., "PASER: Post-Training Data Selection for Efficient Pruned Large Language
Model Recovery" (arXiv 2502.12594): recover a pruned model on the text it lost most on. The pool is
clustered semantically, each cluster gets a share of the budget proportional to how much capability the
pruned model lost on it, and inside a cluster the samples it lost most on come first.

    inputs      the dense model (`--model`, `model`) and the pruned one (`--pruned DIR`,
                `options["pruned"]`), which must share the dense model's tokenizer: different vocabularies
                are refused.
    score       per sample, the loss gap NLL_pruned - NLL_dense, each the mean next-token NLL per predicted
                token over the first `max_tokens` tokens (+inf with fewer than 2 tokens: nothing to compare).
    embedding   the dense model's mean last hidden state (as embed.py), projected to embed_dim - 1 float16
                dimensions, plus the dense NLL as the last column (so select.py stores it and keeps the
                width <= embed_dim, unprojected). One dense forward per batch serves both the score and the
                embedding (a one-batch cache).
    clusters    k-means (`clusters.kmeans`) of the centred, unit-scaled embeddings; k = `options["clusters"]`,
                by default sqrt(N) capped at 64.
    conflicts   the paper drops samples inconsistent with its concept-consistency graph; here, more simply,
                a sample whose dense NLL is an outlier (modified z-score above `options["outlier"]`, default
                3.5: NLL > median + 3.5 * 1.4826 * MAD over the pool) is treated as gibberish / noise the
                dense model itself cannot read and goes after every other sample; so does a sample with
                nothing to compare.
    shares      a cluster's capability loss = the mean gap of its remaining samples; its share of the budget
                is proportional to max(loss, 0) (all clusters alike when none lost anything). The pool is
                ordered by stride scheduling (the r-th sample of cluster j at time (r + 0.5) / share_j), so
                every budget follows the shares as closely as whole samples allow, and a cluster that runs
                out (or one that lost nothing) leaves its turn to the others.
    in-cluster  largest individual gap first (ties: pool order).

Simplified from the paper: no concept graph (the outlier rule above instead), shares proportional to the
loss rather than the paper's softened allocation, the embedding is the dense model's own hidden state (no
separate sentence encoder, no diffusion-based spectral clustering), and no per-sample token-cost
normalisation.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from . import embed as embedding
from .clusters import default_clusters, kmeans
from .perplexity import padded_batch

NEEDS_MODEL = True
OUTLIER = 3.5
# The last batch's dense outputs: score_batch computes them, embed_batch reuses them. The model and the
# tokenizer are held by weak reference and compared by identity: an id() could be reused by a model
# loaded after this one was freed, and a strong reference would keep a freed model alive.
_CACHE: dict = {}


def vocabulary(model) -> int:
    """The number of rows of the model's output layer (its vocabulary)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_models(model, pruned) -> None:
    """Refuse a missing pruned model or one whose vocabulary differs from the dense model's."""
    if pruned is None:
        raise ValueError("paser compares the dense model with the pruned one: pass --pruned DIR (and --model, "
                         "the dense model it was pruned from)")
    dense_vocab, pruned_vocab = vocabulary(model), vocabulary(pruned)
    if dense_vocab != pruned_vocab:
        raise ValueError(f"paser: the dense model's vocabulary ({dense_vocab:,} tokens) differs from the pruned "
                         f"model's ({pruned_vocab:,}); the pruned model must be pruned from --model and share its "
                         "tokenizer")


def _batch(texts, tokenizer, max_tokens):
    """(ids, mask) of the texts' first `max_tokens` tokens, at least one column wide (the model always runs)."""
    _, ids, mask = padded_batch(texts, tokenizer, max_tokens, min_width=1)
    return ids, mask


def _forward(model, ids, mask, hidden: bool):
    """(mean NLL per predicted token (B,) float64, +inf with nothing to predict; mean last hidden state
    (B, width) float32 or None)."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        nll = F.cross_entropy(out.logits.float()[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        valid = mask[:, 1:].float()
        counts = valid.sum(1)
        mean = ((nll * valid).sum(1) / counts.clamp(min=1)).double().cpu()
        mean[counts.cpu() == 0] = math.inf
        pooled = None
        if hidden:
            weights = mask.float().unsqueeze(-1)
            pooled = ((out.hidden_states[-1].float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)).cpu()
    return mean, pooled


def _dense(texts, model, tokenizer, options):
    key = (tuple(texts), options.get("max_tokens", 512))
    cached = _CACHE.get("key") == key and _CACHE["model"]() is model and _CACHE["tokenizer"]() is tokenizer
    if not cached:
        ids, mask = _batch(texts, tokenizer, options.get("max_tokens", 512))
        nll, pooled = _forward(model, ids, mask, hidden=True)
        _CACHE.clear()
        _CACHE.update(key=key, model=weakref.ref(model), tokenizer=weakref.ref(tokenizer), ids=ids, mask=mask,
                      nll=nll, pooled=pooled)
    return _CACHE


def score_batch(texts: list[str], model, tokenizer, options: dict) -> list[float]:
    """NLL_pruned - NLL_dense of each text (+inf with fewer than 2 tokens)."""
    pruned = options.get("pruned")
    check_models(model, pruned)
    dense = _dense(texts, model, tokenizer, options)
    pruned_nll, _ = _forward(pruned, dense["ids"], dense["mask"], hidden=False)
    gap = pruned_nll - dense["nll"]
    return [float(g) if math.isfinite(float(d)) else math.inf for g, d in zip(gap, dense["nll"])]


def embed_batch(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """(B, <= embed_dim): the dense mean hidden state projected to embed_dim - 1 dimensions, then the dense
    NLL (the conflict filter's input) as the last column."""
    dim = int(options.get("embed_dim", embedding.DIM))
    if dim < 2:
        raise ValueError(f"paser stores an embedding and the dense NLL: embed_dim must be at least 2, got {dim}")
    dense = _dense(texts, model, tokenizer, options)
    reduced = embedding.project(dense["pooled"], dim - 1, options.get("seed", 0)).float()
    return torch.cat([reduced, dense["nll"].float().unsqueeze(1)], dim=1)


def conflicts(dense_nll: np.ndarray, threshold: float = OUTLIER) -> np.ndarray:
    """True where a finite dense NLL is an outlier: modified z-score (x - median) / (1.4826 * MAD) above
    `threshold` (the mean absolute deviation * 1.2533 stands in for a zero MAD; all alike: none)."""
    finite = np.isfinite(dense_nll)
    flags = np.zeros(len(dense_nll), dtype=bool)
    if finite.sum() < 3:
        return flags
    values = dense_nll[finite]
    center = np.median(values)
    spread = 1.4826 * np.median(np.abs(values - center))
    if spread <= 0:
        spread = 1.2533 * np.mean(np.abs(values - center))
    if spread <= 0:
        return flags
    flags[finite] = (values - center) / spread > threshold
    return flags


def order_and_labels(scores, lengths, options: dict) -> tuple[list[int], list[int]]:
    """(priority over the pool's indices, cluster of each sample); `options["embeddings"]` holds the stored
    (N, d + 1) vectors (embedding, dense NLL). Writes each cluster's capability loss to
    `options["cluster_loss"]`."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths) or stored.shape[1] < 2:
        raise ValueError("paser orders samples by their embeddings and dense NLL: options['embeddings'] must hold "
                         "one vector per sample")
    n = len(lengths)
    stored = torch.as_tensor(stored).float()
    gap = np.asarray(scores, dtype=np.float64)
    dense = stored[:, -1].double().numpy()
    k = options.get("clusters") or default_clusters(n)
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    x = embedding.prepare(stored[:, :-1])
    centroids, labels_t = kmeans(x, k, options.get("seed", 0))
    k = len(centroids)
    labels = labels_t.numpy()
    nothing = ~np.isfinite(gap) | ~np.isfinite(dense)
    conflict = conflicts(np.where(nothing, np.inf, dense), float(options.get("outlier", OUTLIER))) & ~nothing
    usable = ~nothing & ~conflict
    loss = np.zeros(k)
    for j in range(k):
        members = usable & (labels == j)
        loss[j] = gap[members].mean() if members.any() else 0.0
    share = np.maximum(loss, 0.0)
    share = share / share.sum() if share.sum() > 0 else np.full(k, 1.0 / k)
    index = np.arange(n)
    ranked = index[usable][np.lexsort((index[usable], -gap[usable], labels[usable]))]   # by cluster, gap
    rank = np.zeros(n, dtype=np.int64)
    for j in range(k):
        members = ranked[labels[ranked] == j]
        rank[members] = np.arange(len(members))
    with np.errstate(divide="ignore"):
        stride = 1.0 / share                                    # a cluster that lost nothing: never, until the end
    time = (rank + 0.5) * stride[labels]
    first = index[usable][np.lexsort((rank[usable], labels[usable], time[usable]))]
    noisy = index[conflict][np.lexsort((index[conflict], -gap[conflict]))]
    options["cluster_loss"] = [round(float(v), 6) for v in loss]
    options["conflicts"] = int(conflict.sum())
    return first.tolist() + noisy.tolist() + index[nothing].tolist(), labels.tolist()


def order(scores, lengths, options: dict) -> list[int]:
    """The pool's indices by priority (see `order_and_labels`)."""
    return order_and_labels(scores, lengths, options)[0]
