"""Width pruning: coupled shapes, exact unit removal, bias compensation, export and reload."""
import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from prunekit import prune_
from prunekit.io.export import save_pretrained_atomic
from prunekit.io.loading import load_pruned
from prunekit.methods.flap import FlapConfig
from prunekit.methods.magnitude_sp import MagnitudeSPConfig
from prunekit.methods.taylor import TaylorConfig
from prunekit.methods.wanda_sp import WandaSPConfig
from prunekit.models import spec_for
from prunekit.models.spec import get_module, weight_view
from prunekit.methods.magnitude_sp import magnitude_sp
from prunekit.report import StructureReport
from prunekit.structured import WidthConfig, _remove, _unit_scores, coupled_groups
from prunekit.surgery import block_widths, stock_widths

FAMILIES = sorted(TINY_CONFIGS)
METHODS = [MagnitudeSPConfig, WandaSPConfig, FlapConfig, TaylorConfig]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids, steps=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                              pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config_cls", METHODS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "global"])
def test_shapes_stay_coupled(family, config_cls, uniform, calib):
    """Every method x family x mode: the model still runs, generates with a KV cache, and each
    block's q/k/v/o and gate/up/down shapes agree with its head and channel counts."""
    model = tiny_model(family)
    report = prune_(model, config_cls(sparsity=0.3, uniform=uniform), calib, progress=False)
    assert 0.1 < report.removed_fraction < 0.5
    assert report.block_params_after < report.block_params_before
    spec = spec_for(model)
    for block, width in zip(get_module(model, spec.blocks), block_widths(model)):
        hd = next(g for g in coupled_groups(model, 0, block, WidthConfig()) if g.kind == "heads").head_dim
        q = weight_view(get_module(block, spec.heads.q)).shape[0]
        expected_q = (width["heads"] + 2 * width["kv_heads"]) * hd if spec.heads.fused else width["heads"] * hd
        assert q == expected_q
        assert width["heads"] % width["kv_heads"] == 0
        assert weight_view(get_module(block, spec.channels.consumer)).shape[1] == width["channels"]
        for name in spec.channels.producers:
            assert weight_view(get_module(block, name)).shape[0] == width["channels"] * spec.channels.fused
        if uniform:
            assert width["channels"] % 8 == 0
    out = _logits(model, calib[:2])
    assert out.shape == (2, calib.shape[1], VOCAB) and torch.isfinite(out).all()
    cached = _greedy(model, calib[:1, :5])
    assert cached.shape == (1, 11)


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_units_with_zero_weights_changes_nothing(family, calib):
    """Zero every weight of one KV group (multi-head: one head; its q/k/v rows and o columns) and
    of one FFN channel in block 0: such units contribute nothing, magnitude ranks them last, and
    removing them leaves the logits unchanged."""
    model = tiny_model(family)
    block = get_module(model, spec_for(model).blocks)[0]
    config = MagnitudeSPConfig(heads="kv")
    groups = coupled_groups(model, 0, block, config)
    widths = block_widths(model)[0]
    with torch.no_grad():
        for group, unit in zip(groups, (0, 5)):
            for module, rows in group.producers:
                weight_view(module)[rows == unit] = 0
                if module.bias is not None:
                    module.bias[rows == unit] = 0
            weight_view(group.consumer)[:, group.column_units == unit] = 0
    before = _logits(model, calib)
    scores = [_unit_scores(g, magnitude_sp(g, None, config), standardize=False) for g in groups]
    assert [int(s.argmin()) for s in scores] == [0, 5]
    _remove(model, groups, scores, [g.units - 1 for g in groups], [None, None], config,
            StructureReport("test", config, 0, 0, 0, 0))
    torch.testing.assert_close(_logits(model, calib), before, atol=1e-5, rtol=1e-4)
    per_kv = widths["heads"] // widths["kv_heads"]
    assert block_widths(model)[0] == {"heads": widths["heads"] - per_kv, "kv_heads": widths["kv_heads"] - 1,
                                      "channels": widths["channels"] - 1}


def test_flap_bias_compensation_reduces_block_error(calib):
    """Same mask, with and without compensation: folding the removed inputs' mean into the bias
    makes the pruned block's output closer to the dense block's (measured on its own input)."""
    from prunekit.core.stream import block_stream
    dense = tiny_model("llama")
    calib = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))
    errors = {}
    for bias in (False, True):
        model = tiny_model("llama")
        with torch.no_grad():                       # give the MLP input a clear non-zero mean
            for block in model.model.layers:
                block.mlp.up_proj.weight.add_(0.05)
                block.mlp.gate_proj.weight.add_(0.05)
        reference = tiny_model("llama")
        reference.load_state_dict(model.state_dict())
        prune_(model, FlapConfig(sparsity=0.35, uniform=True, bias=bias, attention=False), calib, progress=False)
        # block 0's outputs on identical inputs
        steps_dense = block_stream(reference, calib, progress=False)
        dense_step = next(steps_dense)
        dense_out = torch.cat(dense_step.forward())
        steps = block_stream(model, calib, progress=False)
        step = next(steps)
        out = torch.cat(step.forward())
        errors[bias] = float((out - dense_out).norm() / dense_out.norm())
        steps.close()
        steps_dense.close()
    assert errors[True] < errors[False]
    del dense


