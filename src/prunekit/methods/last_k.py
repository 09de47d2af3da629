"""Remove the last k blocks before the final `keep_last`: the data-free depth baseline.

Deep blocks are the most redundant ones in most LLMs (Gromov et al., arXiv 2403.17887; Men et
al., arXiv 2403.03853), so dropping a run of late blocks is the baseline every calibrated method
has to beat. The very last block is the exception: it turns the residual stream into next-token
features, and removing it costs far more than removing its neighbours. Gromov et al.'s simpler
heuristic therefore removes the deepest blocks but keeps the final one, which is the default
here (`keep_last=1`); `keep_last=0` removes the very last blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..depth import BlockChoice, DepthConfig, decoder_blocks
from ..registry import register


@dataclass(frozen=True)
class LastKConfig(DepthConfig):
    keep_last: int = 1      # final blocks that always stay; the k removed blocks end right before them

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"keep_last must be a number of final blocks to keep (>= 0), got {self.keep_last!r}")


def last_k_blocks(num_blocks: int, count: int, keep_last: int) -> list[int]:
    """The `count` blocks right before the final `keep_last` of `num_blocks`."""
    end = num_blocks - keep_last
    if count > end:
        raise ValueError(f"cannot remove {count} blocks before the last {keep_last} of {num_blocks}: "
                         f"lower keep_last to at most {num_blocks - count}")
    return list(range(end - count, end))


@register("last-k", LastKConfig, scope="depth", calibrated=False)
def last_k(model, calib: Tensor | None, cfg: LastKConfig, *, device=None, batch_size: int = 8, cache_device=None,
           progress: bool = True) -> BlockChoice:
    """Data-free: ignores `calib` and the pass options. No scores."""
    num_blocks = len(decoder_blocks(model))
    return BlockChoice(last_k_blocks(num_blocks, cfg.blocks_to_remove(num_blocks), cfg.keep_last))
