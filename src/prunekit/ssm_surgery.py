"""Structured surgery for Mamba mixers: keep some SSM heads (Mamba-2) or inner channels (Mamba-1)
and slice every tensor whose shape depends on them, so the result is a smaller standard checkpoint.

"On Pruning State-Space LLMs" (arXiv 2502.18886) compares unstructured pruning of Mamba's
projections with structured removal of the SSM's own dimensions; this file is the structured
side's surgery (scoring lives in `methods/ssm_heads.py`). The state dimension (d_state, B/C rows)
is never sliced here: the paper reports that pruning it collapses the model.

Mamba-2 mixer (`Mamba2Mixer`), H heads of P = head_dim channels, G groups, N = d_state, I = H*P:

    in_proj rows   [ z (I) | x (I) | B (G*N) | C (G*N) | dt (H) ]   head h: z/x rows h*P..h*P+P, dt row h
    conv1d         depthwise over [ x (I) | B | C ]                   head h: channels h*P..h*P+P
    A_log, D, dt_bias  (H,)                                           head h: entry h
    norm.weight    (I,), a gated RMSNorm over G groups of I/G        head h: entries h*P..h*P+P
    out_proj cols  (I,)                                              head h: columns h*P..h*P+P

Head h reads B/C of group h // (H/G), so every group keeps the same number of heads and the kept
heads stay in order. The gated RMSNorm averages over a group's channels; with fewer channels
the mean is over fewer terms, so the norm weight is scaled by sqrt(H/H') to give the kept heads
exactly what they receive in the model where the removed heads output zero (`mask_mamba2_heads_`),
up to the norm's epsilon (it is added to a mean that is H/H' times larger).

Mamba-1 mixer (`MambaMixer`, also FalconMamba), I inner channels, R = time_step_rank:

    in_proj rows   [ x (I) | z (I) ]      conv1d channels (I)    x_proj columns (I)
    dt_proj rows + bias (I)               A_log rows (I, N)      D (I)      out_proj columns (I)

x_proj reads every channel (dt, B and C mix them), so removing channel c equals zeroing x_proj's
and out_proj's column c (`mask_mamba_channels_`), exactly.

A config can express the result only when the kept inner width is `expand * hidden_size` with an
integer `expand` (transformers' Mamba configs validate it as an int); `kept_units_allowed` lists
the counts that reload with stock `from_pretrained`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SSM_HEAD_FAMILIES = ("mamba2",)
SSM_CHANNEL_FAMILIES = ("mamba", "falcon_mamba")


def _slice_linear_(linear: nn.Linear, rows: Tensor | None = None, columns: Tensor | None = None) -> None:
    """Keep the given output rows and/or input columns of `linear`, in place."""
    W = linear.weight.data                                          # (out, in)
    if rows is not None:
        W = W[rows.to(W.device)]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows.to(W.device)].clone())
        linear.out_features = W.shape[0]
    if columns is not None:
        W = W[:, columns.to(W.device)]
        linear.in_features = W.shape[1]
    linear.weight = nn.Parameter(W.clone())


def _slice_conv_(conv: nn.Conv1d, channels: Tensor) -> None:
    """Keep the given channels of a depthwise conv1d (weight (C, 1, K), bias (C,))."""
    channels = channels.to(conv.weight.device)
    conv.weight = nn.Parameter(conv.weight.data[channels].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data[channels].clone())
    conv.in_channels = conv.out_channels = conv.groups = int(channels.numel())


def _slice_param_(module: nn.Module, name: str, index: Tensor) -> None:
    value = getattr(module, name)
    setattr(module, name, nn.Parameter(value.data[index.to(value.device)].clone()))


def mamba2_geometry(mixer: nn.Module) -> tuple[int, int, int, int]:
    """(heads H, head_dim P, groups G, d_state N) of a Mamba-2 mixer, from its current shapes."""
    return int(mixer.num_heads), int(mixer.head_dim), int(mixer.n_groups), int(mixer.ssm_state_size)


def check_heads(mixer: nn.Module, keep: Tensor) -> Tensor:
    """`keep` sorted and checked: distinct heads, at least one, the same number in every group."""
    heads, _, groups, _ = mamba2_geometry(mixer)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().unique(sorted=True)
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= heads:
        raise ValueError(f"keep must name heads in 0..{heads - 1}, at least one, got {keep.tolist()}")
    per_group = torch.bincount(keep // (heads // groups), minlength=groups)
    if not bool((per_group == per_group[0]).all()):
        raise ValueError(f"every one of the {groups} B/C groups must keep the same number of heads "
                         f"(head h reads group h // {heads // groups}); kept per group: {per_group.tolist()}")
    return keep


def keep_mamba2_heads_(mixer: nn.Module, keep: Tensor) -> None:
    """Keep the SSM heads `keep` of a Mamba-2 mixer, in place (see the module docstring)."""
    keep = check_heads(mixer, keep)
    heads, P, groups, N = mamba2_geometry(mixer)
    inner = heads * P
    channels = (keep[:, None] * P + torch.arange(P)).flatten()            # (H'*P,) inner channels kept
    bc = torch.arange(inner, inner + 2 * groups * N)                       # conv / x-B-C rows of B and C
    rows = torch.cat([channels, inner + channels, inner + bc, 2 * inner + 2 * groups * N + keep])
    _slice_linear_(mixer.in_proj, rows=rows)
    _slice_conv_(mixer.conv1d, torch.cat([channels, bc]))
    for name in ("A_log", "D", "dt_bias"):
        _slice_param_(mixer, name, keep)
    kept = int(keep.numel())
    norm = mixer.norm
    norm.weight = nn.Parameter(norm.weight.data[channels.to(norm.weight.device)].clone() * math.sqrt(heads / kept))
    norm.group_size = kept * P // groups
    _slice_linear_(mixer.out_proj, columns=channels)
    mixer.num_heads = kept
    mixer.intermediate_size = kept * P
    mixer.conv_dim = kept * P + 2 * groups * N


def mask_mamba2_heads_(mixer: nn.Module, removed: Tensor) -> None:
    """Make the heads `removed` output zero, shapes unchanged: their x rows of in_proj and their
    conv1d channels (weight and bias) are zeroed, so x = silu(0) = 0, the state stays 0 and
    y = C h + D x = 0. The reference that `keep_mamba2_heads_` must reproduce."""
    heads, P, _, _ = mamba2_geometry(mixer)
    removed = torch.as_tensor(removed, dtype=torch.long).flatten()
    channels = (removed[:, None] * P + torch.arange(P)).flatten()
    with torch.no_grad():
        mixer.in_proj.weight[heads * P + channels] = 0
        if mixer.in_proj.bias is not None:
            mixer.in_proj.bias[heads * P + channels] = 0
        mixer.conv1d.weight[channels] = 0
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias[channels] = 0


def keep_mamba_channels_(mixer: nn.Module, keep: Tensor) -> None:
    """Keep the inner channels `keep` of a Mamba-1 / FalconMamba mixer, in place."""
    inner = int(mixer.intermediate_size)
    keep = torch.as_tensor(keep, dtype=torch.long).flatten().unique(sorted=True)
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= inner:
        raise ValueError(f"keep must name inner channels in 0..{inner - 1}, at least one, got {keep.tolist()}")
    _slice_linear_(mixer.in_proj, rows=torch.cat([keep, inner + keep]))
    _slice_conv_(mixer.conv1d, keep)
    _slice_linear_(mixer.x_proj, columns=keep)
    _slice_linear_(mixer.dt_proj, rows=keep)
    for name in ("A_log", "D"):
        _slice_param_(mixer, name, keep)
    _slice_linear_(mixer.out_proj, columns=keep)
    mixer.intermediate_size = int(keep.numel())


def mask_mamba_channels_(mixer: nn.Module, removed: Tensor) -> None:
    """Zero x_proj's and out_proj's columns of the channels `removed`: what removing them computes."""
    removed = torch.as_tensor(removed, dtype=torch.long).flatten()
    with torch.no_grad():
        mixer.x_proj.weight[:, removed] = 0
        mixer.out_proj.weight[:, removed] = 0


def kept_units_allowed(config, units: int, unit_width: int) -> list[int]:
    """Kept unit counts whose inner width `kept * unit_width` a stock config can state: a multiple of
    hidden_size (integer `expand`) below the current width; for Mamba-2 also a multiple of n_groups."""
    hidden = int(config.hidden_size)
    groups = int(getattr(config, "n_groups", 1)) if config.model_type in SSM_HEAD_FAMILIES else 1
    return [k for k in range(1, units) if (k * unit_width) % hidden == 0 and k % groups == 0]


def write_ssm_config(model: nn.Module, mixers: list[nn.Module]) -> None:
    """Rewrite the config fields that size the mixers (every mixer must have the same width)."""
    config = model.config
    widths = {int(m.intermediate_size) for m in mixers}
    if len(widths) != 1:
        raise ValueError(f"the mixers have different inner widths {sorted(widths)}; a stock config states one")
    inner = widths.pop()
    if inner % config.hidden_size:
        raise ValueError(f"inner width {inner} is not a multiple of hidden_size {config.hidden_size}: the config's "
                         "integer `expand` cannot state it")
    if config.model_type in SSM_HEAD_FAMILIES:
        config.num_heads = int(mixers[0].num_heads)
    config.expand = inner // config.hidden_size
    if hasattr(config, "intermediate_size") and config.model_type in SSM_CHANNEL_FAMILIES:
        config.intermediate_size = inner
