"""Recovery fine-tuning that keeps the sparsity: configs, the training loop, checkpoint/resume.

Six registered methods (scope "recover") share one function, `recover_`; each config class
says what it trains (`trains`) and what it minimises (`objective`):

    lora  masked LoRA on every linear layer of the decoder blocks, next-token loss
          (`masked_lora.py`; rslora=True: the alpha / sqrt(r) scale of rsLoRA arXiv 2312.03732
          and RoRA arXiv 2501.04315)
    perp  only the normalisation weights/biases and the linear biases, next-token loss (PERP,
          Zimmer et al., arXiv 2312.15230: retraining such a tiny, expressive subset restores much
          of what pruning loses); the pruned weights are frozen, so their zeros cannot move
    kd    masked LoRA, loss = T^2 * KL(teacher || student) on temperature-T softmaxes (Hinton et
          al., arXiv 1503.02531), teacher = the dense model; `kd_weight` < 1 mixes in the
          next-token loss
    router-kd  Mixture-of-Experts models: only the routers (weight, and bias where the family has
          one), loss = kd's T^2 * KL(teacher || student) (Router Knowledge Distillation, Hyeon & Do,
          arXiv 2603.02217); teacher = the model before its experts were pruned/merged/edited
    expert-kd  Mixture-of-Experts models: the fused 3-D expert weights with their zeros held,
          loss = next-token cross-entropy + lambda * sum over MoE blocks and experts of the MSE
          between the teacher's and the student's expert outputs (expert-wise knowledge
          distillation of MoE-Pruner, Xie et al., arXiv 2410.12013, Eq. 10; see `moe.py`)
    distill  every parameter (zeros held), loss = kd's T^2 * KL(teacher || student) plus an optional
          hidden-state term: the Minitron practice for width- and depth-pruned models (arXiv
          2407.14679, 2408.11796); `distill.py` holds its config, loss and memory check

The loop: AdamW over the trainable tensors, exactly `steps` optimizer steps, each on
`batch_size` windows taken in order from a seeded permutation of the windows (a new permutation
per pass), constant learning rate, optional gradient clipping. Nothing depends on the total
step count, so k steps then a resume to N equals N steps. The whole model trains on `device`
(it must fit there, with the teacher for kd), in eval mode: the pretraining dropout of some
families (GPT-2's 0.1) stays off, so the objective is deterministic and the loss we report is the
function we merge; only LoRA's own `dropout` is active.

Checkpoints (`run_dir/recover-checkpoint.pt`, every `checkpoint_every` steps and at the end) hold
the trainable tensors, the optimizer state, the step, the RNG states and the loss history, written
to a temp file and renamed into place; they are read with `torch.load(weights_only=True)` only.
A resume checks that the method, its settings, the windows and the model's zeros are the same
(settings a config lists in `run_only`, such as `steps`, may change).

After training, the zeros of every linear weight in the decoder blocks, and of every fused 3-D
expert weight of an MoE model, are compared with those recorded before: a weight that was zero
and is not raises RuntimeError. A trained tensor that this check covers (expert-kd's expert
weights, PhiMoE's linear router under router-kd, every block linear under distill) has its
gradient masked and its zeros written again after every optimizer step, if it has any zeros.
Every exact zero counts, whether pruning made it or chance did: the check cannot tell them apart
(masked LoRA holds every zero the same way), and holding the few chance zeros of a dense model
costs nothing measurable. A failed or interrupted run leaves the model as it was given
(adapters discarded, trained tensors restored).

Two optional inputs of `recover_`: `loss_mask` (beside the windows: the next-token targets that count, from a
data selection's token pruning, see `selected_windows` and `prunekit.selection.qtuning`) and `light_peft`
(`light_peft.py`: after a few early steps, whole adapter modules and single ranks are pruned and the smaller
adapters train on; not resumable).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io.atomic import write_atomic
from ..registry import register

log = logging.getLogger("prunekit")

CHECKPOINT = "recover-checkpoint.pt"
CHECKPOINT_FORMAT = 1
PROBE_WINDOWS = 32      # loss before/after is measured on the first 32 windows (fixed, dropout off)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(name: str, value, low: float, high: float = math.inf, low_open: bool = True,
            high_open: bool = False) -> float:
    """A float in the given range; YAML reads `1e-4` as a string, so numeric strings are accepted."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (above and below):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return number