def test_flap_adds_stock_biases_to_llama(calib):
    model = tiny_model("llama")
    prune_(model, FlapConfig(sparsity=0.3, uniform=True), calib, progress=False)
    assert model.config.mlp_bias and model.config.attention_bias
    for block in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert getattr(block.self_attn, name).bias is not None
        assert block.mlp.down_proj.bias.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3_text", "gpt2"])
def test_uniform_export_reloads_with_stock_transformers(family, calib, tmp_path):
    model = tiny_model(family)
    prune_(model, FlapConfig(sparsity=0.3, uniform=True, attention=family != "gpt2"), calib, progress=False)
    assert stock_widths(model) is not None
    before, text = _logits(model, calib[:2]), _greedy(model, calib[:1, :4])
    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata={})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, calib[:2]), before, atol=1e-5, rtol=1e-4)
    assert torch.equal(_greedy(reloaded, calib[:1, :4]), text)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gpt2"])
def test_non_uniform_export_reloads_with_load_pruned(family, calib, tmp_path):
    """Different widths per block (or OPT/GPT-2 heads, which a stock config cannot describe):
    the config stays, prunekit.json records the widths, `load_pruned` rebuilds the model."""
    model = tiny_model(family)
    prune_(model, WandaSPConfig(sparsity=0.4, uniform=False), calib, progress=False)
    widths = block_widths(model)
    assert stock_widths(model) is None
    before = _logits(model, calib[:2])
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer
    out = save_pretrained_atomic(model, AutoTokenizer.from_pretrained(tmp_path / "tok"), tmp_path / "out",
                                 metadata={"structure": {"stock": False, "widths": widths}})
    reloaded, _ = load_pruned(out)
    assert block_widths(reloaded) == widths
    torch.testing.assert_close(_logits(reloaded, calib[:2]), before, atol=1e-5, rtol=1e-4)


def test_a_share_nearest_to_every_head_keeps_one_group_and_the_mlp_takes_the_rest(calib):
    """GQA (6 query heads in 2 KV groups, removable 2 at a time): at 70% of the block the attention share,
    which counts the K/V projections that stay, is nearest to removing all 6 heads; attention keeps 2 and
    the MLP gives the rest (SEAP's deepest blocks on SmolLM2 at 50% failed here)."""
    m = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]().__class__(
        hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=VOCAB))
    before = sum(p.numel() for p in m.model.layers.parameters())
    prune_(m, MagnitudeSPConfig(sparsity=0.7, round_to=4), calib, progress=False)
    widths = block_widths(m)[0]
    assert (widths["heads"], widths["kv_heads"]) == (2, 2)
    removed = 1 - sum(p.numel() for p in m.model.layers.parameters()) / before
    assert removed == pytest.approx(0.7, abs=0.03)


def test_bad_requests_give_clear_errors(calib):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="every attention head"):
        prune_(model, MagnitudeSPConfig(sparsity=0.9, mlp=False), calib, progress=False)
    with pytest.raises(ValueError, match="num_attention_heads % num_key_value_heads"):
        # 6 query heads in 2 KV groups: removing 1 head would leave 5
        m = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]().__class__(
            hidden_size=96, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=1,
            vocab_size=VOCAB))
        prune_(m, MagnitudeSPConfig(sparsity=0.07, mlp=False, round_heads=False), calib, progress=False)
    with pytest.raises(ValueError, match="round_to"):
        prune_(tiny_model("llama"), MagnitudeSPConfig(sparsity=0.99, attention=False, round_to=64), calib,
               progress=False)
    with pytest.raises(ValueError, match="sparsity must be"):
        MagnitudeSPConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="nothing to prune"):
        MagnitudeSPConfig(attention=False, mlp=False)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(tiny_model("llama"), FlapConfig(), None, progress=False)


def test_a_target_above_what_feasible_widths_allow_is_refused(calib):
    """The probe: flap --sparsity 0.99 removed 72.71% and reported success. Keeping one unit of each group
    per block bounds what can go; a target above that bound is refused with the bound."""
    from prunekit.methods.flap import FlapConfig
    with pytest.raises(ValueError, match=r"sparsity 0\.99 cannot be met: .* at most \d+\.\d+% .* --sparsity 0\.\d+"):
        prune_(tiny_model("llama"), FlapConfig(sparsity=0.99), calib, progress=False)
    report = prune_(tiny_model("llama"), FlapConfig(sparsity=0.3), calib, progress=False)   # reachable: met
    assert 0.2 < report.removed_fraction < 0.4
