"""ShortGPT's Block Influence: remove the blocks that change their input the least.

Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
arXiv 2403.03853. With x_i the input of block i and x_{i+1} its output,

    BI_i = 1 - E_{windows, tokens} [ x_i . x_{i+1} / (|x_i| |x_{i+1}|) ]

averaged over every token of every calibration window. A block whose output points where its
input did (cosine 1, BI 0) adds little to the residual stream; the k blocks with the lowest BI are
removed. One dense pass, all blocks scored on the unpruned model (no re-scoring after a removal,
as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import global_mean
from ..depth import BlockChoice, DepthConfig, lowest
from ..core.stream import block_stream
from ..registry import register


@dataclass(frozen=True)
class BlockInfluenceConfig(DepthConfig):
    pass


def cosine_sum(inputs: list[Tensor], outputs: list[Tensor]) -> tuple[float, int]:
    """(sum of the cosine similarities between a block's input and output tokens, token count).

    inputs, outputs: one (batch, seq, hidden) tensor per calibration chunk.
    """
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs, strict=True):
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)       # (batch, seq)
        total += float(cos.sum(dtype=torch.float64))
        count += cos.numel()
    return total, count


def block_influence(inputs: list[Tensor], outputs: list[Tensor]) -> float:
    """1 - mean cosine similarity between a block's input and output, over every token."""
    total, count = cosine_sum(inputs, outputs)
    return 1.0 - total / count


@register("block-influence", BlockInfluenceConfig, scope="depth", calibrated=True)
def block_influence_method(model, calib: Tensor, cfg: BlockInfluenceConfig, *, device=None, batch_size: int = 8,
                           cache_device=None, progress: bool = True) -> BlockChoice:
    """Score every block by BI in one pass; choose the `cfg.blocks_to_remove` lowest.

    scores: {"block_influence": [BI_0, ..., BI_{L-1}]}.
    """
    scores = []
    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="score block-influence"):
        step.forward()
        scores.append(1.0 - global_mean(*cosine_sum(step.inputs, step.outputs)))   # over every process's windows
    return BlockChoice(lowest(scores, cfg.blocks_to_remove(len(scores))), {"block_influence": scores})
