"""Removing decoder blocks: the model must stay a consistent, loadable, cache-correct model."""
import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS
from prunekit.depth import BlockCache, DepthConfig, decoder_blocks, remove_blocks
from prunekit.prune import prune_
from prunekit.io.export import save_pretrained_atomic
from prunekit.methods.last_k import LastKConfig

FAMILIES = sorted(TINY_CONFIGS)


def four_layer_model(family: str, seed: int = 0, **overrides):
    """A 4-block model of `family`; per-layer lists repeat the tiny config's pattern."""
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = 4
    for name, value in overrides.items():
        setattr(config, name, value)
    if getattr(config, "layer_types", None) is not None and "layer_types" not in overrides:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(4)]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


class _Skip(nn.Module):
    """Stands in for a removed block: returns its input (decoder blocks return a tensor in transformers 5)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipping(model, removed):
    """A copy of the unpruned model whose removed blocks pass their input through."""
    reference = copy.deepcopy(model)
    blocks = decoder_blocks(reference)
    for index in removed:
        blocks[index] = _Skip()
    return reference


def layer_indices(model) -> list[list[int]]:
    return [[m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
            for block in decoder_blocks(model)]


@pytest.mark.parametrize("removed", [[1], [0, 3]])
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_blocks_equals_forward_through_kept_blocks(family, removed, calib):
    model = four_layer_model(family)
    layer_types = getattr(model.config, "layer_types", None)
    with torch.no_grad():
        expected = skipping(model, removed)(input_ids=calib).logits
    remove_blocks(model, removed)
    kept = [i for i in range(4) if i not in removed]
    assert len(decoder_blocks(model)) == len(kept)
    assert model.config.num_hidden_layers == len(kept)
    if family == "gpt2":
        assert model.config.n_layer == len(kept)          # attribute_map really forwards the assignment
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in kept]
    indices = layer_indices(model)
    assert all(indices) and indices == [[position] * len(found) for position, found in enumerate(indices)]
    with torch.no_grad():
        logits = model(input_ids=calib).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_after_removal(family, calib):
    model = four_layer_model(family)
    remove_blocks(model, [0, 2])
    model.generation_config.eos_token_id = None        # decode all steps, like the manual loop
    prompt = calib[:2, :5]
    new = 10                                            # 15 tokens: past the sliding window of 8
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
        ids = prompt
        for _ in range(new):
            next_token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(family, calib, tmp_path):
    model = four_layer_model(family)
    remove_blocks(model, [1])
    out = save_pretrained_atomic(model, None, tmp_path / "pruned", metadata={"removed_blocks": [1]})
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 3 and len(decoder_blocks(loaded)) == 3
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=calib).logits, model(input_ids=calib).logits)


def test_qwen2_sliding_layers_keep_their_type_and_max_window_layers_follows():
    # blocks 2 and 3 use the sliding window (i >= max_window_layers); remove block 0
    model = four_layer_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2,
                             layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    remove_blocks(model, [0])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1
    # a config rebuilt without layer_types derives the same ones from max_window_layers
    fields = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    assert transformers.Qwen2Config(**fields).layer_types == model.config.layer_types


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_loss_is_the_models_own_loss(family, calib):
    """BlockCache's NLL (final norm, head, Gemma soft-capping found per family) equals the model's loss."""
    model = four_layer_model(family)
    cache = BlockCache(model, calib, batch_size=3, progress=False)
    with torch.no_grad():
        assert cache.loss() == pytest.approx(model(input_ids=calib, labels=calib).loss.item(), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "opt"])
def test_cache_skips_blocks_like_removing_them(family, calib):
    model = four_layer_model(family)
    cache = BlockCache(model, calib, batch_size=3, progress=False)
    cache.remove(1)                                   # permanent: the boundaries after it are refreshed

    def loss_without(removed):
        pruned = copy.deepcopy(model)
        remove_blocks(pruned, removed)
        with torch.no_grad():
            return pruned(input_ids=calib, labels=calib).loss.item()

    assert cache.loss() == pytest.approx(loss_without([1]), rel=1e-5)
    assert cache.loss([2]) == pytest.approx(loss_without([1, 2]), rel=1e-5)
    assert cache.loss([0, 3]) == pytest.approx(loss_without([0, 1, 3]), rel=1e-5)


def test_config_needs_exactly_one_amount():
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        DepthConfig()
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        DepthConfig(sparsity=0.25, layers=2)
    for bad in (0, 0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="sparsity must be a fraction"):
            DepthConfig(sparsity=bad)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="layers must be a positive"):
            DepthConfig(layers=bad)


def test_blocks_to_remove_rounds_half_up_and_keeps_one():
    assert DepthConfig(sparsity=0.25).blocks_to_remove(30) == 8
    assert DepthConfig(sparsity=0.25).blocks_to_remove(10) == 3          # 2.5 rounds up, not to even
    assert DepthConfig(layers=3).blocks_to_remove(4) == 3
    with pytest.raises(ValueError, match="rounds to 0 blocks"):
        DepthConfig(sparsity=0.1).blocks_to_remove(4)
    with pytest.raises(ValueError, match="at least one must stay"):
        DepthConfig(layers=4).blocks_to_remove(4)
    with pytest.raises(ValueError, match="at least one must stay"):
        DepthConfig(sparsity=0.9).blocks_to_remove(4)


def test_bad_indices_are_refused_and_leave_the_model_alone(calib):
    model = four_layer_model("gemma2")
    before = copy.deepcopy(model.state_dict())
    for bad, message in (([1, 1], "more than once"), ([4], "out of range"), ([-1], "out of range"),
                         ([0, 1, 2, 3], "cannot remove all")):
        with pytest.raises(ValueError, match=message):
            remove_blocks(model, bad)
    with pytest.raises(TypeError, match="integers"):
        remove_blocks(model, ["1"])
    assert len(decoder_blocks(model)) == 4 and model.config.num_hidden_layers == 4
    assert len(model.config.layer_types) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prune_refuses_removing_every_block_before_any_work():
    model = four_layer_model("llama")
    with pytest.raises(ValueError, match="at least one must stay"):
        prune_(model, LastKConfig(layers=4), None, progress=False)
    assert len(decoder_blocks(model)) == 4


def test_gpt2_inverse_layer_scaling_refuses_moving_blocks(calib):
    model = four_layer_model("gpt2", scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(model, [1])
    with torch.no_grad():
        expected = skipping(model, [3])(input_ids=calib).logits
    remove_blocks(model, [3])                          # the last block: nothing moves
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, expected)


def test_prune_depth_report(calib):
    model = four_layer_model("llama")
    blocks_before = sum(p.numel() for p in decoder_blocks(model).parameters())
    report = prune_(model, LastKConfig(sparsity=0.5), calib, progress=False)
    assert report.method == "last-k" and report.removed_blocks == [1, 2]
    assert report.block_params_before == blocks_before
    assert report.block_params_after == blocks_before // 2
    assert report.model_params_before - report.model_params_after == blocks_before // 2
    assert report.removed_fraction == pytest.approx(0.5)
    assert "removed 2 of 4 blocks" in report.notes[0]
    assert report.to_dict()["removed_blocks"] == [1, 2]
