"""Inference-time pruning on stock transformers models: tokens in prefill (LazyLLM), KV entries at decode
(Twilight, streaming heads) and prompts before generation.

    configs.py    what to prune, one frozen dataclass per mechanism
    runtime.py    the registered attention function and the switch (`activate`) every mechanism runs through
    lazyllm.py    token pruning in prefill with revival at decode (per-layer caches with positions)
    kv.py         Twilight top-p selection and streaming heads (per-head caches) at decode
    prompt.py     fitting a prompt into a token budget by the model's own surprisal
    generation.py `pruning(model, ...)` (a context manager around any generation loop) and `generate(...)`
"""
from .configs import LazyLLMConfig, PromptPruningConfig, StreamingConfig, TwilightConfig
from .generation import Generation, generate, pruning

__all__ = ["Generation", "LazyLLMConfig", "PromptPruningConfig", "StreamingConfig", "TwilightConfig", "generate",
           "pruning"]
