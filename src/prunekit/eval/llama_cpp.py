"""A GGUF file run in llama.cpp (through llama-cpp-python): perplexity and greedy continuations with the
protocol of `eval.perplexity`, so that a number from llama.cpp stands beside ours.

Perplexity: non-overlapping windows of `seqlen` tokens (`windows_for`, as `perplexity` cuts them), each
window evaluated from an empty KV cache, every position but the first scored (seqlen - 1 per window).
Greedy: the prompt is evaluated once, then one token at a time through llama.cpp's KV cache, taking the
argmax of the logits (no sampler), as `model.generate(do_sample=False)` does.

llama-cpp-python is optional (`pip install 'prunekit[llama]'`; scripts/setup.sh builds it from source).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np


def llama_cpp_version() -> str:
    from importlib import metadata
    return metadata.version("llama-cpp-python")


def open_gguf(path: str | os.PathLike, n_ctx: int = 512, threads: int | None = None, logits_all: bool = True,
              f32_cache: bool = False):
    """A `llama_cpp.Llama` on `path`, quiet. f32_cache: keep the KV cache in f32 (llama.cpp's default is f16),
    to compare the graph itself with transformers."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ImportError("running a GGUF file needs llama-cpp-python: pip install 'prunekit[llama]' "
                          "(scripts/setup.sh builds it)") from exc
    extra = {"type_k": 0, "type_v": 0} if f32_cache else {}
    threads = threads or min(os.cpu_count() or 1, 8)
    return Llama(str(Path(path)), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=threads,
                 n_threads_batch=threads, n_batch=n_ctx, seed=0, **extra)


def gguf_perplexity(path: str | os.PathLike, ids, seqlen: int = 512, threads: int | None = None,
                    f32_cache: bool = False) -> dict:
    """Perplexity of the GGUF model on `ids` (an `EvalText` or a 1-D LongTensor), windows as `perplexity`."""
    from .perplexity import windows_for
    source = dict(getattr(ids, "protocol", None) or {})
    tokens = getattr(ids, "ids", ids).reshape(-1).tolist()
    windows = windows_for(len(tokens), seqlen, seqlen)
    llm = open_gguf(path, n_ctx=seqlen, threads=threads, f32_cache=f32_cache)
    started = time.perf_counter()
    total, scored = 0.0, 0
    try:
        for begin, end, _ in windows:
            window = tokens[begin:end]
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[:len(window) - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            logsumexp = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
            total += float((logsumexp - logits[np.arange(len(window) - 1), window[1:]]).sum())
            scored += len(window) - 1
    finally:
        llm.close()
    nll = total / scored
    return {"ppl": math.exp(nll) if nll < 709 else math.inf, "nll_per_token": nll, "tokens_scored": scored,
            "seqlen": seqlen, "windows": len(windows), "seconds": round(time.perf_counter() - started, 2),
            "protocol": f"llama.cpp (llama-cpp-python {llama_cpp_version()}), {Path(path).name}, non-overlapping "
                        f"windows of {seqlen}, {scored} tokens scored, KV cache {'f32' if f32_cache else 'f16'}"
                        + (f", {source['source']}" if source.get("source") else "")}


def gguf_greedy(path: str | os.PathLike, prompt: list[int], new_tokens: int, threads: int | None = None,
                f32_cache: bool = False) -> list[int]:
    """Greedy continuation (token ids) of `prompt` in llama.cpp, one token at a time through its KV cache."""
    # logits_all: llama-cpp-python keeps no logits in `scores` without it
    llm = open_gguf(path, n_ctx=len(prompt) + new_tokens, threads=threads, logits_all=True, f32_cache=f32_cache)
    out = []
    try:
        llm.eval(list(prompt))
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
    finally:
        llm.close()
    return out
