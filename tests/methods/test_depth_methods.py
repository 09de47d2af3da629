"""Depth methods: exact choices on constructed models, each paper's formula, and a method x family matrix."""
import copy
import math

import pytest
import torch

from conftest import TINY_CONFIGS
from prunekit.depth import decoder_blocks, remove_blocks
from prunekit.prune import prune_
from prunekit.methods.angular import AngularConfig, angular_distance
from prunekit.methods.block_influence import BlockInfluenceConfig, block_influence
from prunekit.methods.laco import LaCoConfig, collapse
from prunekit.methods.last_k import LastKConfig
from prunekit.methods.sleb import SLEBConfig
from prunekit.catalog import get_method
from transformers import AutoModelForCausalLM


def tiny(family: str = "llama", layers: int = 4, identity: tuple[int, ...] = (), seed: int = 0):
    """A `layers`-block model; the blocks in `identity` return their input exactly (their attention
    output and MLP output projections are zero, so both residual branches add 0)."""
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(layers)]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for index in identity:
            block = decoder_blocks(model)[index]
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def own_text(model, windows: int = 8, length: int = 16):
    """Greedy continuations of random 2-token prompts: text the dense model predicts confidently,
    so removing any block that does something raises its perplexity (random text would not)."""
    ids = torch.randint(0, model.config.vocab_size, (windows, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        while ids.shape[1] < length:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def hf_loss(model, ids) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_registered_as_depth_methods():
    for name in ("block-influence", "angular", "sleb", "laco"):
        method = get_method(name)
        assert method.scope == "depth" and method.needs_calibration
    assert get_method("last-k").scope == "depth" and not get_method("last-k").needs_calibration


# block influence (ShortGPT) --------------------------------------------------------------------

def test_block_influence_formula():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])                       # (batch, seq, hidden)
    assert block_influence([x], [3 * x]) == pytest.approx(0.0)          # same direction
    assert block_influence([x], [-x]) == pytest.approx(2.0)             # opposite
    turned = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])                   # cos 0 and 1/sqrt(2)
    assert block_influence([x], [turned]) == pytest.approx(1 - (0 + 2 ** -0.5) / 2)


def test_block_influence_removes_the_identity_block_first(calib):
    model = tiny(identity=(2,))
    report = prune_(model, BlockInfluenceConfig(layers=1), calib, progress=False)
    scores = report.scores["block_influence"]
    assert abs(scores[2]) < 1e-6 and min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    assert report.removed_blocks == [2]


# angular distance (Gromov et al.) --------------------------------------------------------------

