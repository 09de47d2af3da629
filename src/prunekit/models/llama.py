"""Specs for the Llama-style decoders: separate q/k/v/o projections and a gated MLP.

Llama, Mistral, Qwen2, Qwen3 and Gemma 1/2/3 (text) share the module names
`model.layers[i].self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`, so one spec serves all
of them. What differs between them (GQA, Qwen3/Gemma3 q/k norms, Gemma's scaled embedding and
extra norms, sliding windows, soft-capping) lives outside the linear layers or in `model.config`
and does not change the spec. Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`;
a fused layer is one linear layer, so it forms a group of its own.

Only the causal-LM classes are covered: `gemma3_text` is `Gemma3ForCausalLM`; the multimodal
`gemma3` (`Gemma3ForConditionalGeneration`, blocks under `model.language_model`) is not.
"""
from __future__ import annotations

from .spec import Channels, Heads, ModelSpec

LLAMA = ModelSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # read the normed residual
        ("self_attn.o_proj",),                                          # reads the attention output
        ("mlp.gate_proj", "mlp.up_proj"),                               # read the normed residual
        ("mlp.down_proj",),                                             # reads act(gate) * up
    ),
    embeddings=("model.embed_tokens",),
    heads=Heads("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    channels=Channels("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
)

PHI3 = ModelSpec(
    model_types=("phi3",),
    blocks="model.layers",
    groups=(
        ("self_attn.qkv_proj",),
        ("self_attn.o_proj",),
        ("mlp.gate_up_proj",),
        ("mlp.down_proj",),
    ),
    embeddings=("model.embed_tokens",),
    heads=Heads("self_attn", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
    channels=Channels("mlp", ("mlp.gate_up_proj",), "mlp.down_proj", fused=2),
)
