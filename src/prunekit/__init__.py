"""prunekit: prune Hugging Face causal language models one block at a time, and measure it.

    from prunekit import load, calibration_data, prune_, WandaConfig
    model, tok = load("default")                      # hub id, local dir, or a .gguf file
    report = prune_(model, WandaConfig(sparsity=0.5), calib=calibration_data(tok, samples=128))

Public names are imported on first use, so `import prunekit` stays cheap (no transformers import).
"""
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "prune_": ".prune",
    "load": ".io.loading",
    "calibration_data": ".data",
    "evaluation_data": ".data",
    "perplexity": ".eval.perplexity",
    "save_pretrained_atomic": ".io.export",
    "sparsity_report": ".report",
    "SparsityConfig": ".config",
    "MagnitudeConfig": ".methods.magnitude",
    "WandaConfig": ".methods.wanda",
    "SparseGPTConfig": ".methods.sparsegpt",
    "run_recipe": ".api",
    "load_recipe": ".recipe",
    # structured pruning: width (heads, channels) and depth (blocks)
    "load_pruned": ".io.loading",
    "WidthConfig": ".structured",
    "MagnitudeSPConfig": ".methods.magnitude_sp",
    "WandaSPConfig": ".methods.wanda_sp",
    "FlapConfig": ".methods.flap",
    "TaylorConfig": ".methods.taylor",
    "DepthConfig": ".depth",
    "remove_blocks": ".depth",
    "BlockInfluenceConfig": ".methods.block_influence",
    "AngularConfig": ".methods.angular",
    "SLEBConfig": ".methods.sleb",
    "LastKConfig": ".methods.last_k",
    "LaCoConfig": ".methods.laco",
    "SublayerDropConfig": ".methods.sublayer_drop",
    "benchmark": ".bench",
    # beyond one-shot: more scores, compensation
    "RIAConfig": ".methods.ria",
    "GBLMConfig": ".methods.gblm",
    "PrunerZeroConfig": ".methods.pruner_zero",
    "EoraConfig": ".eora",
    # Mixture of experts: whole experts (scores, merging) and weights inside experts
    "ExpertsConfig": ".experts",
    "ReapConfig": ".methods.reap",
    "ExpertFrequencyConfig": ".methods.expert_frequency",
    "ExpertOutputConfig": ".methods.expert_output",
    "ExpertLooConfig": ".methods.expert_loo",
    "EasyEpConfig": ".methods.easy_ep",
    "NaeeConfig": ".methods.naee",
    "ExpertRandomConfig": ".methods.expert_random",
    "ExpertMergeConfig": ".methods.expert_merge",
    "MoePrunerConfig": ".methods.moe_pruner",
    # recovery that keeps the mask
    "recover_": ".recovery",
    "LoraRecoverConfig": ".recovery",
    "PerpConfig": ".recovery",
    "KDConfig": ".recovery",
    "RouterKDConfig": ".recovery",
    "ExpertKDConfig": ".recovery",
    # inference-time pruning: tokens in prefill, KV entries at decode, prompts
    "generate": ".inference.generation",
    "pruning": ".inference.generation",
    "LazyLLMConfig": ".inference.configs",
    "TwilightConfig": ".inference.configs",
    "StreamingConfig": ".inference.configs",
    "PromptPruningConfig": ".inference.configs",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name], __name__), name)
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
