"""ssm-heads: remove whole SSM heads (Mamba-2) or inner channels (Mamba-1, FalconMamba), the same
share in every mixer, scored by a Wanda-style activation score; the result is a smaller standard
checkpoint (fewer `num_heads` / a smaller `expand`).

"On Pruning State-Space LLMs" (arXiv 2502.18886) finds that unstructured Wanda holds up to 50%
on Mamba while structured removal inside the SSM degrades quickly; this method is the structured
baseline of that comparison (`tests/models/test_ssm.py` measures both on a tiny trained Mamba-2).
The state dimension (d_state) is not pruned: the paper reports it collapses the model.

Score of unit u (a head's P channels, or one inner channel), from out_proj's weight W (out, I)
and its input X (tokens, I), the mixer's gated-norm output (Wanda, arXiv 2306.11695, Eq. 1,
summed over the unit's columns):

    S_u = sum_{c in u} sum_i |W_ic| * ||X_:,c||_2

Mamba-2 keeps the best H' / G heads of every B/C group (head h reads group h // (H/G)).
Blocks are scored and cut one at a time on the block stream, so later blocks are scored on the
outputs of the already-pruned ones.

Registration: scope "state" (`prune.prune_` hands it the whole model, `fn(model, calib, cfg, ...)`, and it
returns the `StructureReport` of what it removed). Only uniform counts whose inner
width a stock config can state (`expand` an integer) are offered; anything else is refused with
the sparsities that work.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.stream import block_stream
from ..report import StructureReport, parameter_counts
from ..models import spec_for
from ..models.spec import get_module
from ..registry import register
from ..ssm_surgery import SSM_CHANNEL_FAMILIES, SSM_HEAD_FAMILIES, keep_mamba2_heads_, keep_mamba_channels_, \
    kept_units_allowed, mamba2_geometry, write_ssm_config

MIXER = "mixer"      # the Mamba families' mixer, relative to a block (`models/ssm.py`)


@dataclass(frozen=True)
class SsmHeadsConfig:
    """sparsity: fraction of every mixer's SSM heads (Mamba-2) or inner channels (Mamba-1) to remove."""
    sparsity: float = 0.5

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be a fraction of the SSM heads in (0, 1), e.g. 0.5, got {self.sparsity!r}")



def unit_scores(W: Tensor, sq_norm: Tensor, width: int) -> Tensor:
    """S_u = sum over the unit's `width` columns of |W_ic| * ||X_c||: W (out, I), sq_norm (I,) the
    squared column norms of the input, -> (I / width,)."""
    score = W.abs().float() * sq_norm.float().sqrt()                       # (out, I)
    return score.sum(dim=0).view(-1, width).sum(dim=1)


def choose_heads(scores: Tensor, groups: int, keep: int) -> Tensor:
    """The `keep` best heads, `keep / groups` from each of the `groups` consecutive groups, sorted."""
    per_group = keep // groups
    heads = scores.numel() // groups
    best = scores.view(groups, heads).topk(per_group, dim=1).indices + torch.arange(groups)[:, None] * heads
    return best.flatten().sort().values


def _plan(model, sparsity: float) -> tuple[str, int, int, int]:
    """(kind, units per mixer, units kept, unit width) or a clear refusal."""
    model_type = model.config.model_type
    if model_type not in SSM_HEAD_FAMILIES + SSM_CHANNEL_FAMILIES:
        raise ValueError(f"ssm-heads removes the SSM heads of Mamba-2 or the inner channels of Mamba-1 / FalconMamba "
                         f"models ({', '.join(SSM_HEAD_FAMILIES + SSM_CHANNEL_FAMILIES)}), not {model_type!r}; "
                         "for other families use a width method (wanda-sp, flap) or an unstructured one (wanda)")
    mixer = get_module(get_module(model, spec_for(model).blocks)[0], MIXER)
    if model_type in SSM_HEAD_FAMILIES:
        heads, P, _, _ = mamba2_geometry(mixer)
        kind, units, width = "heads", heads, P
    else:
        kind, units, width = "channels", int(mixer.intermediate_size), 1
    keep = units - math.floor(sparsity * units + 0.5)
    allowed = kept_units_allowed(model.config, units, width)
    if keep not in allowed:
        offered = ", ".join(f"{1 - k / units:.4g}" for k in allowed) or "none"
        raise ValueError(f"sparsity={sparsity} keeps {keep} of {units} {kind} per mixer, an inner width of "
                         f"{keep * width} that {model_type}'s config cannot state (expand must be an integer, "
                         f"inner width = expand * hidden_size = multiple of {model.config.hidden_size}"
                         + (f", and a multiple of n_groups={model.config.n_groups} heads" if kind == "heads" else "")
                         + f"); sparsities that reload with stock transformers: {offered}")
    return kind, units, keep, width


@register("ssm-heads", SsmHeadsConfig, scope="state", calibrated=True)
def ssm_heads(model, calib: Tensor, cfg: SsmHeadsConfig, *, device=None, batch_size: int = 8,
              cache_device=None, progress: bool = True) -> StructureReport:
    """Score and remove SSM heads / inner channels block by block, in place; rewrite the config."""
    kind, units, keep, width = _plan(model, cfg.sparsity)
    block_params, model_params = parameter_counts(model)
    started = time.perf_counter()
    mixers, kept = [], {}
    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="score ssm-heads"):
        mixer = get_module(step.block, MIXER)
        sq_norm = torch.zeros(units * width, dtype=torch.float32, device=step.device)

        def accumulate(module, args, sq_norm=sq_norm):
            X = args[0].detach().float().reshape(-1, args[0].shape[-1])    # (tokens, I)
            sq_norm.add_(X.pow(2).sum(dim=0))

        handle = mixer.out_proj.register_forward_pre_hook(accumulate)
        try:
            step.forward()
        finally:
            handle.remove()
        scores = unit_scores(mixer.out_proj.weight.detach(), sq_norm, width)
        with torch.no_grad():
            if kind == "heads":
                chosen = choose_heads(scores.cpu(), int(mixer.n_groups), keep)
                keep_mamba2_heads_(mixer, chosen)
            else:
                chosen = scores.cpu().topk(keep).indices.sort().values
                keep_mamba_channels_(mixer, chosen)
        kept[step.index] = chosen.tolist()
        mixers.append(mixer)
        step.outputs = None          # run again: the next block sees the pruned outputs
        step.changed = True
    write_ssm_config(model, mixers)
    note = (f"ssm-heads: kept {keep} of {units} {kind} in each of {len(mixers)} mixers "
            f"(config: expand={model.config.expand}" + (f", num_heads={model.config.num_heads}" if kind == "heads"
                                                        else "") + "); d_state not pruned")
    block_after, model_after = parameter_counts(model)
    return StructureReport(method="ssm-heads", config=cfg, block_params_before=block_params,
                           block_params_after=block_after, model_params_before=model_params,
                           model_params_after=model_after, seconds=time.perf_counter() - started,
                           scores={"kept": kept}, notes=[note])
