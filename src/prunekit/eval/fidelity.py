"""Fidelity of a pruned model to its dense original on the same text.

Perplexity says how well a model predicts text; it does not say whether the pruned model still
behaves like the model it came from. Two models with the same perplexity can disagree on many
tokens. This module measures the disagreement directly:

* **token KL**: mean over positions of KL(p_dense || p_model), from float32 log-softmax. The
  dense distribution is the reference (first argument), as in distillation.
* **top-1 agreement**: the share of positions where both models' most likely next token agree.
* **Divergent Token Metrics** (Deiseroth et al., "Divergent Token Metrics: Measuring degradation
  to prune away LLM components - and optimize quantization", arXiv 2311.01544). The dense
  model's greedy continuation ``y`` (``new_tokens`` tokens) of each prompt is fixed once. The
  evaluated model is run teacher-forced on ``prompt + y`` (one forward, no generation) and its
  argmax at every continuation position is compared with ``y``:
  - first divergent token (FDT): 0-based index of the first mismatch, ``new_tokens`` if none;
  - share of divergent tokens (SDT): mismatches / ``new_tokens``.
  Teacher forcing keeps the comparison position-by-position: after a first mismatch, the model is
  still asked about the dense model's text rather than drifting into its own.

The metric functions are pure functions on tensors (`token_kl`, `top1_agreement`,
`divergent_tokens`); `dense_logprobs`, `greedy_continuations` and `teacher_forced_argmax` run a
model (its own forward, ``model(input_ids, use_cache=False).logits``, batched, no_grad).

Memory: the dense log-probabilities are kept once for the whole run, ``tokens x vocab x 4``
bytes in float32: 4096 tokens of SmolLM2 (vocabulary 49,152) take about 800 MB.

A model compared with itself gives KL 0, top-1 agreement 1, FDT = new_tokens and SDT 0 exactly:
the greedy continuation is defined as the fixed point of the same teacher-forced forward that
scores it (see `greedy_continuations`), and both sides run the same batch shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.cache import cache_keyword, returned_cache


# ----------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------

def token_kl(dense_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_model) per position: (..., V) dense log-probs and model logits -> (...).

    Computed in float32; a model log-prob of -inf where the dense probability is positive gives
    +inf (the model rules out what the dense model predicts), as the definition says.
    """
    if dense_logprobs.shape != logits.shape:
        raise ValueError(f"dense log-probs {tuple(dense_logprobs.shape)} and logits {tuple(logits.shape)} "
                         "must have the same shape")
    p_log = dense_logprobs.float()
    q_log = F.log_softmax(logits.float(), dim=-1)
    p = p_log.exp()
    # where p == 0 the term is 0 whatever q is (0 * log 0 = 0); masking avoids 0 * inf = nan
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)     # round-off can make a perfect match -1e-9