@dataclass(frozen=True)
class RecoverConfig:
    """What every recovery method shares. Subclasses add their knobs and say what they train."""
    steps: int = 200                  # optimizer steps
    lr: float = 1e-4                  # AdamW learning rate, constant
    batch_size: int = 4               # windows per optimizer step
    samples: int | None = None        # windows to draw from the data; None: steps * batch_size (each seen once)
    seqlen: int | None = None         # tokens per window; None: the calibration seqlen (CLI: 512 or the context)
    seed: int = 0                     # window order, LoRA's initialisation and dropout
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None: no clipping
    checkpoint_every: int = 50        # steps between checkpoints (with a run_dir); 0: none

    trains: ClassVar[str] = ""        # "lora", "norms_biases", "routers", "experts" or "all"
    objective: ClassVar[str] = "lm"   # "lm" (next-token cross-entropy), "kd" (KL to the teacher), "expert-kd",
    #                                   or "distill" (KL, plus hidden states, computed by the config's session)
    # settings that change how far or how a run goes, not what it computes: a resume may change them
    run_only: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every")

    def __post_init__(self):
        _integer("steps", self.steps, 1)
        object.__setattr__(self, "lr", _number("lr", self.lr, 0.0))
        _integer("batch_size", self.batch_size, 1)
        if self.samples is not None:
            _integer("samples (windows drawn from the data)", self.samples, 1)
        if self.seqlen is not None:
            _integer("seqlen", self.seqlen, 2)
        _integer("seed", self.seed, 0)
        object.__setattr__(self, "weight_decay", _number("weight_decay", self.weight_decay, 0.0, low_open=False))
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", _number("max_grad_norm (None to disable)",
                                                              self.max_grad_norm, 0.0))
        _integer("checkpoint_every (0 disables checkpoints)", self.checkpoint_every, 0)

    @property
    def needs_teacher(self) -> bool:
        return self.objective != "lm"

    @property
    def windows_needed(self) -> int:
        return self.samples if self.samples is not None else self.steps * self.batch_size

    def resolved(self, seqlen: int) -> RecoverConfig:
        """The config that trains on windows of `seqlen` tokens: itself, unless it gives its budget in
        tokens (`DistillConfig.tokens`), which becomes a whole number of optimizer steps here."""
        return self

    def session(self, model: nn.Module, teacher: nn.Module | None, windows: Tensor, device: torch.device,
                name: str):
        """What a method sets up around its training, or None: a context manager that `recover_` builds
        before the model moves to `device` (so it can refuse a run that does not fit there), enters
        around the probes and the steps, and hands to `objective` (distill: `distill.DistillSession`)."""
        return None


@dataclass(frozen=True)
class LoraRecoverConfig(RecoverConfig):
    """Masked LoRA on the decoder blocks' linear layers (see `masked_lora.py`)."""
    rank: int = 16
    alpha: float | None = None        # None: alpha = rank, i.e. scale 1 for LoRA and sqrt(rank) for rsLoRA
    rslora: bool = False              # scale alpha / sqrt(rank) instead of alpha / rank (arXiv 2312.03732)
    dropout: float = 0.0              # dropout on the adapters' input

    trains: ClassVar[str] = "lora"

    def __post_init__(self):
        super().__post_init__()
        _integer("rank", self.rank, 1)
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _number("alpha", self.alpha, 0.0))
        if not isinstance(self.rslora, bool):
            raise ValueError(f"rslora must be true or false, got {self.rslora!r}")
        object.__setattr__(self, "dropout", _number("dropout", self.dropout, 0.0, 1.0, low_open=False,
                                                    high_open=True))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        from .masked_lora import lora_scaling
        return lora_scaling(self.rank, self.lora_alpha, self.rslora)


@dataclass(frozen=True)
class PerpConfig(RecoverConfig):
    """PERP: retrain only normalisation parameters and linear biases."""
    # so few parameters move that they need, and tolerate, a larger step than LoRA's; tune it
    lr: float = 1e-3

    trains: ClassVar[str] = "norms_biases"


@dataclass(frozen=True)
class KDConfig(LoraRecoverConfig):
    """Masked LoRA trained to match the dense teacher's next-token distributions."""
    temperature: float = 1.0          # softmax temperature of both distributions; the loss is scaled by T^2
    kd_weight: float = 1.0            # loss = kd_weight * KD + (1 - kd_weight) * next-token loss

    objective: ClassVar[str] = "kd"

    def __post_init__(self):
        super().__post_init__()
        _check_distillation(self)


def _check_distillation(cfg) -> None:
    object.__setattr__(cfg, "temperature", _number("temperature", cfg.temperature, 0.0))
    object.__setattr__(cfg, "kd_weight", _number("kd_weight", cfg.kd_weight, 0.0, 1.0, low_open=False))


@dataclass(frozen=True)
class RouterKDConfig(RecoverConfig):
    """router-kd: only the routers of a Mixture-of-Experts model, trained on T^2 * KL(teacher || student).

    Router Knowledge Distillation (Hyeon & Do, arXiv 2603.02217): after experts are pruned, merged
    or edited, recalibrating the routers alone on the original model's next-token distributions
    (unlabeled data) recovers much of the loss. Trainable: each MoE block's router weight, and its
    bias where the family has one (`moe.router_parameters`); everything else is frozen.
    """
    temperature: float = 1.0          # softmax temperature of both distributions; the loss is scaled by T^2
    kd_weight: float = 1.0            # loss = kd_weight * KD + (1 - kd_weight) * next-token loss

    trains: ClassVar[str] = "routers"
    objective: ClassVar[str] = "kd"

    def __post_init__(self):
        super().__post_init__()
        _check_distillation(self)


