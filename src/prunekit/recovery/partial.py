"""Partial-layer fine-tuning: after depth pruning, train only the last k blocks, the final norm and the LM head.

Lu et al., "Reassessing Layer Pruning in LLMs: New Insights and Methods", arXiv 2411.15558. Their
recipe: remove the final 25% of the blocks (`reverse-order`, `methods/reverse_order.py`), then
fine-tune only the `lm_head` and the last three remaining blocks with the next-token loss; it
recovers more than LoRA on the whole model at a similar cost, since the blocks next to the removed
ones and the head are where the damage shows and the gradient is strongest.

    trainable = every parameter of the last `blocks` decoder blocks
              + the final norm (the modules between the last block and the head)
              + the LM head (`head=True`)
    loss      = next-token cross-entropy (the `lm` objective of `train.py`)

What it matches: the trained set of the authors' script (the last k blocks, `lm_head` and the final
`model.norm`, k = 3 their best); their learning rate, 1e-5, is the default here. What differs: the
loop is the one every recovery method shares (`train.recover_`: AdamW, constant learning rate,
`steps` steps of `batch_size` windows in a seeded order, gradient clipping, checkpoints and resume)
instead of their Trainer with warm-up and epochs on Alpaca.

Tied embeddings (SmolLM2, Gemma, Qwen's small models): the LM head *is* the input embedding matrix,
so training the head trains the embedding too; the tie is kept (one matrix, trained once, saved
once), so the checkpoint stays stock, and the report says `tied_embedding: true`. `head=False`
leaves that matrix (and an untied head) frozen.

Zeros: a trained block's linear weights keep their zeros, as every recovery method here does
(gradient masked, zeros rewritten after each step, checked at the end), so partial fine-tuning can
follow unstructured pruning too. A failed or interrupted run puts the trained tensors back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from ..registry import register
from .train import RecoverConfig, recover_


@dataclass(frozen=True)
class PartialConfig(RecoverConfig):
    """Partial-layer fine-tuning: the last `blocks` decoder blocks, the final norm and (head=True) the LM head."""
    blocks: int = 3                   # k: the last k decoder blocks train (the paper's best: 3)
    head: bool = True                 # train the LM head too (tied: the shared embedding matrix)
    lr: float = 1e-5                  # the paper's

    trains: ClassVar[str] = "partial"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"blocks (the last k decoder blocks to train) must be an integer >= 0, "
                             f"got {self.blocks!r}")
        if not isinstance(self.head, bool):
            raise ValueError(f"head must be true or false, got {self.head!r}")
        if self.blocks == 0 and not self.head:
            raise ValueError("blocks=0 with head=false trains only the final norm; train at least one block "
                             "or the head")

    def trainable(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """What `train.recover_` trains for this config (its `trainable_tensors` asks)."""
        return partial_parameters(model, self.blocks, self.head)


def partial_parameters(model: nn.Module, blocks: int, head: bool) -> dict[str, nn.Parameter]:
    """What partial fine-tuning trains, by name (a tied matrix once, under its first name)."""
    from ..depth import decoder_blocks, output_layers

    layers = decoder_blocks(model)
    if blocks > len(layers):
        raise ValueError(f"blocks={blocks} asks for more than the model's {len(layers)} decoder blocks")
    modules = [*list(layers)[len(layers) - blocks:], *output_layers(model)]
    if head:
        modules.append(model.get_output_embeddings())
    chosen = {id(p) for module in modules for p in module.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def tied_embedding(model: nn.Module) -> bool:
    """The LM head and the input embedding are one matrix."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


@register("partial", PartialConfig, scope="recover", calibrated=True)
def recover_partial(model: nn.Module, cfg: PartialConfig, windows: Tensor, **options) -> dict:
    """Fine-tune the last `cfg.blocks` blocks, the final norm and the head of `model` in place on
    `windows` (n, seqlen) token ids with `train.recover_` (every other parameter stays bit-identical);
    its report plus report["partial"] = {"blocks": [trained block indices], "head", "tied_embedding",
    "trained": [names]}."""
    partial_parameters(model, cfg.blocks, cfg.head)                      # a bad request fails before any work
    report = recover_(model, cfg, windows, **options)
    report["partial"] = {"blocks": _trained_blocks(model, cfg.blocks), "head": cfg.head,
                         "tied_embedding": tied_embedding(model),
                         "trained": list(partial_parameters(model, cfg.blocks, cfg.head))}
    return report


def _trained_blocks(model: nn.Module, blocks: int) -> list[int]:
    from ..depth import decoder_blocks
    count = len(decoder_blocks(model))
    return list(range(count - blocks, count))
