"""Angular distance: remove the run of n consecutive blocks that changes the hidden state least.

Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887. With
x_l the input of block l, n the number of blocks to remove and

    d(x_l, x_{l+n}) = arccos( x_l . x_{l+n} / (|x_l| |x_{l+n}|) ) / pi        (in [0, 1])

between the input of block l and the output of block l+n-1, averaged over the calibration
windows, the blocks l*, ..., l*+n-1 with l* = argmin_l d are removed: a consecutive run, chosen
once on the unpruned model. (The paper then heals the model with QLoRA; that is a separate
recovery step here.)

`token` chooses where the distance is measured:
  "last"  the last token of every window, as in the paper. The default, to match the paper's
          choices; it keeps only one vector per window and boundary in memory.
  "all"   the mean over every token of every window: more measurements per window (less noise
          with few windows) but it keeps n+1 boundaries' full hidden states in memory at once.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import global_mean
from ..depth import BlockChoice, DepthConfig, decoder_blocks
from ..core.stream import block_stream
from ..registry import register

TOKENS = ("last", "all")


@dataclass(frozen=True)
class AngularConfig(DepthConfig):
    token: str = "last"      # "last": last token of each window (paper); "all": every token

    def __post_init__(self):
        super().__post_init__()
        if self.token not in TOKENS:
            raise ValueError(f"token must be one of {TOKENS} ('last' as in the paper), got {self.token!r}")


def angular_distance(x: Tensor, y: Tensor) -> Tensor:
    """arccos(cos(x, y)) / pi for every row: x, y (rows, hidden) -> (rows,), in [0, 1]."""
    cos = F.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def angular_distance_sum(x: list[Tensor], y: list[Tensor]) -> tuple[float, int]:
    """(sum of `angular_distance` over all rows of two boundaries, row count); lists of (rows, hidden) chunks."""
    total = sum(float(angular_distance(a, b).sum(dtype=torch.float64)) for a, b in zip(x, y, strict=True))
    return total, sum(a.shape[0] for a in x)


def _kept_tokens(hidden: list[Tensor], token: str) -> list[Tensor]:
    """The rows of a boundary that the distance uses: (rows, hidden) views or copies."""
    if token == "last":           # a copy, so the full hidden states can be freed
        return [torch.cat([h[:, -1, :] for h in hidden]).float()]
    return [h.reshape(-1, h.shape[-1]) for h in hidden]


@register("angular", AngularConfig, scope="depth", calibrated=True)
def angular(model, calib: Tensor, cfg: AngularConfig, *, device=None, batch_size: int = 8, cache_device=None,
            progress: bool = True) -> BlockChoice:
    """One dense pass; remove blocks l*..l*+n-1 with l* = argmin_l d(x_l, x_{l+n}).

    scores: {"angular_distance": [d(x_l, x_{l+n}) for l = 0 .. L-n]} (index = first block of the run).
    """
    count = cfg.blocks_to_remove(len(decoder_blocks(model)))
    window: deque = deque(maxlen=count + 1)      # the last n+1 boundaries: all a distance needs
    distances: list[float] = []                  # distances[l] = d(x_l, x_{l+n})

    def boundary(hidden: list[Tensor]) -> None:
        window.append(_kept_tokens(hidden, cfg.token))
        if len(window) == count + 1:
            distances.append(global_mean(*angular_distance_sum(window[0], window[-1])))   # every process's windows

    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="score angular"):
        boundary(step.inputs)
        step.forward()
    boundary(step.outputs)
    start = min(range(len(distances)), key=lambda i: (distances[i], i))
    return BlockChoice(list(range(start, start + count)), {"angular_distance": distances},
                       notes=[f"angular distance {distances[start]:.4f} across blocks {start}..{start + count - 1}"])

