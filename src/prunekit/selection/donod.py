"""DONOD selection after Hu et al., "DONOD: Robust and Generalizable Instruction Fine-Tuning for LLMs via
Model-Intrinsic Dataset Pruning" (arXiv 2504.14810): two model-intrinsic signals per sample, read off the
weights of the output layer under one probing SGD step on that sample alone, ranked together by TOPSIS;
the samples ranked last (noisy, unlearnable, destabilising) are the first a budget drops.

    probe       the sample's loss is the mean next-token NLL over its first `max_tokens` tokens (as in
                fine-tuning); W is the weight of the output projection (`get_output_embeddings()`, the LM
                head) and g = dL/dW through that projection only. One SGD step would give W' = W - lr * g
                (lr = `options["probe_lr"]`, default 1e-5, a usual fine-tuning rate). Nothing is stepped:
                with H the head's inputs (T, d), P the softmax of Z = H W^T and Y the one-hot targets,
                g = (P - Y)^T H / T, so
                    <W, g>  = sum_t (E_p[z_t] - z_t[y_t]) / T
                    ||g||^2 = sum((A A^T) * (H H^T)) / T^2,  A = P - Y     (T x T Gram matrices, never V x d)
                and ||W'|| follows exactly from ||W||^2 - 2 lr <W, g> + lr^2 ||g||^2. The model is only run
                forward (inference mode), never modified.
    DON         Delta of Norm, ||W'|| - ||W||, computed as (lr^2 ||g||^2 - 2 lr <W, g>) / (||W'|| + ||W||)
                (no cancellation). Higher is better: a sample the model can already partly predict
                (target logit above the expected logit) grows the head along what it knows (DON > 0); a
                sample the step must pull the weights away from (noise, gibberish, contradicting labels)
                shrinks it (DON < 0).
    NOD         Norm of Delta, ||W' - W|| = lr ||g||. Lower is better: a large step is the weight
                instability the paper filters.
    stored      both divided by lr (TOPSIS's vector normalisation makes each column's scale irrelevant,
                and the quotients stay in float16's range), as a (B, 2) vector per sample through select.py's
                embedding path (width 2 <= embed_dim: kept as is, no projection; 4 bytes per sample). A
                sample with fewer than 2 tokens predicts nothing: NaN, ranked after every scored sample.
    TOPSIS      `topsis`: each criterion column divided by its Euclidean norm, multiplied by its weight
                (`options["weights"]`, equal by default), the ideal best = per-column max of a benefit
                criterion (DON) / min of a cost criterion (NOD), the ideal worst the opposite; a sample's
                closeness = d(worst) / (d(best) + d(worst)). Highest closeness first (ties: pool order).

Simplified from the paper: the paper's direction for DON is read as "higher is better" as argued above
(its exact sign convention is not reproduced from its text); the probe uses the head's share of the
gradient only (for a tied head the embedding lookup's share is left out, and a head bias and final-logit
softcapping are ignored); the loss covers every token (no prompt / response split: pools here are plain
text); one step from the given model, no warm-up fine-tuning. Cost: one forward pass per sample plus
T x V and T x T products per sample (no backward pass).
"""
from __future__ import annotations

import math

import numpy as np
import torch

NEEDS_MODEL = True
CRITERIA = ("don", "nod")
BENEFIT = (True, False)            # DON: higher is better; NOD: lower is better
PROBE_LR = 1e-5


