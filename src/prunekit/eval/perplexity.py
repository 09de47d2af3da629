"""Perplexity of a causal LM on a token stream, always reported together with its protocol.

A perplexity number is meaningless without how it was measured: the text, the split, the
window length and the stride change it by large factors. `perplexity` therefore returns a
`PerplexityResult` that prints as ``ppl 19.36 [source=..., split=..., seqlen=512, stride=512,
windows=40, tokens scored=20440]`` and serializes the same facts with `to_dict()`.

Protocols
---------
* ``stride == seqlen`` (the default): non-overlapping windows ``ids[i*seqlen:(i+1)*seqlen]``,
  the WikiText protocol of GPTQ/SparseGPT/Wanda. The first token of every window has no
  context and is not scored, so ``tokens scored = windows * (seqlen - 1)``; a trailing partial
  window is dropped (and the result says how many tokens that was).
* ``stride < seqlen``: the Hugging Face sliding-window protocol. Windows start every ``stride``
  tokens and end at ``start + seqlen`` (the last one at the end of the text); each window scores
  only the tokens the previous window did not, so every token but the very first is scored
  exactly once (``tokens scored = len(ids) - 1``) with up to ``seqlen - 1`` tokens of context.

The model's own forward produces the logits (``model(input_ids, use_cache=False).logits``), so
architecture details such as Gemma-2 logit soft-capping are respected. Several windows run per
forward; the summed negative log-likelihood is computed in float32 with
``cross_entropy(reduction="sum")`` and accumulated in double precision, so batching does not
change the result beyond float32 round-off.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LOGITS_BUDGET_BYTES = 512 * 2**20     # automatic batch size keeps float32 logits under this


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_per_token: float
    tokens_scored: int
    seqlen: int
    stride: int
    windows: int
    source: dict = field(default_factory=dict)   # protocol of the evaluation text (see prunekit.data)
    tokens: int = 0                              # length of the token stream
    dropped_tokens: int = 0                      # trailing tokens outside every window (stride == seqlen)
    batch_size: int = 1
    seconds: float = field(default=0.0, compare=False)

    @property
    def protocol(self) -> str:
        """Everything needed to reproduce or compare the number, in one line."""
        src = self.source or {}
        name = src.get("source")
        parts = []
        if name is not None:
            description = src.get("description")
            parts.append(f"source={name}" + (f" ({description})" if description and description != name else ""))
        else:
            parts.append(f"source=token ids ({self.tokens} tokens)")
        if src.get("split"):
            split = f"split={src['split']}"
            tokens, in_split = src.get("tokens"), src.get("tokens_in_split")
            if isinstance(tokens, int) and isinstance(in_split, int) and tokens < in_split:
                split += f" (first {tokens} of {in_split} tokens)"
            parts.append(split)
        parts += [f"seqlen={self.seqlen}", f"stride={self.stride}", f"windows={self.windows}",
                  f"tokens scored={self.tokens_scored}"]
        if self.dropped_tokens:
            parts.append(f"trailing {self.dropped_tokens} tokens dropped")
        return ", ".join(parts)

    def __str__(self) -> str:
        return f"ppl {format_ppl(self.ppl)} [{self.protocol}]"

    def to_dict(self) -> dict:
        """JSON-ready: the numbers, the protocol line, and the evaluation text's own protocol."""
        mode = ("non-overlapping windows; a trailing partial window is dropped" if self.stride == self.seqlen
                else "sliding windows; each window scores only the tokens the previous one did not")
        return {
            "ppl": self.ppl,
            "nll_per_token": self.nll_per_token,
            "tokens_scored": self.tokens_scored,
            "seqlen": self.seqlen,
            "stride": self.stride,
            "windows": self.windows,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped_tokens,
            "batch_size": self.batch_size,
            "seconds": round(self.seconds, 3),
            "mode": mode,
            "protocol": self.protocol,
            "source": dict(self.source),
        }


