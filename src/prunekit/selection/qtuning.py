"""Q-Tuning selection (Wang et al., "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token
Pruning for Efficient Supervised Fine-Tuning", arXiv 2509.23873): every sample is placed on the
error-uncertainty (EU) plane of the reference model, whole samples are kept or dropped by their quadrant,
and inside the kept "misconception" samples the least useful tokens are taken out of the *loss*.

    error        mean next-token NLL of the sample's first `max_tokens` tokens (log perplexity: the same
                 ranking as the paper's perplexity)
    uncertainty  mean predictive entropy of the model's next-token distributions over the same positions
    quadrants    (the paper's Sec. 3 / Fig. 1b; "high" / "low" against quantile thresholds of the pool)
                   Q1 harmful noise            high error, high uncertainty   dropped
                   Q2 valuable misconceptions  high error, low uncertainty    kept, with token pruning
                   Q3 redundant knowledge      low error,  low uncertainty    dropped
                   Q4 calibration data         low error,  high uncertainty   kept whole
    thresholds   the paper searches the quantile threshold t (bisection) so that Q2 (error rank >= 1 - t and
                 uncertainty rank <= t) plus Q4 (error rank <= t and uncertainty rank >= 1 - t) hold the
                 sample budget. The kept set only grows with t, so the bisection's answer for every budget is
                 one ordering: each sample enters at t_Q2 = max(1 - u_e, u_h) or t_Q4 = max(u_e, 1 - u_h)
                 (u_e, u_h its error and uncertainty ranks in [0, 1]), whichever is smaller; `order` sorts by
                 that entry threshold (ties: pool order) and select.py's fill takes the exact budget. A sample
                 entering at t <= 1/2 is in Q2 or Q4 of the plane split at the medians; past 1/2 the quadrants
                 overlap, so a budget larger than Q2 + Q4 (at the medians) fills from Q3 (redundant, harmless)
                 and only then from Q1 (noise, always last); a sample with fewer than 2 tokens after all.
    tokens       inside a kept Q2 sample only (Q4 is kept whole, the paper's asymmetric policy), each
                 predicted token i gets the context-aware score s_i = (1 - lambda) PPL_i + lambda (PPL_{i-1}
                 + PPL_{i+1}) / 2 (PPL_i = exp(NLL_i); at the ends the one neighbour that exists), and the
                 round(token_keep * T) lowest-scoring of its T scored targets stay in the loss (at least one;
                 ties: the earlier token stays); the highest-scoring ones are removed from the loss. Tokens
                 are never removed from the input: the context a kept token is predicted from is unchanged.

Output (select.py writes it through `write_selection` here): each kept sample as
{"text", "index", "cluster": quadrant number, "quadrant": "Q2", "tokens": L, "loss_spans": [[a, b], ...]}.
`tokens` is the length of the sample's tokenization with the model's tokenizer (`prunekit.data.tokenize`,
no special tokens) and `loss_spans` are the half-open ranges [a, b) of token indices whose tokens count as
targets of the next-token loss; token 0 is never a target, so a sample kept whole has [[1, L]]. Tokens past
`max_tokens` are not scored and always count. `prunekit recover --data-select qtuning` reads this mask.

Simplified from the paper: the paper selects per mini-batch during training (dynamic pruning) with the
model being trained; here the selection is made once, before training, with the reference model (static),
and there is no prompt / response split (pools are plain text, every token is a response token).
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

NEEDS_MODEL = True
QUADRANTS = {1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}
TOKEN_KEEP = 0.7          # share of a Q2 sample's scored targets kept in the loss
NEIGHBOUR_WEIGHT = 0.5    # lambda of the context-aware token score


# ---------------------------------------------------------------------------------------------- scoring

def token_stats(texts: list[str], model, tokenizer, options: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text: (NLL (T,), entropy (T,)) float64 of its predicted tokens 1..T among its first `max_tokens`
    tokens (T = 0 for a text of fewer than 2 tokens)."""
    from .perplexity import padded_batch
    rows, ids, mask = padded_batch(texts, tokenizer, int(options.get("max_tokens", 512)))
    empty = torch.zeros(0, dtype=torch.float64)
    out = [(empty, empty)] * len(rows)
    if ids.shape[1] < 2:
        return out
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()[:, :-1]
        logp = F.log_softmax(logits, dim=-1)                                               # (B, L-1, V)
        nll = -logp.gather(2, ids[:, 1:, None].to(device)).squeeze(2)                       # (B, L-1)
        entropy = -(logp.exp() * logp).sum(-1)                                             # (B, L-1)
    for i, row in enumerate(rows):
        t = len(row) - 1
        if t >= 1:
            out[i] = (nll[i, :t].double().cpu(), entropy[i, :t].double().cpu())
    return out


