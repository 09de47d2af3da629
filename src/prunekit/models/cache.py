"""The KV cache's keyword across transformers releases.

transformers 5.24 (prunekit's floor) renamed a model's `past_key_values` argument and output to `cache`;
the old name still works with a FutureWarning and is to be removed in 5.40. A model with its own modeling
code (trust_remote_code) may know only `past_key_values`. A decode loop that passed a name the forward does
not know would run without its cache, silently (the forward swallows unknown keywords). So every
hand-written decode loop asks the model, once, which name its forward takes.
"""
from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """"cache" where the model's forward takes that argument, else "past_key_values"."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned (`output.cache`, or `output.past_key_values` on earlier releases)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
