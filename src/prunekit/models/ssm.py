"""Specs for the state-space (Mamba) families and one hybrid (Jamba), for unstructured / N:M pruning.

"On Pruning State-Space LLMs" (arXiv 2502.18886) finds that Wanda holds up to 50% unstructured
sparsity on Mamba models: the projections are ordinary linears, pruned like any other. The SSM's
own parameters (the depthwise conv1d, A_log, D, dt_bias / dt_proj.bias) are not linears and stay
dense; SparseSSM (arXiv 2506.09613) prunes those with an OBS rule of their own, which is not here.

    mamba, falcon_mamba   `backbone.layers[i].mixer`: in_proj (x | z rows) -> conv1d -> x_proj
                          (dt_low | B | C) -> dt_proj (R -> inner) -> scan -> out_proj
    mamba2                `backbone.layers[i].mixer`: in_proj (z | x | B | C | dt rows) -> conv1d
                          on x/B/C -> scan -> gated RMSNorm -> out_proj
    jamba                 `model.layers[i]`: either `self_attn` (Llama-style q/k/v/o) or `mamba`
                          (the Mamba-1 mixer above), then `feed_forward`: a gated MLP or a
                          mixture of experts (router + fused experts, `spec.Experts`)

`dt_proj` is left out of the groups (so it stays dense): transformers applies it as
`dt_proj.weight @ time_step` inside the mixer instead of calling the module, so no forward hook
sees its input and a calibrated method has no statistics for it. It is `time_step_rank x inner`,
about 2% of a mixer's linear weights.

Why Jamba is the hybrid: its blocks differ (attention or Mamba mixer; gated MLP or experts), and
the engine skips the names a block does not have for specs that declare experts (`spec.Experts`),
which Jamba genuinely has; Bamba and Nemotron-H mix block kinds too but have no experts in the
Bamba case (the engine would need a new "blocks may differ" flag) and a per-block `mixer` of four
kinds in Nemotron-H. Jamba's router is a softmax over every expert, top-k, not renormalised.
"""
from __future__ import annotations

from .spec import Experts, ModelSpec

MAMBA = ModelSpec(
    model_types=("mamba", "falcon_mamba"),
    blocks="backbone.layers",
    groups=(
        ("mixer.in_proj",),      # reads the normed residual
        ("mixer.x_proj",),       # reads the conv1d output (inner channels)
        ("mixer.out_proj",),     # reads scan(x) * silu(z)
    ),
    embeddings=("backbone.embeddings",),
)

MAMBA2 = ModelSpec(
    model_types=("mamba2",),
    blocks="backbone.layers",
    groups=(
        ("mixer.in_proj",),      # reads the normed residual
        ("mixer.out_proj",),     # reads the gated RMSNorm of the scan output
    ),
    embeddings=("backbone.embeddings",),
)

JAMBA = ModelSpec(
    model_types=("jamba",),
    blocks="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),   # attention blocks
        ("self_attn.o_proj",),
        ("mamba.in_proj",),                                              # Mamba blocks
        ("mamba.x_proj",),
        ("mamba.out_proj",),
        ("feed_forward.gate_proj", "feed_forward.up_proj"),             # blocks with a dense MLP
        ("feed_forward.down_proj",),
    ),
    embeddings=("model.embed_tokens",),
    experts=Experts("feed_forward", "feed_forward.router", "feed_forward.experts", "num_experts",
                    renormalize=False, residual_norm="pre_ff_layernorm"),
)

SSM_SPECS = (MAMBA, MAMBA2, JAMBA)

__all__ = ["SSM_SPECS", "MAMBA", "MAMBA2", "JAMBA"]
