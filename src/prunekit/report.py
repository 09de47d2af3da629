"""What pruning achieved: per-layer records, per-block time and memory, and a sparsity scan of
any model (also one loaded back from disk)."""
from __future__ import annotations

import dataclasses
import resource
import sys
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerRecord:
    name: str
    block: int
    requested: float          # sparsity asked for this layer
    zeros: int                # zeros actually stored after pruning
    numel: int
    error: float | None       # ||X W^T - X W'^T|| / ||X W^T|| on a sample of calibration tokens
    seconds: float
    note: str | None = None   # e.g. a SparseGPT dampening fallback
    problem: str | None = None

    @property
    def achieved(self) -> float:
        return self.zeros / self.numel


@dataclass
class PruneReport:
    method: str
    config: object
    sequential: str
    calibration_windows: int
    calibration_seqlen: int
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    memory_budget: dict = field(default_factory=dict)
    allocation: dict | None = None       # non-uniform allocation: per-block scores and sparsity
    adapters: dict = field(default_factory=dict)   # EoRA: layer name -> (B, A), exported as a PEFT adapter

    @property
    def sparsity(self) -> float:
        """Zeros over weights, across all pruned layers."""
        total = sum(r.numel for r in self.layers)
        return sum(r.zeros for r in self.layers) / total if total else 0.0

    def table(self) -> str:
        lines = [f"{'layer':<48} {'requested':>9} {'achieved':>9} {'rel.err':>8}"]
        for r in self.layers:
            error = f"{r.error:8.4f}" if r.error is not None else f"{'-':>8}"
            lines.append(f"{r.name:<48} {r.requested:9.2%} {r.achieved:9.2%} {error}")
        lines.append(f"{'all pruned layers':<48} {'':>9} {self.sparsity:9.2%}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "config": _plain(self.config),
            "sequential": self.sequential,
            "calibration_windows": self.calibration_windows,
            "calibration_seqlen": self.calibration_seqlen,
            "seconds": round(self.seconds, 3),
            "sparsity_of_pruned_layers": self.sparsity,
            "layers": [dataclasses.asdict(r) | {"achieved": r.achieved} for r in self.layers],
            "blocks": self.blocks,
            "memory_budget": self.memory_budget,
            **({"allocation": self.allocation} if self.allocation else {}),
            **({"adapter_parameters": sum(B.numel() + A.numel() for B, A in self.adapters.values())}
               if self.adapters else {}),
        }


@dataclass
class StructureReport:
    """What a width or depth step removed, for `prunekit.json` and the summary table.

    Parameter counts are given for the decoder blocks (what `sparsity` is a fraction of) and for
    the whole model (embeddings and head included).
    """
    method: str
    config: object
    block_params_before: int
    block_params_after: int
    model_params_before: int
    model_params_after: int
    seconds: float = 0.0
    removed_blocks: list[int] = field(default_factory=list)   # depth: indices in the input model
    widths: list[dict] = field(default_factory=list)          # width: per block, the kept sizes
    scores: dict = field(default_factory=dict)                # the importance values behind the choice
    notes: list[str] = field(default_factory=list)            # e.g. compensation that a family cannot store

    @property
    def removed_fraction(self) -> float:
        """Fraction of the decoder blocks' parameters removed."""
        return 1 - self.block_params_after / self.block_params_before if self.block_params_before else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "config": _plain(self.config),
            "seconds": round(self.seconds, 3),
            "block_params_before": self.block_params_before,
            "block_params_after": self.block_params_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "removed_fraction_of_block_params": self.removed_fraction,
            "removed_blocks": self.removed_blocks,
            "widths": self.widths,
            "scores": _plain(self.scores),
            "notes": self.notes,
        }


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters in the decoder blocks, parameters in the whole model); tied weights count once."""
    from .models import spec_for
    from .models.spec import get_module

    blocks = get_module(model, spec_for(model).blocks)
    return (sum(p.numel() for p in blocks.parameters()), sum(p.numel() for p in model.parameters()))


def sparsity_report(model: nn.Module) -> dict:
    """Zero fraction of every linear layer in the decoder blocks, plus totals.

    Works on any supported model, e.g. one reloaded with `AutoModelForCausalLM.from_pretrained`.
    """
    from .models import spec_for
    from .models.spec import get_module, is_linear, weight_view

    spec = spec_for(model)
    layers = {}
    for name, module in get_module(model, spec.blocks).named_modules(prefix=spec.blocks):
        if is_linear(module):
            W = weight_view(module)
            layers[name] = {"zeros": int((W == 0).sum()), "numel": W.numel()}
    block_zeros = sum(v["zeros"] for v in layers.values())
    block_numel = sum(v["numel"] for v in layers.values())
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "layers": {k: v["zeros"] / v["numel"] for k, v in layers.items()},
        "block_linear_sparsity": block_zeros / block_numel if block_numel else 0.0,
        "model_sparsity": all_zeros / all_params,
        "parameters": all_params,
    }


def memory_now(device: torch.device) -> dict:
    """Peak accelerator memory of the current block, or the process's RSS now and at its peak."""
    if device.type == "cuda":
        return {"peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    import psutil
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    return {"rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "peak_rss_mb": round(peak_mb, 1)}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
