"""Inference-time pruning mechanisms (prunekit.inference): exactness when they keep everything, for every
supported family; Twilight's selection and streaming heads' cache on hand-built cases; LazyLLM's prefill
against a stock forward with the same tokens removed per layer, and its revival; refusals."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, llama, tiny_model
from prunekit.inference import LazyLLMConfig, StreamingConfig, TwilightConfig
from prunekit.inference.generation import pruning
from prunekit.inference.kv import GrowingLayer, KVPruning, StreamingLayer, calibrate_streaming, top_p_mask

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def four_blocks(family: str):
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = 4
    if getattr(config, "layer_types", None):
        config.layer_types = (["sliding_attention", "full_attention"] * 2 if family == "gemma3_text"
                              else ["full_attention"] * 4)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt(length=40, seed=0):
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, new=10):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)


KEEP_ALL = {
    "lazyllm keep=1": dict(token_pruning=LazyLLMConfig(keep=1.0)),
    "lazyllm keep=1, observation window 8": dict(token_pruning=LazyLLMConfig(keep=1.0, observe=8)),
    "lazyllm keep=1, pooled over 5": dict(token_pruning=LazyLLMConfig(keep=1.0, observe=4, pool=5)),
    "twilight top_p=1": dict(kv_pruning=TwilightConfig(top_p=1.0)),
    "streaming heads=0": dict(kv_pruning=StreamingConfig(heads=0.0)),
    "all heads streaming, window > context": dict(kv_pruning=StreamingConfig(sink=4, window=512, heads=1.0)),
    "twilight quest, every page a candidate": dict(kv_pruning=TwilightConfig(top_p=1.0, selector="quest", page=8,
                                                                            candidates=1.0)),
    "twilight + streaming": dict(kv_pruning=[TwilightConfig(top_p=1.0), StreamingConfig(sink=2, window=512,
                                                                                        heads=1.0)]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(KEEP_ALL))
def test_keeping_everything_generates_what_stock_generates(family, case):
    model = four_blocks(family)
    ids = prompt()
    expected = greedy(model, ids)
    with pruning(model, **KEEP_ALL[case]):
        assert torch.equal(greedy(model, ids), expected)
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__   # restored


def test_top_p_mask_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    assert top_p_mask(probs, 0.5).tolist() == [[False, True, False, False, False]]
    assert top_p_mask(probs, 0.8).tolist() == [[False, True, False, True, False]]      # 0.5 + 0.3 reaches 0.8
    assert top_p_mask(probs, 0.81).tolist() == [[False, True, True, True, False]]
    assert top_p_mask(probs, 0.5, sink=1, window=1).tolist() == [[True, True, False, False, True]]
    assert top_p_mask(probs, 1.0).all()
    generator = torch.Generator().manual_seed(0)
    for spread, p in ((8.0, 0.95), (0.1, 0.9), (0.1, 0.999), (3.0, 0.5)):  # peaked (the first k) to flat (k grows)
        probs = torch.softmax(spread * torch.randn(2, 3, 1000, generator=generator), dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)     # the definition, by a full sort
        expected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, ordered.cumsum(-1) - ordered < p)
        assert torch.equal(top_p_mask(probs, p), expected)


def test_twilight_attends_to_fewer_entries_and_reports_how_many():
    model = llama(num_hidden_layers=2)
    with pruning(model, kv_pruning=TwilightConfig(top_p=0.5, sink=0, window=0)) as state:
        greedy(model, prompt(), new=4)
    assert 0 < state.mechanisms[0].kept_fraction < 0.9


def test_quest_page_bounds_hold_every_score_and_grow_with_the_cache():
    kv = KVPruning([TwilightConfig(selector="quest", page=4)])
    key = torch.randn(1, 2, 22, 8, generator=torch.Generator().manual_seed(0))
    query = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(1))
    for length in (4, 9, 16, 22):                    # incremental: earlier pages are reused, new ones added
        lo, hi = kv._page_bounds(key[:, :, :length], length // 4, layer=0)
    fresh = KVPruning([TwilightConfig(selector="quest", page=4)])._page_bounds(key, 5, layer=0)
    assert torch.equal(lo, fresh[0]) and torch.equal(hi, fresh[1]) and lo.shape == (1, 2, 5, 8)
    bound = query.clamp(min=0) @ hi.transpose(-1, -2) + query.clamp(max=0) @ lo.transpose(-1, -2)   # (1, 2, 3, 5)
    scores = (query @ key[:, :, :20].transpose(-1, -2)).view(1, 2, 3, 5, 4)
    assert (bound + 1e-5 >= scores.amax(-1)).all()
    one = KVPruning([TwilightConfig(selector="quest", page=1)])._page_bounds(key, 22, layer=0)
    assert torch.allclose(query.clamp(min=0) @ one[1].transpose(-1, -2) + query.clamp(max=0) @ one[0].transpose(-1, -2),
                          query @ key.transpose(-1, -2), atol=1e-5)   # a page of one entry: the bound is the score


def test_quest_passes_the_page_the_query_points_at_plus_sink_window_and_tail():
    key = torch.full((1, 1, 18, 2), -1.0)                # 4 pages of 4 and a partial page of 2
    key[:, :, 8:12] = torch.tensor([3.0, 3.0])            # page 2 is the one the query points at
    value = torch.arange(18.0).view(1, 1, 18, 1).expand(1, 1, 18, 2)
    query = torch.ones(1, 1, 1, 2)
    kv = KVPruning([TwilightConfig(top_p=1.0, sink=0, window=0, selector="quest", page=4, candidates=0.25)])
    (_, pages), (_, tail) = kv._candidates(query, key, value, layer=0)
    assert pages[0, 0, :, 0].tolist() == [8, 9, 10, 11] and tail[0, 0, :, 0].tolist() == [16, 17]   # page 2, tail
    kv = KVPruning([TwilightConfig(top_p=1.0, sink=1, window=6, selector="quest", page=4, candidates=0.25)])
    (_, pages), (_, tail) = kv._candidates(query, key, value, layer=0)
    assert pages[0, 0, :, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15] and tail.shape[2] == 2   # + sink


def test_quest_reads_fewer_entries_and_counts_them_against_the_whole_cache():
    model = llama(num_hidden_layers=2)
    with pruning(model, kv_pruning=TwilightConfig(top_p=1.0, sink=0, window=0, selector="quest", page=4,
                                                  candidates=0.25)) as state:
        greedy(model, prompt(64), new=4)
    assert 0.2 < state.mechanisms[0].kept_fraction < 0.4     # a quarter of the pages + the partial page
    for bad in (dict(selector="pages"), dict(page=0), dict(candidates=0.0), dict(candidates=1.5)):
        with pytest.raises(ValueError):
            TwilightConfig(**bad)


def test_a_growing_layer_holds_what_a_dynamic_layer_holds_without_copying_each_step():
    from transformers.cache_utils import DynamicLayer
    from prunekit.inference.runtime import cache_bytes
    grown, stock = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(1, 2, n, 4, generator=torch.Generator().manual_seed(n)) for n in (300, *[1] * 40)]
    buffers = set()
    for step in steps:                                  # the prefill's room (300 + 256) outlasts 40 steps...
        k, v = grown.update(step, -step)
        expected_k, expected_v = stock.update(step, -step)
        assert torch.equal(k, expected_k) and torch.equal(v, expected_v)
        buffers.add(grown.appender.keys.data_ptr())
    assert len(buffers) == 1                             # ... so every step wrote into the same buffer
    assert grown.get_seq_length() == 340
    for _ in range(300):                                 # outgrowing the room copies once, values intact
        step = torch.randn(1, 2, 1, 4)
        assert torch.equal(grown.update(step, step)[0], stock.update(step, step)[0])
    grown.crop(-5)
    stock.crop(-5)
    step = torch.randn(1, 2, 1, 4)
    assert torch.equal(grown.update(step, step)[0], stock.update(step, step)[0])   # appends after the crop
    grown.batch_repeat_interleave(2)
    stock.batch_repeat_interleave(2)
    step = torch.randn(2, 2, 1, 4)
    assert torch.equal(grown.update(step, step)[0], stock.update(step, step)[0])   # a reshuffled batch is taken over

    class Cache:
        layers = [grown]
    assert cache_bytes(Cache) == grown.appender.held_bytes() >= 2 * stock.keys.numel() * 4   # the room counts


def test_a_streaming_layer_keeps_sink_and_window_and_counts_every_token():
    layer = StreamingLayer(torch.tensor([True, False]), sink=2, window=3)
    keys = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 1).contiguous()
    returned, _ = layer.update(keys, keys)
    assert returned.shape[2] == 10                                       # the prefill sees the whole prompt
    step = torch.full((1, 2, 1, 1), 10.0)
    full, _ = layer.update(step, step)
    assert layer.stream_keys.flatten().tolist() == [0, 1, 8, 9, 10]      # sink 2 + window 3
    assert full.flatten().tolist() == list(range(11)) and layer.get_seq_length() == 11
    assert layer.cached_entries() == 2 * (11 + 5)
    with pytest.raises(ValueError, match="one prefill"):
        layer.update(keys, keys)


def test_streaming_heads_are_the_ones_the_window_changes_least():
    """KV head 1 of block 1 has zero values: its output is zero with or without the window, so it is the
    one head a 1-in-4 budget makes streaming."""
    model = llama(num_hidden_layers=2)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[16:].zero_()
    heads = calibrate_streaming(model, prompt(200), StreamingConfig(sink=2, window=8, heads=0.25))
    assert [h.tolist() for h in heads.values()] == [[False, False], [False, True]]


def test_streaming_heads_shrink_the_cache():
    model = llama(num_hidden_layers=2)
    with pruning(model, kv_pruning=StreamingConfig(sink=2, window=8, heads=1.0)) as state:
        cache = state.new_cache()
        with torch.inference_mode():
            model(prompt(40), cache=cache, use_cache=True)
    assert all(layer.cached_entries() == 2 * 2 * 10 for layer in cache.layers)   # 2 KV heads x (2 + 8), K and V


def _reference_last_logits(model, ids, pruned_at: dict[int, int]):
    """Stock forward in which token p's key/value is hidden from every layer >= pruned_at[p]."""
    length = ids.shape[1]
    handles = []
    for index, layer in enumerate(model.model.layers):
        allowed = torch.ones(length, length).tril().bool()
        for position, stage in pruned_at.items():
            if index >= stage:
                allowed[:, position] = False
        mask = torch.zeros(1, 1, length, length).masked_fill(~allowed, float("-inf"))

        def hook(module, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            return model(ids).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family,observe", [("llama", 1), ("qwen3", 1), ("llama", 8)])
def test_lazyllm_prefill_equals_stock_with_the_same_tokens_removed_per_layer(family, observe):
    model = four_blocks(family)
    ids = prompt(32)
    with pruning(model, token_pruning=LazyLLMConfig(keep=0.3, stages=3, observe=observe)) as state:
        with torch.inference_mode():
            logits = model(ids, cache=state.new_cache(), use_cache=True).logits[0, -1]
        lazy = state.mechanisms[0]
        pruned_at = {position: stage for position, (stage, _) in lazy.waiting.items()}
        assert len(pruned_at) == 32 - 10 and lazy.note().startswith("LazyLLM: prefill computed")
    assert torch.allclose(logits, _reference_last_logits(model, ids, pruned_at), atol=1e-4)


def test_an_observation_window_ranks_by_the_last_rows_not_only_the_last_token():
    """observe=k averages the attention of the prompt's last k rows: the tokens it prunes differ from the last
    token's own ranking (observe=1) on the same prompt."""
    model = four_blocks("llama")
    ids = prompt(40)
    waiting = {}
    for observe in (1, 12):
        with pruning(model, token_pruning=LazyLLMConfig(keep=0.3, stages=3, observe=observe)) as state:
            greedy(model, ids, new=1)
            waiting[observe] = set(state.mechanisms[0].waiting)
    assert len(waiting[1]) == len(waiting[12]) and waiting[1] != waiting[12]


def test_pooling_gives_each_token_the_best_score_within_half_the_width():
    from prunekit.inference.lazyllm import pooled
    # a prompt of 10 positions; 6 and 7 are absent from this layer (pruned earlier): they count as 0
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9])
    scores = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.5, 0.0, 0.0, 0.3])
    assert torch.equal(pooled(positions, scores, 10, 3), torch.tensor([0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.3, 0.3]))
    assert torch.equal(pooled(positions, scores, 10, 1), scores)


