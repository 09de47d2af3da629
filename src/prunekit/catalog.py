"""The catalogue of built-in methods: importing this module imports every method file once (each
registers itself with `registry.register`), and answers lookups by name.

It sits above the method files, which import only `registry`; that keeps the name catalogue out
of the lowest module, so no method file can reach the others through it.
"""
from __future__ import annotations

import difflib

from . import eora, search  # noqa: F401  (compensate: eora; search)
from .methods import angular, block_influence, laco, last_k, sleb, sublayer_drop  # noqa: F401  (depth)
from .methods import ssm_heads  # noqa: F401  (Mamba SSM heads / inner channels, through the depth scope)
from .methods import mka, reverse_order, streamline  # noqa: F401  (depth, second generation)
from .methods import amp, bonsai, flap, magnitude_sp, taylor, wanda_sp  # noqa: F401  (width)
from .methods import easy_ep, expert_frequency, expert_loo, expert_merge, expert_output, expert_random, naee, reap  # noqa: F401  (experts)
from .methods import gblm, magnitude, moe_pruner, pruner_zero, ria, sparsegpt, wanda  # noqa: F401  (unstructured, N:M)
from .methods import llm_surgeon  # noqa: F401  (unstructured, N:M: Kronecker-factored, multi-shot)
from .methods import llm_surgeon_sp  # noqa: F401  (width: the structured LLM Surgeon, heads and channels)
from .methods import armor  # noqa: F401  (N:M core between block-diagonal wrappers)
from .methods import contextual, d_pruner, seap  # noqa: F401  (domain-specific: width, unstructured, width)
from .recovery import train  # noqa: F401  (recover: lora, perp, kd, router-kd, expert-kd)
from .recovery import distill, partial  # noqa: F401  (recover: distill, partial)
from .registry import Method, registered


def get_method(name: str) -> Method:
    """The registered method called `name`; an unknown name gets the nearest valid one."""
    methods = registered()
    if name not in methods:
        close = difflib.get_close_matches(name, methods, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(sorted(methods))}")
    return methods[name]


def available_methods() -> list[str]:
    return sorted(registered())
