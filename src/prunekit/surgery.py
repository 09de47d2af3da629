"""Model surgery: change a model's shapes in place and keep its config describing them.

    keep_rows_ / keep_columns_   slice a linear layer's outputs / inputs (nn.Linear and GPT-2's Conv1D)
    permute_channels_            reorder the MLP's intermediate channels (same function, new order)
    set_head_counts              tell an attention module its new head counts
    enable_bias                  give a family's layers a bias where compensation needs one (FLAP)
    keep_experts_                keep some routed experts of an MoE block (experts, router rows, biases)
    block_widths / stock_widths  read every block's widths; the config values that describe them
    write_config / resize_to_    write uniform widths into the config; shrink a freshly built model
                                 to recorded (non-uniform) widths, which `load_pruned` needs
    drop_sublayer_               remove a block's attention or FFN (with the norm before it): the
                                 block keeps its residual path; its width is recorded as 0

What to remove is decided elsewhere (the width driver, `structured.py`; RIA's permutation in the
linear engine); this module only carries it out, from the family spec (`models/`).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .models import spec_for
from .models.moe import expert_count, is_moe_block
from .models.spec import get_module, is_conv1d, weight_view


def head_dim(config, spec) -> int:
    names = spec.config_names
    value = getattr(config, names.head_dim, None) if names.head_dim else None
    return int(value) if value else config.hidden_size // getattr(config, names.heads)


def head_counts(spec, config, block: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one block, from its weights' shapes."""
    h = spec.heads
    hd = head_dim(config, spec)
    n_heads = weight_view(get_module(block, h.o)).shape[1] // hd
    if h.fused:
        n_kv = (weight_view(get_module(block, h.q)).shape[0] - n_heads * hd) // (2 * hd)
    else:
        n_kv = weight_view(get_module(block, h.k)).shape[0] // hd
    return n_heads, n_kv, hd


def block_widths(model: nn.Module) -> list[dict]:
    """Per block: query heads, KV heads and FFN channels, read from the weights' shapes."""
    spec = spec_for(model)
    widths = []
    for block in get_module(model, spec.blocks):
        entry = {}
        if spec.heads is not None:
            dropped = isinstance(get_module(block, spec.heads.module), NoAttention)
            entry["heads"], entry["kv_heads"], _ = (0, 0, 0) if dropped else head_counts(spec, model.config, block)
        if spec.channels is not None:
            dropped = isinstance(get_module(block, spec.channels.module), NoMLP)
            entry["channels"] = 0 if dropped else weight_view(get_module(block, spec.channels.consumer)).shape[1]
        if spec.experts is not None and is_moe_block(block, spec.experts):
            entry["experts"] = expert_count(block, spec.experts)
        widths.append(entry)
    return widths


def enable_bias(model, spec, kind: str) -> bool:
    """Set the config flag that gives the group's layers biases and add zero biases to every block
    (a stock config has one flag for all blocks). False if the family has no such flag."""
    names = spec.config_names
    flag = names.attention_bias if kind == "heads" else names.mlp_bias
    if flag is None or not hasattr(model.config, flag):
        return False
    setattr(model.config, flag, True)
    h, c = spec.heads, spec.channels
    governed = {h.q, h.k, h.v, h.o} if kind == "heads" else {*c.producers, c.consumer}
    if flag == names.attention_bias == names.mlp_bias:       # OPT: one flag for every linear
        governed = {h.q, h.k, h.v, h.o, *c.producers, c.consumer}
    for block in get_module(model, spec.blocks):
        for name in governed:
            module = get_module(block, name)
            if module.bias is None:
                W = module.weight
                module.bias = nn.Parameter(torch.zeros(weight_view(module).shape[0], dtype=W.dtype, device=W.device))
    return True


