"""Shared fields of the one-shot sparsity methods (magnitude, Wanda, SparseGPT, RIA, ...).

Each method's config subclasses `SparsityConfig` and adds only its own knobs. Configs are frozen
and validate in `__post_init__`, so a bad recipe fails before any work starts.

Two choices apply to every mask-producing method, so they live here:
  allocation  how the global sparsity is spread over the blocks: "uniform" (every layer gets
              `sparsity`), "owl" (outlier-weighted, `allocation.py`), "sensitivity"
              (measured per-block reconstruction error) or "fdtm" (first divergent token of
              the dense greedy continuation, `allocation_fdtm.py`); the parameter-weighted mean is always
              `sparsity`, each block within +/- `allocation_lambda` of it
  update      what happens to the kept weights once the mask is chosen: "none", "obs" (the
              SparseGPT column sweep for that mask) or "admm" (Boza's ADMM least-squares
              update, `updates.py`)
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
    allocation: str = "uniform"            # "uniform", "owl", "sensitivity", "fdtm": per-block sparsity, global budget
    allocation_lambda: float = 0.08        # largest deviation of a block's sparsity from `sparsity` (OWL's lambda)
    owl_m: float = 5.0                     # OWL: an outlier scores above owl_m x the block's mean Wanda score
    fdtm_prompts: int = 8                  # fdtm: prompts (the first calibration windows' openings)
    fdtm_prompt_tokens: int = 32           # fdtm: tokens per prompt (at most the calibration seqlen)
    fdtm_new_tokens: int = 32              # fdtm: length of the dense greedy continuation compared against
    fdtm_quantile: float = 0.25            # fdtm: quantile of the per-prompt first divergent token (0.5: median)
    update: str = "none"                   # "none", "obs" or "admm": re-fit the kept weights to the mask
    admm_iterations: int = 20              # ADMM iterations (the reference's 20)
    admm_gradual: bool = False             # ADMM chooses the mask itself over the first 3/4 of the iterations
    expert_min_tokens: int = 16            # MoE: an expert routed fewer calibration tokens falls back to |W| scores

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
        if self.sparsity == 0 and not any(value > 0 for value in self.overrides.values()):
            raise ValueError("sparsity=0 prunes nothing: give a fraction in (0, 1) such as 0.5 (--sparsity 0.5), "
                             "or overrides that prune some layers")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not 0 <= self.allocation_lambda < 0.5:
            raise ValueError(f"allocation_lambda must be in [0, 0.5), got {self.allocation_lambda!r} (OWL uses 0.08)")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m must be positive, got {self.owl_m!r} (OWL uses 5)")
        for name in ("fdtm_prompts", "fdtm_prompt_tokens", "fdtm_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r} (default "
                                 f"{type(self).__dataclass_fields__[name].default})")
        if isinstance(self.fdtm_quantile, bool) or not isinstance(self.fdtm_quantile, (int, float)) \
                or not 0 <= self.fdtm_quantile <= 1:
            raise ValueError(f"fdtm_quantile must be a number in [0, 1], got {self.fdtm_quantile!r} (0.25: the "
                             "first divergent token that three prompts in four reach)")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if not isinstance(self.admm_iterations, int) or self.admm_iterations < 1:
            raise ValueError(f"admm_iterations must be a positive integer, got {self.admm_iterations!r}")
        if isinstance(self.expert_min_tokens, bool) or not isinstance(self.expert_min_tokens, int) \
                or self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be a non-negative integer, got {self.expert_min_tokens!r}")
        if self.admm_gradual and self.update != "admm":
            raise ValueError("admm_gradual applies to update='admm'; add update: admm (--update admm)")

    @property
    def needs_hessian(self) -> bool:
        """The weight updates need X^T X, not just the input norms."""
        return self.update in ("obs", "admm")

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


ALLOCATIONS = ("uniform", "owl", "sensitivity", "fdtm")
UPDATES = ("none", "obs", "admm")


def _check_sparsity(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r} (0.5 prunes half of the weights)")


def _compile(what: str, pattern: str):
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({err})") from None