def probe(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """(len(texts), 2) float64: DON / lr and NOD / lr of each text (NaN where fewer than 2 tokens)."""
    from ..data import tokenize
    lr = float(options.get("probe_lr", PROBE_LR))
    if not lr > 0:
        raise ValueError(f"the DONOD probe learning rate must be positive, got {lr}")
    max_tokens = options.get("max_tokens", 512)
    rows = [tokenize(tokenizer, text)[:max_tokens] for text in texts]
    out = torch.full((len(rows), 2), math.nan, dtype=torch.float64)
    longest = max(len(r) for r in rows)
    if longest < 2:
        return out
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError("donod probes the output layer: this model has no output embeddings (LM head)")
    device = next(model.parameters()).device
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    captured = {}
    hook = head.register_forward_hook(lambda module, args, output: captured.__setitem__("h", args[0]))
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        hook.remove()
    with torch.inference_mode():
        weight = head.weight.float()
        w_norm = float(weight.double().norm())
        for i, row in enumerate(rows):
            t = len(row) - 1
            if t < 1:
                continue
            h = captured["h"][i, :t].float()                       # inputs predicting tokens 1..t
            z = h @ weight.T                                       # (T, V)
            targets = ids[i, 1:t + 1].to(z.device)
            p = torch.softmax(z, dim=-1)
            w_dot_g = float(((p * z).sum(1) - z.gather(1, targets[:, None]).squeeze(1)).double().sum()) / t
            a = p
            a[torch.arange(t, device=a.device), targets] -= 1.0
            g_sq = float(((a @ a.T).double() * (h @ h.T).double()).sum()) / t ** 2
            g_sq = max(g_sq, 0.0)
            stepped = math.sqrt(max(w_norm ** 2 - 2 * lr * w_dot_g + lr ** 2 * g_sq, 0.0))
            don = (lr ** 2 * g_sq - 2 * lr * w_dot_g) / (stepped + w_norm) if stepped + w_norm > 0 else 0.0
            out[i, 0], out[i, 1] = don / lr, math.sqrt(g_sq)
    return out


def embed_batch(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """The selector's per-sample vector (see select.py): (B, 2) = (DON / lr, NOD / lr)."""
    return probe(texts, model, tokenizer, options).float()


def topsis(matrix, benefit, weights=None) -> np.ndarray:
    """TOPSIS closeness in [0, 1] of each row of `matrix` (N, C) of finite criteria: vector-normalised
    columns, weighted (`weights`, equal by default, normalised to sum 1), distance to the ideal best and
    worst rows (best = max of a benefit column / min of a cost column); d_worst / (d_best + d_worst), 0.5
    where a row is both (every row alike)."""
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(benefit):
        raise ValueError(f"TOPSIS needs an (N, {len(benefit)}) criteria matrix, got shape {x.shape}")
    w = np.full(x.shape[1], 1.0 / x.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (x.shape[1],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"TOPSIS weights must be {x.shape[1]} non-negative numbers, not all zero; got {weights}")
    w = w / w.sum()
    if len(x) == 0:
        return np.zeros(0)
    norms = np.linalg.norm(x, axis=0)
    v = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0) * w
    up = np.asarray(benefit, dtype=bool)
    best = np.where(up, v.max(0), v.min(0))
    worst = np.where(up, v.min(0), v.max(0))
    d_best = np.linalg.norm(v - best, axis=1)
    d_worst = np.linalg.norm(v - worst, axis=1)
    total = d_best + d_worst
    return np.divide(d_worst, total, out=np.full(len(x), 0.5), where=total > 0)


def order(scores, lengths, options: dict) -> list[int]:
    """The pool's indices by TOPSIS closeness over (DON, NOD), highest first; samples with nothing to
    probe (NaN criteria) last, in pool order. `options["embeddings"]` holds the stored (N, 2) criteria."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths) or stored.shape[1] != len(CRITERIA):
        raise ValueError("donod ranks samples by their stored (DON, NOD) pair: options['embeddings'] must hold "
                         "two numbers per sample")
    criteria = torch.as_tensor(stored).double().numpy()
    scored = np.isfinite(criteria).all(1)
    index = np.flatnonzero(scored)
    closeness = topsis(criteria[scored], BENEFIT, options.get("weights"))
    ranked = index[np.lexsort((index, -closeness))]
    return ranked.tolist() + np.flatnonzero(~scored).tolist()