@dataclass(frozen=True)
class ExpertKDConfig(RecoverConfig):
    """expert-kd: MoE-Pruner's expert-wise knowledge distillation (Xie et al., arXiv 2410.12013, Eq. 10).

    loss = next-token cross-entropy + expert_weight * sum over MoE blocks j and routed experts i of
    MSE(teacher expert i of block j, student expert i of block j), both experts reading the
    student's input to the block's experts on the tokens routed to expert i (`moe.ExpertDistillation`).
    Trainable: the fused 3-D expert weights, their zeros kept; the teacher is the unpruned model.
    """
    lr: float = 2e-5                  # the paper's (full fine-tuning, cosine schedule; ours is constant)
    expert_weight: float | None = None  # lambda; None: L_CE / L_expert before training (the paper's initialisation)

    trains: ClassVar[str] = "experts"
    objective: ClassVar[str] = "expert-kd"

    def __post_init__(self):
        super().__post_init__()
        if self.expert_weight is not None:
            object.__setattr__(self, "expert_weight", _number("expert_weight (None: balance it automatically)",
                                                              self.expert_weight, 0.0))


# ----------------------------------------------------------------------------------------------
# What is trained
# ----------------------------------------------------------------------------------------------

def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside the decoder blocks, by full module name (what pruning zeroes)."""
    from ..models import spec_for
    from ..models.spec import get_module, is_linear

    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    return {name: module for name, module in blocks.named_modules(prefix=spec.blocks) if is_linear(module)}


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, and the RMSNorm classes every family defines for itself (LlamaRMSNorm, Gemma3RMSNorm, ...)
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm")


def norm_and_bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """PERP's trainable set: every normalisation weight/bias and every linear layer's bias."""
    from ..models.spec import is_linear

    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if _is_norm(module):
            candidates = module.named_parameters(recurse=False)
        elif is_linear(module) and getattr(module, "bias", None) is not None:
            candidates = [("bias", module.bias)]
        else:
            continue
        for param_name, param in candidates:
            if id(param) not in seen:          # tied tensors train once
                seen.add(id(param))
                out[f"{name}.{param_name}" if name else param_name] = param
    return out


def pruned_tensors(model: nn.Module) -> dict[str, Tensor]:
    """What pruning zeroes, by name: the (out, in) weight of every linear layer in the decoder blocks
    (under the layer's name) and, for MoE families, every fused 3-D expert weight (under the
    parameter's name). The zero check after recovery covers exactly these."""
    from ..models.spec import weight_view
    from .moe import fused_expert_weights

    out = {name: weight_view(module) for name, module in block_linears(model).items()}
    out.update(fused_expert_weights(model))
    return out


def nonzero_masks(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """name -> bool mask, True where the tensor is nonzero."""
    return {name: tensor.detach() != 0 for name, tensor in tensors.items()}


def zeros_violated(tensors: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, int]:
    """Tensor name -> how many weights that were zero (mask False) are nonzero now; only offenders.

    `tensors` from `pruned_tensors` (linear weights and fused expert weights), taken after training."""
    out = {}
    for name, tensor in tensors.items():
        count = int(((tensor.detach() != 0) & ~masks[name]).sum())
        if count:
            out[name] = count
    return out


def _zero_fraction(masks: dict[str, Tensor]) -> float:
    """Fraction of zeros, from nonzero masks (True where W != 0)."""
    total = sum(mask.numel() for mask in masks.values())
    return sum(int((~mask).sum()) for mask in masks.values()) / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# Losses and data order
# ----------------------------------------------------------------------------------------------

def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of predicting ids[:, t+1] from position t.  logits (b, L, V), ids (b, L)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def masked_next_token_loss(logits: Tensor, ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that count: ids[:, t] for t >= 1 where loss_mask[:, t] is True
    (a token left out still feeds the positions after it; it is only not a target). 0 (with a gradient) when
    no target of the batch counts.  logits (b, L, V), ids and loss_mask (b, L)."""
    counted = loss_mask[:, 1:].flatten().to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return torch.where(counted, nll, 0.0).sum() / counted.sum().clamp(min=1)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over positions.  (b, L, V) each.

    The T^2 keeps the gradient's size independent of T (Hinton et al.); every position counts,
    the last one too: distillation needs no label.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                         "differ: the teacher must share the student's vocabulary")
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)              # (b*L, V)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)              # (b*L, V)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def expert_kd_terms(model: nn.Module, ids: Tensor, distiller) -> tuple[Tensor, Tensor]:
    """(next-token cross-entropy, sum of the per-expert MSEs) of one student forward (expert-kd)."""
    distiller.reset()
    logits = model(input_ids=ids, use_cache=False).logits
    return next_token_loss(logits, ids), distiller.total()


def objective(model: nn.Module, ids: Tensor, cfg: RecoverConfig, teacher: nn.Module | None,
              distiller=None, loss_mask: Tensor | None = None) -> Tensor:
    """The loss one batch of windows contributes (the thing the optimizer minimises).

    distiller: expert-kd's `moe.ExpertDistillation` (its hooks installed, `weight` = lambda); for
    objective "distill", the config's session (`distill.DistillSession`), which computes the loss.
    loss_mask: (b, L) bool, the targets that count in the next-token loss (objective "lm" only; None: all)."""
    if cfg.objective == "distill":
        return distiller.objective(model, ids, cfg, teacher)
    if cfg.objective == "expert-kd":
        ce, expert = expert_kd_terms(model, ids, distiller)
        return ce + distiller.weight * expert
    logits = model(input_ids=ids, use_cache=False).logits
    if cfg.objective != "kd":
        return next_token_loss(logits, ids) if loss_mask is None else masked_next_token_loss(logits, ids, loss_mask)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits
    loss = distillation_loss(logits, teacher_logits, cfg.temperature)
    if cfg.kd_weight < 1:
        loss = cfg.kd_weight * loss + (1 - cfg.kd_weight) * next_token_loss(logits, ids)
    return loss


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Windows of optimizer step `step` (0-based): a pure function of the step, so resuming needs no state.

    The window stream is one seeded permutation of range(n) per pass over the data, concatenated;
    step s takes positions [s * batch_size, (s + 1) * batch_size) of that stream.
    """
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    passes, offsets = positions // n, positions % n
    out = torch.empty(batch_size, dtype=torch.long)
    for p in passes.unique().tolist():
        # distinct seeds for (seed, pass) pairs while seed < 1e6
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + p))
        chosen = passes == p
        out[chosen] = order[offsets[chosen]]
    return out


@torch.no_grad()
def probe_loss(model: nn.Module, windows: Tensor, cfg: RecoverConfig, teacher: nn.Module | None,
               device: torch.device, distiller=None, loss_mask: Tensor | None = None) -> float:
    """The objective on the first PROBE_WINDOWS windows, no dropout (the same before and after)."""
    probe = windows[:PROBE_WINDOWS]
    total = 0.0
    for start in range(0, len(probe), cfg.batch_size):
        batch = probe[start:start + cfg.batch_size].to(device)
        mask = loss_mask[start:start + cfg.batch_size].to(device) if loss_mask is not None else None
        total += float(objective(model, batch, cfg, teacher, distiller, mask)) * len(batch)
    return total / len(probe)


@torch.no_grad()
def balanced_expert_weight(model: nn.Module, windows: Tensor, cfg: RecoverConfig, distiller,
                           device: torch.device) -> float:
    """MoE-Pruner's lambda, "initialized based on the strength of" the two losses: L_CE / L_expert,
    both measured on the probe windows before any training (1.0 if the experts equal the teacher's)."""
    probe = windows[:PROBE_WINDOWS]
    ce_total = expert_total = 0.0
    for start in range(0, len(probe), cfg.batch_size):
        batch = probe[start:start + cfg.batch_size].to(device)
        ce, expert = expert_kd_terms(model, batch, distiller)
        ce_total += float(ce) * len(batch)
        expert_total += float(expert) * len(batch)
    if not expert_total > 0:
        log.warning("expert-kd: the experts' outputs equal the teacher's on the probe windows; lambda = 1")
        return 1.0
    return ce_total / expert_total


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def _identity(cfg: RecoverConfig, windows: Tensor, masks: dict[str, Tensor], params: dict[str, Tensor],
              loss_mask: Tensor | None = None) -> dict:
    """What must match for a checkpoint to continue this run (steps may grow; the rest may not)."""
    from ..registry import method_for_config
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in cfg.run_only}
    if loss_mask is not None:      # a data selection's loss mask is part of the data
        settings["loss_mask_sha256"] = hashlib.sha256(loss_mask.cpu().contiguous().numpy().tobytes()).hexdigest()
    return {
        "method": method_for_config(cfg).name,
        "settings": settings,
        "windows_sha256": hashlib.sha256(windows.cpu().contiguous().numpy().tobytes()).hexdigest(),
        "windows_shape": list(windows.shape),
        "zeros": {name: int((~mask).sum()) for name, mask in masks.items()},
        "trainable": {name: list(p.shape) for name, p in params.items()},
    }


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically (`io.atomic`): the old file or the new, never half."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    # weights_only: tensors and plain containers only; a checkpoint can never run code
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a prunekit recovery checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _check_resumable(state: dict, identity: dict, steps: int, path: Path) -> None:
    saved = state["identity"]
    for key, what in (("method", "method"), ("settings", "settings"), ("windows_sha256", "training windows"),
                      ("zeros", "model's zero pattern"), ("trainable", "trainable tensors")):
        if saved.get(key) != identity[key]:
            detail = ""
            if key in ("method", "settings"):
                detail = f" (checkpoint: {saved.get(key)!r}; now: {identity[key]!r})"
            raise ValueError(f"cannot resume from {path}: the {what} differ from this run{detail}; use the same "
                             "input model, data and settings (only steps may grow), or another run directory")
    if state["step"] > steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']}, beyond steps={steps}")


