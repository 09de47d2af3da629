"""`allocation: fdtm`: per-block sparsity from the First Divergent Token metric (FDT).

Deiseroth et al., "Divergent Token Metrics: Measuring degradation to prune away LLM components -
and optimize quantization" (arXiv 2311.01544), Sec. 3 (the metrics) and Algorithm 1 (sparsification
guided by FDT). The dense model's greedy continuation of a few prompts is the reference; a
component is pruned alone and the pruned model, run teacher-forced on prompt + reference, is asked
at which position its argmax first leaves the reference (the FDT, `eval.fidelity.divergent_tokens`).
A component whose pruning makes the generation diverge early is important and keeps more weights.

What the paper does (Algorithm 1), per iteration with a target of t added sparsity:
  1. for every component c, measure FDT of the model with c pruned at t/2 and at t + t/2, and
     assume FDT = max at 0 and FDT = 0 at 100%: four points (sparsity, FDT) per component;
  2. lower a threshold f from the maximum FDT one unit at a time; at each f give every component
     the largest sparsity whose linearly interpolated FDT is still >= f; stop at the first f where
     the parameter-weighted mean sparsity reaches t.

What this file does, and where it differs (each difference is what our contract or an offline CPU
run allows):
  * components are decoder blocks (all their target linears pruned together), not single
    linears: the allocation report and N:M's per-block N are per block, and it costs 7x fewer
    probes on a Llama block. The probe mask is Wanda's (|W_ij| ||X_j||, per row, unstructured
    even when the step is N:M), with input norms from the calibration windows, as `sensitivity`.
  * one iteration (one-shot): the paper repeats the procedure on the already-sparsified model;
    an allocation pre-pass leaves the weights untouched, and the engine prunes once.
  * the upper probe is min(1.5 t, (1 + t) / 2), so it stays below 100% when t > 2/3.
  * FDT over prompts is summarised by a quantile (`fdtm_quantile`, default 0.25: the FDT that
    three prompts in four reach). The paper's "FDT75" is a percentile summary; which tail its
    75 names could not be checked offline, so the quantile is a parameter.
  * the unit-step threshold search is solved exactly: bisection on a continuous f, then the
    blocks that jump across the final step share it in the same proportion, so the weighted mean
    is exactly the target (the paper stops at the first f whose mean is >= t, overshooting).
  * every block stays within +/- `allocation_lambda` of the target (the allocation contract
    shared with OWL and sensitivity); the paper lets a component go to 0% or 100%. Raise lambda
    (up to 0.5) for a freer allocation.
  * prompts are the openings of the first `fdtm_prompts` calibration windows (the paper uses a
    held-out text set); continuations are short (`fdtm_new_tokens`) to stay feasible on a CPU.

Cost (forward passes of the whole model on `fdtm_prompts` sequences of prompt + continuation
tokens): one calibration pass through the blocks for the Wanda norms, the dense greedy
continuation (`fdtm_new_tokens` cached decode steps plus one teacher-forced check), then
2 x blocks teacher-forced forwards, one per (block, probe). SmolLM2-135M (30 blocks) with the
defaults (8 prompts of 32 + 32 tokens): 60 forwards of 8 x 64 tokens, about 1.5 CPU-seconds each
in float32 on one thread (the whole pre-pass: under 2 CPU-minutes; `prunekit prune default
--method wanda --sparsity 0.5 --allocation fdtm --samples 16 --seqlen 128 --no-eval`).

The probes run the whole model where it lives (its own device): the pre-pass needs every block at
once, so it refuses out-of-core runs (`OnDisk`) and distributed calibration (every process would
measure its own prompts).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .core.residency import OnDisk, current
from .core.stream import model_device, progress_bar
from .eval.fidelity import divergent_tokens, greedy_continuations, teacher_forced_argmax
from .masks import lowest
from .models.spec import weight_view

Curve = list[tuple[float, float]]          # (sparsity, FDT) points, sparsity increasing, FDT non-increasing


# ----------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------

def fdt_summary(predicted: Tensor, reference: Tensor, quantile: float) -> float:
    """The `quantile` of the per-prompt first divergent token: (P, T) argmax and reference -> float.

    Linear interpolation between order statistics (`torch.quantile`); T where no prompt diverges."""
    fdt, _ = divergent_tokens(predicted, reference)
    return float(torch.quantile(fdt.double(), quantile))


def fdt_curve(max_fdt: float, probes: list[tuple[float, float]]) -> Curve:
    """Algorithm 1's points for one component: (0, max_fdt), the measured (sparsity, FDT) probes,
    (1, 0). FDT is made non-increasing in sparsity (a running minimum): more pruning is assumed
    never to help, so a noisy later probe cannot buy a component more sparsity."""
    points = [(0.0, float(max_fdt))] + sorted((float(s), float(f)) for s, f in probes) + [(1.0, 0.0)]
    curve, floor = [], float("inf")
    for s, f in points:
        floor = min(floor, f)
        curve.append((s, floor))
    return curve


def fdt_at(curve: Curve, sparsity: float) -> float:
    """The curve's FDT at `sparsity` (linear interpolation)."""
    for (s0, f0), (s1, f1) in zip(curve, curve[1:]):
        if sparsity <= s1:
            return f0 if s1 == s0 else f0 + (f1 - f0) * (sparsity - s0) / (s1 - s0)
    return curve[-1][1]


