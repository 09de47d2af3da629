"""Calibration by the pruning statistic itself: choose the samples whose activations, taken together, look
most like the whole pool's to the pruning methods.

Wanda scores a weight by |W_ij| * ||X_j|| and SparseGPT solves with H = X^T X, whose diagonal is the same
sum of squares: both see the calibration set only through each linear layer's input, above all its
per-channel second moments. A random 128 of a larger pool estimates those moments with the noise of 128
draws, and one loud window (a table of numbers, a run of markup) can shift a channel on its own. This
selector keeps a compact profile of every sample's second moments and then picks, greedily, the samples
whose mean profile stays closest to the pool's mean (kernel herding on the profiles): a stratified
estimate of the statistic the full pool would give, in which a loud outlier comes in only once the
selection is large enough for its share of the pool's mean.

    profile   one forward pass of the reference model; a hook on every linear layer of the decoder
              (not the LM head) reads the layer's input and keeps, per sample, the mean over its own
              tokens (padding masked out, the first `max_tokens`) of x_j^2 for every input channel j;
              layers called in turn on one tensor (q, k and v; gate and up) count once. The profile is the log of
              those moments (what matters to a pruning decision is how channels compare, a ratio),
              concatenated over the layers: one value per input channel of the model (97,920 for
              SmolLM2-135M), every channel weighted alike.
    stored    projected to `embed_dim` (default 256) dimensions by embed.py's seeded random projection
              (linear: the mean of projected profiles is the projection of the mean profile) and stored as
              float16, as the embeddings are (512 bytes per sample). The greedy step below optimises what
              it sees, so a small projection is overfitted: on 192 windows of SmolLM2-135M, 48 chosen on
              32 dimensions were no closer to the pool in the full 97,920 than random ones; on 256 they
              closed ~80% of the gap between random and a choice on the full profiles (BENCHMARKS.md).
    greedy    with y_i = profile_i - pool mean and T the sum over the samples taken so far, repeatedly
              take the sample minimising ||T + y_i|| (ties: the lowest index): after k picks the mean
              profile of the chosen k is as close to the pool's as one more sample can bring it. The
              first `greedy_picks` (default 4,096) are chosen this way (each costs one pass over the pool:
              O(N * dim)); the rest follow by their distance to the pool mean, closest first.

Options: `max_tokens` (512), `embed_dim` (256), `greedy_picks` (4,096), `seed` (the projection's).
"""
from __future__ import annotations

import torch

from ..models.spec import is_linear
from .perplexity import padded_batch

NEEDS_MODEL = True
GREEDY_PICKS = 4096
EMBED_DIM = 256


def profile_batch(texts: list[str], model, tokenizer, options: dict) -> torch.Tensor:
    """(len(texts), channels) float32 on the CPU: each text's log mean square input per channel of every
    distinct linear-layer input of the decoder, in module order (see the module's docstring)."""
    _, ids, mask = padded_batch(texts, tokenizer, options.get("max_tokens", 512))
    if ids.shape[1] == 0:                              # nothing to run: every sample is empty
        ids, mask = torch.zeros(len(texts), 1, dtype=torch.long), torch.zeros(len(texts), 1, dtype=torch.long)
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)         # the decoder without its LM head
    weights = mask.to(device=device, dtype=torch.float32).unsqueeze(-1)
    counts = weights.sum(1).clamp(min=1.0)             # an empty sample: zeros, then the floor below
    parts: list[torch.Tensor] = []
    last: list[torch.Tensor] = []

    def record(_module, inputs):
        x = inputs[0]
        if last and x is last[0]:                     # q, k, v (gate, up) are called in turn on one tensor
            return
        last[:] = [x]
        parts.append(((x.float() ** 2 * weights).sum(1) / counts).cpu())

    hooks = [m.register_forward_pre_hook(record) for m in body.modules() if is_linear(m)]
    try:
        with torch.inference_mode():
            body(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
    if not parts:
        raise ValueError("the statistic selector reads linear layers' inputs, and this model's decoder has none")
    return torch.cat(parts, dim=1).clamp(min=1e-12).log()


embed_batch = profile_batch                             # select.py's hook for selectors that store a vector


def order(scores, lengths, options: dict) -> list[int]:
    """The pool's indices, greedily matching the pool's mean profile (see the module's docstring);
    `options["embeddings"]` holds the stored (N, d) projected profiles."""
    stored = options.get("embeddings")
    if stored is None or len(stored) != len(lengths):
        raise ValueError("statistic orders samples by their activation profiles: options['embeddings'] must hold "
                         "one vector per sample")
    y = torch.as_tensor(stored).double()
    y = y - y.mean(0, keepdim=True)
    n = y.shape[0]
    picks = min(n, int(options.get("greedy_picks", GREEDY_PICKS)))
    if picks < 0:
        raise ValueError(f"greedy_picks must be >= 0, got {picks}")
    squares = (y * y).sum(1)
    taken = torch.zeros(n, dtype=torch.bool)
    total = torch.zeros(y.shape[1], dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(picks):
        cost = squares + 2 * (y @ total)                # ||T + y_i||^2 - ||T||^2
        cost[taken] = float("inf")
        i = int(torch.argmin(cost))                    # the first of equal minima: the lowest index
        chosen.append(i)
        taken[i] = True
        total += y[i]
    rest = [i for i in torch.argsort(squares, stable=True).tolist() if not taken[i]]
    return chosen + rest
