"""The `statistic` calibration selector: activation profiles (per-channel input moments of every linear layer)
and the greedy matching of the pool's mean profile."""
import json

import pytest
import torch

from conftest import tiny_model, word_tokenizer
from prunekit.selection import statistic
from prunekit.selection.select import select


def test_the_greedy_order_on_hand_built_profiles():
    """Centred on the pool mean (1.6, 1.6): the sample nearest it first, then whichever keeps the running sum
    of deviations shortest (worked by hand); past `greedy_picks` the rest by their distance to the mean."""
    vectors = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [8.0, 8.0]])
    lengths = [1] * 5
    assert statistic.order(None, lengths, {"embeddings": vectors}) == [2, 0, 1, 4, 3]
    assert statistic.order(None, lengths, {"embeddings": vectors, "greedy_picks": 1}) == [2, 0, 1, 3, 4]
    assert statistic.order(None, lengths, {"embeddings": vectors, "greedy_picks": 0}) == [2, 0, 1, 3, 4]
    twins = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    assert statistic.order(None, [1] * 4, {"embeddings": twins}) == [0, 2, 1, 3]    # ties: the lowest index
    with pytest.raises(ValueError, match="one vector per sample"):
        statistic.order(None, lengths, {"embeddings": vectors[:3]})


def test_the_greedy_mean_is_closer_to_the_pools_than_random_subsets():
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(400, 8, generator=generator) * torch.linspace(0.5, 3.0, 8)
    pool[7] += 40.0                                               # one loud sample
    chosen = statistic.order(None, [1] * 400, {"embeddings": pool})[:20]
    assert 7 not in chosen
    target = pool.mean(0)
    greedy = float((pool[chosen].mean(0) - target).norm())
    draws = [float((pool[torch.randperm(400, generator=generator)[:20]].mean(0) - target).norm())
             for _ in range(200)]
    assert greedy < min(draws)


def test_profiles_are_the_log_mean_square_inputs_of_every_distinct_linear_input():
    model = tiny_model("llama")
    tokenizer = word_tokenizer(["the cat sat on the mat", "a dog ran far away today"])
    texts = ["the cat sat on the mat", "a dog", ""]
    profiles = statistic.profile_batch(texts, model, tokenizer, {})
    config = model.config
    per_layer = 2 * config.hidden_size + config.num_attention_heads * config.head_dim + config.intermediate_size
    assert profiles.shape == (3, config.num_hidden_layers * per_layer)   # q/k/v and gate/up counted once
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    with torch.no_grad():
        normed = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))[0]
    expected = (normed ** 2).mean(0).log()                        # layer 0's q/k/v input, by hand
    torch.testing.assert_close(profiles[0, :config.hidden_size], expected, rtol=1e-4, atol=1e-5)
    alone = statistic.profile_batch(["a dog"], model, tokenizer, {})
    torch.testing.assert_close(profiles[1], alone[0], rtol=1e-4, atol=1e-4)  # padding of a batch is masked out
    assert torch.all(profiles[2] == torch.tensor(1e-12).log())   # nothing to read: the floor, far from the rest


def test_gpt2_conv1d_layers_are_profiled():
    model = tiny_model("gpt2")
    tokenizer = word_tokenizer(["one two three four"])
    profiles = statistic.profile_batch(["one two three four"], model, tokenizer, {})
    hidden, layers = model.config.n_embd, model.config.n_layer
    assert profiles.shape == (1, layers * (3 * hidden + 4 * hidden))     # c_attn, attn c_proj, c_fc, mlp c_proj
    assert torch.isfinite(profiles).all()


def test_calibration_windows_by_statistic_are_kept_and_reused(tiny_model_dir, tmp_path):
    from prunekit.io.loading import load
    from prunekit.selection.windows import select_windows
    model, tokenizer = load(str(tiny_model_dir))
    windows = torch.randint(3, 100, (24, 16), generator=torch.Generator().manual_seed(0))
    windows[5] = 7                                                # one window of a single token repeated
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    kept, line = select_windows(model, tokenizer, windows, "statistic", 4, scores_dir=tmp_path)
    assert kept.numel() == 4 and 5 not in kept.tolist() and "statistic kept 4 of 24" in line
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["statistic"]
    calls.clear()
    again, _ = select_windows(model, tokenizer, windows, "statistic", 4, scores_dir=tmp_path)
    assert torch.equal(kept, again) and not calls                 # the stored profiles, no model pass


def test_data_select_by_statistic_resumes_and_is_refused_another_selectors_run(tiny_model_dir, tmp_path):
    from prunekit.io.loading import load
    model, tokenizer = load(str(tiny_model_dir))
    source = tmp_path / "p.jsonl"
    source.write_text("".join(json.dumps({"text": f"text number {i} of the pool"}) + "\n" for i in range(12)))
    run = tmp_path / "run"
    first = select(source, "statistic", "4 samples", tmp_path / "a.jsonl", model=model, tokenizer=tokenizer,
                   run_dir=run, progress=False)
    assert first["samples"]["kept"] == 4
    stored = json.loads((run / "scores.jsonl").read_text().splitlines()[0])["embedding"]
    assert len(stored) == statistic.EMBED_DIM == 256               # 576 channels projected to 256
    again = select(source, "statistic", "4 samples", tmp_path / "b.jsonl", model=model, tokenizer=tokenizer,
                   run_dir=run, progress=False)
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text() and again["samples"]["kept"] == 4
    with pytest.raises(ValueError, match="holds scores of 'statistic', not 'entropy'"):
        select(source, "entropy", "4 samples", tmp_path / "c.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
               progress=False)
