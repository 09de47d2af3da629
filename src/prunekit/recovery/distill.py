"""distill: full-parameter distillation of a structurally pruned model from its dense teacher.

A width-pruned model (fewer attention heads / KV groups, fewer FFN channels) or a depth-pruned one
(fewer decoder blocks) is an ordinary dense model, smaller than the one it came from. Minitron
(Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation", arXiv
2407.14679; Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach",
arXiv 2408.11796) recovers such a model by training *every* parameter on the unpruned teacher's
next-token distributions instead of on the labels. The forward KL on the logits is their loss,
and it suffices on its own (no next-token loss is needed; the follow-up distils its pruned
Llama 3.1 and Mistral NeMo students from the logits alone), so that is the default here. Minitron
also studies adding losses on intermediate hidden states; that is the option `hidden_weight`,
offered where the student keeps the teacher's residual-stream width (width pruning of heads and
FFN channels leaves the hidden size unchanged), since a plain comparison needs equal widths.

    loss = kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))     (train.distillation_loss)
         + (1 - kd_weight) * next-token cross-entropy
         + hidden_weight * mean over block pairs (i, j) of  |h_s,i - h_t,j|^2 / |h_t,j|^2

h_s,i is the output of student block i (the residual stream after it), h_t,j that of the teacher
block it came from, both (batch, seqlen, hidden), summed over every element. The hidden term is a
*normalised* MSE (the squared error relative to the teacher's own energy) rather than a plain MSE:
the residual stream grows by orders of magnitude with depth, so a plain MSE would be decided by
the last blocks and by the model's scale; relative to the teacher, 1.0 means "no better than
zeros" at every block, and `hidden_weight` means the same for every model. Block pairs: student
block i with teacher block i when both have as many blocks (width pruning); after depth pruning
`teacher_blocks` gives the teacher index of every student block (`prunekit recover` reads it from
the removed_blocks its prunekit.json records); without it a hidden loss is refused, never guessed.

What trains and what stays: every parameter of the student (tied tensors once), with AdamW, in
the shared loop of `train.py` (windows, checkpoints, exact resume, the zero check). A student that
also holds unstructured zeros (width pruning after Wanda, say) keeps them: the block linears that
contain zeros have their gradient masked and their zeros rewritten after every step (train.py's
`_fit`); every exact zero counts, as in the shared zero check, and a dense student simply has
none worth mentioning. The teacher is frozen and never modified.

Budget in tokens: `tokens=N` instead of `steps` trains ceil(N / (batch_size * seqlen)) optimizer
steps (whole steps, so slightly more than N tokens when N is not a multiple); the report says how
many tokens were used.

Memory: the student, its gradients and the two AdamW moments (the dtype of the weights: four
copies of the student), the teacher, and the activations all live on the training device. The
estimate below (`estimate_memory`) is a floor; a run whose floor exceeds the free memory is
refused before anything moves, naming what to change. `gradient_checkpointing=True` keeps only
each decoder block's input and recomputes the rest in the backward pass (one more block forward
per block, about a third more compute). transformers' own checkpointing engages only in training
mode, and training mode switches on the pretraining dropout of some families (GPT-2's 0.1, OPT's),
which the recovery loop keeps off; so each decoder block's forward is wrapped in
`torch.utils.checkpoint` (non-reentrant) here, in eval mode, for every family. Checkpoints of
the run hold the whole student and both AdamW moments: three times the student's size on disk.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..registry import register
from .train import (RecoverConfig, _check_distillation, _integer, _number, distillation_loss, next_token_loss,
                    pruned_tensors, recover_)

log = logging.getLogger("prunekit")

DEFAULT_STEPS = 200
GIB = 2 ** 30


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig(RecoverConfig):
    """Every parameter of a structurally pruned model, trained on the dense teacher's logits (Minitron)."""
    steps: int | None = None          # optimizer steps; None: 200, or what `tokens` gives
    lr: float = 2e-5                  # full fine-tuning takes a far smaller step than LoRA
    temperature: float = 1.0          # softmax temperature of both distributions; the loss is scaled by T^2
    kd_weight: float = 1.0            # loss = kd_weight * KD + (1 - kd_weight) * next-token loss (+ hidden term)
    hidden_weight: float = 0.0        # weight of the normalised hidden-state MSE; 0: logit-only distillation
    teacher_blocks: tuple[int, ...] | None = None  # teacher block of each student block; None: the same index
    tokens: int | None = None         # training budget in tokens, instead of steps
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass

    trains: ClassVar[str] = "all"
    objective: ClassVar[str] = "distill"
    # how far and how a run goes, not what it computes: a resume may change them (a run that ran out
    # of memory continues with gradient checkpointing)
    run_only: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "tokens", "gradient_checkpointing")

    def __post_init__(self):
        if self.tokens is not None:
            _integer("tokens (the training budget)", self.tokens, 1)
            if self.steps is not None:
                raise ValueError("steps and tokens both give the training budget: give one of them (with tokens, "
                                 "steps = ceil(tokens / (batch_size x seqlen)))")
            object.__setattr__(self, "steps", 1)       # the shared checks want a number; `resolved` sets it
            try:
                super().__post_init__()
            finally:
                object.__setattr__(self, "steps", None)
        else:
            if self.steps is None:
                object.__setattr__(self, "steps", DEFAULT_STEPS)
            super().__post_init__()
        _check_distillation(self)
        object.__setattr__(self, "hidden_weight", _number("hidden_weight", self.hidden_weight, 0.0, low_open=False))
        if self.teacher_blocks is not None:
            blocks = self.teacher_blocks
            if not isinstance(blocks, (list, tuple)) or not blocks or any(
                    isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in blocks):
                raise ValueError("teacher_blocks must list, for every student block, the index (>= 0) of the teacher "
                                 f"block it came from, got {blocks!r}")
            object.__setattr__(self, "teacher_blocks", tuple(blocks))
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")

    @property
    def windows_needed(self) -> int:
        if self.steps is None and self.samples is None:
            raise ValueError("a budget in tokens becomes steps once the window length is known: "
                             "use cfg.resolved(seqlen).windows_needed")
        return super().windows_needed

    def resolved(self, seqlen: int) -> DistillConfig:
        """With `tokens`: ceil(tokens / (batch_size * seqlen)) optimizer steps; otherwise itself."""
        if self.tokens is None:
            return self
        return dataclasses.replace(self, steps=math.ceil(self.tokens / (self.batch_size * seqlen)), tokens=None)

    def session(self, model, teacher, windows, device, name) -> DistillSession:
        return DistillSession(model, teacher, self, int(windows.shape[1]), device, name)


