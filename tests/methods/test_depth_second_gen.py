"""Second-generation depth methods: reverse-order, MKA, LLM-Streamline.

Each paper's formula on hand-built tensors first, then exact choices on constructed models, then a
method x family matrix: the pruned model has the expected blocks, reloads with stock transformers
with equal logits, and generates the same with and without the KV cache."""
import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from methods.test_depth_methods import logits, tiny
from prunekit.catalog import get_method
from prunekit.depth import decoder_blocks
from prunekit.io.export import save_pretrained_atomic
from prunekit.methods.mka import (MKAConfig, adjacent_choice, manifold_similarity, merge, merged_block, npib,
                                  quantile_cells, token_sample)
from prunekit.methods.reverse_order import ReverseOrderConfig, deepest_blocks
from prunekit.methods.streamline import StreamlineConfig, best_run, fit, mean_squared_error, run_similarities
from prunekit.prune import prune_


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: tiny matrices, one thread


def test_registered_as_depth_methods():
    assert get_method("reverse-order").scope == "depth" and not get_method("reverse-order").needs_calibration
    for name in ("mka", "streamline"):
        assert get_method(name).scope == "depth" and get_method(name).needs_calibration


# reverse-order ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config, expected", [(ReverseOrderConfig(layers=2), [4, 5]),
                                              (ReverseOrderConfig(layers=5), [1, 2, 3, 4, 5]),
                                              (ReverseOrderConfig(sparsity=0.25), [4, 5]),    # 1.5 rounds up
                                              (ReverseOrderConfig(sparsity=0.5), [3, 4, 5])])
def test_reverse_order_removes_the_deepest_blocks_the_final_one_included(config, expected):
    model = tiny(layers=6)
    report = prune_(model, config, None, progress=False)
    assert report.removed_blocks == expected
    assert report.scores["importance"] == [6, 5, 4, 3, 2, 1]
    assert deepest_blocks(6, 0) == [] and deepest_blocks(6, 6) == list(range(6))


# MKA: the math ---------------------------------------------------------------------------------

def test_npib_on_hand_built_labels():
    a = torch.tensor([0, 0, 1, 1])
    assert npib(a, a) == pytest.approx(1.0)
    assert npib(a, torch.tensor([7, 7, 3, 3])) == pytest.approx(1.0)          # a relabelling
    assert npib(a, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)          # independent
    assert npib(a, torch.tensor([5, 5, 5, 5])) == 0.0                         # constant: no information
    # y determines x: I = H(x) = log 2; H(y) = 1.5 log 2
    y = torch.tensor([0, 0, 1, 2])
    assert npib(a, y) == pytest.approx(1.0 / (1.5 ** 0.5))


def test_quantile_cells_are_equal_count_bins_per_coordinate():
    Y = torch.tensor([[0.4, 10.0], [0.1, 30.0], [0.3, 20.0], [0.2, 40.0]])   # (n=4, dims=2)
    cells = quantile_cells(Y, bins=2)                                       # cell = bin0 + 2 * bin1
    assert cells.tolist() == [1 + 0, 0 + 2, 1 + 0, 0 + 2]


def test_manifold_similarity_is_maximal_for_identical_activations():
    torch.manual_seed(0)
    X = torch.randn(128, 16)
    assert manifold_similarity(X, X) == pytest.approx(1.0)
    assert manifold_similarity(X, 3 * X - 1) == pytest.approx(1.0)          # distances scale: same manifold
    assert manifold_similarity(X, -X) == pytest.approx(1.0)                 # an eigenvector's sign is arbitrary
    unrelated = manifold_similarity(X, torch.randn(128, 16))
    close = manifold_similarity(X, X + 0.05 * torch.randn(128, 16))
    assert unrelated < 0.5 < close < 1.0


def test_merge_is_the_weighted_sum_of_every_parameter():
    A = {"w": torch.tensor([1.0, 2.0]), "norm": torch.tensor([4.0])}
    B = {"w": torch.tensor([3.0, -2.0]), "norm": torch.tensor([0.0])}
    merged = merge(A, B, 0.25)
    assert merged["w"].tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2] and merged["norm"].tolist() == [1.0]
    model = tiny(layers=2)
    a, b = decoder_blocks(model)
    block = merged_block(a, b, 0.3)
    others = dict(b.named_parameters())
    names = [name for name, _ in a.named_parameters()]
    assert any("norm" in name for name in names)                            # norms are merged too
    for name, param in block.named_parameters():
        torch.testing.assert_close(param, 0.3 * dict(a.named_parameters())[name] + 0.7 * others[name],
                                   rtol=0, atol=1e-7)


