"""Per-sample embeddings from the reference model itself, for the selectors that need a vector per sample
(`clusters.py`, `entropy.py`), and the compact form a large pool keeps them in.

    embed_batch   the mean of the model's last hidden state over the sample's own tokens (its first
                  `max_tokens`), padded batches masked out, so a sample embeds the same alone or in a
                  batch; a sample with no tokens embeds as zeros. Using the model being pruned (not a
                  separate sentence encoder) means no extra download and that "similar" is judged by the
                  representations the pruned model will be calibrated on.
    project       a seeded random Gaussian projection to `dim` (<= 1,024) dimensions (Johnson-Lindenstrauss:
                  pairwise distances are kept up to a small relative error), so the pool keeps 2 * dim
                  bytes per sample in float16 instead of hidden_size floats.
    prepare       what the selectors measure distances on: the stored vectors centred on the pool's mean
                  (mean-pooled hidden states of a language model share a large common direction that
                  would make every pair look alike) and scaled to unit length (distances then rank pairs
                  like cosine similarity, independent of how long or loud a sample is).
"""
from __future__ import annotations

import functools

import torch

DIM = 32                   # stored dimensions by default: 64 bytes per sample in float16
MAX_DIM = 1024             # statistic.py stores 256 by default: its profiles have ~10^5 channels


def embed_batch(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """(len(texts), hidden_size) float32: each text's mean last hidden state over its first `max_tokens`
    tokens, on the CPU."""
    from .perplexity import padded_batch
    _, ids, mask = padded_batch(texts, tokenizer, options.get("max_tokens", 512), min_width=1)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)          # the decoder without its LM head: no logits computed
    with torch.inference_mode():
        out = body(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        weights = mask.to(device=device, dtype=torch.float32).unsqueeze(-1)
        sums = (hidden.float() * weights).sum(1)
        counts = weights.sum(1).clamp(min=1.0)         # no tokens: zeros, not NaN
    return (sums / counts).cpu()


def projection(width: int, dim: int, seed: int) -> torch.Tensor | None:
    """The (width, dim) Gaussian matrix for `seed`, scaled by 1/sqrt(dim) so lengths are kept on average;
    None when `width` <= `dim` (the vectors are already small enough and are kept exactly)."""
    if not 1 <= dim <= MAX_DIM:
        raise ValueError(f"embedding dimensions must be between 1 and {MAX_DIM}, got {dim}")
    if width <= dim:
        return None
    return _gaussian(width, dim, seed)


@functools.lru_cache(maxsize=2)
def _gaussian(width: int, dim: int, seed: int) -> torch.Tensor:
    """Made once per selection, not once per batch; at most two kept (statistic's is 100 MB)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(width, dim, generator=generator) / dim ** 0.5


def project(vectors: torch.Tensor, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """`vectors` (B, width) reduced to (B, min(width, dim)) float16 by the seeded random projection."""
    vectors = vectors.float().cpu()
    matrix = projection(vectors.shape[1], dim, seed)
    reduced = vectors if matrix is None else vectors @ matrix
    return reduced.clamp(-65000.0, 65000.0).half()


def prepare(stored: torch.Tensor) -> torch.Tensor:
    """Stored (N, d) vectors as float32, centred on their mean and scaled to unit length (a vector equal
    to the mean stays zero)."""
    x = stored.float()
    x = x - x.mean(0, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def pairwise_chunks(x: torch.Tensor, y: torch.Tensor, cells: int = 1 << 22, squared: bool = False):
    """Yield (start, distances) for row blocks of `x` against all of `y`: Euclidean distances (squared ones
    with `squared`, which saves a square root where only comparisons matter), each block at most `cells`
    entries, so an N x N comparison never holds more than a few dozen MB."""
    rows = max(1, cells // max(1, y.shape[0]))
    y_sq = (y * y).sum(1)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        sq = torch.addmm(y_sq, block, y.T, alpha=-2).add_((block * block).sum(1, keepdim=True)).clamp_(min=0)
        yield start, sq if squared else sq.sqrt_()