def embed_batch(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """The selector's per-sample vector (see select.py): (B, 2) = (mean NLL, mean entropy), NaN when the
    sample predicts nothing; width 2 is stored as is (float16), never projected."""
    out = torch.full((len(texts), 2), math.nan)
    for i, (nll, entropy) in enumerate(token_stats(texts, model, tokenizer, options)):
        if len(nll):
            out[i, 0], out[i, 1] = float(nll.mean()), float(entropy.mean())
    return out


# ---------------------------------------------------------------------------------------------- the plane

def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank as a quantile in [0, 1]; equal values share their mean rank (duplicates of a sample
    land in the same quadrant); 0.5 for a single value."""
    n = len(values)
    if n == 1:
        return np.array([0.5])
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    positions = np.arange(n, dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    for start, end in zip(starts, np.r_[starts[1:], n]):
        positions[start:end] = (start + end - 1) / 2
    ranks = np.empty(n)
    ranks[order] = positions / (n - 1)
    return ranks


def quadrant_order(error, uncertainty) -> tuple[list[int], list[int]]:
    """(every index by entry threshold, see the module doc; each sample's quadrant 1-4, 0 for nothing to
    score). `error`, `uncertainty`: one number per sample, NaN where the sample predicts nothing."""
    error, uncertainty = np.asarray(error, dtype=np.float64), np.asarray(uncertainty, dtype=np.float64)
    if error.shape != uncertainty.shape or error.ndim != 1:
        raise ValueError("qtuning needs one error and one uncertainty value per sample")
    n = len(error)
    scored = np.isfinite(error) & np.isfinite(uncertainty)
    index = np.flatnonzero(scored)
    quadrant = np.zeros(n, dtype=np.int64)
    entry = np.full(n, np.inf)
    if len(index):
        u_e, u_h = _ranks(error[index]), _ranks(uncertainty[index])
        t_q2, t_q4 = np.maximum(1 - u_e, u_h), np.maximum(u_e, 1 - u_h)
        high_e, high_h = u_e > 0.5, u_h > 0.5
        # the quadrant of the plane split at the medians (a median sample counts as low)
        quadrant[index] = np.where(high_e, np.where(high_h, 1, 2), np.where(high_h, 4, 3))
        # kept quadrants by entry threshold; then Q3, then Q1, each by its own entry threshold
        group = np.select([quadrant[index] == 2, quadrant[index] == 4, quadrant[index] == 3], [0, 0, 1], 2)
        entry[index] = group * 2.0 + np.minimum(t_q2, t_q4)
    order = np.lexsort((np.arange(n), entry))
    return order.tolist(), quadrant.tolist()


def order_and_labels(scores, lengths, options: dict) -> tuple[list[int], list[int]]:
    """select.py's hook: the pool's indices in Q-Tuning's priority and each sample's quadrant (reported as
    its "cluster"). `options["embeddings"]` holds the stored (N, 2) (error, uncertainty) pairs."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths) or stored.shape[1] != 2:
        raise ValueError("qtuning places samples by their stored (error, uncertainty) pair: options['embeddings'] "
                         "must hold two numbers per sample")
    pairs = torch.as_tensor(stored).double().numpy()
    return quadrant_order(pairs[:, 0], pairs[:, 1])


def order(scores, lengths, options: dict) -> list[int]:
    return order_and_labels(scores, lengths, options)[0]


# ---------------------------------------------------------------------------------------------- tokens

def token_scores(nll, neighbour_weight: float = NEIGHBOUR_WEIGHT) -> torch.Tensor:
    """s_i = (1 - lambda) PPL_i + lambda * mean(PPL of the neighbours i-1, i+1 that exist), PPL_i = exp(NLL_i)."""
    if not 0 <= neighbour_weight <= 1:
        raise ValueError(f"the neighbour weight lambda must be in [0, 1], got {neighbour_weight}")
    ppl = torch.as_tensor(nll, dtype=torch.float64).exp()
    if len(ppl) < 2:
        return ppl.clone()
    left = torch.cat([ppl[1:2], ppl[:-1]])        # the first token's only neighbour is the next one
    right = torch.cat([ppl[1:], ppl[-2:-1]])      # the last token's only neighbour is the previous one
    return (1 - neighbour_weight) * ppl + neighbour_weight * (left + right) / 2


def token_keep_mask(nll, token_keep: float = TOKEN_KEEP, neighbour_weight: float = NEIGHBOUR_WEIGHT) -> torch.Tensor:
    """(T,) bool over a Q2 sample's scored targets: True for the round(token_keep * T) (>= 1) lowest scores."""
    if not 0 < token_keep <= 1:
        raise ValueError(f"token_keep must be in (0, 1] (the share of a Q2 sample's tokens kept in the loss), "
                         f"got {token_keep}")
    scores = token_scores(nll, neighbour_weight)
    t = len(scores)
    keep = torch.zeros(t, dtype=torch.bool)
    if t == 0:
        return keep
    count = min(t, max(1, round(token_keep * t)))
    ranked = sorted(range(t), key=lambda i: (float(scores[i]), i))
    keep[ranked[:count]] = True
    return keep


def spans(mask: torch.Tensor, offset: int = 1) -> list[list[int]]:
    """Half-open [a, b) ranges of the True entries of `mask`, shifted by `offset` (targets start at token 1)."""
    out: list[list[int]] = []
    for i, value in enumerate(mask.tolist()):
        if not value:
            continue
        if out and out[-1][1] == i + offset:
            out[-1][1] += 1
        else:
            out.append([i + offset, i + offset + 1])
    return out


def loss_spans(length: int, quadrant: int, nll=None, options: dict | None = None) -> list[list[int]]:
    """The loss spans of one kept sample of `length` tokens: every target for all but Q2; for Q2 the kept
    scored targets (`nll`: the scored targets' NLL) and every unscored one past them."""
    options = options or {}
    if length < 2:
        return []
    if quadrant != 2 or nll is None or len(nll) == 0:
        return [[1, length]]
    keep = token_keep_mask(nll, float(options.get("token_keep", TOKEN_KEEP)),
                           float(options.get("neighbour_weight", NEIGHBOUR_WEIGHT)))
    out = spans(keep)
    scored_end = len(nll) + 1
    if scored_end < length:
        if out and out[-1][1] == scored_end:
            out[-1][1] = length
        else:
            out.append([scored_end, length])
    return out


def mask_from_spans(length: int, loss_spans_: list[list[int]]) -> torch.Tensor:
    """(length,) bool: True at the tokens that count as targets; checks the spans."""
    mask = torch.zeros(length, dtype=torch.bool)
    for span in loss_spans_:
        if (not isinstance(span, (list, tuple)) or len(span) != 2 or not all(isinstance(v, int) for v in span)
                or not 1 <= span[0] < span[1] <= length):
            raise ValueError(f"loss span {span!r} is not a half-open [a, b) range of target tokens within 1..{length}")
        mask[span[0]:span[1]] = True
    return mask


# ---------------------------------------------------------------------------------------------- output

def write_selection(out, pool, keep: set[int], labels, model, tokenizer, options: dict) -> dict:
    """Stream `pool` once more and write the kept samples with their quadrant and loss spans to `out`
    (JSON lines, atomically). Returns {"written", "targets", "loss_targets"}: samples written, their
    targets (tokens 1..L-1) and how many of those count in the loss."""
    from ..data import tokenize
    from ..io.atomic import write_atomic
    counts = {"written": 0, "targets": 0, "loss_targets": 0}

    def flush(handle, pending):
        misconceptions = [text for _, text, quadrant in pending if quadrant == 2]
        stats = iter(token_stats(misconceptions, model, tokenizer, options)) if misconceptions else iter(())
        for index, text, quadrant in pending:
            length = len(tokenize(tokenizer, text))
            nll = next(stats)[0] if quadrant == 2 else None
            kept = loss_spans(length, quadrant, nll, options)
            record = {"text": text, "index": index, "cluster": quadrant, "quadrant": QUADRANTS.get(quadrant),
                      "tokens": length, "loss_spans": kept}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["written"] += 1
            counts["targets"] += max(length - 1, 0)
            counts["loss_targets"] += sum(b - a for a, b in kept)

    def write(tmp) -> None:
        for key in counts:
            counts[key] = 0
        pending = []
        with open(tmp, "w", encoding="utf-8") as handle:
            for index, text in enumerate(pool):
                if index in keep:
                    pending.append((index, text, int(labels[index])))
                    if len(pending) == 8:
                        flush(handle, pending)
                        pending = []
            if pending:
                flush(handle, pending)
    write_atomic(out, write)
    return dict(counts)