def test_adjacent_choice_takes_the_most_similar_pair_ties_to_the_deeper():
    assert adjacent_choice([0.2, 0.9, 0.5]) == 1
    assert adjacent_choice([0.9, 0.4, 0.9]) == 2


def test_token_sample_skips_each_windows_first_token_and_is_a_multiple_of_bins():
    picks = token_sample(windows=3, seqlen=5, tokens=10, bins=4, seed=0)
    assert picks.numel() == 8 and bool((picks % 5 != 0).all()) and torch.equal(picks, picks.sort().values)
    assert torch.equal(picks, token_sample(3, 5, 10, 4, seed=0))


# MKA: on models --------------------------------------------------------------------------------

def test_mka_merges_identical_neighbours_first_and_keeps_the_function(calib):
    # blocks 1 and 2 pass their input through: blocks 0, 1, 2 have the same output (S = 1 twice); the tie
    # goes to the deeper pair, block 2 merges into block 1 with alpha = 1, i.e. block 2 is simply dropped
    model = tiny(layers=5, identity=(1, 2))
    original = copy.deepcopy(model)
    report = prune_(model, MKAConfig(layers=1, tokens=64), calib, progress=False)
    merge_record = report.scores["merges"][0]
    assert report.scores["similarity"][:2] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert (merge_record["kept"], merge_record["merged"], merge_record["weight"]) == (1, 2, pytest.approx(1.0))
    assert report.removed_blocks == [2]
    torch.testing.assert_close(logits(model, calib), logits(original, calib), rtol=1e-4, atol=1e-5)


def test_mka_remeasures_after_every_merge_and_writes_the_merged_blocks(calib):
    model = tiny(layers=6)
    original = copy.deepcopy(model)
    report = prune_(model, MKAConfig(layers=2, tokens=64, weight=0.5), calib, progress=False)
    first, second = report.scores["merges"]
    assert len(first["pairs"]) == 5 and len(second["pairs"]) == 4           # the second sees the merged model
    assert sorted([first["merged"], second["merged"]]) == report.removed_blocks
    # replay the merges on the original parameters: every kept block holds what they say
    expected = {i: dict(block.named_parameters()) for i, block in enumerate(decoder_blocks(original))}
    for record in (first, second):
        into, gone = expected[record["kept"]], expected.pop(record["merged"])
        expected[record["kept"]] = {name: 0.5 * into[name] + 0.5 * gone[name] for name in into}
    for position, index in enumerate(sorted(expected)):
        for name, param in decoder_blocks(model)[position].named_parameters():
            torch.testing.assert_close(param, expected[index][name], rtol=0, atol=1e-6)


def test_mka_config_is_checked():
    with pytest.raises(ValueError, match="weight is the kept block's share"):
        MKAConfig(layers=1, weight=1.5)
    with pytest.raises(ValueError, match="tokens=4 is too few"):
        MKAConfig(layers=1, tokens=4, bins=5)


# Streamline: the math --------------------------------------------------------------------------

def test_streamline_picks_the_run_whose_input_and_output_agree_most():
    # boundaries 0..4 of a 4-block model (input of block i; 4: the last output), one (batch=1, seq=2,
    # hidden=2) chunk each; removing 1 block replaces runs of 2 blocks: boundary l against l + 2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diagonal = (e1 + e2) / 2
    tokens = [[e1, e2], [e1, e1], [e2, e2], [e1, diagonal], [e2, e1]]
    boundaries = [[torch.stack(pair)[None]] for pair in tokens]
    similarities = run_similarities(boundaries, count=1)
    assert similarities == pytest.approx([(0 + 1) / 2,                # e1.e2, e2.e2
                                          (1 + 2 ** -0.5) / 2,        # e1.e1, e1.diagonal
                                          (1 + 0) / 2])               # e2.e2, e2.e1
    assert best_run(similarities) == 1
    assert run_similarities(boundaries, count=3) == pytest.approx([0.0])     # one run: all four blocks
    assert best_run([0.3, 0.8, 0.8]) == 1                                    # ties go to the lower block


