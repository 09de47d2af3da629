"""Reverse-order: remove the deepest blocks, the final one included. Data-free.

Lu et al., "Reassessing Layer Pruning in LLMs: New Insights and Methods", arXiv 2411.15558. The
reverse-order criterion ranks a block's importance by its position alone, deeper = less important,
so removing n blocks of an L-block model removes blocks L-n, ..., L-1:

    remove = [L - n, ..., L - 1]            (e.g. 2 of 6 blocks -> [4, 5])

The paper's finding is that this criterion, followed by fine-tuning the `lm_head` and the last
three remaining blocks (`prunekit recover --method partial`, `recovery/partial.py`), beats the
metric-based selections it benchmarks (its recipe: prune the final 25% of the blocks).

What it matches: the final block is removed too. The paper states the recipe as "pruning the final
25% of layers", and the authors' pruning script keeps blocks 0 .. L-n-1, i.e. the last n blocks go,
the very last one included. This differs from `last-k`, whose default (`keep_last=1`) follows
Gromov et al. (arXiv 2403.17887) and keeps the final block; `reverse-order` equals
`last-k` with `keep_last=0`, registered under the paper's name so that a recipe says what it runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..depth import BlockChoice, DepthConfig, decoder_blocks
from ..registry import register


@dataclass(frozen=True)
class ReverseOrderConfig(DepthConfig):
    pass


def deepest_blocks(num_blocks: int, count: int) -> list[int]:
    """The `count` deepest of `num_blocks` blocks, the final one included, ascending."""
    if not 0 <= count <= num_blocks:
        raise ValueError(f"cannot remove {count} of {num_blocks} blocks")
    return list(range(num_blocks - count, num_blocks))


@register("reverse-order", ReverseOrderConfig, scope="depth", calibrated=False)
def reverse_order(model, calib: Tensor | None, cfg: ReverseOrderConfig, *, device=None, batch_size: int = 8,
                  cache_device=None, progress: bool = True) -> BlockChoice:
    """Data-free: ignores `calib` and the pass options. scores: {"importance": [L, L-1, ..., 1]},
    the reverse-order score of every block (higher is kept)."""
    num_blocks = len(decoder_blocks(model))
    removed = deepest_blocks(num_blocks, cfg.blocks_to_remove(num_blocks))
    return BlockChoice(removed, {"importance": [num_blocks - i for i in range(num_blocks)]},
                       [f"reverse-order removed the {len(removed)} deepest blocks, the final one included"])