def test_pooling_keeps_the_neighbours_of_a_token_the_prompt_points_at():
    """With pool=p a stage keeps runs of neighbouring tokens: fewer separate kept spans than without it."""
    model = four_blocks("llama")
    ids = prompt(48)
    spans = {}
    for pool in (1, 7):
        with pruning(model, token_pruning=LazyLLMConfig(keep=0.3, stages=1, observe=4, pool=pool)) as state:
            greedy(model, ids, new=1)
            waiting = set(state.mechanisms[0].waiting)
        kept = [position for position in range(48) if position not in waiting]
        spans[pool] = 1 + sum(b - a > 1 for a, b in zip(kept, kept[1:]))
    assert spans[7] < spans[1]


def test_lazyllm_revives_tokens_pruned_in_prefill_at_decode():
    model = four_blocks("llama")
    ids = prompt(40)
    with pruning(model, token_pruning=LazyLLMConfig(keep=0.3, stages=3)) as state:
        greedy(model, ids, new=1)
        lazy = state.mechanisms[0]
        waiting_after_prefill = len(lazy.waiting)
        greedy(model, ids, new=8)
        assert len(lazy.waiting) < waiting_after_prefill                # some were computed again, from the aux cache
        for index in lazy.stages:                                       # and joined their stage layer's cache
            positions = lazy.layers[index].positions
            assert positions.unique().numel() == positions.numel()      # each token computed once per layer


