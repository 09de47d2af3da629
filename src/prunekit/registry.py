"""Method registry: `@register(name, Config, stats=...)` maps a method name to its config class
and its pure function. Duplicate names are rejected; there is no dispatch on method names
anywhere else in the code. This module is the lowest of the package (every method imports it);
`catalog.py` imports the built-in methods and answers lookups by name.

Each method has a scope, and each scope its own function signature:

    "linear"  fn(W, stats, cfg) -> W_pruned: `W` a float32 (out, in) weight, `stats` the observer
              the method declared (or None), `cfg` its config with this layer's sparsity
              (unstructured and N:M methods; the engine in `engine.py` drives them)
    "width"   scores for the heads and channels of one block (see `structured.py`); a method
              that scores every block from whole-model passes also registers
              `prescore(model, calib, cfg, *, device, batch_size, cache_device, progress)
              -> {block: [scores per coupled group]}`, and fn then receives those scores
    "depth"   fn(model, calib, cfg, ...) -> blocks to remove (see `depth.py`)
    "experts" fn(routed, cfg, keep) -> one score per routed expert of an MoE block, higher kept
              (see `experts.py`); a merging method also registers `apply`
    "search"  fn(model, cfg, calib, ...) -> StructureReport: a budgeted search over widths, sublayers and
              blocks that cuts the best structure out of the model (see `search.py`)
    "state"   fn(model, calib, cfg, ...) -> StructureReport: removes state-space heads or inner channels of
              the mixers of Mamba-family blocks and rewrites the config (`methods/ssm_heads.py`)
    "compensate"  a step that follows a linear pruning step and is computed in the same pass,
              from the same statistics (EoRA's low-rank residuals, see `eora.py`)
    "recover" fine-tuning that keeps the sparsity (masked LoRA, PERP, distillation; `recovery/`)

A linear method that prunes by a score may also register `score(W, stats, cfg) -> (out, in)`;
the engine uses it where it needs the score itself (RIA's channel permutation for N:M).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    fn: Callable
    stats: type | None       # observer class the method needs, None for data-free methods
    scope: str = "linear"    # one of SCOPES (see the module docstring)
    calibrated: bool | None = None   # needs calibration data; None: exactly when it has an observer
    score: Callable | None = None    # linear methods: score(W, stats, cfg) -> (out, in), lower is pruned first
    updates_weights: bool = False    # linear methods: fn already re-fits kept weights (OBS), `update: obs` adds nothing
    apply: Callable | None = None    # experts methods: apply(block, moe, routed, kept, cfg) merges instead of dropping
    prescore: Callable | None = None  # width: every block's scores from whole-model passes (Bonsai); linear:
                                      # per-layer statistics from a whole-model pre-pass (D-Pruner's gradients)

    @property
    def needs_calibration(self) -> bool:
        return self.stats is not None if self.calibrated is None else self.calibrated

    def needs_calibration_for(self, cfg) -> bool:
        """This step needs calibration windows: the method itself, or what a linear step adds
        around it (a non-uniform allocation, a weight update, gradients)."""
        if self.needs_calibration:
            return True
        if self.scope == "width":          # compensation (bias, liar) reads the consumers' inputs
            return getattr(cfg, "compensation", "none") != "none"
        return self.scope == "linear" and (cfg.allocation != "uniform" or cfg.update != "none"
                                           or getattr(cfg, "uses_gradient", False))


_METHODS: dict[str, Method] = {}


SCOPES = ("linear", "width", "depth", "experts", "search", "state", "compensate", "recover")


def register(name: str, config_cls: type, stats: type | None = None, scope: str = "linear",
             calibrated: bool | None = None, score: Callable | None = None, updates_weights: bool = False,
             apply: Callable | None = None, prescore: Callable | None = None):
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")

    def decorate(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].fn.__module__}")
        _METHODS[name] = Method(name, config_cls, fn, stats, scope, calibrated, score, updates_weights, apply,
                                prescore)
        return fn
    return decorate


def method_for_config(cfg) -> Method:
    """The method whose config class `cfg` is. A config's class lives in the file that registers
    its method, so holding a config means its method is registered: no catalogue is needed here."""
    for method in _METHODS.values():
        if type(cfg) is method.config_cls:
            return method
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered method")


def registered() -> dict[str, Method]:
    """Every method registered so far, by name (a copy; `catalog` imports the built-in ones)."""
    return dict(_METHODS)