register("distill", DistillConfig, scope="recover", calibrated=True)(recover_)


# ----------------------------------------------------------------------------------------------
# Block pairs for the hidden-state loss
# ----------------------------------------------------------------------------------------------

def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    from ..models import spec_for
    from ..models.spec import get_module
    return get_module(model, spec_for(model).blocks)


def block_pairs(model: nn.Module, teacher: nn.Module, cfg: DistillConfig,
                name: str = "distill") -> list[tuple[int, int]]:
    """(student block, teacher block) pairs of the hidden-state loss; [] when hidden_weight is 0.

    Refuses what it cannot pair: different hidden sizes (the embedding channels were pruned), or
    different block counts with no `teacher_blocks` to say where each student block came from."""
    if not cfg.hidden_weight:
        return []
    student_hidden, teacher_hidden = model.config.hidden_size, teacher.config.hidden_size
    if student_hidden != teacher_hidden:
        raise ValueError(f"{name}: hidden_weight compares the residual streams, but the student's hidden size is "
                         f"{student_hidden} and the teacher's {teacher_hidden}; use hidden_weight 0 (logits only)")
    count, teacher_count = len(decoder_blocks(model)), len(decoder_blocks(teacher))
    if cfg.teacher_blocks is not None:
        if len(cfg.teacher_blocks) != count:
            raise ValueError(f"{name}: teacher_blocks names {len(cfg.teacher_blocks)} teacher blocks, but the student "
                             f"has {count} blocks (one entry per student block)")
        outside = [b for b in cfg.teacher_blocks if b >= teacher_count]
        if outside:
            raise ValueError(f"{name}: teacher_blocks {outside} are out of range: the teacher has {teacher_count} "
                             "blocks; is it the model the student was pruned from?")
        return list(enumerate(cfg.teacher_blocks))
    if count != teacher_count:
        raise ValueError(f"{name}: hidden_weight pairs every student block with the teacher block it came from, but "
                         f"the student has {count} blocks and the teacher {teacher_count} and nothing records which "
                         "were removed. Give teacher_blocks (the teacher index of each student block; `prunekit "
                         "recover` reads them from the removed_blocks that DIR/prunekit.json records, when there is "
                         "one), or use hidden_weight 0: logit-only distillation, which Minitron uses after depth "
                         "pruning")
    return [(i, i) for i in range(count)]


