"""The command-line flags of inference-time pruning, shared by `prunekit generate`, `prunekit eval` and
`prunekit bench`, and the configs they make."""
from __future__ import annotations

import argparse

from .configs import LazyLLMConfig, PromptPruningConfig, StreamingConfig, TwilightConfig

KV_METHODS = ("twilight", "streaming")


def add_arguments(parser: argparse.ArgumentParser, prompt: bool = True) -> None:
    group = parser.add_argument_group("inference-time pruning")
    group.add_argument("--token-pruning", choices=["lazyllm"], default=None,
                       help="prune prompt tokens in prefill (LazyLLM, revivable at decode)")
    group.add_argument("--keep", type=float, default=None, help="lazyllm: prompt tokens kept by the last stage "
                                                               "(default 0.5)")
    group.add_argument("--stages", type=int, default=None, help="lazyllm: pruning layers (default 3)")
    group.add_argument("--observe", type=int, default=None,
                       help="lazyllm: the prompt's last N rows rank the tokens (default 1: the last token, the "
                            "paper's; e.g. 32: an observation window over the question, as SnapKV)")
    group.add_argument("--pool", type=int, default=None,
                       help="lazyllm: rank each token by the best score within POOL//2 positions (odd; default 1: "
                            "none; e.g. 7, SnapKV's pooling: a fact's neighbouring tokens are kept with it)")
    group.add_argument("--no-revive", dest="revive", action="store_false", default=None,
                       help="lazyllm: never compute pruned tokens again at decode (faster steps, no revival)")
    group.add_argument("--kv-pruning", default=None, metavar="{twilight,streaming}",
                       help="prune KV entries at decode: twilight (top-p per head), streaming (sink + window heads), "
                            "or both: twilight,streaming")
    group.add_argument("--top-p", type=float, default=None, help="twilight: attention mass kept per head "
                                                                 "(default 0.95)")
    group.add_argument("--selector", choices=["exact", "quest"], default=None,
                       help="twilight: candidates scored exactly (default) or by Quest's page bounds (reads less)")
    group.add_argument("--page", type=int, default=None,
                       help="twilight --selector quest: entries per page (default 16)")
    group.add_argument("--candidates", type=float, default=None,
                       help="twilight --selector quest: share of pages passed to top-p (default 0.25)")
    group.add_argument("--sink", type=int, default=None, help="streaming/twilight: first entries always kept "
                                                              "(default 4)")
    group.add_argument("--window", type=int, default=None, help="streaming: last entries a streaming head keeps "
                                                                "(default 256); twilight: always kept (default 64)")
    group.add_argument("--heads", type=float, default=None, help="streaming: fraction of KV heads made streaming "
                                                                 "by a calibration pass (default 0.5)")
    if prompt:
        group.add_argument("--prompt-pruning", choices=["examples", "tokens"], default=None,
                           help="fit the prompt into --budget tokens: drop whole few-shot examples or "
                                "low-surprisal tokens (the last blank-line-separated block is the question)")
        group.add_argument("--budget", type=int, default=None, help="prompt pruning: token budget (default 2048)")


def _given(args, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def configs_from_args(args) -> tuple:
    """(token_pruning, kv_pruning, prompt_pruning) from parsed flags; a flag of a mechanism not asked for is an
    error (it would silently do nothing)."""
    token = kv = prompt = None
    if args.token_pruning == "lazyllm":
        token = LazyLLMConfig(**_given(args, ("keep", "stages", "revive", "observe", "pool")))
    elif _given(args, ("keep", "stages", "revive", "observe", "pool")):
        raise ValueError("--keep, --stages, --observe, --pool and --no-revive set up token pruning: add "
                         "--token-pruning lazyllm")
    methods = [m.strip() for m in (args.kv_pruning or "").split(",") if m.strip()]
    unknown = [m for m in methods if m not in KV_METHODS]
    if unknown:
        raise ValueError(f"--kv-pruning takes {', '.join(KV_METHODS)} (comma-separated for both); got {unknown}")
    kv = []
    if "twilight" in methods:
        options = _given(args, ("top_p", "sink", "selector", "page", "candidates"))
        if "streaming" not in methods and args.window is not None:
            options["window"] = args.window
        kv.append(TwilightConfig(**options))
    elif _given(args, ("top_p", "selector", "page", "candidates")):
        raise ValueError("--top-p, --selector, --page and --candidates set up Twilight: add --kv-pruning twilight")
    if "streaming" in methods:
        kv.append(StreamingConfig(**_given(args, ("sink", "window", "heads"))))
    elif args.heads is not None:
        raise ValueError("--heads sets up streaming heads: add --kv-pruning streaming")
    if not methods and _given(args, ("sink", "window")):
        raise ValueError("--sink and --window set up KV pruning: add --kv-pruning twilight or streaming")
    if getattr(args, "prompt_pruning", None):
        prompt = PromptPruningConfig(mode=args.prompt_pruning, **_given(args, ("budget",)))
    elif getattr(args, "budget", None) is not None:
        raise ValueError("--budget sets up prompt pruning: add --prompt-pruning examples or tokens")
    return token, (kv[0] if len(kv) == 1 else kv) or None, prompt


def describe(token, kv, prompt=None) -> str:
    """One line naming the pruning in effect (for protocols)."""
    parts = [repr(c) for c in (token, *(kv if isinstance(kv, list) else [kv]), prompt) if c is not None]
    return ", ".join(parts) if parts else "none (stock)"


def to_spec(token, kv) -> dict | None:
    """JSON-able form of (token_pruning, kv_pruning), for benchmark workers."""
    from dataclasses import asdict
    kv = kv if isinstance(kv, list) else [kv] if kv is not None else []
    if token is None and not kv:
        return None
    return {"token": asdict(token) if token is not None else None,
            "kv": [{"kind": type(c).__name__, **asdict(c)} for c in kv]}


def from_spec(spec: dict) -> tuple:
    kinds = {"TwilightConfig": TwilightConfig, "StreamingConfig": StreamingConfig}
    token = LazyLLMConfig(**spec["token"]) if spec.get("token") else None
    kv = [kinds[c["kind"]](**{k: v for k, v in c.items() if k != "kind"}) for c in spec.get("kv", [])]
    return token, (kv[0] if len(kv) == 1 else kv) or None