def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# The registered function
# ----------------------------------------------------------------------------------------------

@register("lora", LoraRecoverConfig, scope="recover", calibrated=True)
@register("perp", PerpConfig, scope="recover", calibrated=True)
@register("kd", KDConfig, scope="recover", calibrated=True)
@register("router-kd", RouterKDConfig, scope="recover", calibrated=True)
@register("expert-kd", ExpertKDConfig, scope="recover", calibrated=True)
def recover_(model: nn.Module, cfg: RecoverConfig, windows: Tensor, *, teacher: nn.Module | None = None,
             run_dir: str | os.PathLike | None = None, resume: bool = False, device: str | torch.device = "cpu",
             progress: bool = True, loss_mask: Tensor | None = None, light_peft=None) -> dict:
    """Fine-tune `model` in place on `windows` (n, seqlen) token ids without moving any of its zeros.

    teacher: the model before pruning for kd, router-kd, expert-kd and distill (frozen; never
    modified; expert-kd calls only its experts modules). run_dir: where checkpoints go
    (None: no checkpoints). resume: continue from run_dir's checkpoint (a fresh start if there is
    none). Returns a report: losses before/after on fixed windows and per step, tokens, seconds,
    trainable parameters, sparsity before/after. Raises RuntimeError if a zero became nonzero.

    loss_mask: (n, seqlen) bool beside `windows`, True where a token counts as a next-token target (a data
    selection's token pruning, e.g. `prunekit.selection.qtuning`); next-token methods only. light_peft: a
    `light_peft.LightPeftConfig` (lora / kd only): prune adapter modules and ranks after its early steps.
    """
    from contextlib import nullcontext

    from ..io.loading import resolve_device
    from ..registry import method_for_config
    from .masked_lora import zero_masks
    from .moe import ExpertDistillation

    name = method_for_config(cfg).name
    windows = _check_windows(windows, cfg, model.config)
    if loss_mask is not None:
        if cfg.objective != "lm":
            raise ValueError(f"a loss mask selects next-token targets; {name} trains on a teacher's distributions "
                             "at every position: use a method with the next-token loss (lora, perp) or a selection "
                             "without token pruning")
        if not isinstance(loss_mask, Tensor) or loss_mask.shape != windows.shape:
            raise ValueError(f"loss_mask must be a bool tensor shaped like the windows {tuple(windows.shape)}")
        loss_mask = loss_mask.bool()
        if not bool(loss_mask[:, 1:].any()):
            raise ValueError("the loss mask leaves no target token in any window: nothing to train on")
    if light_peft is not None:
        if cfg.trains != "lora":
            raise ValueError(f"Light-PEFT prunes LoRA adapters; {name} trains no adapters (use --method lora or kd)")
        if resume:
            raise ValueError("a Light-PEFT run cannot resume (its adapters change shape after the early steps); "
                             "rerun without --resume")
        if light_peft.steps >= cfg.steps:
            raise ValueError(f"Light-PEFT's early steps ({light_peft.steps}) must be fewer than steps={cfg.steps}: "
                             "lower --light-peft-steps or raise --steps")
    token_budget = getattr(cfg, "tokens", None)
    cfg = cfg.resolved(int(windows.shape[1]))        # a budget in tokens becomes steps
    if cfg.trains != "lora":
        trainable_tensors(model, cfg, name)          # a dense model given to router-kd/expert-kd fails here
    if cfg.needs_teacher and teacher is None:
        raise ValueError(f"{name} distils from the dense model: pass teacher=<the model before pruning>")
    device = resolve_device(device)
    checkpoint = Path(run_dir) / CHECKPOINT if run_dir is not None and cfg.checkpoint_every else None
    if resume and checkpoint is None:
        raise ValueError("resume needs checkpoints: give a run_dir and checkpoint_every > 0")
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise FileExistsError(f"{checkpoint} exists from an earlier run: resume it (resume=True, CLI --resume) "
                              "or remove it / choose another run directory")

    session = cfg.session(model, teacher, windows, device, name)   # distill: refuses a run that cannot fit

    started = time.perf_counter()
    home = next(model.parameters()).device
    teacher_home = next(teacher.parameters()).device if teacher is not None else None
    try:
        # fork_rng: seeding for LoRA's initialisation and dropout leaves the caller's RNG as it was
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            model.to(device).eval()        # eval: no pretraining dropout (module docstring)
            if teacher is not None:
                teacher.to(device).eval()
            targets = block_linears(model)
            masks = zero_masks(targets) if cfg.trains == "lora" else {}         # LoRA's masks, before any training
            zeros = nonzero_masks(pruned_tensors(model))                       # linears + fused experts: the check
            sparsity_before = _zero_fraction(zeros)
            distiller = ExpertDistillation(model, teacher, name) if cfg.objective == "expert-kd" else session
            with distiller if distiller is not None else nullcontext():
                if cfg.objective == "expert-kd":
                    distiller.weight = (cfg.expert_weight if cfg.expert_weight is not None
                                        else balanced_expert_weight(model, windows, cfg, distiller, device))
                loss_before = probe_loss(model, windows, cfg, teacher, device, distiller, loss_mask)
                terms_before = distiller.take_probe() if session is not None else None
                params, losses, resumed_from, pruned_peft = _fit(model, cfg, windows, teacher, targets, masks, zeros,
                                                                 checkpoint, resume, device, name, progress,
                                                                 distiller, loss_mask, light_peft)
                violated = zeros_violated(pruned_tensors(model), zeros)
                if violated:
                    raise RuntimeError(f"recovery made {sum(violated.values())} pruned weights nonzero "
                                       f"({', '.join(f'{k}: {v}' for k, v in list(violated.items())[:5])}); "
                                       "this is a bug")
                loss_after = probe_loss(model, windows, cfg, teacher, device, distiller, loss_mask)
                terms_after = distiller.take_probe() if session is not None else None
        sparsity_after = _zero_fraction(nonzero_masks(pruned_tensors(model)))
    finally:
        model.to(home)
        if teacher is not None:
            teacher.to(teacher_home)

    report = {
        "method": name,
        "config": dataclasses.asdict(cfg),
        "steps": cfg.steps,
        "resumed_from": resumed_from,
        "batch_size": cfg.batch_size,
        "seqlen": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens": cfg.steps * cfg.batch_size * int(windows.shape[1]),
        "trainable_parameters": sum(p.numel() for p in params.values()),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss_protocol": f"{_objective_name(cfg, distiller)} on the first {min(PROBE_WINDOWS, len(windows))} training "
                         f"windows, before training and after the merge",
        "loss_first_step": losses[0] if losses else None,
        "loss_last_step": losses[-1] if losses else None,
        "losses": losses,
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "zeros_kept": True,
        "layers": len(targets),
        "device": str(device),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if cfg.trains == "lora":
        report["lora"] = {"rank": cfg.rank, "alpha": cfg.lora_alpha, "rslora": cfg.rslora, "scaling": cfg.scaling}
    if token_budget is not None:
        report["token_budget"] = token_budget
    if loss_mask is not None:
        report["loss_mask"] = {"targets": int(loss_mask[:, 1:].numel()), "counted": int(loss_mask[:, 1:].sum())}
        report["loss_protocol"] += " (only the targets the loss mask keeps)"
    if pruned_peft is not None:
        report["light_peft"] = pruned_peft
        report["notes"] = report.get("notes", []) + [
            f"Light-PEFT after {pruned_peft['steps']} steps: {pruned_peft['modules']['removed']} of "
            f"{pruned_peft['modules']['total']} adapter modules removed, ranks {pruned_peft['ranks']['before']} -> "
            f"{pruned_peft['ranks']['after']}; trainable parameters {pruned_peft['trainable_before']:,} -> "
            f"{pruned_peft['trainable_after']:,} ({pruned_peft['saved']:.1%} saved)"]
    if session is not None:
        report[name], report["notes"] = session.report(terms_before, terms_after)
    if cfg.objective == "expert-kd":
        report["expert_kd"] = {"expert_weight": distiller.weight, "blocks": len(distiller.pairs),
                               "expert_weight_from": "given" if cfg.expert_weight is not None
                               else "L_CE / L_expert on the probe windows before training"}
    return report


def trainable_tensors(model: nn.Module, cfg: RecoverConfig, name: str) -> dict[str, nn.Parameter]:
    """What a method other than LoRA trains, by name (a clear error when the model has none of it)."""
    from .moe import expert_parameters, router_parameters

    if cfg.trains == "norms_biases":
        params = norm_and_bias_parameters(model)
        if not params:
            raise ValueError(f"{name} found no normalisation or bias parameters to train in this model")
        return params
    if cfg.trains == "routers":
        return router_parameters(model, name)
    if cfg.trains == "experts":
        return expert_parameters(model, name)
    if cfg.trains == "all":
        return dict(model.named_parameters())        # tied tensors once, under their first name
    select = getattr(cfg, "trainable", None)
    if callable(select):                             # a config that names its own set (partial.py)
        return select(model)
    raise ValueError(f"{name}: unknown trainable set {cfg.trains!r}")


def _fit(model, cfg, windows, teacher, targets, masks, zeros, checkpoint, resume, device, name, progress,
         distiller=None, loss_mask=None, light_peft=None):
    """Attach what trains, restore a checkpoint, run the steps, merge. Returns (params, losses, resumed_from,
    Light-PEFT's record or None).

    light_peft (`light_peft.LightPeftConfig`, LoRA only): the first `steps` steps train the full adapters
    (no checkpoint), then modules and ranks are pruned and the smaller adapters train to `cfg.steps`.
    masks: LoRA's, per linear layer; zeros: every pruned tensor's (what the checkpoint identity
    records). On any failure the model is put back as it was given: adapters discarded (the base
    weights were never written), trained tensors restored, requires_grad flags restored.
    """
    from .masked_lora import attach_masked_lora
    from .moe import fused_expert_weights

    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    lora = None
    params: dict[str, nn.Parameter] = {}
    param_masks: dict[str, Tensor] = {}
    backup: dict[str, Tensor] = {}
    finished = False
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.trains == "lora":
            lora = attach_masked_lora(model, targets, rank=cfg.rank, alpha=cfg.lora_alpha, rslora=cfg.rslora,
                                      dropout=cfg.dropout, masks=masks)
            params = lora.parameters()
            if cfg.dropout:
                for layer in lora.layers.values():
                    layer.lora_dropout.train()
        else:
            params = trainable_tensors(model, cfg, name)
            pruned = {id(module.weight) for module in targets.values()}
            pruned |= {id(p) for p in fused_expert_weights(model).values()}
            if cfg.trains == "norms_biases" and any(id(p) in pruned for p in params.values()):
                raise RuntimeError("perp would train a pruned weight matrix")   # impossible by construction
            # a trained tensor that pruning may have zeroed keeps its zeros: gradient masked, zeros rewritten
            # (a tensor without a zero needs no mask: distill trains every block linear of a dense model)
            param_masks = {key: mask for key, p in params.items() if id(p) in pruned
                           for mask in [p.detach() != 0] if not bool(mask.all())}
            # on the CPU: expert-kd's tensors are most of an MoE model
            backup = {key: p.detach().to("cpu", copy=True) for key, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)

        optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start, losses, pruned_peft = 0, [], None
        if light_peft is not None and light_peft.steps < cfg.steps:
            from .light_peft import early_prune
            early = dataclasses.replace(cfg, steps=light_peft.steps)
            _train(model, early, windows, teacher, params, optimizer, device, 0, losses, None, None, name, progress,
                   param_masks, distiller, loss_mask)
            chosen = batch_indices(light_peft.steps, len(windows), cfg.batch_size, cfg.seed)
            early_mask = loss_mask[chosen].to(device) if loss_mask is not None else None
            pruned_peft = early_prune(lora, light_peft, lambda: objective(model, windows[chosen].to(device), cfg,
                                                                          teacher, distiller, early_mask))
            params = {key: p for key, p in lora.parameters().items() if p.numel()}
            optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
            start = light_peft.steps
        identity = _identity(cfg, windows, zeros, params, loss_mask) if checkpoint is not None else None
        if resume and checkpoint.exists():
            state = load_checkpoint(checkpoint)
            _check_resumable(state, identity, cfg.steps, checkpoint)
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(state["trainable"][key])
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], device)
            if cfg.objective == "expert-kd" and "expert_weight" in state:
                distiller.weight = float(state["expert_weight"])     # lambda stays the one training began with
            start, losses = state["step"], list(state["losses"])
            log.info("resuming %s from step %d of %d (%s)", name, start, cfg.steps, checkpoint)
        elif resume:
            log.info("no checkpoint at %s: starting %s from step 0", checkpoint, name)

        _train(model, cfg, windows, teacher, params, optimizer, device, start, losses, checkpoint, identity,
               name, progress, param_masks, distiller, loss_mask)
        if lora is not None:
            lora.merge_and_unload()
            lora = None
        finished = True
        resumed = start if start and pruned_peft is None else None
        return params, losses, resumed, pruned_peft
    finally:
        if lora is not None:
            lora.unload()
        if not finished and backup:
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(backup[key])
        for key, p in model.named_parameters():
            p.requires_grad_(flags.get(key, p.requires_grad))


