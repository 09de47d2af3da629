"""What a calibration run will read and hold, said before it starts.

`coverage` tells how much distinct text the calibration windows cover: windows are drawn at random
starts from the calibration split, so asking for more tokens than the split holds re-reads the same
text (100,000 windows of 64 tokens from a 14k-token file use every token ~450 times) and adds time, not
information. `estimate` adds up the memory a block-by-block pass holds at its peak:

    weights       every parameter, unless out of core (then one block)
    activations   the windows' hidden states entering and leaving the current block:
                  2 x windows x seqlen x hidden x bytes per element, on the cache device
    held          true-sequential linear pruning only (`lockstep.py`): every window waits at each group's
                  meeting point with the group's input and the block's residual stream alive, so at
                  the widest group (the MLP's down projection) windows x seqlen x (widest input +
                  2 x hidden) x bytes per element are held at once (measured on SmolLM2-135M: 44 MB per
                  8 x 512 chunk, i.e. 704 MB for 128 x 512 windows in float32). `--sequential block`
                  (the reference order, two passes per block) holds none of it.
    statistics    per linear group, the largest of: an (in x in) float32 Hessian (SparseGPT, OBS/ADMM
                  updates, EoRA), or an input norm per column (Wanda and friends); counted for the
                  largest layer input, twice (accumulating one group while another is used)

`check_fits` compares it with what the machine has free and refuses a run that cannot fit, naming
what to change. The estimate is a floor (it leaves out the forward pass's temporaries and Python's
own overhead), so a refusal is certain and a pass is not a promise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2 ** 30
REUSE_WARNING = 4.0          # windows reading each token of the split more than this many times: say so


@dataclass(frozen=True)
class Coverage:
    split_tokens: int        # tokens in the calibration split
    drawn_tokens: int        # windows x seqlen
    distinct_tokens: int     # positions of the split that at least one window covers

    @property
    def reuse(self) -> float:
        """How many times each covered token is read, on average."""
        return self.drawn_tokens / max(self.distinct_tokens, 1)

    def line(self, seqlen: int) -> str:
        text = (f"{self.drawn_tokens:,} tokens drawn from a split of {self.split_tokens:,}: "
                f"{self.distinct_tokens:,} distinct ({self.distinct_tokens / max(self.split_tokens, 1):.0%} of it)")
        if self.reuse > REUSE_WARNING:
            text += (f"; each token is read {self.reuse:.0f} times on average, so more windows add time, not "
                     f"information: about --samples {max(1, math.ceil(self.split_tokens / seqlen))} covers the "
                     "text once, or give more text")
        return text


def coverage(split_tokens: int, starts, seqlen: int) -> Coverage:
    """The distinct positions that windows of `seqlen` tokens at `starts` cover in a split of `split_tokens`."""
    covered, end = 0, -1
    for start in sorted(int(s) for s in starts):
        stop = start + seqlen
        covered += stop - max(start, end) if stop > end else 0
        end = max(end, stop)
    return Coverage(split_tokens, len(starts) * seqlen, covered)


@dataclass(frozen=True)
class Estimate:
    weights: int
    activations: int
    statistics: int
    held: int = 0            # group inputs the true-sequential lockstep keeps alive (0 in block order)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.statistics + self.held

    def line(self) -> str:
        held = (f", group inputs held by true-sequential {self.held / GIB:.2f}: --sequential block holds none"
                if self.held else "")
        return (f"memory: at least {self.total / GIB:.2f} GiB (weights {self.weights / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}, statistics {self.statistics / GIB:.2f}{held})")


def estimate(parameters: int, block_parameters: int, hidden: int, widest_input: int, windows: int, seqlen: int,
             element_bytes: int, hessian: bool, out_of_core: bool, lockstep: bool = False) -> Estimate:
    """The floor of a block-by-block pass's peak memory (see the module docstring); `lockstep`: a
    true-sequential linear pass, whose waiting windows hold their group inputs."""
    weights = (block_parameters if out_of_core else parameters) * element_bytes
    activations = 2 * windows * seqlen * hidden * element_bytes
    statistics = 2 * (widest_input * widest_input if hessian else widest_input) * 4
    held = windows * seqlen * (widest_input + 2 * hidden) * element_bytes if lockstep else 0
    return Estimate(weights, activations, statistics, held)


def check_fits(need: Estimate, available: int, windows: int, seqlen: int, where: str, hints: list[str]) -> None:
    """Refuse a run whose floor exceeds the memory free on `where`, with the most windows that would fit."""
    if need.total <= available:
        return
    per_window = (need.activations + need.held) / max(windows, 1)
    room = available - need.weights - need.statistics
    fits = int(room // per_window) if per_window and room > 0 else 0
    advice = [f"--samples {fits} (or a shorter --seqlen)" if fits >= 1 else "a shorter --seqlen", *hints]
    raise ValueError(f"this run needs at least {need.total / GIB:.2f} GiB on {where} (weights "
                     f"{need.weights / GIB:.2f}, activations {need.activations / GIB:.2f}, statistics "
                     f"{need.statistics / GIB:.2f}) and "
                     f"{available / GIB:.2f} GiB is free: {windows} windows x {seqlen} tokens do not fit. Use "
                     + ", or ".join(advice))
