"""Spec for GPT-2: blocks at `transformer.h`, fused q/k/v in `attn.c_attn`.

GPT-2's linear layers are `Conv1D` modules whose weight is stored (in, out); `weight_view` in
`spec.py` hides that, so the spec names them like any other linear layer.
"""
from __future__ import annotations

from .spec import Channels, ConfigNames, Heads, ModelSpec

GPT2 = ModelSpec(
    model_types=("gpt2",),
    blocks="transformer.h",
    groups=(
        ("attn.c_attn",),
        ("attn.c_proj",),
        ("mlp.c_fc",),
        ("mlp.c_proj",),
    ),
    embeddings=("transformer.wte", "transformer.wpe"),
    heads=Heads("attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj"),
    channels=Channels("mlp", ("mlp.c_fc",), "mlp.c_proj"),
    config_names=ConfigNames(heads="n_head", kv_heads=None, head_dim=None, intermediate="n_inner",
                             attention_bias=None, mlp_bias=None),   # Conv1D layers always have biases
)


def refuse_cross_attention(config) -> None:
    """Reject GPT-2 configs with `add_cross_attention`.

    Such blocks gain `crossattention.{c_attn,q_attn,c_proj}`, which read encoder states that a
    causal-LM calibration pass never provides. A static spec cannot list layers that exist only
    under a config flag, so this is checked here instead of being silently left unpruned.
    """
    if getattr(config, "add_cross_attention", False):
        raise ValueError("gpt2 with add_cross_attention=True is not supported: its cross-attention "
                         "layers read encoder states, which causal-LM calibration does not provide")