def _objective_name(cfg: RecoverConfig, distiller=None) -> str:
    if cfg.objective == "distill":
        return distiller.describe(cfg)
    if cfg.objective == "expert-kd":
        weight = distiller.weight if distiller is not None else cfg.expert_weight
        return (f"next-token cross-entropy + {weight:g} x sum over MoE blocks and experts of "
                "MSE(teacher expert, student expert)")
    if cfg.objective != "kd":
        return "next-token cross-entropy"
    mix = f" + {1 - cfg.kd_weight:g} x next-token cross-entropy" if cfg.kd_weight < 1 else ""
    return f"{cfg.kd_weight:g} x T^2 KL(teacher || student), T={cfg.temperature:g}{mix}"


def _check_windows(windows: Tensor, cfg: RecoverConfig, config) -> Tensor:
    from ..data import default_seqlen

    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype.is_floating_point:
        raise ValueError("windows must be an integer tensor of token ids, shape (n, seqlen); "
                         "see prunekit.data.calibration_data")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must hold at least one window of 2+ tokens, got shape {tuple(windows.shape)}")
    if cfg.seqlen is not None and windows.shape[1] != cfg.seqlen:
        raise ValueError(f"the windows have {windows.shape[1]} tokens but the config asks for seqlen={cfg.seqlen}")
    context = default_seqlen(config, cap=1 << 30)
    if windows.shape[1] > context:   # positions past the context would train on garbage, silently
        raise ValueError(f"windows of {windows.shape[1]} tokens are longer than the model's context ({context} "
                         f"positions); use seqlen <= {context}")
    return windows.long()


