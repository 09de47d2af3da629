"""Recovery for Mixture-of-Experts models: what `router-kd` and `expert-kd` train, and expert-kd's loss.

router-kd  Router Knowledge Distillation (Hyeon & Do, "Is Retraining-Free Enough? The Necessity of
           Router Calibration for Efficient MoE Compression", arXiv 2603.02217): after experts are
           pruned, edited or merged, the degradation is largely a router-expert mismatch, so only
           the routers are trained, on T^2 * KL(teacher || student) of the next-token distributions
           (their Eq. 3; the teacher is the uncompressed model, the data unlabeled). Trainable: the
           router `weight` (E, H) of every MoE block, and its `bias` where the family has one
           (gpt-oss); never DeepSeek-V3's `e_score_correction_bias` (a buffer, not trained by
           gradient in the original either), nor Qwen2-MoE's `shared_expert_gate` (a shared expert's
           gate, not the router). Teacher and student may have different expert counts.

expert-kd  Expert-wise knowledge distillation of MoE-Pruner (Xie et al., "MoE-Pruner: Pruning
           Mixture-of-Experts Large Language Model using the Hints from Its Router", arXiv
           2410.12013, section 3.3, Eq. 10), for a model pruned *inside* its experts:

               L = L_CE + lambda * sum_j sum_i MSE(E^j_i,teacher, E^j_i,student)

           L_CE is the next-token cross-entropy of the student, j runs over the MoE blocks, i over
           the routed experts, MSE is the mean over the elements, and lambda is "initialized based
           on the strength of cross entropy loss and expert-wise knowledge distillation loss",
           L_CE / L_expert (here: measured once, before training, on the probe windows; or given).
           The paper fine-tunes all expert weights with the sparsity mask kept; here the trainable
           tensors are the fused 3-D expert weights (`gate_up_proj`, `down_proj`), their zeros
           held by masking the gradient and re-applying the mask after every step.

           What the paper leaves open, and what we do: both experts of a pair read the *same* input,
           the student's hidden state entering the experts module of block j (detached, so the
           MSE term trains expert i of block j alone), on the tokens the student's router sends to
           expert i; each expert's output is its own, unweighted by the router. Expert i of the
           student is paired with expert i of the teacher, so the two must have the same experts
           (pruning inside experts: MoE-Pruner, Wanda, SparseGPT; after experts were *removed*
           use router-kd or kd).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _moe(model: nn.Module, method: str, what: str):
    """(spec, [(index, block)] of the MoE blocks); a ValueError naming the model when it has none."""
    from ..models import spec_for
    from ..models.moe import is_moe_block
    from ..models.spec import get_module

    spec = spec_for(model)
    blocks = []
    if spec.experts is not None:
        blocks = [(i, block) for i, block in enumerate(get_module(model, spec.blocks))
                  if is_moe_block(block, spec.experts)]
    if not blocks:
        model_type = getattr(model.config, "model_type", None)
        raise ValueError(f"{method} trains the {what} of a Mixture-of-Experts model; {model_type!r} "
                         f"({type(model).__name__}) has none" + ("; use kd or lora for a dense model"
                                                                 if spec.experts is None else ""))
    return spec, blocks


def router_parameters(model: nn.Module, method: str = "router-kd") -> dict[str, nn.Parameter]:
    """router-kd's trainable set: every MoE block's router weight (E, H) and bias (E,) if any, by full name.

    Parameters only: `e_score_correction_bias` (DeepSeek-V3, GLM-4-MoE) is a buffer and stays as it is.
    """
    from ..models.spec import get_module

    spec, blocks = _moe(model, method, "routers")
    out = {}
    for index, block in blocks:
        router = get_module(block, spec.experts.router)
        for name, param in router.named_parameters(recurse=False):
            out[f"{spec.blocks}.{index}.{spec.experts.router}.{name}"] = param
    return out


def expert_parameters(model: nn.Module, method: str = "expert-kd") -> dict[str, nn.Parameter]:
    """The fused 3-D expert weights of every MoE block ((E, 2I, H) / (E, H, I), gpt-oss transposed), by name.

    What pruning inside the experts zeroes, so what the zero check after recovery covers besides
    the linear layers, and what expert-kd trains (expert biases, 2-D, are not included).
    """
    from ..models.spec import get_module

    spec, blocks = _moe(model, method, "routed experts")
    out = {}
    for index, block in blocks:
        experts = get_module(block, spec.experts.experts)
        for name, param in experts.named_parameters(recurse=False):
            if param.dim() == 3:
                out[f"{spec.blocks}.{index}.{spec.experts.experts}.{name}"] = param
    return out


def fused_expert_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """`expert_parameters`, or {} for a dense family or a model without MoE blocks (no error)."""
    from ..models import spec_for

    if spec_for(model).experts is None:
        return {}
    try:
        return expert_parameters(model)
    except ValueError:
        return {}


class ExpertDistillation:
    """Expert-wise distillation (MoE-Pruner, arXiv 2410.12013, Eq. 10): measures, during each
    student forward, sum over MoE blocks j and experts i of MSE(teacher expert, student expert).

    Used as a context manager: on entry a forward hook goes on every student experts module; each
    student forward adds one term per MoE block to `terms`; `reset()` before a forward, `total()`
    after it. `weight` is lambda (set by the caller). The teacher runs no forward of its own: only
    its experts modules are called, on the student's inputs.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, method: str = "expert-kd"):
        from ..models import spec_for
        from ..models.moe import expert_count, is_moe_block
        from ..models.spec import get_module

        spec, blocks = _moe(model, method, "routed experts")
        if type(teacher.config).__name__ != type(model.config).__name__:
            raise ValueError(f"{method} pairs each expert with the teacher's: the teacher is "
                             f"{type(teacher).__name__} and the student {type(model).__name__}")
        teacher_spec = spec_for(teacher)
        teacher_blocks = get_module(teacher, teacher_spec.blocks)
        if len(teacher_blocks) != len(get_module(model, spec.blocks)):
            raise ValueError(f"{method} pairs each block with the teacher's: the student has "
                             f"{len(get_module(model, spec.blocks))} decoder blocks and the teacher "
                             f"{len(teacher_blocks)}; after removing blocks use kd")
        self.pairs: list[tuple[str, nn.Module, nn.Module]] = []
        for index, block in blocks:
            where = f"{spec.blocks}.{index}.{spec.experts.experts}"
            other = teacher_blocks[index]
            if not is_moe_block(other, teacher_spec.experts):
                raise ValueError(f"{method}: block {index} of the teacher has no routed experts")
            if expert_count(block, spec.experts) != expert_count(other, teacher_spec.experts):
                raise ValueError(f"{method} pairs expert i of the student with expert i of the teacher, but block "
                                 f"{index} has {expert_count(block, spec.experts)} experts and the teacher's "
                                 f"{expert_count(other, teacher_spec.experts)}; expert-kd follows pruning inside "
                                 "the experts (moe-pruner, wanda, ...): after removing experts use router-kd or kd")
            student_experts = get_module(block, spec.experts.experts)
            teacher_experts = get_module(other, teacher_spec.experts.experts)
            shapes = {n: tuple(p.shape) for n, p in student_experts.named_parameters()}
            teacher_shapes = {n: tuple(p.shape) for n, p in teacher_experts.named_parameters()}
            if shapes != teacher_shapes:
                raise ValueError(f"{method}: the experts of {where} have shapes {shapes}, the teacher's "
                                 f"{teacher_shapes}; the teacher must be the model before pruning")
            self.pairs.append((where, student_experts, teacher_experts))
        self.weight = 1.0
        self.terms: list[Tensor] = []
        self._handles: list = []
        self._inside = False

    def __enter__(self) -> ExpertDistillation:
        for _, student, teacher in self.pairs:
            self._handles.append(student.register_forward_hook(self._hook_for(teacher)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.terms.clear()

    def reset(self) -> None:
        self.terms.clear()

    def total(self) -> Tensor:
        if not self.terms:
            raise RuntimeError("expert-kd measured no MoE block in this forward pass; the experts modules were "
                               "not called (are the hooks installed?)")
        return torch.stack(self.terms).sum()

    def _hook_for(self, teacher: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._inside:              # our own calls of the experts module below
                return
            if len(args) < 2:
                raise RuntimeError(f"{type(module).__name__} was called without the routing (hidden_states, "
                                   "top_k_index, top_k_weights) as positional arguments; expert-kd cannot "
                                   "pair its experts")
            self.terms.append(self._block_loss(module, teacher, args[0], args[1]))
        return hook

    def _block_loss(self, student: nn.Module, teacher: nn.Module, x: Tensor, index: Tensor) -> Tensor:
        """sum_i MSE(E_i,teacher(x_i), E_i,student(x_i)), x_i the tokens routed to expert i.  x (T, H), index (T, k)."""
        count = int(student.gate_up_proj.shape[0])
        x = x.detach().reshape(-1, x.shape[-1])                                        # (T, H)
        rows = index.reshape(x.shape[0], -1)                                           # (T, k)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(rows.shape[1])
        rows = rows.reshape(-1)
        keep = (rows >= 0) & (rows < count)            # some families mark dropped slots with E
        rows, token = rows[keep], token[keep]
        if rows.numel() == 0:
            return x.new_zeros((), dtype=torch.float32)
        inputs = x[token]                                      # (R, H): one row per (token, chosen expert)
        ones = torch.ones(rows.shape[0], 1, dtype=x.dtype, device=x.device)
        self._inside = True
        try:
            # the family's own experts module, each row sent to its expert alone with weight 1
            student_out = student(inputs, rows[:, None], ones)                         # (R, H)
            with torch.no_grad():
                dtype = teacher.gate_up_proj.dtype
                teacher_out = teacher(inputs.to(dtype), rows[:, None], ones.to(dtype))
        finally:
            self._inside = False
        error = (student_out.float() - teacher_out.float()).pow(2).mean(dim=-1)        # (R,)
        sums = torch.zeros(count, dtype=error.dtype, device=error.device).index_add(0, rows, error)
        counts = torch.bincount(rows, minlength=count)
        used = counts > 0
        return (sums[used] / counts[used]).sum()        # each expert's MSE over its tokens x H elements


__all__ = ["ExpertDistillation", "expert_parameters", "fused_expert_weights", "router_parameters"]