def test_fit_lowers_the_mse_and_is_deterministic():
    torch.manual_seed(0)
    inputs = [torch.randn(4, 8) for _ in range(3)]
    W = torch.randn(8, 8)
    targets = [x @ W.T for x in inputs]

    def forward(module, i):
        return module(inputs[i])

    def trained(seed):
        torch.manual_seed(1)
        layer = nn.Linear(8, 8)
        before = mean_squared_error(layer, forward, targets)
        losses = fit(layer, forward, targets, steps=60, lr=0.05, seed=seed)
        return layer, before, mean_squared_error(layer, forward, targets), losses

    layer, before, after, losses = trained(0)
    assert after < 0.1 * before and len(losses) == 60
    again, *_ = trained(0)
    assert torch.equal(layer.weight, again.weight)


# Streamline: on models -------------------------------------------------------------------------

def test_streamline_replaces_a_run_of_identity_blocks_by_its_first_block(calib):
    # blocks 2, 3 pass their input through: the run 2..3 has cosine 1; block 2 (an identity) already maps the
    # run's input to its output, so its MSE is 0 and training leaves it as it is
    model = tiny(layers=5, identity=(2, 3))
    original = copy.deepcopy(model)
    report = prune_(model, StreamlineConfig(layers=1, steps=5), calib, progress=False)
    assert report.scores["run"] == [2, 3] and report.removed_blocks == [3]
    assert report.scores["similarity"][2] == pytest.approx(1.0)
    assert report.scores["mse_before"] == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(logits(model, calib), logits(original, calib), rtol=1e-4, atol=1e-5)


def test_streamline_trains_the_replacement_on_the_runs_input_and_output(calib):
    model = tiny(layers=5)
    original = copy.deepcopy(model)
    report = prune_(model, StreamlineConfig(layers=2, steps=40, lr=1e-3), calib, progress=False)
    run = report.scores["run"]
    assert len(run) == 3 and report.removed_blocks == run[1:] and len(decoder_blocks(model)) == 3
    assert report.scores["mse_after"] < 0.5 * report.scores["mse_before"]
    assert report.scores["losses"][-1] < report.scores["losses"][0]
    changed = decoder_blocks(model)[run[0]]                                  # the replacement sits where the run began
    assert not torch.equal(changed.mlp.down_proj.weight, decoder_blocks(original)[run[0]].mlp.down_proj.weight)
    kept = [i for i in range(5) if i not in report.removed_blocks and i != run[0]]
    for position, index in enumerate(i for i in range(5) if i not in report.removed_blocks):
        if index in kept:
            for a, b in zip(decoder_blocks(model)[position].parameters(), decoder_blocks(original)[index].parameters()):
                assert torch.equal(a, b)


def test_streamline_config_is_checked():
    with pytest.raises(ValueError, match="steps must be"):
        StreamlineConfig(layers=1, steps=0)
    with pytest.raises(ValueError, match="lr must be"):
        StreamlineConfig(layers=1, lr=0)


# every new method on every family of the depth matrix, through the public entry point ---------

CONFIGS = [ReverseOrderConfig(layers=2), MKAConfig(layers=2, tokens=64), StreamlineConfig(layers=2, steps=20, lr=1e-3)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_every_method_prunes_every_family_to_a_stock_checkpoint(family, config, calib, tmp_path):
    model = tiny(family, layers=5)
    report = prune_(model, config, calib, progress=False)
    assert len(report.removed_blocks) == 2 and len(decoder_blocks(model)) == 3
    assert model.config.num_hidden_layers == 3 and report.block_params_after < report.block_params_before
    out = save_pretrained_atomic(model, None, tmp_path / "pruned", metadata={"removed_blocks": report.removed_blocks})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(decoder_blocks(loaded)) == 3
    torch.testing.assert_close(logits(loaded, calib), logits(model, calib))
    loaded.generation_config.eos_token_id = None
    prompt = calib[:2, :5]
    with torch.no_grad():
        cached = loaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        plain = loaded.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("raw", [{"method": "reverse-order", "layers": 2}, {"method": "mka", "layers": 2, "tokens": 64},
                                 {"method": "streamline", "layers": 2, "steps": 10, "lr": 1e-3}],
                         ids=["reverse-order", "mka", "streamline"])
def test_out_of_core_writes_what_memory_writes(tmp_path, calib, raw):
    """--offload disk: the merged (MKA) and trained (Streamline) blocks are read from disk and written
    back through the residency; the export is bit-identical to the in-memory one."""
    from prunekit.recipe import step_from_dict
    from test_offload_structure import _compare, _deep

    report, _ = _compare(tmp_path, _deep("llama", 6), step_from_dict(raw), calib)
    assert len(report.removed_blocks) == 2
