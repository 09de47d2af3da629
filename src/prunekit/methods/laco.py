"""LaCo, layer collapse: merge runs of blocks into the block below them, top-down.

Yang et al., "LaCo: Large Language Model Pruning via Layer Collapse", arXiv 2402.11187.

Merge (Reserving-Differences-while-Seeking-Common): collapsing the m-1 blocks after block l into l

    theta_l <- theta_l + sum_{k=1}^{m-1} (theta_{l+k} - theta_l)

keeps block l's parameters as the common part and adds every later block's difference from them.
(With m = 2 this is theta_{l+1}: the collapse amounts to deleting block l.)
Every parameter of the block is merged, norms included: the paper states the merge for the
layer's parameters. (The authors' notebooks merge only the seven linear weights, and their
in-place loop subtracts the already-updated theta_l, which makes the result a copy of the last
merged block; this file follows the paper's equation.)

Search (the paper's Algorithm 1), from the top down:
  * l starts where the first collapse ends one block below the last: the final block is never
    merged away, as in the authors' code (it matters most; see `last_k.py`).
  * merge, then compare the merged model with the original one on the calibration windows: the
    cosine similarity of their final hidden states (after the final norm, flattened per window,
    as the authors' `hidden_states[-1]`), averaged over the windows.
  * similarity >= threshold: accept, and move down by `interval` (never above the highest l whose
    collapse stays full and below the final block); otherwise move down by one.
  * stop below `min_layer`, or as soon as the requested number of blocks is gone: the last
    collapse merges only as many blocks as are still needed, so the count is exact.

Defaults (merge 4, interval 2, threshold 0.65) are a starting point in the range of the authors'
settings for 7B-13B models (their Llama-13B notebook: merge 7, interval 1, threshold 0.45); the
knobs are model-specific. On small models whose neighbouring blocks differ a lot, a collapse of 3
or more blocks can destroy the output (SmolLM2-135M: similarity <= 0.55 for every collapse of 3,
<= 0.08 for 4); the error then says how far the search got and which threshold would accept more.

Cost: the search only moves down, so the blocks below l are still the original ones and their
outputs (the dense hidden states, cached once) are reused: an attempt at l runs the merged block
and the current blocks above it, about L^2/2 block forwards for the whole search over the windows
used (`samples`). The model is changed only when the search succeeds.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..depth import BlockCache, BlockChoice, DepthConfig, first_windows, onloaded
from ..distributed import global_mean
from ..registry import register


@dataclass(frozen=True)
class LaCoConfig(DepthConfig):
    merge: int = 4              # m: blocks per collapse (the base and the m-1 blocks merged into it)
    threshold: float = 0.65     # accept a collapse if the final hidden states keep this cosine similarity
    interval: int = 2           # after an accepted collapse at l, try l - interval next
    min_layer: int = 1          # lowest block that may be merged into (block 0 reads raw embeddings)
    samples: int | None = None  # use only the first N calibration windows; None: all

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("merge", 2), ("interval", 1), ("min_layer", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1 <= self.threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold!r}")
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 1):
            raise ValueError(f"samples must be a positive number of calibration windows or None (all), "
                             f"got {self.samples!r}")


def collapse(base: dict[str, Tensor], followers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """theta_base + sum_k (theta_k - theta_base) for every parameter, computed in float32."""
    merged = {}
    for name, theta in base.items():
        W = theta.float()
        merged[name] = (W + sum(follower[name].float() - W for follower in followers)).to(theta.dtype)
    return merged


def window_similarity(x: list[Tensor], y: list[Tensor]) -> float:
    """Mean over windows of the cosine similarity of two windows' hidden states, each flattened
    (over the windows of every process, under distributed calibration).

    x, y: one (windows, seq, hidden) tensor per calibration chunk.
    """
    sims = [F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1) for a, b in zip(x, y, strict=True)]
    return global_mean(sum(float(s.sum(dtype=torch.float64)) for s in sims), sum(s.numel() for s in sims))


def merged_block(base: nn.Module, followers: list[nn.Module]) -> nn.Module:
    """A copy of `base` whose parameters are `collapse`d with those of `followers`."""
    block = copy.deepcopy(base)
    merged = collapse(dict(base.named_parameters()), [dict(f.named_parameters()) for f in followers])
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.copy_(merged[name])
    return block


@register("laco", LaCoConfig, scope="depth", calibrated=True)
def laco(model, calib: Tensor, cfg: LaCoConfig, *, device=None, batch_size: int = 8, cache_device=None,
         progress: bool = True) -> BlockChoice:
    """The top-down collapse search (module docstring); writes the merged blocks only on success.

    scores: {"attempts": [{"base": l, "merged": [blocks], "similarity": s, "accepted": bool}]}, in
    the input model's numbering, in search order.
    """
    windows = first_windows(calib, cfg.samples)
    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="cache laco")
    count = cfg.blocks_to_remove(cache.num_blocks)
    reference = cache.final_hidden(cache.output)
    blocks = [step.block for step in cache.steps]
    current = list(range(cache.num_blocks))    # the merged model's blocks, as input indices
    replaced: dict[int, nn.Module] = {}        # input index -> its merged block
    removed: list[int] = []
    attempts = []
    position = len(current) - 1 - cfg.merge
    while len(removed) < count and position >= cfg.min_layer:
        base = current[position]               # == position: nothing at or below it has changed
        followers = current[position + 1: position + min(cfg.merge, count - len(removed) + 1)]
        parts = [replaced.get(base, blocks[base])] + [replaced.get(i, blocks[i]) for i in followers]
        with onloaded(torch.device("cpu"), *parts):          # out of core: read them from disk
            candidate = merged_block(parts[0], parts[1:])
        output = cache.run(base, cache.inputs[base], skip=removed + followers, replace={**replaced, base: candidate})
        similarity = window_similarity(cache.final_hidden(output), reference)
        accepted = similarity >= cfg.threshold
        attempts.append({"base": base, "merged": followers, "similarity": similarity, "accepted": accepted})
        if accepted:
            replaced[base] = candidate
            removed += followers
            current = [i for i in current if i not in followers]
            position = min(position - cfg.interval, len(current) - 1 - cfg.merge)
        else:
            position -= 1
    if len(removed) < count:
        raise ValueError(_shortfall(cfg, count, removed, attempts))
    for base, block in replaced.items():
        with torch.no_grad(), onloaded(torch.device("cpu"), blocks[base], block, changed=True):
            for target, merged in zip(blocks[base].parameters(), block.parameters()):
                target.copy_(merged)
    merges = [f"{a['merged']} into {a['base']}" for a in attempts if a["accepted"]]
    return BlockChoice(removed, {"attempts": attempts},
                       [f"LaCo merged blocks {'; '.join(merges)} (the kept blocks were changed in place)"])


def _shortfall(cfg: LaCoConfig, count: int, removed: list[int], attempts: list[dict]) -> str:
    """Why the search fell short, and which knob to turn."""
    rejected = [a["similarity"] for a in attempts if not a["accepted"]]
    if rejected:
        best = math.floor(max(rejected) * 1e4) / 1e4          # rounded down: a threshold that accepts it
        hint = f"the most similar rejected collapse reached {best}: lower threshold to that or below"
    else:
        hint = "no collapse was rejected but the search reached min_layer: lower min_layer or interval, or raise merge"
    message = (f"LaCo removed only {len(removed)} of the {count} requested blocks with threshold={cfg.threshold}, "
               f"merge={cfg.merge}, interval={cfg.interval}, min_layer={cfg.min_layer} ({len(attempts)} collapses "
               f"tried); {hint}")
    return message + (f"; or ask for at most layers={len(removed)}" if removed else "")
