"""Spec for OPT: blocks at `model.decoder.layers`, separate q/k/v/out projections, fc1/fc2 MLP.

`project_in`/`project_out` (present when `word_embed_proj_dim != hidden_size`, e.g. OPT-350m)
sit outside the blocks and are not pruned. The learned positional embedding is listed with the
token embedding.
"""
from __future__ import annotations

from .spec import Channels, ConfigNames, Heads, ModelSpec

OPT = ModelSpec(
    model_types=("opt",),
    blocks="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
    heads=Heads("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    channels=Channels("", ("fc1",), "fc2"),
    config_names=ConfigNames(kv_heads=None, head_dim=None, intermediate="ffn_dim", attention_bias="enable_bias",
                             mlp_bias="enable_bias"),
)
