"""Mixture-of-Experts checkpoints out of core: read per-expert keys as fused tensors, write back.

transformers 5 holds a block's routed experts as fused 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2I, H)) but reads and writes checkpoints in each family's original layout: one key per expert
and matrix (Mixtral `block_sparse_moe.experts.3.w1.weight`, Qwen `mlp.experts.3.gate_proj.weight`),
sometimes other module names (PhiMoE's router is saved as `block_sparse_moe.gate`, GraniteMoE's
experts as `input_linear`/`output_linear`). `from_pretrained` and `save_pretrained` translate with
the family's conversion mapping; the out-of-core driver reads one tensor at a time, so it needs the
same translation per tensor:

    FusedReader   a `ShardReader` that answers in-memory names: a name the checkpoint lacks is
                  assembled from the saved keys transformers' own `revert_weight_conversion`
                  turns it into. Which element of which saved key lands where is learned once per
                  (block-relative) name from a marker tensor (element i holds i) sent through the
                  reverse conversion, so any split, concatenation, transposition or renaming the
                  family uses is followed exactly, without restating it here.
    to_saved      a block's in-memory tensors -> the keys `save_pretrained` would write.

Cost: the marker of a tensor is an int64 copy of its index space, built once per block-relative
name and reused for every block (only the block number in the keys changes).
"""
from __future__ import annotations

import torch
from torch import nn


def _revert(model: nn.Module, tensors: dict) -> dict:
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, dict(tensors))


def to_saved(model: nn.Module, tensors: dict) -> dict:
    """The keys and tensors `save_pretrained` writes for these in-memory tensors (one block's)."""
    return _revert(model, tensors)


class FusedReader:
    """`reader` (a ShardReader over a checkpoint in the saved layout) read by in-memory names."""

    def __init__(self, reader, model: nn.Module, blocks: str):
        self.reader, self.model, self.path = reader, model, reader.path
        self.blocks = blocks                           # "model.layers": block names get a template
        self.shapes = {name: tuple(t.shape) for name, t in
                       [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
        self._plans: dict[str, list | None] = {}      # template name -> [(saved template, flat index)]

    def _template(self, name: str) -> tuple[str, str | None]:
        """("model.layers.{}.mlp.experts.gate_up_proj", "3") for a block tensor, (name, None) otherwise."""
        prefix = self.blocks + "."
        if name.startswith(prefix):
            index, _, tail = name[len(prefix):].partition(".")
            if index.isdigit():
                return f"{prefix}{{}}.{tail}", index
        return name, None

    def _plan(self, name: str):
        """[(saved key, flat positions in `name`'s tensor)], or None if the checkpoint cannot give it."""
        template, index = self._template(name)
        if template not in self._plans:
            shape = self.shapes.get(name)
            plan = None
            if shape is not None:
                numel = 1
                for d in shape:
                    numel *= d
                marker = torch.arange(numel, dtype=torch.int64).reshape(shape)
                saved = _revert(self.model, {name: marker})
                if saved and not (len(saved) == 1 and name in saved):
                    block = f"{self.blocks}.{index}."
                    plan = [(key.replace(block, f"{self.blocks}.{{}}.", 1) if index is not None else key,
                             value.reshape(-1)) for key, value in saved.items()]
            self._plans[template] = plan
        plan = self._plans[template]
        if plan is None:
            return None
        return [(key.format(index) if index is not None else key, positions) for key, positions in plan]

    def names(self) -> list[str]:
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        if name in self.reader:
            return True
        plan = self._plan(name)
        return plan is not None and all(key in self.reader for key, _ in plan)

    def get(self, name: str) -> torch.Tensor:
        if name in self.reader:
            return self.reader.get(name)
        plan = self._plan(name)
        if plan is None or not all(key in self.reader for key, _ in plan):
            missing = [key for key, _ in plan or [] if key not in self.reader][:3]
            raise KeyError(f"{name} is not in the checkpoint {self.path}, nor the saved keys it is written as "
                           f"({missing or 'none known'}); is it the model the config describes?")
        pieces = [(self.reader.get(key), positions) for key, positions in plan]
        out = torch.empty(sum(p.numel() for _, p in pieces), dtype=pieces[0][0].dtype)
        for tensor, positions in pieces:
            out[positions] = tensor.reshape(-1)
        return out.reshape(self.shapes[name])