def format_ppl(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value < 1e6 else f"{value:.4g}"


def windows_for(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of every window: tokens [first_scored, end) are scored in ids[begin:end]."""
    if stride == seqlen:
        return [(b, b + seqlen, b + 1) for b in range(0, n_tokens - seqlen + 1, seqlen)]
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and callable(getattr(config, "get_text_config", None)):
        configs.append(config.get_text_config())
    for cfg in configs:
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def auto_batch_size(model, seqlen: int) -> int:
    """Windows per forward so that one batch of float32 logits stays under LOGITS_BUDGET_BYTES."""
    return max(1, LOGITS_BUDGET_BYTES // (seqlen * vocab_size(model) * 4))


def perplexity(model, ids, seqlen: int = 512, stride: int | None = None, batch_size: int | None = None,
               device: str | torch.device | None = None, protocol: dict | None = None) -> PerplexityResult:
    """Perplexity of `model` on `ids` (an `EvalText` from `evaluation_data`, or a 1-D LongTensor).

    seqlen: window length; stride: distance between window starts (default seqlen: non-overlapping);
    batch_size: windows per forward (default: as many as keep float32 logits under ~512 MB);
    device: where to run (default: where the model is; a model elsewhere is moved there for the
    measurement and moved back afterwards); protocol: facts about the text to report with the
    number (merged over an `EvalText`'s own protocol).
    """
    source = dict(getattr(ids, "protocol", None) or {})
    source.update(protocol or {})
    ids = getattr(ids, "ids", ids)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be an EvalText or a LongTensor, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must be one token stream (1-D), got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must hold integer token ids, got {ids.dtype}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    stride = seqlen if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= seqlen:
        raise ValueError(f"stride must be an integer in [1, seqlen={seqlen}], got {stride!r}")
    limit = _max_positions(model)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} exceeds the model's {limit} positions")
    n = int(ids.numel())
    if n < seqlen:
        if source.get("split") == "evaluation":        # say which part of the user's text this is
            raise ValueError(f"the evaluation split of {source.get('source')} has {n} tokens "
                             f"({source.get('split_rule')}), fewer than one window of seqlen={seqlen}: perplexity "
                             "is measured on held-out text "
                             "only, not on the part used for calibration; give more text (or more documents) or "
                             "a lower --seqlen")
        raise ValueError(f"the text has {n} tokens, fewer than one window of seqlen={seqlen}; "
                         "lower seqlen or use more text")
    if batch_size is None:
        batch_size = auto_batch_size(model, seqlen)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    windows = windows_for(n, seqlen, stride)
    batch_size = min(batch_size, len(windows))
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    dispatched = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    moved = not dispatched and target != home
    was_training = model.training
    started = time.perf_counter()
    total_nll = 0.0
    scored = 0
    try:
        if moved:
            model.to(target)
        model.eval()
        input_device = _model_device(model) if dispatched else target
        ids = ids.to(torch.long)
        with torch.inference_mode():
            for batch in _batches(windows, batch_size):
                inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(input_device)
                labels = inputs.clone()
                for row, (b, _, first) in enumerate(batch):
                    labels[row, : first - b] = -100          # context only, not scored
                logits = model(input_ids=inputs, use_cache=False).logits
                nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                      ignore_index=-100, reduction="sum")
                total_nll += float(nll)
                scored += int((labels[:, 1:] != -100).sum())
                del logits, nll
    finally:
        if moved:
            model.to(home)
        model.train(was_training)

    expected = len(windows) * (seqlen - 1) if stride == seqlen else n - 1
    if scored != expected:     # guards the window arithmetic above
        raise RuntimeError(f"scored {scored} tokens, expected {expected}")
    nll_per_token = total_nll / scored
    dropped = n - windows[-1][1]
    ppl = math.exp(nll_per_token) if nll_per_token < 709 else math.inf
    return PerplexityResult(ppl=ppl, nll_per_token=nll_per_token, tokens_scored=scored,
                            seqlen=seqlen, stride=stride, windows=len(windows), source=source, tokens=n,
                            dropped_tokens=dropped, batch_size=batch_size,
                            seconds=time.perf_counter() - started)


def _batches(windows, batch_size):
    """Consecutive windows of equal length, at most batch_size per group."""
    group: list = []
    for window in windows:
        if group and (len(group) == batch_size or window[1] - window[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(window)
    if group:
        yield group
