"""Gradient magnitudes for gradient-aware pruning scores (GBLM-Pruner arXiv 2311.04902,
Pruner-Zero arXiv 2406.02924): one (out, in) float32 CPU tensor per linear layer.

Two estimators:
  model_gradients  the references' quantity: backpropagate the causal LM loss of the whole model,
                   one calibration window at a time, and take the l2 norm over windows of the
                   per-window gradients, G_ij = sqrt(sum_s (dL_s/dW_ij)^2). Matches
                   `gradient_computation.update_gradient` of VILA-Lab/GBLM-Pruner (also used by
                   pprp/Pruner-Zero) without its `--scale` factor 100, which the methods apply
                   (GBLM's `alpha`). The reference runs in `model.train()`; we use eval mode
                   (identical for the dropout-free families, deterministic for the others).
  block_gradients  for models too big for a full backward pass: one block at a time, the
                   gradient of L = sum(Y * R), R ~ N(0, 1) per chunk. A block's reconstruction loss
                   ||Y(W') - Y(W)||^2 has zero gradient at the dense weights, but E_R[(dL/dW)^2] is
                   the diagonal of its Gauss-Newton matrix, J^T J (Hutchinson; `methods/taylor.py`
                   makes the same argument): sqrt of the sum over chunks is the block-local analogue
                   of G, on a different scale (retune GBLM's alpha if you use it).

Neither function changes the weights, their `requires_grad` or their `.grad` (gradients are taken
with `torch.autograd.grad`, which does not write `.grad`).

The squared gradients are summed in float64, and under distributed calibration the processes'
sums are added (`distributed.all_reduce_sum_`) before the square root: each process backpropagates
only its own windows, and the result is the single-process one (bit for bit in our tests, since
float64 sums of the same float32 squares round to the same float32 in any grouping).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import SparsityConfig
from .distributed import all_reduce_sum_
from .models.spec import get_module, is_linear, weight_view


@dataclass(frozen=True)
class GradientScoreConfig(SparsityConfig):
    gradient: str = "model"          # "model": full-model backward (the references); "block": block-local estimate
    gradient_samples: int = 32       # calibration windows backpropagated (model gradients; the references use 128)

    def __post_init__(self):
        super().__post_init__()
        if self.gradient not in ("model", "block"):
            raise ValueError(f"gradient must be 'model' (full-model backward, the paper's) or 'block' "
                             f"(block-local, for models too big to backpropagate), got {self.gradient!r}")
        if isinstance(self.gradient_samples, bool) or not isinstance(self.gradient_samples, int) \
                or self.gradient_samples < 1:
            raise ValueError(f"gradient_samples must be an integer >= 1, got {self.gradient_samples!r} "
                             "(calibration windows to backpropagate; 32 is a good start)")

    @property
    def uses_gradient(self) -> bool:
        return True


class WithGradient:
    """What the engine hands a gradient method as `stats`: the input observer plus `grad`.

    windows: calibration windows the observer saw; grad_windows: windows the gradient was summed
    over (default: the same). The references average activations over windows and sum squared
    gradients over as many windows, so both counts are needed to reproduce their balance.
    """

    def __init__(self, stats, grad: Tensor, *, windows: int, grad_windows: int | None = None):
        self.stats = stats
        self.grad = grad                                                     # (out, in)
        self.windows = windows
        self.grad_windows = windows if grad_windows is None else grad_windows

    @property
    def sq_norm(self) -> Tensor:
        return self.stats.sq_norm                                            # (in,): sum_t x_tj^2

    @property
    def mean_sq_norm(self) -> Tensor:
        """sum_t x_tj^2 averaged over calibration windows: the references' `scaler_row`."""
        return self.stats.sq_norm / max(self.windows, 1)                     # (in,)

    @property
    def grad_l2(self) -> Tensor:
        """The l2 norm of per-window gradients over *all* calibration windows, estimated from the
        `grad_windows` ones backpropagated (the references use as many of each)."""
        return self.grad * math.sqrt(self.windows / max(self.grad_windows, 1))   # (out, in)


def model_gradients(model: nn.Module, calib: Tensor, names: list[str], *, samples: int,
                    device: str | torch.device | None = None, progress: bool = True,
                    first_window: int = 0) -> dict[str, Tensor]:
    """{name: sqrt(sum over windows of (dL/dW)^2)} as (out, in) float32 on CPU, for the linears
    `names` (full module names), from the first `samples` windows of `calib` (windows, seqlen).
    L is the mean next-token cross-entropy of one window (labels = input ids).

    first_window: the global number of `calib[0]` when `calib` is this process's share of the
    windows (distributed calibration): the process backpropagates those of the first `samples`
    windows it holds, and the sums of all processes are added.

    The model runs on `device` (moved there and back if it lives elsewhere); the sums live on the
    CPU, as in the reference, so the accelerator holds only the model and one window's graph.
    """
    windows = max(0, min(samples - first_window, int(calib.shape[0])))          # this process's part of them
    sums = [torch.zeros(weight_view(m).shape, dtype=torch.float64) for m in linear_modules(model, names).values()]
    with contextlib.closing(window_gradients(model, calib[:windows], names, device=device,
                                             progress=progress)) as per_window:
        for grads in per_window:
            for total, grad in zip(sums, grads):
                total += grad.float().square().cpu()
    for total in sums:
        all_reduce_sum_(total)
    return {name: total.sqrt().float() for name, total in zip(names, sums)}


