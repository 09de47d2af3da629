"""Decode latency per block width, measured on this machine: the cost table of a `latency=` search target.

    decode_latency            seconds per decode step of a transformers model (batch 1) with `context`
                              tokens already in its KV cache
    llama_cpp_decode_latency  the same step in llama.cpp: the model written to a temporary GGUF file and
                              timed by `prunekit.bench_llama_cpp`'s worker
    timer_for                 the timer of a runtime (`RUNTIMES`): "transformers" or "llama.cpp"
    measure_latency_table     per block and level of a search ladder, from probe models: a few blocks of
                              one width with random weights, timed by a `timer(model, context)`, minus the
                              time outside the blocks
    genome_latency            one candidate of a search timed as a whole (a probe with its per-block
                              widths): the check of the table's additive prediction

Only the shapes matter for speed, so probes are built from the config (random weights) and never copy
the model's weights. A search should target the latency of the runtime its model is deployed on: the
relative cost of attention, FFN and the LM head differs between transformers and llama.cpp's kernels.

The llama.cpp protocol (`llama_cpp_decode_latency`), the same as `prunekit bench --runtime llama.cpp`'s:

* The model is written with `prunekit.io.gguf_writer.write_gguf` (`outtype` f16 by default for 2-D
  weights, as a default `prunekit export --format gguf`): uniform widths as the family's stock llama.cpp
  architecture, per-block widths and removed sublayers as `deci`. What the writer cannot write (its
  `GgufUnsupportedError`: a family llama.cpp has no graph for, per-block widths of a family `deci` cannot
  hold) is a ValueError that points to `--runtime transformers`. Probes have no tokenizer, and the
  timing does not depend on one, so the file gets a stand-in byte-level BPE vocabulary of as many dummy
  tokens as the embedding has rows (`_stand_in_tokenizer`). The file is removed afterwards.
* One subprocess per timing (`bench_llama_cpp._measure_in_subprocess`, which imports llama_cpp only):
  `threads` for prompt and decode (default all cores, `os.cpu_count()`), f16 KV cache, flash attention
  off; the `context` random prompt ids are evaluated in one call, then `steps` single-token decode steps
  run through the KV cache they built. One warm-up run is discarded, then `repeats` runs are timed; the
  result is the median decode time divided by `steps`. Only the decode steps count (the prompt fills the
  cache); their time is what `decode_latency` measures in transformers.
* llama.cpp refuses a model without blocks (`GGML_ASSERT(n_layer > 0)`, and the GGUF writer needs a
  block to plan from), so the timer raises `NoBlocksError` for one, and `measure_latency_table`
  extrapolates the time outside the blocks from probes of `layers` and 2 x `layers` blocks instead.
"""
from __future__ import annotations

import copy
import functools
import inspect
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bench_llama_cpp import PROMPT_SEED, _measure_in_subprocess, require_llama_cpp
from .core.stream import model_device
from .depth import PER_LAYER_FIELDS
from .io.gguf_writer import GgufUnsupportedError, write_gguf
from .models.cache import cache_keyword, returned_cache
from .surgery import SUBLAYER_FAMILIES, block_widths, resize_to_

RUNTIMES = ("transformers", "llama.cpp")


class NoBlocksError(ValueError):
    """A timer cannot time a model without decoder blocks (llama.cpp cannot load one)."""