def sparsity_at(curve: Curve, threshold: float) -> float:
    """The largest sparsity whose interpolated FDT is still >= `threshold` (0 if none is)."""
    if threshold > curve[0][1]:
        return 0.0
    best = curve[0][0]
    for (s0, f0), (s1, f1) in zip(curve, curve[1:]):
        if f1 >= threshold:
            best = s1
            continue
        # f0 >= threshold > f1: the crossing inside this segment
        return s0 + (s1 - s0) * (f0 - threshold) / (f0 - f1)
    return best


def threshold_allocation(curves: list[Curve], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsity from one FDT threshold f (Algorithm 1), each clipped to
    [max(0, target - lam), min(0.999, target + lam)], with a size-weighted mean of exactly `target`.

    The mean sparsity M(f) is non-increasing in f: M(0) is the upper bound, M above the largest FDT
    the lower one, so target lies between. Bisection brackets the step [f_lo, f_hi] where M
    crosses the target; blocks whose sparsity changes inside it (a flat stretch of a curve makes a
    jump) share what is missing in one common proportion."""
    if lam == 0:
        return [target] * len(curves)
    low, high = max(0.0, target - lam), min(0.999, target + lam)
    total = sum(sizes)

    def at(f: float) -> list[float]:
        return [min(high, max(low, sparsity_at(c, f))) for c in curves]

    def mean(values: list[float]) -> float:
        return sum(n * v for n, v in zip(sizes, values)) / total

    f_lo, f_hi = 0.0, max(c[0][1] for c in curves) + 1.0          # M(f_lo) >= target >= M(f_hi)
    for _ in range(200):
        mid = (f_lo + f_hi) / 2
        if mean(at(mid)) >= target:
            f_lo = mid
        else:
            f_hi = mid
    more, fewer = at(f_lo), at(f_hi)
    m_more, m_fewer = mean(more), mean(fewer)
    share = 0.0 if m_more <= m_fewer else (target - m_fewer) / (m_more - m_fewer)
    return [b + share * (a - b) for a, b in zip(more, fewer)]


# ----------------------------------------------------------------------------------------------
# The pre-pass (driver side): called by `allocation.allocate`
# ----------------------------------------------------------------------------------------------

def check_fdtm_can_run(calib: Tensor | None) -> None:
    """Fail before any pass: the probes need prompts, every block in memory, one process."""
    if calib is None:
        raise ValueError("allocation 'fdtm' needs calibration data: its prompts are the openings of the "
                         "calibration windows (pass calib=calibration_data(...), or use allocation: uniform)")
    residency = current()
    if isinstance(getattr(residency, "inner", residency), OnDisk):
        raise ValueError("allocation 'fdtm' runs the whole model once per block and probe, which an out-of-core "
                         "run cannot do: load the model in memory (drop --offload) or use allocation: sensitivity")
    distributed.refuse("allocation 'fdtm'")


def probe_sparsities(target: float) -> tuple[float, float]:
    """Algorithm 1's t/2 and t + t/2, the upper one kept below 100% ((1 + t) / 2 when t > 2/3)."""
    return target / 2, min(1.5 * target, (1 + target) / 2)


def fdtm_block_sparsity(model, calib: Tensor, blocks_layers: list[dict], norms: list[dict], sizes: list[int],
                        config, *, batch_size: int = 8, progress: bool = True) -> tuple[list[float], list[float]]:
    """(block scores, block sparsities): each block's FDT (the `fdtm_quantile` over prompts) at the
    target sparsity, read off its curve, and the threshold allocation. `blocks_layers[b]` are the
    block's target linears (name -> module), `norms[b]` their input norms (`stats.InputNorm`)."""
    check_fdtm_can_run(calib)
    device = model_device(model)
    prompts = calib[: config.fdtm_prompts, : config.fdtm_prompt_tokens].to(torch.long)
    new_tokens = config.fdtm_new_tokens
    reference = greedy_continuations(model, prompts, new_tokens, batch_size, device)       # (P, T)
    probes = probe_sparsities(config.sparsity)
    curves = []
    bar = progress_bar(len(blocks_layers) * len(probes), "allocate fdtm: probes", enabled=progress)
    try:
        for layers, block_norms in zip(blocks_layers, norms):
            measured = []
            for sparsity in probes:
                with _wanda_pruned(layers, block_norms, sparsity):
                    predicted = teacher_forced_argmax(model, prompts, reference, batch_size, device)
                measured.append((sparsity, fdt_summary(predicted, reference, config.fdtm_quantile)))
                bar.update(1)
            curves.append(fdt_curve(new_tokens, measured))
    finally:
        bar.close()
    scores = [fdt_at(curve, config.sparsity) for curve in curves]
    return scores, threshold_allocation(curves, sizes, config.sparsity, config.allocation_lambda)


class _wanda_pruned:
    """Within the block: the layers Wanda-pruned at `sparsity` (per row), restored on exit."""

    def __init__(self, layers: dict, norms: dict, sparsity: float):
        self.layers, self.norms, self.sparsity, self.saved = layers, norms, sparsity, {}

    def __enter__(self):
        with torch.no_grad():
            for name, module in self.layers.items():
                W = weight_view(module)                                               # (out, in)
                self.saved[name] = W.detach().clone()
                score = W.detach().float().abs() * self.norms[name].sq_norm.to(W.device).sqrt()
                W.masked_fill_(lowest(score, self.sparsity), 0)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, W in self.saved.items():
                weight_view(self.layers[name]).copy_(W)
        return False
