"""`pruning(model, ...)`: inference-time pruning around any generation loop; `generate(...)`: prompt
pruning, then greedy generation under `pruning`, timed."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .configs import LazyLLMConfig, StreamingConfig, TwilightConfig

CALIBRATION_TOKENS = 2048      # streaming-head calibration: one default-corpus window (at most the model's limit)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def mechanisms_for(token_pruning=None, kv_pruning=None, calibration: Tensor | None = None) -> list:
    """The mechanism objects for these configs (checked: the right kind in the right place)."""
    out = []
    if token_pruning is not None:
        from .lazyllm import TokenPruning
        if not isinstance(token_pruning, LazyLLMConfig):
            raise TypeError(f"token_pruning takes a LazyLLMConfig, got {type(token_pruning).__name__}")
        out.append(TokenPruning(token_pruning))
    kv = _as_list(kv_pruning)
    for config in kv:
        if not isinstance(config, (TwilightConfig, StreamingConfig)):
            raise TypeError(f"kv_pruning takes TwilightConfig and/or StreamingConfig, got {type(config).__name__}")
    if len({type(c) for c in kv}) != len(kv):
        raise ValueError("kv_pruning takes at most one TwilightConfig and one StreamingConfig")
    if kv:
        from .kv import KVPruning
        if token_pruning is not None:
            raise ValueError("token pruning (LazyLLM) and KV pruning (Twilight, streaming heads) are not combined yet: "
                             "their caches differ per layer and per head; choose one")
        out.append(KVPruning(kv, calibration))
    return out


def calibration_ids(model: nn.Module, tokenizer) -> Tensor:
    """One window of the offline default corpus for the streaming-head calibration."""
    from ..data import load_text, tokenize
    limit = getattr(model.config, "max_position_embeddings", None) or CALIBRATION_TOKENS
    text, _ = load_text("default", "calibration")
    return tokenize(tokenizer, text)[:min(CALIBRATION_TOKENS, limit)].reshape(1, -1)


@contextmanager
def pruning(model: nn.Module, token_pruning=None, kv_pruning=None, *, calibration: Tensor | None = None,
            tokenizer=None):
    """Run `model` (its `generate`, or forward passes with `state.new_cache()`) with token pruning in prefill
    (LazyLLMConfig) or KV pruning at decode (TwilightConfig, StreamingConfig, or both in a list); with none,
    nothing changes. Streaming heads are chosen by a calibration pass over `calibration` ids, or over the
    default corpus when a `tokenizer` is given. Yields the active `runtime.Pruning` (None without pruning)."""
    if token_pruning is None and not _as_list(kv_pruning):
        yield None
        return
    from .runtime import activate
    needs_calibration = any(isinstance(c, StreamingConfig) and c.heads > 0 for c in _as_list(kv_pruning))
    if needs_calibration and calibration is None and tokenizer is not None:
        calibration = calibration_ids(model, tokenizer)
    with activate(model, mechanisms_for(token_pruning, kv_pruning, calibration)) as state:
        yield state


@dataclass
class Generation:
    """What `generate` returns: the new text and ids, the prompt as generated from, and its timings."""
    text: str
    new_ids: Tensor
    prompt_ids: Tensor
    seconds: float
    first_token_seconds: float
    prompt_account: str | None = None
    notes: list[str] = field(default_factory=list)


def generate(model: nn.Module, tokenizer, prompt: str, *, max_new_tokens: int = 64, token_pruning=None,
             kv_pruning=None, prompt_pruning=None, calibration: Tensor | None = None) -> Generation:
    """Greedy continuation of `prompt` (batch 1) with inference-time pruning: the prompt is first fitted into
    `prompt_pruning`'s budget (PromptPruningConfig), then generated under `pruning(...)`. Times the first
    token (prefill + one step) and the whole generation."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    account = None
    if prompt_pruning is not None:
        from .prompt import prune_prompt
        pruned = prune_prompt(model, tokenizer, prompt, prompt_pruning)
        ids, account = pruned.input_ids.reshape(1, -1), pruned.account()
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with pruning(model, token_pruning, kv_pruning, calibration=calibration, tokenizer=tokenizer) as state, \
            torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=pad)
        first = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - started
        notes = [n for n in (getattr(m, "note", lambda: None)() for m in (state.mechanisms if state else [])) if n]
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, ids[0], seconds, first, account, notes)