def test_refusals():
    with pytest.raises(ValueError, match="llama-family"):
        with pruning(tiny_model("gpt2"), kv_pruning=TwilightConfig()):
            pass
    model = llama(num_hidden_layers=2)
    with pytest.raises(ValueError, match="batch 1"):
        with pruning(model, kv_pruning=TwilightConfig()):
            greedy(model, torch.cat([prompt(8), prompt(8, 1)]))
    with pytest.raises(ValueError, match="without past_key_values"):
        from transformers import DynamicCache
        with pruning(model, token_pruning=LazyLLMConfig()):
            model.generate(prompt(8), max_new_tokens=2, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="not combined"):
        with pruning(model, token_pruning=LazyLLMConfig(), kv_pruning=TwilightConfig()):
            pass
    with pytest.raises(ValueError, match="calibration"):
        with pruning(model, kv_pruning=StreamingConfig(heads=0.5)):
            pass
    for bad in (dict(keep=0), dict(keep=1.5), dict(stages=0), dict(observe=0), dict(observe=True),
                dict(pool=0), dict(pool=4), dict(pool=True)):
        with pytest.raises(ValueError):
            LazyLLMConfig(**bad)
    with pytest.raises(ValueError, match="top_p"):
        TwilightConfig(top_p=0)
    assert model.config._attn_implementation == "sdpa"
    no_cache = llama(num_hidden_layers=2, use_cache=False)
    with pytest.raises(ValueError, match="without a KV cache"):
        with pruning(no_cache, kv_pruning=TwilightConfig()):
            pass


