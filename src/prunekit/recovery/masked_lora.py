"""Masked LoRA: low-rank adapters whose update never touches a pruned (zero) weight.

Plain LoRA (Hu et al., arXiv 2106.09685) learns W + s * B @ A. The product B @ A is dense, so
merging it into a sparse W fills every zero back in: the usual `merge_and_unload` silently
undoes the pruning. Here every adapter is *masked* with the base weight's sparsity pattern:

    W_eff = W + (s * B @ A) ⊙ M        M = (W != 0), recorded once, before training     # (out, in)

and the very same expression is used in the forward pass during training and in the merge, so
training optimises exactly the function that ships, and the merged model has the pruned model's
zeros. With rslora=True the scale is s = alpha / sqrt(r) instead of alpha / r (peft's
`use_rslora`): rsLoRA (Kalajdzievski, arXiv 2312.03732) shows that alpha / r shrinks the update
as the rank grows, and RoRA (Liu et al., arXiv 2501.04315) uses the same alpha / sqrt(r) scale to
recover the accuracy of pruned LLMs.

Why the zeros stay exactly zero: the masked product is built with `torch.where(M, s*B@A, 0)`,
which writes a literal 0.0 wherever M is False (no `0 * inf = nan`, no rounding), and the merge
adds it to W, where W is already exactly 0 at those places: 0 + 0 = 0 in every float format.
`merge_and_unload` writes the merged weight into the base layer itself and then lets peft remove
its wrappers with `unload()` (never peft's own `merge_and_unload`, which re-densifies).

Memory: autograd would keep the dense (out, in) product of every layer for the backward pass (a
full extra copy of the model in float32); `_MaskedDelta` keeps only x, A and B and recomputes the
product in backward. The masks cost one byte per targeted weight.

peft supplies the adapter modules (A, B, dropout, initialisation, scaling, Conv1D handling);
its forward is replaced per layer by `masked_forward`. peft is imported lazily.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.spec import weight_view

ADAPTER = "default"   # peft's name for the one adapter we create


def masked_delta(A: Tensor, B: Tensor, mask: Tensor, scale: float) -> Tensor:
    """(s * B @ A) ⊙ M with literal zeros where the mask is False.  A: (r, in), B: (out, r) -> (out, in)."""
    return torch.where(mask, (B @ A) * scale, 0.0)


class _MaskedDelta(torch.autograd.Function):
    """y = x @ masked_delta(A, B, M, s).T, keeping x, A, B (not the dense product) for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, B: Tensor, mask: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(x, A, B, mask)
        ctx.scale = scale
        return F.linear(x, masked_delta(A, B, mask, scale))                          # (..., out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, A, B, mask = ctx.saved_tensors
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ masked_delta(A, B, mask, ctx.scale)                # (..., in)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dL/dDelta = g^T x, masked and scaled like the forward; then the chain rule through B @ A
            G = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])   # (out, in)
            G = torch.where(mask, G, 0.0) * ctx.scale
            grad_A = B.T @ G                                                         # (r, in)
            grad_B = G @ A.T                                                         # (out, r)
        return grad_x, grad_A, grad_B, None, None


def masked_forward(layer: nn.Module, mask: Tensor, x: Tensor, *args, **kwargs) -> Tensor:
    """Replaces a peft LoRA layer's forward: base(x) + dropout(x) @ ((s * B @ A) ⊙ M).T."""
    result = layer.base_layer(x, *args, **kwargs)
    A = layer.lora_A[ADAPTER].weight
    B = layer.lora_B[ADAPTER].weight
    # peft keeps adapters in float32 even for a bf16/fp16 base; compute the update there
    update = _MaskedDelta.apply(layer.lora_dropout[ADAPTER](x).to(A.dtype), A, B, mask, layer.scaling[ADAPTER])
    return result + update.to(result.dtype)


@dataclass
class MaskedLora:
    """Masked adapters attached to a model; `merge_and_unload()` or `unload()` removes them again."""
    model: nn.Module
    peft_model: nn.Module
    layers: dict[str, nn.Module]                      # target name -> peft LoRA layer
    masks: dict[str, Tensor]                          # target name -> (out, in) bool, True where W != 0
    scaling: float
    _done: bool = field(default=False, repr=False)

    def parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors, under names that do not depend on peft's module naming."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight
            out[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight
        return out

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Write W + (s * B @ A) ⊙ M into every base weight, then remove the peft wrappers."""
        self._check_open()
        for name, layer in self.layers.items():
            W = weight_view(layer.get_base_layer())                                  # (out, in), a view
            A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            merged = W.to(A.dtype) + masked_delta(A, B, self.masks[name], layer.scaling[ADAPTER])
            W.copy_(merged.to(W.dtype))
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove the adapters without merging (the model is as it was before `attach`)."""
        self._check_open()
        self._done = True
        model = self.peft_model.unload()
        if model is not self.model:   # peft swaps the layers inside the model it was given
            raise RuntimeError("peft's unload() returned a different model object; prunekit expects the same one")
        return model

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("these adapters were already merged or unloaded")


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / sqrt(r) for rsLoRA, alpha / r for LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def zero_masks(targets: dict[str, nn.Module]) -> dict[str, Tensor]:
    """name -> (out, in) bool mask, True where the weight is nonzero (M above)."""
    return {name: weight_view(module) != 0 for name, module in targets.items()}


def attach_masked_lora(model: nn.Module, targets: dict[str, nn.Module], *, rank: int, alpha: float,
                       rslora: bool = False, dropout: float = 0.0,
                       masks: dict[str, Tensor] | None = None) -> MaskedLora:
    """Add masked LoRA adapters to the linear layers `targets` (full module names -> modules).

    `masks` (from `zero_masks`, taken before any training) default to the weights' zeros now;
    peft freezes the base weights, so they cannot change while the adapters exist. Returns the
    handle that merges or discards the adapters.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA recovery needs peft: pip install 'prunekit[peft]' (or pip install peft)") from err
    if not targets:
        raise ValueError("no linear layers to adapt: the model's decoder blocks hold no linear layers")
    masks = zero_masks(targets) if masks is None else masks
    if set(masks) != set(targets):
        raise ValueError("masks must have exactly one entry per target layer")
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, lora_dropout=dropout, bias="none",
        target_modules=sorted(targets),   # full names: matched exactly, nothing outside the blocks
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in targets.values()),  # GPT-2 stores (in, out)
        task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft asks transformers 5 for a renamed property; nothing for a user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    scaling = lora_scaling(rank, alpha, rslora)
    layers = {name: model.get_submodule(name) for name in targets}
    for name, layer in layers.items():
        problem = None
        if not hasattr(layer, "lora_A") or ADAPTER not in layer.lora_A:
            problem = f"peft did not wrap {name} ({type(layer).__name__}) with a LoRA layer"
        elif not math.isclose(layer.scaling[ADAPTER], scaling, rel_tol=1e-9):
            problem = f"peft's scaling for {name} is {layer.scaling[ADAPTER]}, expected {scaling}"
        if problem:
            peft_model.unload()
            raise RuntimeError(problem)
        # an instance attribute wins over the class's forward in nn.Module.__call__
        layer.forward = partial(masked_forward, layer, masks[name])
    return MaskedLora(model, peft_model, layers, masks, scaling)
