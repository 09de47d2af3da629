"""Sublayer drop: remove single attention or FFN sublayers, not whole blocks.

He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv 2406.15786 (Attention
Drop, MLP Drop, Joint Layer Drop). Each sublayer is scored like ShortGPT scores a block, on its own
residual update: with x the residual stream entering the sublayer and y = x + f(norm(x)) leaving it,

    importance = 1 - E_{windows, tokens} [ cos(x, y) ]

For the attention of block i, x is the block's input and y the stream after the attention (the input of
`post_attention_layernorm`); for the FFN, x is that stream and y the block's output. The k least
important candidates go: attention sublayers only (`sublayers: attention`, the paper's finding is that
many can go at little cost), FFNs only (`mlp`), or both kinds in one ranking (`both`; a block that loses
both is removed whole). One dense pass, every sublayer scored on the unpruned model.

`sparsity` / `layers` count sublayers among the candidates (30 attention sublayers for SmolLM2 with
`sublayers: attention`). The output has no stock config (a block without attention); it loads with
`prunekit.load_pruned`, and llama.cpp runs it as the per-layer `deci` architecture.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core.stream import block_stream
from ..depth import BlockChoice, DepthConfig, lowest
from ..distributed import global_mean
from ..models.spec import get_module
from ..registry import register
from ..surgery import SUBLAYER_FAMILIES, SUBLAYER_NORMS
from .block_influence import cosine_sum

KINDS = {"attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}


@dataclass(frozen=True)
class SublayerDropConfig(DepthConfig):
    sublayers: str = "attention"        # which sublayers are candidates: attention, mlp, or both

    def __post_init__(self):
        super().__post_init__()
        if self.sublayers not in KINDS:
            raise ValueError(f"sublayers must be attention, mlp or both, got {self.sublayers!r}")

    def candidates(self, num_blocks: int) -> int:
        return num_blocks * len(KINDS[self.sublayers])

    def unit(self) -> str:
        return {"attention": "attention sublayers", "mlp": "FFN sublayers",
                "both": "sublayers (attention and FFN)"}[self.sublayers]


@register("sublayer-drop", SublayerDropConfig, scope="depth", calibrated=True)
def sublayer_drop(model, calib: Tensor, cfg: SublayerDropConfig, *, device=None, batch_size: int = 8,
                  cache_device=None, progress: bool = True) -> BlockChoice:
    """Score every attention and FFN sublayer in one pass; choose the lowest among the candidates.

    scores: {"attention": [per block], "mlp": [per block]}.
    """
    if model.config.model_type not in SUBLAYER_FAMILIES:
        raise ValueError(f"sublayer-drop supports {', '.join(SUBLAYER_FAMILIES)}; {model.config.model_type!r} "
                         "has another norm layout")
    scores = {"attention": [], "mlp": []}
    for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                             progress=progress, desc="score sublayer-drop"):
        middle: list[Tensor] = []                     # the residual stream between attention and FFN, per chunk
        norm = get_module(step.block, SUBLAYER_NORMS["mlp"])
        handle = norm.register_forward_pre_hook(lambda module, args, seen=middle: seen.append(args[0].detach()))
        try:
            step.forward()
        finally:
            handle.remove()
        middle = [m.to(x.device) for m, x in zip(middle, step.inputs, strict=True)]
        scores["attention"].append(1.0 - global_mean(*cosine_sum(step.inputs, middle)))
        scores["mlp"].append(1.0 - global_mean(*cosine_sum(middle, step.outputs)))
    kinds = KINDS[cfg.sublayers]
    candidates = [(index, kind) for kind in kinds for index in range(len(scores[kind]))]
    values = [scores[kind][index] for index, kind in candidates]
    chosen = [candidates[i] for i in lowest(values, cfg.blocks_to_remove(len(candidates)))]
    return BlockChoice(remove=[], scores=scores, sublayers=chosen)
