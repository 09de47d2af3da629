"""Specs for the Mixture-of-Experts decoders of transformers 5, and their routing functions.

Nine families, each a Llama-style attention block whose MLP is (in some or all blocks) a router
plus routed experts stored as fused 3-D parameters (see `spec.Experts`):

    mixtral, phimoe, granitemoe   softmax / SparseMixer / top-k-softmax routing, no shared expert
    qwen2_moe                     a shared expert with its own sigmoid gate (`shared_expert_gate`)
    qwen3_moe, olmoe              softmax routing, renormalised when `norm_topk_prob`
    deepseek_v3, glm4_moe         sigmoid scores with `e_score_correction_bias`, grouped routing
                                  (`n_group` / `topk_group`), shared experts, dense first blocks
                                  (`first_k_dense_replace`); DeepSeek-V3 uses MLA attention
    gpt_oss                       top-k then softmax, router bias, transposed interleaved experts

A block without experts (DeepSeek's dense first blocks, Qwen's `mlp_only_layers`) is a dense
block: its MLP linears are listed in the groups like the shared experts', and a name a block does
not have is skipped there (`ModelSpec.experts` set means blocks may differ).

`route(moe, router, logits, excluded)` is the one function that cannot be declared: it reproduces
each family's router from its logits, with some experts excluded (their logit masked), which is
exactly what the router of a model without those experts computes. Leave-one-expert-out and NAEE
re-route with it; `tests/models/test_moe_specs.py` checks it against every family's own router.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .spec import Experts, ModelSpec, get_module, has_module

_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_DENSE_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _mlp_groups(prefix: str) -> tuple[tuple[str, ...], ...]:
    return ((f"{prefix}.gate_proj", f"{prefix}.up_proj"), (f"{prefix}.down_proj",))


MIXTRAL = ModelSpec(
    model_types=("mixtral",), blocks="model.layers", groups=_ATTENTION, embeddings=("model.embed_tokens",),
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "num_local_experts"),
)
PHIMOE = ModelSpec(
    model_types=("phimoe",), blocks="model.layers", groups=_ATTENTION, embeddings=("model.embed_tokens",),
    experts=Experts("mlp", "mlp.router", "mlp.experts", "num_local_experts", routing="sparsemixer"),
)
GRANITEMOE = ModelSpec(
    model_types=("granitemoe",), blocks="model.layers", groups=_ATTENTION, embeddings=("model.embed_tokens",),
    experts=Experts("block_sparse_moe", "block_sparse_moe.router", "block_sparse_moe.experts",
                    "num_local_experts", routing="topk-softmax"),
)
QWEN2_MOE = ModelSpec(
    model_types=("qwen2_moe",), blocks="model.layers", embeddings=("model.embed_tokens",),
    groups=_ATTENTION + _mlp_groups("mlp.shared_expert") + _DENSE_MLP,
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "num_experts", renormalize="norm_topk_prob",
                    shared=("mlp.shared_expert", "mlp.shared_expert_gate")),
)
QWEN3_MOE = ModelSpec(
    model_types=("qwen3_moe",), blocks="model.layers", embeddings=("model.embed_tokens",),
    groups=_ATTENTION + _DENSE_MLP,
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "num_local_experts", renormalize="norm_topk_prob"),
)
OLMOE = ModelSpec(
    model_types=("olmoe",), blocks="model.layers", groups=_ATTENTION, embeddings=("model.embed_tokens",),
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "num_experts", renormalize="norm_topk_prob"),
)
DEEPSEEK_V3 = ModelSpec(
    model_types=("deepseek_v3",), blocks="model.layers", embeddings=("model.embed_tokens",),
    groups=(("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"),  # MLA: read the normed residual
            ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
    + _mlp_groups("mlp.shared_experts") + _DENSE_MLP,
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "n_routed_experts", routing="sigmoid-grouped",
                    shared=("mlp.shared_experts",)),
)
GLM4_MOE = ModelSpec(
    model_types=("glm4_moe",), blocks="model.layers", embeddings=("model.embed_tokens",),
    groups=_ATTENTION + _mlp_groups("mlp.shared_experts") + _DENSE_MLP,
    experts=Experts("mlp", "mlp.gate", "mlp.experts", "n_routed_experts", routing="sigmoid-grouped",
                    shared=("mlp.shared_experts",)),
)
GPT_OSS = ModelSpec(
    model_types=("gpt_oss",), blocks="model.layers", groups=_ATTENTION, embeddings=("model.embed_tokens",),
    experts=Experts("mlp", "mlp.router", "mlp.experts", "num_local_experts", routing="topk-softmax",
                    transposed=True, interleaved=True),
)

MOE_SPECS = (MIXTRAL, PHIMOE, GRANITEMOE, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V3, GLM4_MOE, GPT_OSS)


def is_moe_block(block: nn.Module, moe: Experts) -> bool:
    """Whether this decoder block routes to experts (DeepSeek's first blocks are dense)."""
    return has_module(block, moe.experts)


def expert_count(block: nn.Module, moe: Experts) -> int:
    return int(get_module(block, moe.router).weight.shape[0])


def top_k(block: nn.Module, moe: Experts) -> int:
    return int(get_module(block, moe.router).top_k)


def groups_of(router: nn.Module) -> int:
    """Routing groups (DeepSeek-V3's `n_group`); 1 for ungrouped routers."""
    return int(getattr(router, "num_group", 1) or 1)


def _renormalize(moe: Experts, router: nn.Module) -> bool:
    if isinstance(moe.renormalize, bool):
        return moe.renormalize
    return bool(getattr(router, moe.renormalize))


def route(moe: Experts, router: nn.Module, logits: Tensor, excluded: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(weights (T, k) float32, experts (T, k)) that `router` chooses from its logits (T, E),
    with the experts in the boolean mask `excluded` (E,) unavailable: what the router of a model
    without them computes (their logit masked to -inf; for sigmoid routing, their choice score)."""
    logits = logits.float()
    k = router.top_k
    masked = logits if excluded is None else logits.masked_fill(excluded.to(logits.device), float("-inf"))
    if moe.routing == "softmax":
        probs = torch.softmax(masked, dim=-1)
        weights, chosen = torch.topk(probs, k, dim=-1)
        if _renormalize(moe, router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, chosen
    if moe.routing == "topk-softmax":
        values, chosen = torch.topk(masked, k, dim=-1)
        return torch.softmax(values, dim=-1), chosen
    if moe.routing == "sigmoid-grouped":
        return _route_grouped(router, logits, excluded)
    if moe.routing == "sparsemixer":
        from transformers.models.phimoe.modeling_phimoe import sparsemixer
        weights, chosen = sparsemixer(masked, jitter_eps=router.router_jitter_noise, training=False, top_k=k)
        return weights.float(), chosen
    raise ValueError(f"unknown routing kind {moe.routing!r}")


def _route_grouped(router: nn.Module, logits: Tensor, excluded: Tensor | None) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 / GLM-4-MoE: sigmoid scores; the choice adds `e_score_correction_bias`, keeps the
    best `topk_group` of `n_group` groups (a group scores the sum of its best two), then top-k;
    weights are the plain sigmoid scores, renormalised if `norm_topk_prob`, times the scaling."""
    scores = logits.sigmoid()                                                        # (T, E)
    choice = scores + router.e_score_correction_bias.float()
    if excluded is not None:
        choice = choice.masked_fill(excluded.to(choice.device), float("-inf"))
    tokens, experts = choice.shape
    groups = router.num_group
    group_scores = choice.view(tokens, groups, experts // groups).topk(2, dim=-1)[0].sum(dim=-1)   # (T, G)
    best_groups = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    allowed = torch.zeros_like(group_scores).scatter_(1, best_groups, 1).bool()
    allowed = allowed.unsqueeze(-1).expand(tokens, groups, experts // groups).reshape(tokens, experts)
    chosen = torch.topk(choice.masked_fill(~allowed, float("-inf")), k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, chosen)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, chosen


def expert_output(experts: nn.Module, x: Tensor, expert: int) -> Tensor:
    """Expert `expert`'s output on the tokens x (T, H), weight 1: the family's own experts module,
    told that every token goes to that expert alone (exact for every layout and activation)."""
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long, device=x.device)
    return experts(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))


def mixture(experts: nn.Module, x: Tensor, chosen: Tensor, weights: Tensor) -> Tensor:
    """The routed experts' weighted sum for tokens x (T, H) given a routing (T, k)."""
    return experts(x, chosen, weights.to(x.dtype))


def expert_matrix(experts: nn.Module, moe: Experts, name: str, expert: int) -> Tensor:
    """Expert `expert`'s `gate_up_proj` (2I, H) or `down_proj` (H, I) as an (out, in) view of the
    stored parameter (gpt-oss stores them transposed)."""
    W = getattr(experts, name)[expert]
    return W.T if moe.transposed else W


def expert_weights(experts: nn.Module, moe: Experts, expert: int) -> dict[str, Tensor]:
    """Views of one expert's matrices as (out, in): "gate" and "up" (I, H), "down" (H, I)."""
    gate_up = expert_matrix(experts, moe, "gate_up_proj", expert)                     # (2I, H)
    down = expert_matrix(experts, moe, "down_proj", expert)                           # (H, I)
    if moe.interleaved:
        gate, up = gate_up[0::2], gate_up[1::2]
    else:
        gate, up = gate_up.chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": down}


def _check_route_kinds() -> None:
    kinds = {"softmax", "topk-softmax", "sigmoid-grouped", "sparsemixer"}
    for spec in MOE_SPECS:
        if spec.experts.routing not in kinds:
            raise ValueError(f"{spec.model_types}: unknown routing {spec.experts.routing!r}")


_check_route_kinds()
__all__ = ["MOE_SPECS", "route", "expert_output", "mixture", "expert_matrix", "expert_weights", "is_moe_block",
           "expert_count", "top_k", "groups_of"]