def teacher_blocks_from_record(record: dict, teacher_count: int, student_count: int) -> tuple[int, ...] | None:
    """The teacher block each student block came from, by replaying the removed_blocks of every
    pruning step recorded in a prunekit.json (`record`), in order, from a teacher of `teacher_count`
    blocks; None when no step removed a block. Raises when the record does not lead from this
    teacher to a student of `student_count` blocks."""
    kept = list(range(teacher_count))
    removed_any = False
    for index, step in enumerate(record.get("steps") or []):
        removed = set((step or {}).get("removed_blocks") or [])
        if not removed:
            continue
        removed_any = True
        outside = sorted(i for i in removed if not 0 <= i < len(kept))
        if outside:
            raise ValueError(f"prunekit.json: step {index} removed blocks {outside}, but at that step the model had "
                             f"{len(kept)} blocks: the record does not start from this teacher ({teacher_count} "
                             "blocks); give the teacher the model was pruned from")
        kept = [block for position, block in enumerate(kept) if position not in removed]
    if not removed_any:
        return None
    if len(kept) != student_count:
        raise ValueError(f"prunekit.json: the recorded block removals lead from the teacher's {teacher_count} blocks "
                         f"to {len(kept)}, but the student has {student_count}; give the teacher the model was "
                         "pruned from, or use --hidden-weight 0")
    return tuple(kept)