def test_generate_prunes_the_prompt_then_generates_under_pruning(tiny_model_dir):
    from prunekit import PromptPruningConfig, generate
    from prunekit.io.loading import load
    model, tokenizer = load(str(tiny_model_dir))
    text = "\n\n".join(["the cat sat on the mat"] * 6 + ["the dog"])
    plain = generate(model, tokenizer, text, max_new_tokens=5)
    pruned = generate(model, tokenizer, text, max_new_tokens=5, prompt_pruning=PromptPruningConfig(budget=20),
                      kv_pruning=StreamingConfig(sink=2, window=4, heads=0.5))
    assert len(pruned.prompt_ids) <= 20 < len(plain.prompt_ids) and "prompt pruning" in pruned.prompt_account
    assert len(pruned.new_ids) == 5 and pruned.first_token_seconds > 0 and plain.prompt_account is None


def test_bench_times_the_pruned_model_beside_itself_stock(tiny_model_dir):
    from prunekit.bench import benchmark, format_table
    from prunekit.inference.cli import to_spec
    result = benchmark(str(tiny_model_dir), prompt_len=24, new_tokens=3, repeats=1, warmup=0, threads=1,
                       pruning=to_spec(None, StreamingConfig(sink=2, window=4, heads=1.0)))
    rows = {row["role"]: row for row in result["rows"]}
    assert rows["baseline"]["model"] == rows["model"]["model"]
    assert rows["model"]["kv_cache_bytes"] < rows["baseline"]["kv_cache_bytes"]
    assert "StreamingConfig" in format_table(result)


