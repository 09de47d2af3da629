"""Decode latency per block width, measured on this machine: the cost table of a `latency=` search target.

    decode_latency          seconds per decode step of a transformers model (batch 1) with `context`
                            tokens already in its KV cache
    measure_latency_table   per block and level of a search ladder, from probe models: a few blocks of
                            one width with random weights, timed by a `timer(model, context)`, minus a
                            probe without blocks

Only the shapes matter for speed, so probes are built from the config (random weights) and never copy
the model's weights.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .core.stream import model_device
from .depth import PER_LAYER_FIELDS
from .surgery import SUBLAYER_FAMILIES, block_widths, resize_to_


def decode_latency(model: nn.Module, context: int, steps: int = 16, repeats: int = 3, seed: int = 0) -> float:
    """Median seconds per decode step (batch 1) with `context` tokens already in the KV cache: a prefill of
    random ids, 2 warm-up steps, then `repeats` timings of `steps` steps each."""
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        token = ids[:, -1:]
        for repeat in range(repeats + 1):
            count = 2 if repeat == 0 else steps
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(count):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if repeat:
                times.append((time.perf_counter() - started) / count)
    times.sort()
    return times[len(times) // 2]


def _probe(model: nn.Module, layers: int, width: dict) -> nn.Module:
    """A model of the same family and dtype with `layers` blocks of `width` (random weights)."""
    from transformers import AutoModelForCausalLM
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            setattr(config, name, list(value)[:layers])
    torch.manual_seed(0)
    probe = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype).to(model_device(model))
    if layers:
        resize_to_(probe, [width] * layers)
    return probe.eval()


def measure_latency_table(model: nn.Module, groups: list, ladder: list, context: int, *,
                          layers: int = 4, timer=decode_latency, echo=None) -> tuple[list[dict], float, float]:
    """Decode latency per block and level on this machine, from probe models.

    A probe has `layers` blocks, all at one width, random weights; its step time minus that of a probe
    with no block, divided by `layers`, is the time of one block of that width. Attention levels are
    timed with the full FFN and FFN levels with full attention, so a block (a, f) costs
    t(a, full) + t(full, f) - t(full, full); a removed block costs 0. Returns (per-block tables, the time
    outside the blocks, the dense model's measured step time). Every block is assumed to be as fast as
    block 0 at the same widths (true for the families here: their blocks differ only in weights and,
    for sliding-window layers, in the mask)."""
    lad = ladder[0]
    widths = block_widths(model)[0]
    per_kv = widths["heads"] // widths["kv_heads"] if widths.get("kv_heads") else 1
    query_units = groups[0][0].per_group > 1           # units are query heads (GQA), else KV groups

    def width(a: int, f: int) -> dict:
        kept = lad.heads[a]
        if kept == 0:
            head = {"heads": 0, "kv_heads": 0}
        elif query_units:
            head = {"heads": kept, "kv_heads": widths["kv_heads"]}
        else:
            head = {"heads": kept * per_kv, "kv_heads": kept}
        return {**widths, **head, "channels": lad.channels[f]}

    outside = timer(_probe(model, 0, widths), context)
    per_block = {}
    pairs = {(a, 0) for a in range(len(lad.heads))} | {(0, f) for f in range(len(lad.channels))}
    sublayer_ok = model.config.model_type in SUBLAYER_FAMILIES
    for a, f in sorted(pairs):
        if (lad.heads[a] == 0 or lad.channels[f] == 0) and not sublayer_ok:
            continue                                   # a block without a sublayer exists only in these families
        per_block[(a, f)] = max(0.0, (timer(_probe(model, layers, width(a, f)), context) - outside) / layers)
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
