"""Architecture knowledge as data: one frozen `ModelSpec` per model family.

A spec says where the decoder blocks live and which linear layers inside a block read the
same input. Everything else (head geometry, GQA, biases) is read from `model.config` when
needed. Methods never name modules; the engine asks the spec.

`groups` lists the prunable linear layers of one block in execution order. Layers in the same
group read the same input tensor (q/k/v, gate/up), so they share one set of statistics (one
Hessian, one inverse) and, in true-sequential mode, are pruned together before the block moves
on to the next group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Heads:
    """A block's attention as one coupled group: q/k/v rows (producers) -> o columns (consumer).

    Removing a query head removes head_dim rows of q and the same head_dim columns of o; removing
    a KV group also removes its head_dim rows of k and v. A fused projection (Phi-3 `qkv_proj`,
    GPT-2 `c_attn`) names the same layer for q, k and v; its rows are [q heads | k heads | v heads].
    """
    module: str                     # the attention module (its head counts are updated in place)
    q: str
    k: str
    v: str
    o: str

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v


@dataclass(frozen=True)
class Channels:
    """A block's MLP as one coupled group: producer rows (gate, up) -> consumer columns (down).

    A fused producer (Phi-3 `gate_up_proj`) stacks `fused` row blocks ([gate | up]); channel c is
    row c of every block.
    """
    module: str
    producers: tuple[str, ...]
    consumer: str
    fused: int = 1


@dataclass(frozen=True)
class ConfigNames:
    """Where a family's config keeps the widths that structured pruning changes.

    `head_dim=None`: the family derives head_dim from hidden_size / heads (OPT, GPT-2), so a
    checkpoint with fewer heads cannot be described by a stock config (see `structured.py`).
    Bias flags are used only if the config class has them (Llama has both; Qwen2, Mistral and
    Phi-3 have none, so an output bias cannot be added there).
    """
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"   # None: multi-head attention (kv heads = heads)
    head_dim: str | None = "head_dim"
    intermediate: str = "intermediate_size"
    attention_bias: str | None = "attention_bias"  # config flag that gives q/k/v/o biases
    mlp_bias: str | None = "mlp_bias"              # config flag that gives gate/up/down biases


@dataclass(frozen=True)
class Experts:
    """A block's mixture of experts: a router, routed experts stored as fused 3-D parameters, and
    optional shared experts (never removed).

    transformers 5 stores the routed experts of a block in one module: `gate_up_proj` (E, 2I, H)
    and `down_proj` (E, H, I) (gpt-oss: transposed, (E, H, 2I) and (E, I, H), gate/up rows
    interleaved, with biases); the router holds a raw (E, H) `weight` (gpt-oss: and a bias;
    DeepSeek-V3/GLM-4-MoE: an `e_score_correction_bias` buffer). Every expert parameter and router
    tensor has the expert on dimension 0, which is what `surgery.keep_experts_` slices.

    `routing` names how the router turns logits into (weights, chosen experts); `models/moe.py`
    implements each kind and a test checks it against the family's own router:
        "softmax"          softmax over all experts, top-k, renormalised over the top-k when
                           `renormalize` (a bool, or the config flag that decides it)
        "topk-softmax"     top-k of the logits, softmax over those k (gpt-oss, GraniteMoE)
        "sigmoid-grouped"  sigmoid scores + `e_score_correction_bias`, best `topk_group` of `n_group`
                           groups, top-k inside them, optional renormalisation, scaled (DeepSeek-V3)
        "sparsemixer"      PhiMoE's SparseMixer (inference form)
    """
    module: str                         # the MoE block, relative to a decoder block ("mlp")
    router: str                         # its router ("mlp.gate"); returns (logits, weights, indices)
    experts: str                        # the fused experts module ("mlp.experts")
    count_key: str                      # the config key that counts routed experts
    routing: str = "softmax"
    renormalize: bool | str = True      # "softmax" routing: renormalise over the top-k (or the config flag)
    transposed: bool = False            # gpt-oss: (E, H, 2I) / (E, I, H) instead of (E, 2I, H) / (E, H, I)
    interleaved: bool = False           # gpt-oss: gate/up rows alternate instead of [gate | up]
    shared: tuple[str, ...] = ()        # shared experts (and their gates): never dropped
    residual_norm: str = "post_attention_layernorm"   # reads the residual stream entering the MoE


@dataclass(frozen=True)
class ModelSpec:
    model_types: tuple[str, ...]          # config.model_type values served by this spec
    blocks: str                           # dotted path of the nn.ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]   # linear names relative to a block, grouped by shared input
    embeddings: tuple[str, ...] = ()      # dotted paths of embedding modules (never pruned by default)
    lm_head: str = "lm_head"
    heads: Heads | None = None            # width pruning: the attention's coupled group
    channels: Channels | None = None      # width pruning: the MLP's coupled group
    config_names: ConfigNames = ConfigNames()
    experts: Experts | None = None        # MoE families: the block's experts (blocks without them are dense)

    def __post_init__(self):
        names = [name for group in self.groups for name in group]
        if len(names) != len(set(names)):
            raise ValueError(f"spec for {self.model_types}: a linear layer is listed twice: {names}")


def has_module(root: nn.Module, dotted: str) -> bool:
    try:
        root.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    """`get_module(model, "model.layers")` -> the module at that dotted path (clear error if absent)."""
    try:
        return root.get_submodule(dotted)
    except AttributeError as err:
        raise AttributeError(f"{type(root).__name__} has no submodule {dotted!r}; "
                             "the model spec does not fit this model") from err


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer whose weight is stored as (in, out))."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_view(module: nn.Module):
    """The weight as an (out, in) view, whatever the storage layout (Conv1D stores (in, out))."""
    return module.weight.T if is_conv1d(module) else module.weight


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear layer whose weight is stored (in, out). Matched by class name,
    so that transformers' module need not be imported to ask."""
    return type(module).__name__ == "Conv1D"


def in_features(module: nn.Module) -> int:
    return weight_view(module).shape[1]
