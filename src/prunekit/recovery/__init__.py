"""Recovery fine-tuning that keeps a pruned model's zeros: masked LoRA, PERP and distillation.

    from prunekit.recovery import LoraRecoverConfig, recover_
    report = recover_(model, LoraRecoverConfig(steps=200, rank=16, rslora=True), windows)

`train.py` holds the configs, the registered `recover_` (methods "lora", "perp" (PERP, arXiv
2312.15230), "kd"; scope "recover") and checkpoint/resume; `masked_lora.py` the adapters whose
update is masked by the base weight's sparsity (rsLoRA/RoRA scale: arXiv 2312.03732,
2501.04315); `cli.py` the
`prunekit recover` command. Importing this package registers the three methods; peft is
imported only when LoRA adapters are attached.
"""
from .masked_lora import MaskedLora, attach_masked_lora, lora_scaling
from .train import (KDConfig, LoraRecoverConfig, PerpConfig, RecoverConfig, block_linears, format_summary,
                    recover_, recovery_windows)

__all__ = ["KDConfig", "LoraRecoverConfig", "MaskedLora", "PerpConfig", "RecoverConfig", "attach_masked_lora",
           "block_linears", "format_summary", "lora_scaling", "recover_", "recovery_windows"]