def relative_error(student: Tensor, teacher: Tensor) -> Tensor:
    """|s - t|^2 / |t|^2 over every element, in float32 (the normalised MSE).  (b, L, H) each."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """A floor of what distill holds on its device, in bytes (see `estimate_memory`)."""
    student: int          # the student's weights
    optimizer: int        # its gradients and AdamW's two moments
    teacher: int          # the teacher's weights
    activations: int      # what the backward pass keeps, logits included
    other: int            # the zero masks, and on the CPU the copy that restores a failed run
    resident: int         # of the weights, the bytes already on the device (not allocated again)

    @property
    def total(self) -> int:
        return self.student + self.optimizer + self.teacher + self.activations + self.other

    def line(self, where) -> str:
        return (f"memory on {where}: at least {self.total / GIB:.2f} GiB (student {self.student / GIB:.2f}, "
                f"gradients + AdamW {self.optimizer / GIB:.2f}, teacher {self.teacher / GIB:.2f}, activations "
                f"{self.activations / GIB:.2f}, masks and backup {self.other / GIB:.2f})")


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _bytes_on(module: nn.Module, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if _same_device(p.device, device))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def estimate_memory(model: nn.Module, teacher: nn.Module, cfg: DistillConfig, seqlen: int,
                    device: torch.device) -> MemoryEstimate:
    """The floor of distill's peak on `device`.

    weights       student + teacher parameters
    optimizer     gradients + AdamW exp_avg + exp_avg_sq: three more copies of the student
    activations   per decoder block b x L x (8 hidden + 4 widest-input) elements (what a Llama block keeps
                  for its backward: norms, q/k/v/o inputs and outputs, the FFN's gate/up/act/product),
                  or with gradient checkpointing one block's worth plus every block's input; four float32
                  b x L x vocab tensors (student logits, their log-softmax and its gradient, the teacher's
                  log-softmax); the teacher's block outputs the hidden loss compares
    other         one byte per pruned-tensor element (the zero check's record) and one more for those that
                  hold zeros (their gradient mask); on the CPU a copy of the student (restores a failed run)

    Attention scores, temporaries and the allocator's slack are left out, and the per-block count is a
    Llama block's: a refusal means the run would not fit, a pass is no promise."""
    from ..models.spec import is_linear, weight_view

    element = next(model.parameters()).element_size()
    teacher_element = next(teacher.parameters()).element_size()
    blocks = decoder_blocks(model)
    hidden = model.config.hidden_size
    widest = max((weight_view(m).shape[1] for m in blocks.modules() if is_linear(m)), default=hidden)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size
    tokens = cfg.batch_size * seqlen
    per_block = tokens * (8 * hidden + 4 * widest) * element
    kept = (per_block + len(blocks) * tokens * hidden * element if cfg.gradient_checkpointing
            else per_block * len(blocks))
    pairs = len(blocks) if cfg.hidden_weight else 0
    activations = kept + 4 * tokens * vocab * 4 + pairs * tokens * hidden * teacher_element
    student = _bytes(model)
    masks = 0
    for tensor in pruned_tensors(model).values():
        masks += tensor.numel() * (2 if bool((tensor == 0).any()) else 1)
    backup = student if device.type == "cpu" else 0
    resident = _bytes_on(model, device) + _bytes_on(teacher, device)
    return MemoryEstimate(student, 3 * student, _bytes(teacher), activations, masks + backup, resident)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` now (None where it cannot be asked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil
        return psutil.virtual_memory().available
    return None


def check_memory(model: nn.Module, teacher: nn.Module, cfg: DistillConfig, seqlen: int,
                 device: torch.device) -> MemoryEstimate:
    """The estimate; a ValueError naming what to change when its floor exceeds what `device` has free."""
    need = estimate_memory(model, teacher, cfg, seqlen, device)
    free = free_memory(device)
    if free is None or need.total - need.resident <= free:
        return need
    hints = []
    if not cfg.gradient_checkpointing and need.activations > need.total / 10:
        hints.append("gradient checkpointing (--gradient-checkpointing; gradient_checkpointing=True)")
    hints.append(f"fewer windows per step or shorter ones (--batch-size, --seqlen; now {cfg.batch_size} x {seqlen})")
    if next(model.parameters()).dtype == torch.float32:
        hints.append("bfloat16 weights (--dtype bfloat16: half the weights, gradients and AdamW state)")
    hints.append("a device with more memory (--device)")
    hints.append("masked LoRA distillation, which keeps no full-model gradients or optimizer state (--method kd)")
    raise ValueError(f"distill does not fit: it needs at least {need.total / GIB:.2f} GiB on {device} (student "
                     f"{need.student / GIB:.2f}, gradients + AdamW {need.optimizer / GIB:.2f}, teacher "
                     f"{need.teacher / GIB:.2f}, activations {need.activations / GIB:.2f}, masks and backup "
                     f"{need.other / GIB:.2f}; {need.resident / GIB:.2f} of it already there) and "
                     f"{free / GIB:.2f} GiB is free. Try " + ", or ".join(hints))


# ----------------------------------------------------------------------------------------------
# The session: loss, hooks, gradient checkpointing
# ----------------------------------------------------------------------------------------------

def _checkpointed(forward):
    """`forward` recomputed in the backward pass instead of keeping its activations (with gradients only)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _block_output(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class DistillSession:
    """distill's side of one `recover_` run (built by `DistillConfig.session`, before the model moves):
    checks the memory, pairs the blocks, and while entered holds the hooks that catch the block
    outputs and the gradient-checkpointing wrappers. `objective` is the loss; forwards without
    gradients (the probes) also add their terms to running means that `take_probe` returns."""

    def __init__(self, model: nn.Module, teacher: nn.Module, cfg: DistillConfig, seqlen: int,
                 device: torch.device, name: str = "distill"):
        student_out, teacher_out = model.get_output_embeddings(), teacher.get_output_embeddings()
        if student_out is not None and teacher_out is not None and \
                student_out.weight.shape[0] != teacher_out.weight.shape[0]:
            raise ValueError(f"{name}: the student predicts {student_out.weight.shape[0]} tokens and the teacher "
                             f"{teacher_out.weight.shape[0]}; the teacher must share the student's vocabulary")
        self.pairs = block_pairs(model, teacher, cfg, name)
        self.memory = check_memory(model, teacher, cfg, seqlen, device)
        log.info("%s: %s", name, self.memory.line(device))
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self._student_blocks = decoder_blocks(model)
        self._teacher_blocks = decoder_blocks(teacher)
        self._student_out: dict[int, Tensor] = {}
        self._teacher_out: dict[int, Tensor] = {}
        self._handles: list = []
        self._patched: list[tuple[nn.Module, object]] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def __enter__(self) -> DistillSession:
        try:
            for student in sorted({s for s, _ in self.pairs}):
                self._handles.append(self._student_blocks[student].register_forward_hook(
                    self._keep(self._student_out, student)))
            for teacher in sorted({t for _, t in self.pairs}):     # one hook where two student blocks share one
                self._handles.append(self._teacher_blocks[teacher].register_forward_hook(
                    self._keep(self._teacher_out, teacher)))
            if self.gradient_checkpointing:
                for block in self._student_blocks:
                    self._patched.append((block, vars(block).get("forward")))
                    block.forward = _checkpointed(block.forward)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block, previous in reversed(self._patched):
            if previous is None:
                del block.forward
            else:
                block.forward = previous
        self._patched.clear()
        self._student_out.clear()
        self._teacher_out.clear()

    @staticmethod
    def _keep(store: dict, index: int):
        def hook(module, args, output) -> None:
            store[index] = _block_output(output)
        return hook

    def objective(self, model: nn.Module, ids: Tensor, cfg: DistillConfig, teacher: nn.Module) -> Tensor:
        """The distill loss of one batch (module docstring), computed with the hooks this session installed."""
        self._student_out.clear()
        self._teacher_out.clear()
        try:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            logits = model(input_ids=ids, use_cache=False).logits
            kd = distillation_loss(logits, teacher_logits, cfg.temperature)
            loss = kd if cfg.kd_weight == 1 else cfg.kd_weight * kd + (1 - cfg.kd_weight) * next_token_loss(logits, ids)
            hidden = None
            if self.pairs:
                hidden = torch.stack([relative_error(self._student_out[s], self._teacher_out[t])
                                      for s, t in self.pairs]).mean()
                loss = loss + cfg.hidden_weight * hidden
        finally:
            self._student_out.clear()
            self._teacher_out.clear()
        if not torch.is_grad_enabled():          # a probe: keep its terms
            batch = int(ids.shape[0])
            self._sums["kl"] = self._sums.get("kl", 0.0) + float(kd) * batch
            if hidden is not None:
                self._sums["hidden"] = self._sums.get("hidden", 0.0) + float(hidden) * batch
            self._count += batch
        return loss

    def take_probe(self) -> dict:
        """Mean terms of the forwards without gradients since the last call: {"kl": ..., "hidden": ... or None}."""
        count = max(self._count, 1)
        terms = {"kl": self._sums.get("kl", 0.0) / count,
                 "hidden": self._sums["hidden"] / count if "hidden" in self._sums else None}
        self._sums.clear()
        self._count = 0
        return terms

    def describe(self, cfg: DistillConfig) -> str:
        text = f"T^2 KL(teacher || student), T={cfg.temperature:g}"
        if cfg.kd_weight < 1:
            text = f"{cfg.kd_weight:g} x {text} + {1 - cfg.kd_weight:g} x next-token cross-entropy"
        if self.pairs:
            text += (f" + {cfg.hidden_weight:g} x normalised hidden-state MSE (mean over {len(self.pairs)} "
                     "block pairs)")
        return text

    def report(self, before: dict, after: dict) -> tuple[dict, list[str]]:
        """(the report's "distill" section, lines for the summary)."""
        section = {
            "kl_before": before["kl"], "kl_after": after["kl"],
            "hidden_error_before": before["hidden"], "hidden_error_after": after["hidden"],
            "teacher_blocks": [t for _, t in self.pairs] if self.pairs else None,
            "gradient_checkpointing": self.gradient_checkpointing,
            "memory_floor_bytes": self.memory.total,
        }
        line = f"distill: T^2 KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f}"
        if self.pairs:
            line += (f", normalised hidden-state MSE {before['hidden']:.4f} -> {after['hidden']:.4f} over "
                     f"{len(self.pairs)} block pairs")
        line += f"; gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        return section, [line]


__all__ = ["DistillConfig", "DistillSession", "MemoryEstimate", "block_pairs", "check_memory", "estimate_memory",
           "relative_error", "teacher_blocks_from_record"]