def decode_latency(model: nn.Module, context: int, steps: int = 16, repeats: int = 3, seed: int = 0) -> float:
    """Median seconds per decode step (batch 1) with `context` tokens already in the KV cache: a prefill of
    random ids, 2 warm-up steps, then `repeats` timings of `steps` steps each."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    times = []
    keyword = cache_keyword(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = returned_cache(out)
        token = ids[:, -1:]
        for repeat in range(repeats + 1):
            count = 2 if repeat == 0 else steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(count):
                out = model(input_ids=token, use_cache=True, **{keyword: cache})
                cache = returned_cache(out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                times.append((time.perf_counter() - started) / count)
    times.sort()
    return times[len(times) // 2]


def llama_cpp_decode_latency(model: nn.Module, context: int, *, outtype: str = "f16", steps: int = 16,
                             repeats: int = 3, threads: int | None = None) -> float:
    """Median seconds per decode step (batch 1) in llama.cpp with `context` tokens already in its KV cache.

    `model` is written to a temporary `outtype` GGUF file and timed in a subprocess (see the module
    docstring for the protocol). Raises NoBlocksError for a model without blocks, ValueError for one the
    GGUF writer cannot write (use the transformers runtime for it), ImportError without llama-cpp-python."""
    for name, value in (("context", context), ("steps", steps), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not model.config.num_hidden_layers:
        raise NoBlocksError("llama.cpp cannot load a model without decoder blocks (it asserts n_layer > 0)")
    require_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="prunekit-latency-gguf-") as tmp:
        path = Path(tmp) / "probe.gguf"
        try:
            write_gguf(model, _stand_in_tokenizer(model.get_input_embeddings().weight.shape[0]), path,
                       outtype=outtype, name="prunekit-latency-probe")
        except GgufUnsupportedError as err:
            raise ValueError(f"the llama.cpp runtime cannot time this {model.config.model_type} model: {err}. "
                             "Use --runtime transformers") from err
        result = _measure_in_subprocess({"path": str(path), "threads": threads or os.cpu_count() or 1,
                                         "prompt_len": context, "new_tokens": steps, "repeats": repeats,
                                         "warmup": 1, "seed": PROMPT_SEED})
    times = sorted(result["tg_s"])
    return times[len(times) // 2] / steps


@functools.lru_cache(maxsize=2)
def _stand_in_tokenizer(size: int):
    """A byte-level BPE tokenizer of `size` dummy tokens ("a", "b", "ab", "t3", "t4", ...; size >= 3) that the
    GGUF writer accepts as a "gpt2" vocabulary: llama.cpp needs one token per embedding row and at least
    one merge ("a" + "b"), nothing more, since the timed ids are random and never decoded to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["a", "b", "ab"] + [f"t{i}" for i in range(3, size)]
    tokenizer = Tokenizer(models.BPE(vocab={name: i for i, name in enumerate(names)}, merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def timer_for(runtime: str, **options) -> Callable[[nn.Module, int], float]:
    """The `timer(model, context) -> seconds per decode step` of `runtime` (one of RUNTIMES), with `options`
    bound (e.g. threads=4 or outtype="q8_0" for llama.cpp, steps=32 for both). Raises ValueError for an
    unknown runtime, TypeError for an option the timer does not take, ImportError (naming the install
    command) for llama.cpp without llama-cpp-python."""
    timers = {"transformers": decode_latency, "llama.cpp": llama_cpp_decode_latency}
    if runtime not in timers:
        raise ValueError(f"unknown latency runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "llama.cpp":
        require_llama_cpp()
    timer = timers[runtime]
    try:
        inspect.signature(timer).bind(None, 0, **options)
    except TypeError as err:
        raise TypeError(f"the {runtime} latency timer does not take these options {sorted(options)}: {err}") from None
    return functools.partial(timer, **options) if options else timer


def _probe(model: nn.Module, layers: int, width: dict | list[dict]) -> nn.Module:
    """A model of the same family and dtype with `layers` blocks of `width` (one dict for all, or one per
    block), random weights. Per-layer config lists (layer types) are cut to `layers`, or repeated when the
    probe is deeper than the model."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            value = list(value)
            setattr(config, name, [value[i % len(value)] for i in range(layers)])
    torch.manual_seed(0)
    probe = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype).to(model_device(model))
    if layers:
        resize_to_(probe, width if isinstance(width, list) else [width] * layers)
    return probe.eval()


def level_width(model: nn.Module, groups: list, ladder, a: int, f: int) -> dict:
    """The block widths (`surgery.block_widths`' form) of attention level `a` and FFN level `f` of one
    block's ladder: GQA query-head levels keep every KV head, KV-group levels keep whole groups."""
    widths = block_widths(model)[0]
    per_kv = widths["heads"] // widths["kv_heads"] if widths.get("kv_heads") else 1
    kept = ladder.heads[a]
    if kept == 0:
        head = {"heads": 0, "kv_heads": 0}
    elif groups[0][0].per_group > 1:                    # units are query heads (GQA), else KV groups
        head = {"heads": kept, "kv_heads": widths["kv_heads"]}
    else:
        head = {"heads": kept * per_kv, "kv_heads": kept}
    return {**widths, **head, "channels": ladder.channels[f]}


def genome_latency(model: nn.Module, groups: list, ladder: list, genome, context: int, timer=decode_latency) -> float:
    """The measured step time of a model with `genome`'s level per block (removed blocks left out), built as
    a random-weight probe of those shapes: what the additive cost table predicts, timed as a whole."""
    widths = [level_width(model, groups, lad, a, f) for lad, (a, f) in zip(ladder, genome)
              if lad.heads[a] or lad.channels[f]]
    return timer(_probe(model, len(widths), widths), context)


def measure_latency_table(model: nn.Module, groups: list, ladder: list, context: int, *, layers: int | None = None,
                          timer=decode_latency, echo=None) -> tuple[list[dict], float, float]:
    """Decode latency per block and level on this machine, from probe models.

    A probe has `layers` blocks (default: half the model's depth, at least 4), all at one width, random
    weights; its step time minus the time outside the blocks (embedding, final norm, LM head), divided by
    `layers`, is the time of one block of that width. Probes must be deep enough that their weights do
    not stay in the CPU's cache between decode steps, as a whole model's do not: on SmolLM2 in llama.cpp
    (AMD EPYC, f16, 1024 cached tokens) a block of 6 of 9 query heads and 1152 of 1536 FFN channels timed
    0.19 ms from probes of 4 and 8 blocks but 0.32 ms from probes of 15 and 30, where the full block timed
    0.30 ms both ways; with 4-block probes a searched model of such blocks was predicted at 2.3 ms per
    step and measured 8.5 ms, and the search chased a budget its table could not see. Deeper probes cost
    setup time (one probe per ladder level). The outside time is that of a probe with no block where the
    timer can run one; a timer that
    cannot (llama.cpp: it raises NoBlocksError) gets the intercept of the line through the full-width
    probes of L = `layers` and 2L blocks instead, 2 t(L) - t(2L) (at least 0): the same additive model
    t(n) = outside + n x block that the whole table rests on, read from models that have blocks. The full
    block then costs (t(2L) - t(L)) / L, and the table predicts t(L) for a dense model of L blocks (when
    the timings grow with depth, as they do but for noise).

    Attention levels are timed with the full FFN and FFN levels with full attention, so a block (a, f)
    costs t(a, full) + t(full, f) - t(full, full); a removed block costs 0. Returns (per-block tables, the time
    outside the blocks, the dense model's measured step time). Every block is assumed to be as fast as
    block 0 at the same widths (true for the families here: their blocks differ only in weights and,
    for sliding-window layers, in the mask)."""
    lad = ladder[0]
    widths = block_widths(model)[0]
    layers = layers or max(4, model.config.num_hidden_layers // 2)

    def width(a: int, f: int) -> dict:
        return level_width(model, groups, lad, a, f)

    @functools.cache
    def probe_time(a: int, f: int, count: int = layers) -> float:
        return timer(_probe(model, count, width(a, f)), context)

    try:
        outside = timer(_probe(model, 0, widths), context)
    except NoBlocksError:
        outside = max(0.0, 2 * probe_time(0, 0) - probe_time(0, 0, 2 * layers))
        if echo:
            echo(f"  latency: no probe without blocks in this runtime; outside the blocks "
                 f"{outside * 1e3:.3f} ms, extrapolated from probes of {layers} and {2 * layers} blocks")
    per_block = {}
    pairs = {(a, 0) for a in range(len(lad.heads))} | {(0, f) for f in range(len(lad.channels))}
    sublayer_ok = model.config.model_type in SUBLAYER_FAMILIES
    for a, f in sorted(pairs):
        if (lad.heads[a] == 0 or lad.channels[f] == 0) and not sublayer_ok:
            continue                                   # a block without a sublayer exists only in these families
        per_block[(a, f)] = max(0.0, (probe_time(a, f) - outside) / layers)
        if echo:
            echo(f"  latency probe heads={lad.heads[a]} channels={lad.channels[f]}: "
                 f"{per_block[(a, f)] * 1e3:.3f} ms per block")
    # a narrower width is never slower: timing noise otherwise makes a ladder's cost rise as it narrows
    for a in range(1, len(lad.heads)):
        if (a, 0) in per_block and (a - 1, 0) in per_block:
            per_block[(a, 0)] = min(per_block[(a, 0)], per_block[(a - 1, 0)])
    for f in range(1, len(lad.channels)):
        if (0, f) in per_block and (0, f - 1) in per_block:
            per_block[(0, f)] = min(per_block[(0, f)], per_block[(0, f - 1)])
    full = per_block[(0, 0)]
    rows = []
    for lad_i in ladder:
        row = {}
        for a, f in lad_i.allowed:
            if lad_i.heads[a] == 0 and lad_i.channels[f] == 0:
                row[(a, f)] = 0.0
            else:
                row[(a, f)] = max(0.0, per_block.get((a, 0), full) + per_block.get((0, f), full) - full)
        rows.append(row)
    dense = timer(model, context)
    return rows, outside, dense
