"""Perplexity-based selection (Marion et al., "When Less is More: Investigating Data Pruning for Pretraining
LLMs at Scale", arXiv 2309.04564): score every sample by its perplexity under a reference model and keep a
*band* of the distribution, not simply the lowest. The paper finds that keeping the middle (or the top)
of the perplexity distribution beats keeping the easiest text: the lowest-perplexity samples are
repetitive boilerplate, the highest are noise (gibberish, markup, broken encodings).

    score   mean negative log-likelihood per predicted token (log perplexity) of the sample's first
            `max_tokens` tokens; a sample of fewer than 2 tokens predicts nothing and scores +inf (dropped
            last by every band)
    band    "middle" (default): samples closest to the median rank first; "low": lowest first; "high":
            highest first (+inf still last)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEEDS_MODEL = True
BANDS = ("middle", "low", "high")


def padded_batch(texts: list[str], tokenizer, max_tokens: int,
                 min_width: int = 0) -> tuple[list, torch.Tensor, torch.Tensor]:
    """(rows, ids, mask): each text's first `max_tokens` tokens, right-padded into (B, width) ids with a
    (B, width) attention mask, width = max(longest row, `min_width`) (1 for callers that always run the
    model, even on a batch of empty texts); shared by the model-scored selectors."""
    from ..data import tokenize
    rows = [tokenize(tokenizer, text)[:max_tokens] for text in texts]
    longest = max(min_width, max((len(r) for r in rows), default=0))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return rows, ids, mask


def score_batch(texts: list[str], model, tokenizer, options: dict) -> list[float]:
    """Mean NLL per predicted token of each text (its first `max_tokens` tokens), in one padded batch."""
    rows, ids, mask = padded_batch(texts, tokenizer, options.get("max_tokens", 512))
    out = [math.inf] * len(rows)
    if ids.shape[1] < 2:
        return out
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")  # (B, L-1)
        valid = mask[:, 1:].to(device).float()
        totals, counts = (nll * valid).sum(1), valid.sum(1)
    for i in range(len(rows)):
        if counts[i] > 0:
            out[i] = float(totals[i] / counts[i])
    return out


def order(scores, lengths, options: dict) -> list[int]:
    """Indices by the band's priority; infinite scores (nothing to predict) always last."""
    band = options.get("band", "middle")
    if band not in BANDS:
        raise ValueError(f"perplexity band must be one of {', '.join(BANDS)}, got {band!r}")
    finite = sorted((i for i in range(len(scores)) if math.isfinite(scores[i])), key=lambda i: (scores[i], i))
    rest = [i for i in range(len(scores)) if not math.isfinite(scores[i])]
    if band == "low":
        return finite + rest
    if band == "high":
        return finite[::-1] + rest
    center = (len(finite) - 1) / 2
    by_rank = sorted(range(len(finite)), key=lambda rank: (abs(rank - center), rank))
    return [finite[rank] for rank in by_rank] + rest