def _train(model, cfg, windows, teacher, params, optimizer, device, start, losses, checkpoint, identity, name,
           progress, param_masks=None, distiller=None, loss_mask=None) -> None:
    """Steps start..cfg.steps-1; appends each step's loss to `losses`; checkpoints as configured.

    param_masks: trained tensor name -> True where nonzero; their gradient is masked before the
    clipping and their zeros are written again after every step (exactly zero, whatever AdamW does).
    """
    param_masks = param_masks or {}
    from tqdm.auto import tqdm

    trainable = list(params.values())
    bar = tqdm(total=cfg.steps, initial=start, desc=f"recover {name}", unit="step", disable=not progress)
    try:
        for step in range(start, cfg.steps):
            chosen = batch_indices(step, len(windows), cfg.batch_size, cfg.seed)
            ids = windows[chosen].to(device)
            mask = loss_mask[chosen].to(device) if loss_mask is not None else None
            loss = objective(model, ids, cfg, teacher, distiller, mask)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the {name} loss is {float(loss)} at step {step + 1}; lower the learning rate "
                                   f"(lr={cfg.lr:g}) or keep max_grad_norm")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for key, mask in param_masks.items():
                if params[key].grad is not None:
                    params[key].grad.masked_fill_(~mask, 0.0)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            if param_masks:
                with torch.no_grad():
                    for key, mask in param_masks.items():
                        params[key].masked_fill_(~mask, 0.0)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                state = {"format": CHECKPOINT_FORMAT, "step": done, "identity": identity,
                         "trainable": {key: p.detach().cpu() for key, p in params.items()},
                         "optimizer": optimizer.state_dict(), "rng": _rng_state(device), "losses": list(losses)}
                if cfg.objective == "expert-kd":
                    state["expert_weight"] = distiller.weight
                save_checkpoint(checkpoint, state)
                log.info("checkpoint at step %d: %s", done, checkpoint)
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Helpers for the callers (CLI, recipes)
# ----------------------------------------------------------------------------------------------