def keep_rows_(module: nn.Module, rows: Tensor) -> None:
    """Keep only these output rows of a linear layer (weight and bias), in place."""
    conv1d = is_conv1d(module)
    W = module.weight.data                                                       # Linear (out, in); Conv1D (in, out)
    rows = rows.to(W.device)
    module.weight = nn.Parameter(W[:, rows].contiguous() if conv1d else W[rows].contiguous(),
                                 requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[rows].contiguous(), requires_grad=module.bias.requires_grad)
    if conv1d:
        module.nf = rows.numel()
    else:
        module.out_features = rows.numel()


def permute_channels_(block: nn.Module, channels, perm: Tensor) -> None:
    """Reorder the MLP's intermediate channels: producer rows and consumer columns by `perm`, in
    place. The block computes exactly the same function; the consumer's input columns are now in
    the order `perm` (RIA's channel permutation for N:M uses this)."""
    for name in channels.producers:
        module = get_module(block, name)
        inter = weight_view(module).shape[0] // channels.fused
        keep_rows_(module, torch.cat([perm + part * inter for part in range(channels.fused)]))
    keep_columns_(get_module(block, channels.consumer), perm)


# attributes that count a block's routed experts, in the modules of transformers 5's MoE families
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "out_features")


def keep_experts_(block: nn.Module, moe, keep: Tensor) -> None:
    """Keep only the routed experts `keep` (indices, in the order given) of one MoE block, in place.

    Every parameter and buffer of the experts module and of the router has the expert on
    dimension 0 (gate_up_proj, down_proj and their biases; the router's weight rows, its bias,
    `e_score_correction_bias`), so each is sliced there; then every attribute of the MoE module
    and its children that held the old count (`num_experts`, the PhiMoE router's `out_features`)
    gets the new one. Shared experts are separate modules and are not touched. The config is
    written by `write_config` once every block is done.
    """
    old = expert_count(block, moe)
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or int(keep.min()) < 0 or int(keep.max()) >= old:
        raise ValueError(f"experts to keep must be distinct indices in [0, {old}), got {keep.tolist()}")
    for module in (get_module(block, moe.experts), get_module(block, moe.router)):
        for name, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] == old:
                sliced = param.data[keep.to(param.device)].contiguous()
                setattr(module, name, nn.Parameter(sliced, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.dim() and buffer.shape[0] == old:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer[keep.to(buffer.device)].contiguous(), persistent=persistent)
    for module in get_module(block, moe.module).modules():
        for attribute in _EXPERT_COUNTS:
            if getattr(module, attribute, None) == old and not isinstance(getattr(module, attribute), bool):
                setattr(module, attribute, keep.numel())


def keep_columns_(module: nn.Module, columns: Tensor) -> None:
    """Keep only these input columns of a linear layer, in place."""
    conv1d = is_conv1d(module)
    W = module.weight.data
    columns = columns.to(W.device)
    module.weight = nn.Parameter(W[columns].contiguous() if conv1d else W[:, columns].contiguous(),
                                 requires_grad=module.weight.requires_grad)
    if conv1d:
        module.nx = columns.numel()
    else:
        module.in_features = columns.numel()


def set_head_counts(model, spec, index: int, report=None) -> None:
    """Tell the attention module its new head counts (each family reads different attributes).

    Modules that read head counts from the shared config in forward (Phi-3's fused split) get a
    copy of the config with this block's values when they differ from the model's.
    """
    block = get_module(model, spec.blocks)[index]
    attention = get_module(block, spec.heads.module)
    n_heads, n_kv, hd = head_counts(spec, model.config, block)
    values = {"num_heads": n_heads, "num_key_value_heads": n_kv, "num_key_value_groups": n_heads // n_kv,
              "split_size": n_heads * hd}
    for name, value in values.items():
        if hasattr(attention, name):
            setattr(attention, name, value)
    names = spec.config_names
    config = getattr(attention, "config", None)
    if config is not None and (getattr(config, names.heads) != n_heads or
                               (names.kv_heads and getattr(config, names.kv_heads) != n_kv)):
        if config is model.config:
            config = attention.config = copy.copy(model.config)
        setattr(config, names.heads, n_heads)
        if names.kv_heads:
            setattr(config, names.kv_heads, n_kv)
        if names.head_dim:
            setattr(config, names.head_dim, hd)


def stock_widths(model: nn.Module) -> dict | None:
    """The config values that describe every block, or None if the blocks differ (non-uniform) or
    the family cannot express them (OPT/GPT-2 derive head_dim from hidden_size / heads)."""
    spec = spec_for(model)
    widths = block_widths(model)
    counts = {w["experts"] for w in widths if "experts" in w}          # dense blocks of an MoE model have none
    widths = [{k: v for k, v in w.items() if k != "experts"} for w in widths]
    if any(w != widths[0] for w in widths) or len(counts) > 1 or 0 in widths[0].values():
        return None                     # (0: a removed sublayer, which no stock config describes)
    names = spec.config_names
    values = {spec.experts.count_key: counts.pop()} if counts else {}
    if "heads" in widths[0]:
        hd = head_dim(model.config, spec)
        if names.head_dim is None and widths[0]["heads"] * hd != model.config.hidden_size:
            return None
        values[names.heads] = widths[0]["heads"]
        if names.kv_heads:
            values[names.kv_heads] = widths[0]["kv_heads"]
        if names.head_dim:
            values[names.head_dim] = hd
    if "channels" in widths[0]:
        values[names.intermediate] = widths[0]["channels"]
    return values


def uneven_experts(model: nn.Module) -> bool:
    """An MoE whose blocks keep different numbers of routed experts: no stock config sizes it, so it
    is saved with the in-memory (fused) names and loads with `load_pruned`."""
    spec = spec_for(model)
    return spec.experts is not None and len({w["experts"] for w in block_widths(model) if "experts" in w}) > 1


def write_config(model: nn.Module) -> bool:
    """Write uniform widths into `model.config` (True), or leave it for `load_pruned` (False).

    With a stock config the attention modules can share the model's config again."""
    values = stock_widths(model)
    if values is None:
        return False
    for name, value in values.items():
        setattr(model.config, name, value)
    spec = spec_for(model)
    if spec.experts is not None and spec.experts.count_key in values and hasattr(model, "num_experts"):
        model.num_experts = values[spec.experts.count_key]       # Qwen/OLMoE's causal-LM class keeps a copy
    if spec.heads is not None:
        for block in get_module(model, spec.blocks):
            attention = get_module(block, spec.heads.module)
            if getattr(attention, "config", None) is not None:
                attention.config = model.config
    if spec.channels is not None:
        for block in get_module(model, spec.blocks):
            mlp = get_module(block, spec.channels.module)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = values.get(spec.config_names.intermediate, mlp.intermediate_size)
    return True


def resize_to_(model: nn.Module, widths: list[dict]) -> None:
    """Shrink a freshly built model's blocks to recorded widths (the first heads/channels of each),
    so a non-uniform checkpoint's weights fit; used by `load_pruned`."""
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    if len(widths) != len(blocks):
        raise ValueError(f"the recorded widths list {len(widths)} blocks, the config builds {len(blocks)}")
    for index, (block, width) in enumerate(zip(blocks, widths)):
        if width.get("heads") == 0:
            drop_sublayer_(model, index, "attention")
        if width.get("channels") == 0:
            drop_sublayer_(model, index, "mlp")
        if spec.heads is not None and width.get("heads"):
            n_heads, n_kv, hd = head_counts(spec, model.config, block)
            per_kv = n_heads // n_kv
            if width["kv_heads"] > n_kv or width["heads"] > n_heads or width["heads"] % width["kv_heads"]:
                raise ValueError(f"block {index}: recorded heads {width} do not fit the config")
            keep_heads = torch.cat([torch.arange(width["heads"] // width["kv_heads"]) + g * per_kv
                                    for g in range(width["kv_heads"])])
            q = torch.cat([torch.arange(hd) + h * hd for h in keep_heads.tolist()])
            kv = torch.arange(width["kv_heads"] * hd)
            h = spec.heads
            if h.fused:
                keep_rows_(get_module(block, h.q), torch.cat([q, n_heads * hd + kv, (n_heads + n_kv) * hd + kv]))
            else:
                keep_rows_(get_module(block, h.q), q)
                keep_rows_(get_module(block, h.k), kv)
                keep_rows_(get_module(block, h.v), kv)
            keep_columns_(get_module(block, h.o), q)
            set_head_counts(model, spec, index)
        if spec.channels is not None and width.get("channels"):
            c = spec.channels
            n = weight_view(get_module(block, c.consumer)).shape[1]
            keep = torch.arange(width["channels"])
            for name in c.producers:
                keep_rows_(get_module(block, name), torch.cat([keep + k * n for k in range(c.fused)]))
            keep_columns_(get_module(block, c.consumer), keep)
        if spec.experts is not None and "experts" in width:
            if width["experts"] > expert_count(block, spec.experts):
                raise ValueError(f"block {index}: recorded {width['experts']} experts, the config builds fewer")
            keep_experts_(block, spec.experts, torch.arange(width["experts"]))


def structure_record(model: nn.Module) -> dict:
    """The "structure" entry of prunekit.json: whether a stock config describes the model, and
    every block's widths (what `load_pruned` re-slices a fresh model to)."""
    widths = block_widths(model)
    return {"stock": stock_widths(model) is not None, "num_blocks": len(widths), "widths": widths}


# Families whose block is x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)): removing a
# sublayer with the norm before it leaves exactly the residual path.
SUBLAYER_NORMS = {"attention": "input_layernorm", "mlp": "post_attention_layernorm"}
SUBLAYER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class NoAttention(nn.Module):
    """A removed attention sublayer: adds nothing to the residual stream. It still tells the KV cache how
    many positions went by, since the model reads the sequence length (and so the positions of new tokens)
    from the cache of layer 0, which may be this one: it stores a zero key and value of one head of one
    number per token (a cache of 0 heads would hold no elements, and transformers counts an empty cache
    layer as length 0). The block passes it the cache as `cache` (transformers >= 5.24, the floor)."""

    CACHE_PER_TOKEN = 2          # cached elements per token: one key number and one value number

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: Tensor, *args, cache=None, **kwargs):
        if cache is not None:
            zero = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(zero, zero, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """A removed FFN sublayer: adds nothing to the residual stream."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        return torch.zeros_like(hidden_states)


def drop_sublayer_(model: nn.Module, index: int, kind: str) -> None:
    """Remove block `index`'s attention (kind "attention") or FFN ("mlp") and the norm that feeds it, in
    place. The block then passes that half of its residual path through unchanged."""
    if model.config.model_type not in SUBLAYER_FAMILIES:
        raise ValueError(f"removing a block's attention or FFN is supported for {', '.join(SUBLAYER_FAMILIES)}, "
                         f"not {model.config.model_type!r} (its block has another norm layout)")
    if kind not in SUBLAYER_NORMS:
        raise ValueError(f"a sublayer is 'attention' or 'mlp', got {kind!r}")
    spec = spec_for(model)
    block = get_module(model, spec.blocks)[index]
    name = spec.heads.module if kind == "attention" else spec.channels.module
    current = get_module(block, name)
    if isinstance(current, (NoAttention, NoMLP)):
        raise ValueError(f"block {index}'s {kind} was already removed")
    if kind == "attention":
        replacement = NoAttention(getattr(current, "layer_idx", index))
    else:
        replacement = NoMLP()
    setattr(block, name, replacement)
    setattr(block, SUBLAYER_NORMS[kind], nn.Identity())