def test_cli_flags_make_the_configs_and_refuse_strays():
    import argparse

    from prunekit.inference.cli import add_arguments, configs_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    token, kv, prompt = configs_from_args(parser.parse_args(["--token-pruning", "lazyllm", "--keep", "0.3"]))
    assert token == LazyLLMConfig(keep=0.3) and kv is None and prompt is None
    _, kv, _ = configs_from_args(parser.parse_args(["--kv-pruning", "twilight,streaming", "--top-p", "0.9",
                                                    "--heads", "0.25"]))
    assert kv == [TwilightConfig(top_p=0.9), StreamingConfig(heads=0.25)]
    for stray in (["--keep", "0.5"], ["--top-p", "0.9"], ["--heads", "0.5"], ["--budget", "100"],
                  ["--kv-pruning", "quest"]):
        with pytest.raises(ValueError):
            configs_from_args(parser.parse_args(stray))


def test_the_benchmark_runs_tiny(tiny_model_dir, tmp_path):
    import json

    from conftest import load_bench
    bench = load_bench("inference_smollm2")
    out = tmp_path / "inference.json"
    assert bench.main(["--model", str(tiny_model_dir), "--contexts", "96", "--new-tokens", "4", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--accuracy-contexts", "96", "--accuracy-samples", "1",
                       "--window", "16", "--only", "stock", "--only", "lazyllm-50", "--only", "streaming-50",
                       "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert {row["config"] for row in body["speed"]} == {"lazyllm-50", "streaming-50"}
    assert [row["config"] for row in body["accuracy"]] == ["stock", "lazyllm-50", "streaming-50"]
    assert "TTFT speedup" in out.with_suffix(".md").read_text()
    # prompt pruning: the prompt cut to a share of its tokens (0.75 here: the tiny tokenizer's unknown words
    # are special tokens, never dropped), the pruning's time inside TTFT; accuracy per context
    assert bench.main(["--model", str(tiny_model_dir), "--contexts", "512", "--new-tokens", "4", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--accuracy-contexts", "512,600", "--accuracy-samples", "1",
                       "--only", "prompt-tokens", "--prompt-share", "0.75", "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    [row] = body["speed"]
    assert row["prompt_tokens"]["pruned"] <= int(0.75 * row["prompt_tokens"]["stock"])
    assert row["ttft_ms"]["pruned"] > row["prompt_pruning_ms"] > 0
    assert row["kv_bytes"]["pruned"] < row["kv_bytes"]["stock"]
    [acc] = body["accuracy"]
    assert acc["result"]["contexts"] == [512, 600] and acc["result"]["prompts"] == 6
    for record in acc["result"]["records"]:
        budget = int(0.75 * (record["context"] - 16))
        assert record["prompt_tokens_after"] <= budget < record["prompt_tokens_before"]
    assert "TTFT includes the pruning's" in out.with_suffix(".md").read_text()


def test_cli_generate_with_pruning_prints_the_account(tiny_model_dir, tmp_path, capsys):
    from prunekit.cli import main
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("\n\n".join(["the cat sat on the mat"] * 6 + ["the dog"]))
    assert main(["generate", str(tiny_model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "3",
                 "--token-pruning", "lazyllm", "--keep", "0.5", "--prompt-pruning", "examples", "--budget",
                 "20"]) == 0
    err = capsys.readouterr().err
    assert "prompt pruning (examples)" in err and "LazyLLMConfig(keep=0.5" in err
    assert "LazyLLM: prefill computed" in err
    assert main(["generate", str(tiny_model_dir), "--prompt", "x", "--keep", "0.5"]) != 0
    assert "add --token-pruning lazyllm" in capsys.readouterr().err


def test_cli_eval_long_context_under_pruning(tiny_model_dir, capsys):
    from prunekit.cli import main
    assert main(["eval", str(tiny_model_dir), "--suite", "long-context", "--context", "128",
                 "--long-context-samples", "1", "--kv-pruning", "twilight", "--top-p", "0.9"]) == 0
    assert "kv_pruning TwilightConfig(top_p=0.9" in capsys.readouterr().out
    assert main(["eval", str(tiny_model_dir), "--kv-pruning", "twilight"]) != 0
    assert "add --suite long-context" in capsys.readouterr().err


def test_lazyllm_without_revival_leaves_pruned_tokens_waiting():
    model = four_blocks("llama")
    with pruning(model, token_pruning=LazyLLMConfig(keep=0.3, revive=False)) as state:
        greedy(model, prompt(40), new=1)
        waiting = dict(state.mechanisms[0].waiting)
        greedy(model, prompt(40), new=6)
        assert state.mechanisms[0].waiting.keys() == waiting.keys()