def top1_agreement(dense_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per position, 1.0 where the argmax of both agrees, else 0.0: (..., V), (..., V) -> (...)."""
    if dense_logprobs.shape != logits.shape:
        raise ValueError(f"dense log-probs {tuple(dense_logprobs.shape)} and logits {tuple(logits.shape)} "
                         "must have the same shape")
    return (dense_logprobs.argmax(-1) == logits.argmax(-1)).float()


def divergent_tokens(predicted: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First divergent token and share of divergent tokens per prompt (arXiv 2311.01544).

    predicted, reference: (prompts, new_tokens) token ids (the model's teacher-forced argmax and
    the dense greedy continuation). Returns (fdt, sdt): fdt (prompts,) long, the 0-based index of
    the first mismatch or new_tokens when there is none; sdt (prompts,) float, mismatches / new_tokens.
    """
    if predicted.shape != reference.shape or predicted.dim() != 2:
        raise ValueError(f"predicted {tuple(predicted.shape)} and reference {tuple(reference.shape)} must be "
                         "the same (prompts, new_tokens) shape")
    mismatch = predicted != reference                                    # (P, T)
    T = mismatch.shape[1]
    positions = torch.arange(T).expand_as(mismatch)
    fdt = torch.where(mismatch, positions, torch.full_like(positions, T)).min(-1).values if T else \
        torch.zeros(mismatch.shape[0], dtype=torch.long)
    sdt = mismatch.float().mean(-1) if T else torch.zeros(mismatch.shape[0])
    return fdt, sdt


# ----------------------------------------------------------------------------------------------
# Token selection (deterministic, from the evaluation text)
# ----------------------------------------------------------------------------------------------

def fidelity_windows(ids: torch.Tensor, seqlen: int, tokens: int) -> torch.Tensor:
    """The first non-overlapping windows of `ids` that together cover `tokens` positions: (W, seqlen).

    Every position of a window is scored (its next-token distribution), so W = ceil(tokens / seqlen)
    windows, capped by the text; positions beyond `tokens` in the last window are cut by the caller
    (see `flat_positions`).
    """
    n_windows = min(-(-tokens // seqlen), int(ids.numel()) // seqlen)
    if n_windows < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of "
                         f"seqlen={seqlen}; lower --seqlen or use more text")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def prompt_starts(n_tokens: int, prompts: int, length: int) -> list[int]:
    """`prompts` evenly spaced starts of `length`-token spans in a text of `n_tokens` tokens."""
    if n_tokens < length:
        raise ValueError(f"the evaluation text has {n_tokens} tokens, fewer than one prompt plus "
                         f"continuation ({length} tokens)")
    last = n_tokens - length
    return [(i * last) // max(1, prompts - 1) if prompts > 1 else 0 for i in range(prompts)]


# ----------------------------------------------------------------------------------------------
# Model runners
# ----------------------------------------------------------------------------------------------

def _logits(model, inputs: torch.Tensor) -> torch.Tensor:
    return model(input_ids=inputs, use_cache=False).logits


@torch.no_grad()
def window_logits(model, windows: torch.Tensor, tokens: int, batch_size: int, device) -> list[torch.Tensor]:
    """Float32 logits of the first `tokens` positions of `windows`, one (rows, V) tensor per batch."""
    out, left = [], tokens
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = _logits(model, batch).float().flatten(0, 1)[:left].cpu()
        left -= logits.shape[0]
        out.append(logits)
        if left <= 0:
            break
    return out


def dense_logprobs(model, windows: torch.Tensor, tokens: int, batch_size: int, device) -> torch.Tensor:
    """(tokens, V) float32 log-softmax of the dense model on the fidelity windows."""
    parts = [F.log_softmax(chunk, dim=-1) for chunk in window_logits(model, windows, tokens, batch_size, device)]
    return torch.cat(parts)


@torch.no_grad()
def teacher_forced_argmax(model, prompts: torch.Tensor, continuations: torch.Tensor, batch_size: int,
                          device) -> torch.Tensor:
    """The model's argmax at each continuation position of ``prompt + continuation``: (P, new_tokens)."""
    L, T = prompts.shape[1], continuations.shape[1]
    full = torch.cat([prompts, continuations], dim=1)
    out = []
    for start in range(0, full.shape[0], batch_size):
        batch = full[start:start + batch_size].to(device)
        logits = _logits(model, batch)
        out.append(logits[:, L - 1:L - 1 + T].argmax(-1).cpu())     # position t predicts token t + 1
    return torch.cat(out)


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int, batch_size: int, device) -> torch.Tensor:
    """The dense model's greedy continuation of every prompt: (P, new_tokens) token ids.

    Generation runs with the KV cache (fast); the result is then made the exact fixed point of
    the teacher-forced forward that `teacher_forced_argmax` uses: cached and uncached forwards can
    differ in float round-off, which could flip a near-tie and make a model disagree with itself.
    Position t of the fixed point only depends on positions < t, so at most new_tokens passes are
    needed; in practice the first check already agrees.
    """
    prompts = prompts.to(torch.long)
    if new_tokens < 1:
        return torch.zeros(prompts.shape[0], 0, dtype=torch.long)
    parts, keyword = [], cache_keyword(model)
    for start in range(0, prompts.shape[0], batch_size):
        batch = prompts[start:start + batch_size].to(device)
        out = model(input_ids=batch, use_cache=True)
        past, token = returned_cache(out), out.logits[:, -1].argmax(-1)
        generated = [token]
        for _ in range(new_tokens - 1):
            out = model(input_ids=token[:, None], use_cache=True, **{keyword: past})
            past, token = returned_cache(out), out.logits[:, -1].argmax(-1)
            generated.append(token)
        parts.append(torch.stack(generated, dim=1).cpu())
        del past, out
    continuation = torch.cat(parts)
    for _ in range(new_tokens + 1):
        check = teacher_forced_argmax(model, prompts, continuation, batch_size, device)
        if torch.equal(check, continuation):
            return continuation
        continuation = check
    raise RuntimeError("greedy continuations did not reach a fixed point; the model's forward is not "
                       "deterministic on this device")