def recovery_windows(tokenizer, cfg: RecoverConfig, source: str | os.PathLike, *, seqlen: int, seed: int) -> Tensor:
    """The (windows_needed, cfg.seqlen or `seqlen`) token windows a recovery step trains on."""
    from ..data import calibration_data
    seqlen = cfg.seqlen if cfg.seqlen is not None else seqlen
    return calibration_data(tokenizer, source, samples=cfg.resolved(seqlen).windows_needed, seqlen=seqlen,
                            seed=seed)


def selected_windows(model, tokenizer, source, method: str, budget, *, seqlen: int, seed: int = 0,
                     text_field: str = "text", options: dict | None = None, dense=None,
                     split_tokens: int | None = None, progress: bool = True) -> tuple[Tensor, Tensor | None, dict]:
    """Recovery on a data selection (`prunekit recover --data-select METHOD --budget B`): select samples of
    `source` with `prunekit.selection` (scored with `model`, the model being recovered), pack the kept
    samples' tokens one after another in pool order and cut them into whole windows of `seqlen` tokens (a
    remainder shorter than a window is left out).

    Returns (windows (n, seqlen), loss_mask (n, seqlen) bool or None, a record for the report). The mask is
    given when the selection carries loss spans (qtuning): a token counts as a target only inside its
    sample's spans (a sample's first token never does). PASER compares the pruned model with the one it was
    pruned from: pass that as `dense` (it scores and embeds; `model`, the one being recovered, is PASER's
    pruned model). `split_tokens` cuts the source's samples into pieces of at most that many tokens before
    selecting (`prunekit.selection.pool.Pool`)."""
    import json
    import tempfile

    from ..data import tokenize
    from ..selection.qtuning import mask_from_spans
    from ..selection.select import SELECTORS, select

    if method not in SELECTORS:
        raise ValueError(f"unknown --data-select method {method!r}; choose from {', '.join(SELECTORS)}")
    scorer = model
    if method == "paser":
        if dense is None:
            raise ValueError("--data-select paser compares the pruned model with the dense one it was pruned from: "
                             "pass the dense model (recover: --teacher MODEL, or a DIR whose prunekit.json "
                             "records its source)")
        from ..selection.paser import check_models
        check_models(dense, model)
        scorer, options = dense, {**(options or {}), "pruned": model}
        dense.eval()
    elif dense is not None:
        raise ValueError(f"a dense model is for --data-select paser only, not {method}")
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="prunekit-select-") as folder:
        out = Path(folder) / "selected.jsonl"
        try:
            report = select(source, method, budget, out, model=scorer, tokenizer=tokenizer, seed=seed,
                            text_field=text_field, options=options, progress=progress, split_tokens=split_tokens)
        finally:
            model.train(was_training)
        ids, masks, spanned = [], [], False
        with open(out, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                tokens = tokenize(tokenizer, record["text"])
                if "loss_spans" in record:
                    spanned = True
                    masks.append(mask_from_spans(len(tokens), record["loss_spans"]))
                else:
                    masks.append(torch.ones(len(tokens), dtype=torch.bool))
                ids.append(tokens)
    stream = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    count = len(stream) // seqlen
    if count < 1:
        raise ValueError(f"the {method} selection (budget {report['budget']}) keeps {len(stream):,} tokens, fewer "
                         f"than one training window of {seqlen}; raise --budget or lower --seqlen")
    windows = stream[:count * seqlen].view(count, seqlen).long()
    loss_mask = torch.cat(masks)[:count * seqlen].view(count, seqlen) if spanned else None
    if loss_mask is not None and not bool(loss_mask[:, 1:].any()):
        raise ValueError(f"the {method} selection leaves no target token in the loss; raise --budget")
    record = {"method": method, "budget": report["budget"], "samples": report["samples"],
              "tokens_selected": int(len(stream)), "tokens_trained": int(count * seqlen), "windows": count,
              "options": report["options"], **({"split_tokens": split_tokens} if split_tokens is not None else {})}
    if loss_mask is not None:
        record["loss_targets"] = {"targets": int(loss_mask[:, 1:].numel()), "counted": int(loss_mask[:, 1:].sum())}
    if report.get("clusters"):
        record["clusters"] = report["clusters"]
    return windows, loss_mask, record


def format_summary(report: dict) -> str:
    """Three lines for a terminal: what ran, the loss before/after, the sparsity before/after."""
    resumed = f", resumed at step {report['resumed_from']}" if report["resumed_from"] else ""
    budget = report.get("token_budget")
    budget = (f" used of a budget of {budget:,}: whole steps of {report['batch_size'] * report['seqlen']:,}"
              if budget is not None else "")
    lines = [
        f"recovery: {report['method']}, {report['steps']} steps x {report['batch_size']} windows x "
        f"{report['seqlen']} tokens ({report['tokens']:,} tokens{budget}), "
        f"{report['trainable_parameters']:,} trainable parameters, {report['seconds']:.1f} s{resumed}",
        f"loss: {report['loss_before']:.4f} -> {report['loss_after']:.4f} ({report['loss_protocol']})",
        f"sparsity after merge: {report['sparsity_after']:.2%} (before {report['sparsity_before']:.2%})",
    ]
    lines += report.get("notes", [])
    return "\n".join(lines)
