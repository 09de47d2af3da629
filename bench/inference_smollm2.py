"""Inference-time pruning on SmolLM2-135M (issue 18): time to first token, decode speed, KV-cache memory and
long-context accuracy of stock generation against LazyLLM, Twilight and streaming heads.

    python bench/inference_smollm2.py                                  # contexts 2048,4096,8192, every config
    python bench/inference_smollm2.py --contexts 8192 --only lazyllm-50 --accuracy-contexts none
    python bench/inference_smollm2.py --model DIR --contexts 96 --new-tokens 4 --repeats 1 --warmup 0 \\
        --accuracy-contexts 96 --accuracy-samples 1 --window 16      # tiny (tests)

Protocol. Speed: `prunekit.bench.benchmark` with the config as `pruning` (so every row has its own stock
baseline, measured in the same call right before it: the ratio compares two runs minutes apart at most),
batch 1, a prompt of context - new_tokens tokens (`--prompt text`, the default: the first tokens of the
default corpus's held-out split, real text whose attention is not flat; `--prompt random`: random ids),
`new_tokens` greedy decode steps, `warmup`
discarded runs then the median of `repeats`, each model in its own process, torch threads as given.
TTFT = the prefill's wall time (one forward over the prompt, logits of the last position only); the
decode speed is over the steps after it; the KV cache is the bytes its tensors hold at the end.
Accuracy: `prunekit.eval.long_context.long_context_suite` (needle, kv-retrieval, doc-qa; depths 10-90%;
`accuracy-samples` prompts per task and context, greedy, exact match), with the same config.
Streaming heads are chosen by a calibration pass over the first 2,048 tokens of the default corpus.
Prompt pruning (`prompt-tokens`: tokens mode, the prompt cut to --prompt-share (0.5) of its tokens, its
question kept) changes
the prompt before generation, so it is timed in this process on the suite's first needle prompt of each
context: stock generates from the whole prompt, the pruned run prunes it (its surprisal pass, timed alone:
median of `repeats`) then generates from what is left; its TTFT is that pruning plus the shorter prefill.
Its accuracy: the suite with the budget set to that share of each context's prompt budget.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path


def configs(window: int) -> dict:
    from prunekit.inference import LazyLLMConfig, StreamingConfig, TwilightConfig
    return {
        "stock": (None, None),
        # nothing pruned, stock attention: the cache the KV mechanisms own (kv.GrowingLayer: appended in place
        # instead of concatenated), measured alone so its speed is not counted as the pruning's
        "inplace-cache": (None, StreamingConfig(sink=4, window=window, heads=0.0)),
        "lazyllm-50": (LazyLLMConfig(keep=0.5), None),
        "lazyllm-30": (LazyLLMConfig(keep=0.3), None),
        "lazyllm-50-norevive": (LazyLLMConfig(keep=0.5, revive=False), None),
        # ranked by the prompt's last 32 rows (SnapKV's observation window) instead of its last token alone
        "lazyllm-50-obs32": (LazyLLMConfig(keep=0.5, observe=32), None),
        "lazyllm-30-obs32": (LazyLLMConfig(keep=0.3, observe=32), None),
        # and each token by the best score within 3 positions (SnapKV's max-pooling, kernel 7)
        "lazyllm-50-obs32-pool7": (LazyLLMConfig(keep=0.5, observe=32, pool=7), None),
        "lazyllm-30-obs32-pool7": (LazyLLMConfig(keep=0.3, observe=32, pool=7), None),
        "twilight-90": (None, TwilightConfig(top_p=0.9)),
        "twilight-95": (None, TwilightConfig(top_p=0.95)),
        "twilight-quest-90": (None, TwilightConfig(top_p=0.9, selector="quest", page=16, candidates=0.25)),
        "twilight-quest-95": (None, TwilightConfig(top_p=0.95, selector="quest", page=16, candidates=0.25)),
        "twilight-quest-99": (None, TwilightConfig(top_p=0.99, selector="quest", page=16, candidates=0.25)),
        "quest-25": (None, TwilightConfig(top_p=1.0, selector="quest", page=16, candidates=0.25)),
        "streaming-50": (None, StreamingConfig(sink=4, window=window, heads=0.5)),
        "streaming-75": (None, StreamingConfig(sink=4, window=window, heads=0.75)),
    }


# prompt pruning (tokens mode: the least surprising tokens of the document go, the question stays), the prompt
# cut to --prompt-share of its tokens; a config of its own kind: the prompt changes before generation, so its
# TTFT is the pruning's own forward pass plus the prefill of what is left
PROMPT_CONFIGS = ("prompt-tokens",)


def prompt_config(share: float, tokens: int):
    """The PromptPruningConfig that cuts a prompt of `tokens` tokens to `share` of them."""
    from prunekit.inference import PromptPruningConfig
    return PromptPruningConfig(mode="tokens", budget=int(share * tokens))


def prompt_speed(name: str, context: int, args, lm, tokenizer) -> dict:
    """Stock against prompt pruning at `context`, in this process: the prompt is the suite's first needle
    prompt of that context (a document and its question: prompt pruning needs a question to keep); stock
    generates from all of it, the pruned run prunes it (timed: `repeats` runs after `warmup`) then generates
    from what is left. TTFT pruned = pruning + prefill of the pruned prompt."""
    import statistics
    import time

    from prunekit.bench import measure
    from prunekit.bench_host import load_average
    from prunekit.eval.long_context import LongContextTasks
    from prunekit.inference.prompt import prune_prompt

    sample = LongContextTasks(tokenizer).sample("needle", context, 0)
    cfg = prompt_config(args.prompt_share, len(sample.ids))
    before = load_average()
    for _ in range(args.warmup):
        prune_prompt(lm, tokenizer, sample.prompt, cfg)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        pruned = prune_prompt(lm, tokenizer, sample.prompt, cfg)
        seconds.append(time.perf_counter() - started)
    runs = {}
    for role, ids in (("stock", sample.ids), ("pruned", pruned.input_ids)):
        [row] = measure(lm, new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, ids=ids)["rows"]
        runs[role] = row
    pruning_ms = 1000 * statistics.median(seconds)
    ttft = {"stock": runs["stock"]["prefill_ms"]["median"],
            "pruned": pruning_ms + runs["pruned"]["prefill_ms"]["median"]}
    decode = {role: runs[role]["decode_tok_s_per_seq"]["median"] for role in runs}
    return {"config": name, "context": context, "pruning": repr(cfg), "prompt_tokens": {
                "stock": len(sample.ids), "pruned": int(pruned.input_ids.numel())},
            "prompt_pruning_ms": pruning_ms, "ttft_ms": ttft, "decode_tok_s": decode,
            "kv_bytes": {role: runs[role]["kv_cache_bytes"] for role in runs},
            "speedup_ttft": ttft["stock"] / ttft["pruned"], "speedup_decode": decode["pruned"] / decode["stock"],
            "load_average": {"before": before, "after": load_average()}}


def _ints(text: str) -> list[int]:
    return [] if text == "none" else [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--contexts", default="2048,4096,8192", help="speed: prompt + new tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompt", default="text", choices=["text", "random"], help="speed prompts (default text)")
    parser.add_argument("--window", type=int, default=256, help="streaming heads: recent entries kept")
    parser.add_argument("--accuracy-contexts", default="2048,4096", help="long-context accuracy ('none': skip)")
    parser.add_argument("--accuracy-samples", type=int, default=5)
    parser.add_argument("--prompt-share", type=float, default=0.5,
                        help="prompt-tokens: the share of the prompt's tokens prompt pruning keeps (default 0.5)")
    parser.add_argument("--only", action="append", help="run only these configs (stock is always the baseline)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference_smollm2.json"))
    args = parser.parse_args(argv)

    from prunekit.bench import benchmark
    from prunekit.bench_host import cpu_model
    from prunekit.eval.long_context import long_context_suite
    from prunekit.inference.cli import describe, to_spec
    from prunekit.io.loading import load

    table = configs(args.window)
    names = args.only or [*table, *PROMPT_CONFIGS]
    unknown = [n for n in names if n not in table and n not in PROMPT_CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join([*table, *PROMPT_CONFIGS])}")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)

    @functools.cache
    def lm_and_tokenizer():                        # loaded once, for the in-process rows and the accuracy
        return load(args.model)

    speed, accuracy = [], []
    for context in _ints(args.contexts):
        for name in names:
            if name == "stock":
                continue
            if name in PROMPT_CONFIGS:
                row = prompt_speed(name, context, args, *lm_and_tokenizer())
                speed.append(row)
                print(f"{context:>6} {name:<14} TTFT {row['speedup_ttft']:.2f}x  decode {row['speedup_decode']:.2f}x"
                      f"  (prompt {row['prompt_tokens']['stock']} -> {row['prompt_tokens']['pruned']} tokens, pruning "
                      f"{row['prompt_pruning_ms']:.0f} ms)", flush=True)
                continue
            token, kv = table[name]
            result = benchmark(args.model, prompt_len=context - args.new_tokens, new_tokens=args.new_tokens,
                               repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                               pruning=to_spec(token, kv), prompt=args.prompt)
            rows = {row["role"]: row for row in result["rows"]}
            base, model = rows["baseline"], rows["model"]
            speed.append({"config": name, "context": context, "pruning": describe(token, kv),
                          "ttft_ms": {"stock": base["prefill_ms"]["median"], "pruned": model["prefill_ms"]["median"]},
                          "decode_tok_s": {"stock": base["decode_tok_s_per_seq"]["median"],
                                           "pruned": model["decode_tok_s_per_seq"]["median"]},
                          "kv_bytes": {"stock": base["kv_cache_bytes"], "pruned": model["kv_cache_bytes"]},
                          "speedup_ttft": model["speedup_prefill"], "speedup_decode": model["speedup_decode"],
                          "load_average": result["protocol"]["load_average_1min"]})
            print(f"{context:>6} {name:<14} TTFT {model['speedup_prefill']:.2f}x  decode {model['speedup_decode']:.2f}x"
                  f"  KV {model['kv_cache_bytes'] / 2**20:.1f} / {base['kv_cache_bytes'] / 2**20:.1f} MiB", flush=True)
    contexts = _ints(args.accuracy_contexts)
    if contexts:
        lm, tokenizer = lm_and_tokenizer()
        for name in names:
            if name in PROMPT_CONFIGS:      # a budget per context: the suite runs once per context, then merged
                from prunekit.eval.long_context import MAX_NEW_TOKENS
                result = merge_contexts([long_context_suite(
                    lm, tokenizer, [context], samples=args.accuracy_samples,
                    prompt_pruning=prompt_config(args.prompt_share, context - MAX_NEW_TOKENS))
                    for context in contexts])
            else:
                token, kv = table[name]
                result = long_context_suite(lm, tokenizer, contexts, samples=args.accuracy_samples,
                                            token_pruning=token, kv_pruning=kv)
            # per prompt, for paired comparisons between configs (the same prompts in every run)
            result["records"] = [{key: r[key] for key in ("task", "context", "index", "correct",
                                                          "prompt_tokens_before", "prompt_tokens_after") if key in r}
                                 for r in result["records"]]
            accuracy.append({"config": name, "result": result})
            print(f"accuracy {name}: {json.dumps(_accuracy_cells(result))}", flush=True)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": _commit(), "machine": f"{cpu_model()}, python {platform.python_version()}",
           "args": {k: str(v) for k, v in vars(args).items()}, "speed": speed, "accuracy": accuracy}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    args.out.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    return 0


def merge_contexts(results: list[dict]) -> dict:
    """One long_context_suite result from runs of one context each (their protocols kept, one per context)."""
    if len(results) == 1:
        return results[0]
    records = [r for result in results for r in result["records"]]
    per_task = {task: {c: cell for result in results for c, cell in result["per_task"][task].items()}
                for task in results[0]["per_task"]}
    return {**results[0], "accuracy": sum(r["correct"] for r in records) / len(records), "prompts": len(records),
            "contexts": [c for result in results for c in result["contexts"]], "per_task": per_task,
            "per_context": {c: cell for result in results for c, cell in result["per_context"].items()},
            "records": records, "protocol": [result["protocol"] for result in results]}


def _accuracy_cells(result: dict) -> dict:
    """{context: exact match over every task's prompts} from a long_context_suite result."""
    return {context: round(cell["accuracy"], 4) for context, cell in result["per_context"].items()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(out: dict) -> str:
    lines = [f"Inference-time pruning, {out['date']}, commit {out['commit']}, {out['machine']}", "",
             "| context | config | TTFT ms stock -> pruned | TTFT speedup | decode tok/s stock -> pruned "
             "| decode speedup | KV MiB stock -> pruned | load avg |", "|---:|---|---|---:|---|---:|---|---|"]
    for row in out["speed"]:
        label = row["config"]
        if "prompt_pruning_ms" in row:
            label += (f" ({row['prompt_tokens']['stock']} -> {row['prompt_tokens']['pruned']} tokens; TTFT includes "
                      f"the pruning's {row['prompt_pruning_ms']:.0f} ms)")
        lines.append(f"| {row['context']} | {label} | {row['ttft_ms']['stock']:.0f} -> "
                     f"{row['ttft_ms']['pruned']:.0f} | {row['speedup_ttft']:.2f}x | {row['decode_tok_s']['stock']:.2f}"
                     f" -> {row['decode_tok_s']['pruned']:.2f} | {row['speedup_decode']:.2f}x | "
                     f"{row['kv_bytes']['stock'] / 2**20:.1f} -> {row['kv_bytes']['pruned'] / 2**20:.1f} | "
                     f"{row['load_average']['before']:.1f} / {row['load_average']['after']:.1f} |")
    if out["accuracy"]:
        lines += ["", "| config | long-context exact match |", "|---|---|"]
        for row in out["accuracy"]:
            lines.append(f"| {row['config']} | {json.dumps(_accuracy_cells(row['result']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