def test_angular_distance_formula():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(angular_distance(x, y), torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize("token", ["last", "all"])
def test_angular_removes_the_run_of_identity_blocks(token, calib):
    model = tiny(layers=5, identity=(1, 2))
    report = prune_(model, AngularConfig(layers=2, token=token), calib, progress=False)
    distances = report.scores["angular_distance"]
    assert len(distances) == 4                      # runs starting at blocks 0..3
    assert distances[1] < 1e-3 < min(distances[0], distances[2], distances[3])
    assert report.removed_blocks == [1, 2]


def test_angular_token_is_checked():
    with pytest.raises(ValueError, match="token must be one of"):
        AngularConfig(layers=1, token="first")


# SLEB ------------------------------------------------------------------------------------------

def test_sleb_perplexities_are_the_models_without_each_block():
    model = tiny(layers=4, identity=(1,))
    original = copy.deepcopy(model)
    calib = own_text(model)
    report = prune_(model, SLEBConfig(layers=1), calib, progress=False)
    assert report.removed_blocks == [1]
    first = report.scores["steps"][0]["candidates"]
    for j in range(4):
        without = copy.deepcopy(original)
        remove_blocks(without, [j])
        assert first[j] == pytest.approx(math.exp(hf_loss(without, calib)), rel=1e-5)
    assert report.scores["dense_perplexity"] == pytest.approx(first[1], rel=1e-5)   # block 1 did nothing


def test_sleb_is_greedy_on_the_current_model():
    model = tiny(layers=5, identity=(1, 3))
    calib = own_text(model)
    report = prune_(model, SLEBConfig(layers=2), calib, progress=False)
    steps = report.scores["steps"]
    assert report.removed_blocks == [1, 3]
    assert steps[1]["candidates"][steps[0]["removed"]] is None     # the second step scores the pruned model


def test_sleb_samples_uses_the_first_windows(calib):
    model = tiny(layers=4)
    dense = math.exp(hf_loss(model, calib[:3]))
    report = prune_(model, SLEBConfig(layers=1, samples=3), calib, progress=False)
    assert report.scores["dense_perplexity"] == pytest.approx(dense, rel=1e-5)
    assert "on 3 windows" in report.notes[1]
    with pytest.raises(ValueError, match="samples must be"):
        SLEBConfig(layers=1, samples=0)


# last-k ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, keep_last, expected", [(2, 1, [3, 4]), (2, 0, [4, 5]), (3, 3, [0, 1, 2])])
def test_last_k_removes_the_blocks_before_the_kept_ones(layers, keep_last, expected):
    model = tiny(layers=6)
    report = prune_(model, LastKConfig(layers=layers, keep_last=keep_last), None, progress=False)
    assert report.removed_blocks == expected


def test_last_k_refuses_too_many_kept_blocks():
    with pytest.raises(ValueError, match="lower keep_last to at most 3"):
        prune_(tiny(layers=6), LastKConfig(layers=3, keep_last=4), None, progress=False)
    with pytest.raises(ValueError, match="keep_last must be"):
        LastKConfig(layers=1, keep_last=-1)


# LaCo ------------------------------------------------------------------------------------------

def test_collapse_formula():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    followers = [{"w": torch.tensor([3.0, 2.0], dtype=torch.bfloat16)},
                 {"w": torch.tensor([5.0, 0.0], dtype=torch.bfloat16)}]
    merged = collapse(base, followers)["w"]
    assert merged.dtype == torch.bfloat16
    assert merged.tolist() == [1 + (3 - 1) + (5 - 1), 2 + 0 + (0 - 2)]


def test_laco_merge_into_an_identity_block_keeps_the_function(calib):
    # block 1 is an identity: merging block 2 into it gives block 2's parameters, so the collapsed
    # model computes what the original did
    model = tiny(layers=4, identity=(1,))
    original = copy.deepcopy(model)
    report = prune_(model, LaCoConfig(layers=1, merge=2, threshold=0.999), calib, progress=False)
    assert report.removed_blocks == [2]
    assert report.scores["attempts"][0]["similarity"] > 0.9999
    merged = dict(decoder_blocks(model)[1].named_parameters())
    for name, param in decoder_blocks(original)[2].named_parameters():     # norms included
        torch.testing.assert_close(merged[name], param)
    torch.testing.assert_close(logits(model, calib), logits(original, calib), rtol=1e-4, atol=1e-5)


def test_laco_moves_down_after_a_rejected_merge_and_keeps_the_model_until_success(calib):
    model = tiny(layers=6, identity=(0,))
    original = copy.deepcopy(model)
    report = prune_(model, LaCoConfig(layers=1, merge=2, threshold=0.9999, min_layer=0), calib, progress=False)
    attempts = report.scores["attempts"]
    assert [(a["base"], a["merged"], a["accepted"]) for a in attempts] == [
        (3, [4], False), (2, [3], False), (1, [2], False), (0, [1], True)]
    assert report.removed_blocks == [1]
    torch.testing.assert_close(logits(model, calib), logits(original, calib), rtol=1e-4, atol=1e-5)


def test_laco_stops_at_exactly_the_requested_count(calib):
    model = tiny(layers=8)
    report = prune_(model, LaCoConfig(layers=3, merge=3, interval=2, threshold=-1.0), calib, progress=False)
    attempts = report.scores["attempts"]
    # the first collapse ends one block below the last; the next merges only the one block still needed
    assert [(a["base"], a["merged"]) for a in attempts] == [(4, [5, 6]), (2, [3])]
    assert report.removed_blocks == [3, 5, 6] and len(decoder_blocks(model)) == 5


def test_laco_unreachable_threshold_says_what_to_lower_and_changes_nothing(calib):
    model = tiny(layers=4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"removed only 0 of the 1 .* lower threshold to that or below"):
        prune_(model, LaCoConfig(layers=1, merge=2, threshold=1.0), calib, progress=False)
    with pytest.raises(ValueError, match=r"removed only 1 of the 2 .* reached min_layer"):
        prune_(model, LaCoConfig(layers=2, merge=2, interval=2, threshold=-1.0), calib, progress=False)
    assert len(decoder_blocks(model)) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_laco_config_is_checked():
    with pytest.raises(ValueError, match="merge must be"):
        LaCoConfig(layers=1, merge=1)
    with pytest.raises(ValueError, match="threshold is a cosine"):
        LaCoConfig(layers=1, threshold=1.5)


# every method on two families, through the public entry point --------------------------------

CONFIGS = [BlockInfluenceConfig(layers=2), AngularConfig(layers=2), SLEBConfig(layers=2), LastKConfig(layers=2),
           LaCoConfig(layers=2, merge=2, interval=1, threshold=-1.0)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
@pytest.mark.parametrize("family", ["gemma3_text", "opt"])
def test_every_method_prunes_every_family(family, config, calib):
    model = tiny(family, layers=5)
    report = prune_(model, config, calib, progress=False)
    assert len(report.removed_blocks) == 2 and len(set(report.removed_blocks)) == 2
    assert len(decoder_blocks(model)) == 3 and model.config.num_hidden_layers == 3
    assert report.block_params_after < report.block_params_before
    assert torch.isfinite(logits(model, calib)).all()
