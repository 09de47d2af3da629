"""The latency timers (latency.py): llama.cpp's decode step timed on tiny Llama probes written to GGUF
(uniform, per-block widths, a removed attention), the table measured with it (no probe without blocks in
llama.cpp: the outside time is extrapolated), and the runtime lookup. Timings are only checked for sanity
(positive, finite, ordered where the table orders them, within a loose factor): machines differ."""
import importlib.util
import math
import sys
import tempfile

import pytest

from conftest import llama, tiny_model
from prunekit.latency import (RUNTIMES, NoBlocksError, decode_latency, llama_cpp_decode_latency,
                              measure_latency_table, timer_for)
from prunekit.surgery import block_widths, resize_to_

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
# One thread: on a shared host, llama.cpp's threads wait on each other and tiny steps take 1000x longer;
# the median of 3 repeats: a tiny step is shorter than a time slice another process may take.
FAST = dict(threads=1, steps=8, repeats=3)
TINY = dict(num_hidden_layers=4, intermediate_size=128, vocab_size=256)


def positive_seconds(seconds: float) -> bool:
    return math.isfinite(seconds) and seconds > 0


@needs_llama_cpp
def test_llama_cpp_times_a_uniform_model_and_removes_its_files(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))      # the GGUF file and the worker's result land here
    assert positive_seconds(llama_cpp_decode_latency(llama(**TINY), 16, **FAST))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("prunekit-")] == []   # (torch keeps a cache)


@needs_llama_cpp
def test_llama_cpp_times_per_block_widths_and_a_removed_attention():
    """Written as llama.cpp's per-layer `deci` architecture: a narrower block, a block without attention."""
    model = llama(**TINY)
    full = block_widths(model)[0]
    resize_to_(model, [full, {**full, "heads": 2, "channels": 64}, {**full, "heads": 0, "kv_heads": 0}, full])
    assert [w["heads"] for w in block_widths(model)] == [4, 2, 0, 4]
    assert positive_seconds(llama_cpp_decode_latency(model, 16, **FAST))


@needs_llama_cpp
def test_llama_cpp_refuses_a_model_without_blocks():
    """llama.cpp asserts n_layer > 0 at load; the timer says so before writing anything."""
    with pytest.raises(NoBlocksError, match="without decoder blocks"):
        llama_cpp_decode_latency(llama(**{**TINY, "num_hidden_layers": 0}), 16, **FAST)


@needs_llama_cpp
def test_llama_cpp_refuses_what_gguf_cannot_hold_and_names_the_transformers_runtime():
    with pytest.raises(ValueError, match="cannot time this gpt2 model.*--runtime transformers"):
        llama_cpp_decode_latency(tiny_model("gpt2"), 16, **FAST)
    qwen3 = tiny_model("qwen3")                       # per-head q/k norms: no per-layer (deci) form
    full = block_widths(qwen3)[0]
    resize_to_(qwen3, [full, {**full, "heads": 0, "kv_heads": 0}])
    with pytest.raises(ValueError, match="cannot time this qwen3 model.*--runtime transformers"):
        llama_cpp_decode_latency(qwen3, 16, **FAST)


def _ladder(model, **cfg):
    from prunekit.depth import decoder_blocks
    from prunekit.search import SearchConfig, ladders
    from prunekit.structured import WidthConfig, coupled_groups
    groups = [coupled_groups(model, i, b, WidthConfig(sparsity=0.0)) for i, b in enumerate(decoder_blocks(model))]
    return groups, [ladders(g, SearchConfig(**cfg), True) for g in groups]


@needs_llama_cpp
def test_a_llama_cpp_table_is_ordered_and_predicts_the_dense_model():
    model = llama(**TINY)
    groups, ladder = _ladder(model, ffn_levels=2)
    assert ladder[0].heads == [4, 2, 0] and ladder[0].channels == [128, 64, 0]
    table, outside, dense = measure_latency_table(model, groups, ladder, 16, timer=timer_for("llama.cpp", **FAST))
    assert outside >= 0 and positive_seconds(dense)
    for row, lad in zip(table, ladder):
        assert set(row) == set(lad.allowed) and all(math.isfinite(s) and s >= 0 for s in row.values())
        for (a, f), seconds in row.items():              # narrower along either ladder: never slower
            assert row.get((a + 1, f), 0.0) <= seconds and row.get((a, f + 1), 0.0) <= seconds
    predicted = outside + sum(row[(0, 0)] for row in table)
    assert dense / 3 < predicted < dense * 3


def test_a_timer_without_zero_block_probes_gets_the_outside_time_extrapolated():
    """A timer whose time is a known sum (0.5 ms outside, 1 ms per query head, 0.01 ms per FFN channel) that
    refuses a model without blocks, as llama.cpp does: the table still reproduces that sum."""
    def timer(model, context):
        if not model.config.num_hidden_layers:
            raise NoBlocksError("no blocks")
        widths = [(b.self_attn.o_proj.in_features // 16 if hasattr(b.self_attn, "o_proj") else 0,
                   b.mlp.down_proj.in_features if hasattr(b.mlp, "down_proj") else 0) for b in model.model.layers]
        return 5e-4 + sum(h * 1e-3 + c * 1e-5 for h, c in widths)

    model = llama(**TINY)
    groups, ladder = _ladder(model)
    table, outside, dense = measure_latency_table(model, groups, ladder, 16, timer=timer)
    assert outside == pytest.approx(5e-4) and dense == pytest.approx(5e-4 + 4 * (4e-3 + 128e-5))
    for row, lad in zip(table, ladder):
        for (a, f), seconds in row.items():
            assert seconds == pytest.approx(lad.heads[a] * 1e-3 + lad.channels[f] * 1e-5, abs=1e-12)


def test_probes_are_half_the_model_deep_so_their_weights_leave_the_cache_as_a_whole_model_does():
    """4-block probes of a narrow width stayed in the CPU's cache and timed 0.19 ms per block where a whole
    model's blocks took 0.32 ms (llama.cpp, SmolLM2): the default probe depth is half the model's."""
    depths = []

    def timer(model, context):
        depths.append(model.config.num_hidden_layers)
        if not depths[-1]:
            raise NoBlocksError("no blocks")
        return 1e-3 * (1 + depths[-1])

    model = llama(**{**TINY, "num_hidden_layers": 12})
    groups, ladder = _ladder(model)
    table, outside, _ = measure_latency_table(model, groups, ladder, 16, timer=timer)
    assert sorted(set(depths) - {0}) == [6, 12]          # levels at 6 blocks; the outside from 6 and 12
    assert outside == pytest.approx(1e-3) and table[0][(0, 0)] == pytest.approx(1e-3)
    depths.clear()
    small = llama(**TINY)
    measure_latency_table(small, *_ladder(small), 16, timer=timer)
    assert sorted(set(depths) - {0}) == [4, 8]           # never fewer than 4


def test_timer_for_names_the_runtimes():
    assert RUNTIMES == ("transformers", "llama.cpp")
    assert timer_for("transformers") is decode_latency
    assert timer_for("transformers", steps=2, repeats=1).keywords == {"steps": 2, "repeats": 1}
    with pytest.raises(ValueError, match="unknown latency runtime 'onnx'; choose one of transformers, llama.cpp"):
        timer_for("onnx")
    with pytest.raises(TypeError, match="does not take"):
        timer_for("transformers", outtype="f16")


def test_timer_for_llama_cpp_without_llama_cpp_python_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # `import llama_cpp` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'prunekit\[llama\]'"):
        timer_for("llama.cpp")
