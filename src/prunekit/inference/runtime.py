"""The one attention function and the state that every inference-time pruning mechanism runs through.

transformers looks the attention function up by name (`config._attn_implementation`) in its
`AttentionInterface`; `pruning(model, ...)` registers ours as "prunekit_<original>" (e.g. prunekit_sdpa),
with the original implementation's mask function under the same name in `AttentionMaskInterface` (so
the masks, sliding windows included, are built exactly as before), switches the model to it for the
duration of the block and back afterwards. Every call lands in `attention`, which hands the
call to the mechanism in charge (`lazyllm.TokenPruning` in prefill and decode, `kv.KVPruning` at decode)
or, when none applies (a sliding-window layer, a prefill without token pruning), to the implementation
the model had before ("sdpa", "eager", ...), so whatever is not pruned is computed as stock computes it.

Mechanisms that change what a layer caches (streaming heads, tokens pruned per layer) bring their own
cache layers; `pruning` wraps the model's `generate` so that it starts with that cache (a `past_key_values`
given by the caller is refused then, with the reason), and `Pruning.new_cache()` gives one to callers who
run the forward passes themselves.

Scope: batch 1 (the papers' setting; one prompt's tokens and KV entries are chosen per prompt), the
llama-family decoders in `FAMILIES`; anything else is refused with the reason.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.cache import cache_keyword

ATTENTION_PREFIX = "prunekit_"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _original_function(name: str, module: nn.Module):
    """The attention function `name` ("sdpa", "eager", ...) as the model would call it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling: float,
              dropout: float = 0.0, **kwargs):
    """The registered attention function: dispatch to the active mechanism, else to the original one."""
    state: Pruning | None = getattr(module, "_prunekit_pruning", None)
    if state is None:
        raise RuntimeError("the prunekit attention function ran outside `prunekit.inference.pruning(...)`; "
                           "set the model's attention implementation back (model.set_attn_implementation('sdpa'))")
    if query.shape[0] != 1:
        raise ValueError(f"inference-time pruning runs one prompt at a time (batch 1); got a batch of {query.shape[0]}")
    original = _original_function(state.original, module)

    def stock(q=query, k=key, v=value, mask=attention_mask):
        return original(module, q, k, v, mask, scaling=scaling, dropout=dropout, **kwargs)

    for mechanism in state.mechanisms:
        out = mechanism.attention(module, query, key, value, attention_mask, scaling, stock, **kwargs)
        if out is not None:
            return out
    return stock()


def attend(query: Tensor, key: Tensor, value: Tensor, scaling: float, mask: Tensor | None = None) -> Tensor:
    """Attention of `query` (B, Hq, Q, D) over `key`/`value` (B, Hkv, T, D) with an optional boolean `mask`
    (Q, T), True = may attend. The query heads of each KV group are folded into rows (B, Hkv, g*Q, D), so
    keys and values are never repeated per query head. Returns (B, Q, Hq, D) as transformers' functions do."""
    batch, heads, rows, dim = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(batch, key.shape[1], groups * rows, dim)
    if mask is not None:
        mask = mask.to(query.device).repeat(groups, 1)
    out = F.scaled_dot_product_attention(folded, key.to(query.dtype), value.to(query.dtype), attn_mask=mask,
                                         scale=scaling)
    return out.reshape(batch, heads, rows, dim).transpose(1, 2).contiguous()


def cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a cache holds (every layer kind here and transformers' own); a layer
    that allocates room ahead (`kv.GrowingLayer`, `kv.StreamingLayer`) counts what it allocated."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "held_bytes"):
            total += layer.held_bytes()
            continue
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class Pruning:
    """The active inference-time pruning of one model (what `pruning(...)` yields)."""

    def __init__(self, model: nn.Module, mechanisms: list):
        self.model, self.mechanisms = model, mechanisms
        self.original = model.config._attn_implementation or "sdpa"

    def new_cache(self):
        """A cache for one prompt with every mechanism's layers in place."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for mechanism in self.mechanisms:
            mechanism.prepare_cache(cache)
        return cache

    def needs_own_cache(self) -> bool:
        return any(getattr(m, "owns_cache", False) for m in self.mechanisms)


def check_family(model: nn.Module) -> None:
    family = model.config.model_type
    if family not in FAMILIES:
        raise ValueError(f"inference-time pruning runs on the llama-family decoders ({', '.join(FAMILIES)}); "
                         f"{family} is not supported yet")
    if getattr(model.config, "attn_logit_softcapping", None):
        raise ValueError(f"{family} caps its attention logits (attn_logit_softcapping), which inference-time "
                         "pruning does not reproduce")
    if not getattr(model.config, "use_cache", True):
        raise ValueError("this model is configured without a KV cache (use_cache=False); inference-time pruning "
                         "prunes a cache")


@contextmanager
def activate(model: nn.Module, mechanisms: list):
    """Prepare `mechanisms` (`enter`: calibration passes run on the stock model), then switch `model` to the
    prunekit attention function for the duration; restore the original implementation and `generate`
    afterwards, also on errors."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    check_family(model)
    for mechanism in mechanisms:                      # preparation (calibration passes) on the stock model
        mechanism.enter(model)
    state = Pruning(model, mechanisms)
    if state.original not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"inference-time pruning wraps the sdpa, eager and flash attention implementations; this "
                         f"model uses {state.original!r}")
    name = ATTENTION_PREFIX + state.original
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[state.original])
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    generate = model.generate

    def generate_with_cache(*args, **kwargs):
        if state.needs_own_cache():
            if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
                raise ValueError("this inference-time pruning keeps its own KV cache (appended in place; entries "
                                 "differ per head or layer); call generate without past_key_values")
            kwargs[cache_keyword(model)] = state.new_cache()
        return generate(*args, **kwargs)

    for module in modules:
        module._prunekit_pruning = state
    model.set_attn_implementation(name)
    model.generate = generate_with_cache
    try:
        yield state
    finally:
        for mechanism in reversed(mechanisms):
            mechanism.exit(model)
        del model.generate                                 # the class's method again
        model.set_attn_implementation(state.original)
        for module in modules:
            del module._prunekit_pruning
