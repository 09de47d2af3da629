"""Recovery fine-tuning that keeps a pruned model's zeros: masked LoRA, PERP and distillation.

    from prunekit.recovery import LoraRecoverConfig, recover_
    report = recover_(model, LoraRecoverConfig(steps=200, rank=16, rslora=True), windows)

`train.py` holds the configs, the registered `recover_` (methods "lora", "perp" (PERP, arXiv
2312.15230), "kd", and for Mixture-of-Experts models "router-kd" (Router KD, arXiv 2603.02217)
and "expert-kd" (MoE-Pruner's expert-wise distillation, arXiv 2410.12013); scope "recover") and
checkpoint/resume; `distill.py` the method "distill": every parameter of a width- or
depth-pruned model distilled from the dense teacher's logits (Minitron, arXiv 2407.14679,
2408.11796); `partial.py` the method "partial": the last blocks, final norm and LM head after
depth pruning (arXiv 2411.15558); `masked_lora.py` the adapters whose update is masked by the base weight's sparsity
(rsLoRA/RoRA scale: arXiv 2312.03732, 2501.04315); `moe.py` what the MoE methods train and
expert-kd's per-expert loss; `cli.py` the `prunekit recover` command. Importing this package
registers the seven methods; peft is imported only when LoRA adapters are attached.
"""
from .distill import DistillConfig
from .masked_lora import MaskedLora, attach_masked_lora, lora_scaling
from .moe import ExpertDistillation, expert_parameters, router_parameters
from .partial import PartialConfig, recover_partial
from .train import (ExpertKDConfig, KDConfig, LoraRecoverConfig, PerpConfig, RecoverConfig, RouterKDConfig,
                    block_linears, format_summary, pruned_tensors, recover_, recovery_windows)

__all__ = ["DistillConfig", "ExpertDistillation", "ExpertKDConfig", "KDConfig", "LoraRecoverConfig", "MaskedLora",
           "PartialConfig", "PerpConfig", "RecoverConfig", "RouterKDConfig", "attach_masked_lora", "block_linears",
           "expert_parameters", "format_summary", "lora_scaling", "pruned_tensors", "recover_", "recover_partial",
           "recovery_windows", "router_parameters"]
