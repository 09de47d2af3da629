"""SLEB: greedily remove the block whose removal hurts calibration perplexity least.

Song et al., "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks", arXiv 2402.09025 (Algorithm 1). Repeated k times on the current model:

    for every remaining block j: perplexity of the calibration windows without block j
    remove the j with the lowest perplexity

Unlike one-shot scores (block influence, angular distance), each step re-scores the model that the
earlier removals left, so redundancy that only appears after a removal is seen.

Cost, with the hidden states at every block boundary cached (`depth.BlockCache`): the candidate
"without j" restarts from block j's cached input, so a step with n remaining blocks runs about
n^2/2 block forwards plus n LM-head passes, and refreshing the cache after the removal runs the
blocks after it once more: about L^2/2 block forwards per removal, k L^2/2 in all, over the
windows used. `samples` limits the search to the first N calibration windows (the time is linear
in it; memory is L+1 copies of the hidden states of those windows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..distributed import all_sum
from ..depth import BlockCache, BlockChoice, DepthConfig, first_windows
from ..registry import register


@dataclass(frozen=True)
class SLEBConfig(DepthConfig):
    samples: int | None = None     # use only the first N calibration windows for the search; None: all

    def __post_init__(self):
        super().__post_init__()
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 1):
            raise ValueError(f"samples must be a positive number of calibration windows or None (all), "
                             f"got {self.samples!r}")


def greedy_choice(perplexities: dict[int, float]) -> int:
    """The candidate block whose removal gives the lowest perplexity (ties: the lower index)."""
    return min(perplexities, key=lambda j: (perplexities[j], j))


@register("sleb", SLEBConfig, scope="depth", calibrated=True)
def sleb(model, calib: Tensor, cfg: SLEBConfig, *, device=None, batch_size: int = 8, cache_device=None,
         progress: bool = True) -> BlockChoice:
    """k greedy steps over the current model (see the module docstring).

    scores: {"dense_perplexity": ppl of the unpruned model on the windows used,
             "steps": [{"removed": j, "perplexity": ppl after removing it,
                        "candidates": [ppl without block i, for every block i; None if already removed]}]}
    """
    windows = first_windows(calib, cfg.samples)
    cache = BlockCache(model, windows, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress, desc="cache sleb")
    count = cfg.blocks_to_remove(cache.num_blocks)
    dense = math.exp(cache.loss())
    steps = []
    for number in range(count):
        candidates = [j for j in range(cache.num_blocks) if j not in cache.removed]
        perplexities = {}
        for j in _progress(candidates, f"sleb removal {number + 1}/{count}", progress):
            perplexities[j] = math.exp(cache.loss([j]))
        best = greedy_choice(perplexities)
        cache.remove(best)
        steps.append({"removed": best, "perplexity": perplexities[best],
                      "candidates": [perplexities.get(i) for i in range(cache.num_blocks)]})
    order = [step["removed"] for step in steps]
    used, = all_sum(windows.shape[0])                   # every process's windows
    notes = [f"removal order {order}; calibration perplexity {dense:.3f} -> {steps[-1]['perplexity']:.3f} "
             f"on {used:.0f} windows of {windows.shape[1]} tokens"]
    return BlockChoice(order, {"dense_perplexity": dense, "steps": steps}, notes)


def _progress(items: list, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="block", disable=not enabled)
