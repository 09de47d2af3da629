"""What inference-time pruning to do, as frozen dataclasses (one per mechanism), checked on creation.

    LazyLLMConfig        token pruning in prefill (LazyLLM, arXiv 2407.14057): at a few layers the prompt
                         tokens the last token attends to least stop being computed; a pruned token's
                         hidden state waits in an auxiliary cache and is revived if a later step needs it
    TwilightConfig       KV selection at decode (Twilight, arXiv 2502.02770): per head, the smallest set
                         of cached entries whose attention mass reaches `top_p`, among a selector's
                         candidates
    StreamingConfig      streaming heads (LServe, arXiv 2502.14866): a fraction of the KV heads, chosen by
                         a calibration pass, keep only `sink` first and `window` last entries
    PromptPruningConfig  fit a prompt into `budget` tokens before generation: drop whole few-shot examples
                         or low-information tokens, scored by the model's own surprisal

A config that keeps everything (keep=1, top_p=1, heads=0, a budget the prompt fits) leaves generation
exactly as stock `generate` computes it; the tests hold every mechanism to that.
"""
from __future__ import annotations

from dataclasses import dataclass


def _fraction(name: str, value, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if low_open
                                                                              else 0 <= value <= 1):
        raise ValueError(f"{name} must be a fraction in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


@dataclass(frozen=True)
class LazyLLMConfig:
    """Keep `keep` of the prompt tokens by the last layer; pruning happens at `stages` evenly spaced layers,
    each keeping a geometric share, so the kept fraction falls progressively (1 -> keep). `revive=False`
    leaves pruned tokens pruned at decode: steps cost less, but a token pruned in prefill is never seen
    again by the layers that dropped it (the paper's LazyLLM revives)."""
    keep: float = 0.5
    stages: int = 3                    # pruning layers, evenly spaced over the depth
    protect_last: int = 1              # the last prompt tokens are never pruned (the query position)
    observe: int = 1                   # rows whose attention ranks the prompt: 1 = the last (the paper's);
                                       # k = the prompt's last k (SnapKV's observation window, arXiv 2404.14469)
    pool: int = 1                      # a token ranks by the highest score within pool//2 positions of it
                                       # (SnapKV's max-pooling: a fact's neighbours stay with it); 1 = none
    revive: bool = True                # decode may compute waiting tokens again (LazyLLM's auxiliary cache)

    def __post_init__(self):
        _fraction("keep", self.keep)
        if not isinstance(self.stages, int) or isinstance(self.stages, bool) or self.stages < 1:
            raise ValueError(f"stages must be a positive number of pruning layers, got {self.stages!r}")
        if not isinstance(self.protect_last, int) or self.protect_last < 1:
            raise ValueError(f"protect_last must be at least 1 (the last token), got {self.protect_last!r}")
        if not isinstance(self.observe, int) or isinstance(self.observe, bool) or self.observe < 1:
            raise ValueError(f"observe must be at least 1 (the last token's attention ranks the prompt), got "
                             f"{self.observe!r}")
        if not isinstance(self.pool, int) or isinstance(self.pool, bool) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd number of positions >= 1 (1: no pooling), got {self.pool!r}")
        if not isinstance(self.revive, bool):
            raise ValueError(f"revive must be true or false, got {self.revive!r}")


@dataclass(frozen=True)
class TwilightConfig:
    """At each decode step, per head, attend only to the smallest set of cached entries whose softmax mass
    reaches `top_p`; the first `sink` and the last `window` entries are always kept.

    `selector` says where the candidates come from: "exact" scores every cached entry (the selection bounds
    what a step attends to but reads the whole cache); "quest" (Quest, arXiv 2406.10774, the base selector
    Twilight is evaluated on) keeps per page of `page` entries the elementwise min and max of the keys, bounds
    each page's score from them, and passes the `candidates` share of pages with the highest bounds (plus the
    sink and window pages) to the top-p step: a step then reads the page bounds and the candidate pages only."""
    top_p: float = 0.95
    sink: int = 4
    window: int = 64
    selector: str = "exact"
    page: int = 16
    candidates: float = 0.25

    def __post_init__(self):
        _fraction("top_p", self.top_p)
        if self.selector not in ("exact", "quest"):
            raise ValueError(f"selector must be exact or quest, got {self.selector!r}")
        if not isinstance(self.page, int) or isinstance(self.page, bool) or self.page < 1:
            raise ValueError(f"page must be a number of cache entries >= 1, got {self.page!r}")
        _fraction("candidates", self.candidates)
        for name in ("sink", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number of cache entries >= 0, got {value!r}")


@dataclass(frozen=True)
class StreamingConfig:
    """`heads` of the KV heads (those a calibration pass finds least dependent on distant tokens) keep only
    the first `sink` and the last `window` cache entries; the others keep everything."""
    sink: int = 4
    window: int = 256
    heads: float = 0.5

    def __post_init__(self):
        _fraction("heads", self.heads, low_open=False)
        for name, low in (("sink", 0), ("window", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class PromptPruningConfig:
    """Fit the prompt into `budget` tokens: mode "examples" drops whole few-shot examples (blocks separated
    by `separator`; the last block, the question, always stays), mode "tokens" drops the least surprising
    tokens of the examples part; the question is never touched."""
    mode: str = "examples"
    budget: int = 2048
    separator: str = "\n\n"

    def __post_init__(self):
        if self.mode not in ("examples", "tokens"):
            raise ValueError(f"prompt pruning mode must be examples or tokens, got {self.mode!r}")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {self.budget!r}")
        if not self.separator:
            raise ValueError("separator must not be empty")
