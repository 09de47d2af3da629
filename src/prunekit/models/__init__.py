"""Model family specs, keyed by `config.model_type`. See `spec.py` for what a spec declares."""
from __future__ import annotations

from . import gpt2, llama, moe, opt, ssm
from .spec import ModelSpec

SPECS: tuple[ModelSpec, ...] = (llama.LLAMA, llama.PHI3, opt.OPT, gpt2.GPT2, *moe.MOE_SPECS, *ssm.SSM_SPECS)

# Config checks for what a spec cannot declare (see the named function's docstring).
_CHECKS = {gpt2.GPT2: gpt2.refuse_cross_attention}


def _index(specs) -> dict[str, ModelSpec]:
    by_type: dict[str, ModelSpec] = {}
    for spec in specs:
        for model_type in spec.model_types:
            if model_type in by_type:
                raise ValueError(f"model_type {model_type!r} is served by two specs")
            by_type[model_type] = spec
    return by_type


_BY_TYPE = _index(SPECS)


def supported_model_types() -> list[str]:
    """Every `config.model_type` that has a spec, sorted."""
    return sorted(_BY_TYPE)


def spec_for(model_or_config) -> ModelSpec:
    """The spec for a model (anything with `.config`) or a config, by `config.model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = _BY_TYPE.get(model_type)
    if spec is None:
        raise ValueError(f"unsupported model_type {model_type!r}; supported model types: "
                         + ", ".join(supported_model_types()))
    check = _CHECKS.get(spec)
    if check is not None:
        check(config)
    return spec


__all__ = ["SPECS", "ModelSpec", "spec_for", "supported_model_types"]