def output_covariances(model: nn.Module, calib: Tensor, names: list[str], *, samples: int, device=None,
                       progress: bool = True, first_window: int = 0, diagonal: bool = False) -> dict[str, Tensor]:
    """{name: G} for the linears `names`: G = sum over the first `samples` windows and their tokens of
    g g^T, g = dL/dy the gradient of one window's causal LM loss at the layer's output (out,). The
    output factor of the Kronecker-factored Fisher F ~= G (x) A (K-FAC; The LLM Surgeon, arXiv 2312.17244,
    Eq. 5). (out, out) float32 on CPU, or with `diagonal` its diagonal (out,) (cheaper: out floats a layer).

    One backward pass per window (`window_gradients`); a hook on each layer's output tensor reads g as
    autograd passes it, so nothing but the sums is kept. Summed in float64; under distributed
    calibration (`first_window` as in `model_gradients`) the processes' sums are added."""
    modules = linear_modules(model, names)
    windows = max(0, min(samples - first_window, int(calib.shape[0])))
    sums: dict[str, Tensor] = {}

    def observe(name: str):
        def forward_hook(module, args, output):
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g: accumulate(name, g))
        return forward_hook

    def accumulate(name: str, g: Tensor) -> None:
        g = g.reshape(-1, g.shape[-1]).double()                                    # (tokens, out)
        total = g.square().sum(dim=0) if diagonal else g.T @ g                     # (out,) or (out, out)
        sums[name] = total if name not in sums else sums[name] + total

    handles = [module.register_forward_hook(observe(name)) for name, module in modules.items()]
    try:
        with contextlib.closing(window_gradients(model, calib[:windows], names, device=device, desc="output gradients",
                                                 progress=progress)) as per_window:
            for _ in per_window:
                pass
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, module in modules.items():
        out = weight_view(module).shape[0]
        total = sums.get(name)
        if total is None:
            total = torch.zeros((out,) if diagonal else (out, out), dtype=torch.float64)
        total = total.cpu()
        all_reduce_sum_(total)
        result[name] = total.float()
    return result


def linear_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """{name: module} for full module names, each a linear layer (else a TypeError naming it)."""
    modules = {name: get_module(model, name) for name in names}
    for name, module in modules.items():
        if not is_linear(module):
            raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
    return modules


def window_gradients(model: nn.Module, windows: Tensor, names: list[str], *, device=None, desc: str = "gradients",
                     progress: bool = True):
    """Yield, window by window of `windows` (n, seqlen), the gradients dL/dW of the linears `names` as
    (out, in) tensors on the compute device (Conv1D's (in, out) transposed); L is the window's mean
    next-token cross-entropy. Meanwhile only those weights require gradients (no memory for the
    others'), the model is in eval mode and on `device`; its flags, mode and device are restored when
    the generator ends or is closed (use `contextlib.closing`). The weights and their `.grad` never
    change (`torch.autograd.grad`). Shared by `model_gradients` and D-Pruner's gradient moments."""
    modules = linear_modules(model, names)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    weights = [module.weight for module in modules.values()]
    conv1d = [type(module).__name__ == "Conv1D" for module in modules.values()]    # Conv1D stores (in, out)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    bar = _progress(int(windows.shape[0]), desc, progress)
    try:
        for p in params:
            p.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        model.train(False)
        if device != home:
            model.to(device)
        for i in range(windows.shape[0]):
            ids = windows[i:i + 1].to(device)                                      # (1, seqlen)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, weights)
            yield [grad.T if transposed else grad for grad, transposed in zip(grads, conv1d)]
            bar.update(1)
    finally:
        bar.close()
        if device != home:
            model.to(home)
        model.train(training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def block_gradients(step, modules: dict[str, nn.Module], *, seed: int = 0) -> dict[str, Tensor]:
    """{name: sqrt(sum over chunks of (dL/dW)^2)}, L = sum(Y * R) over one calibration chunk of
    `step` (a `prunekit.core.stream.BlockStep`), R ~ N(0, 1) seeded by (seed, block index, global chunk
    number) as `BlockTaylor` is. (out, in) float32 on CPU. `modules`: linears of `step.block` by name."""
    params = list(step.block.parameters())
    flags = [p.requires_grad for p in params]
    weights = [module.weight for module in modules.values()]
    conv1d = [type(module).__name__ == "Conv1D" for module in modules.values()]
    sums = [torch.zeros(weight_view(module).shape, dtype=torch.float64, device=step.device)
            for module in modules.values()]
    try:
        for p in params:
            p.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
        for chunk in range(len(step.inputs)):
            generator = torch.Generator().manual_seed(seed + 1_000_003 * step.index + step.first_chunk + chunk)
            with torch.enable_grad():
                output = step.run_chunk(chunk)                                     # (batch, seqlen, hidden)
                # drawn on the CPU, so the probe is the same on every device
                probe = torch.randn(output.shape, generator=generator).to(output.device)
                grads = torch.autograd.grad((output.float() * probe).sum(), weights)
            for total, grad, transposed in zip(sums, grads, conv1d):
                total += (grad.T if transposed else grad).float().square()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    for total in sums:
        all_reduce_sum_(total)
    return {name: total.sqrt().float().cpu() for name, total in zip(modules, sums)}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="window", disable=not enabled)
