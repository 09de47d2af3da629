"""Shared fields of the one-shot sparsity methods (magnitude, Wanda, SparseGPT).

Each method's config subclasses `SparsityConfig` and adds only its own knobs. Configs are frozen
and validate in `__post_init__`, so a bad recipe fails before any work starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SparsityConfig:
    sparsity: float = 0.5                  # fraction of weights set to zero in each pruned layer
    nm: tuple[int, int] | None = None      # (2, 4): 2 zeros in every 4 consecutive inputs; sets sparsity = n/m
    per: str = "row"                       # "row": each output row loses `sparsity`; "layer": the layer as a whole
    targets: tuple[str, ...] = ()          # regexes over module names to prune; () = every linear in the decoder blocks
    ignore: tuple[str, ...] = ()           # regexes over module names to leave dense
    overrides: dict = field(default_factory=dict)  # {regex: sparsity}; the first matching pattern wins

    def __post_init__(self):
        if self.nm is not None:
            nm = tuple(self.nm)
            if len(nm) != 2 or not all(isinstance(v, int) and v > 0 for v in nm):
                raise ValueError(f"nm must be two positive integers like (2, 4), got {self.nm!r}")
            n, m = nm
            if n >= m:
                raise ValueError(f"nm=({n}, {m}): N must be smaller than M (N zeros in every M weights), e.g. (2, 4)")
            object.__setattr__(self, "nm", nm)
            object.__setattr__(self, "sparsity", n / m)
        _check_sparsity("sparsity", self.sparsity)
        if self.per not in ("row", "layer"):
            raise ValueError(f"per must be 'row' or 'layer', got {self.per!r}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
            for pattern in value:
                _compile(name, pattern)
        for pattern, value in dict(self.overrides).items():
            _compile("overrides", pattern)
            _check_sparsity(f"overrides[{pattern!r}]", value)
        object.__setattr__(self, "overrides", dict(self.overrides))

    def layer_zeros(self, out_features: int, in_features: int, sparsity: float) -> int:
        """Zeros a per="layer" selection must produce for this shape (methods that select in
        pieces, like SparseGPT's column blocks, override this)."""
        return int(out_features * in_features * sparsity)

    def sparsity_for(self, name: str) -> float | None:
        """Sparsity to apply to the module `name`, or None if it is not a target."""
        if self.targets and not any(re.search(p, name) for p in self.targets):
            return None
        if any(re.search(p, name) for p in self.ignore):
            return None
        for pattern, value in self.overrides.items():
            if re.search(pattern, name):
                return float(value)
        return self.sparsity


def _check_sparsity(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r} (0.5 prunes half of the weights)")


def _compile(what: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({err})") from None
