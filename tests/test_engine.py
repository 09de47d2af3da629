"""The sequential engine against a naive full-model implementation, and the method x
architecture matrix on 2-layer models of every supported family."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, VOCAB, tiny_model
from prunekit import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_, sparsity_report
from prunekit.models import spec_for
from prunekit.models.spec import get_module, in_features, weight_view
from prunekit.registry import method_for_config


def naive_prune(model, config, calib, sequential):
    """The textbook loop: for each block (and, true-sequentially, each group), run the *whole*
    model on all calibration windows at once to collect statistics, then prune."""
    method = method_for_config(config)
    spec = spec_for(model)
    for _index, block in enumerate(get_module(model, spec.blocks)):
        schedule = [spec.groups] if sequential == "block" else [[group] for group in spec.groups]
        for groups in schedule:
            stats = {}

            def hook_for(group):
                def hook(module, args):
                    stats[group].update(args[0])  # noqa: B023 -- hooks run and are removed in this iteration
                return hook

            handles = []
            for group in groups:
                first = get_module(block, group[0])
                stats[group] = method.stats(in_features(first), torch.device("cpu")) if method.stats else None
                if method.stats:
                    handles.append(first.register_forward_pre_hook(hook_for(group)))
            with torch.no_grad():
                model(calib)
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for group in groups:
                    for name in group:
                        W = weight_view(get_module(block, name))
                        W.copy_(method.fn(W.detach().clone().float(), stats[group], config))


CONFIGS = [WandaConfig(sparsity=0.5), SparseGPTConfig(sparsity=0.5), MagnitudeConfig(sparsity=0.4),
           WandaConfig(nm=(2, 4)), SparseGPTConfig(nm=(4, 8), per="row")]


@pytest.mark.parametrize("sequential", ["true", "block"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{method_for_config(c).name}-{c.nm or c.sparsity}")
def test_engine_equals_naive_full_model_loop(config, sequential, calib):
    model = tiny_model("llama")
    expected = copy.deepcopy(model)
    naive_prune(expected, config, calib, sequential)
    prune_(model, config, calib, sequential=sequential, batch_size=len(calib), progress=False)
    for (name, ours), (_, theirs) in zip(model.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(ours == 0, theirs == 0), name


@pytest.mark.parametrize("sequential", ["true", "block"])
def test_chunking_does_not_change_the_result(sequential, calib):
    results = []
    for batch_size in (len(calib), 3, 1):
        model = tiny_model("llama")
        prune_(model, SparseGPTConfig(sparsity=0.5), calib, sequential=sequential, batch_size=batch_size,
               progress=False)
        results.append(model.state_dict())
    for other in results[1:]:
        for key in results[0]:
            torch.testing.assert_close(other[key], results[0][key], rtol=1e-4, atol=1e-5)


def test_true_sequential_differs_from_block_order(calib):
    """Later groups observe pruned inputs in true-sequential mode, so the masks differ."""
    a, b = tiny_model("llama"), tiny_model("llama")
    prune_(a, WandaConfig(sparsity=0.5), calib, sequential="true", progress=False)
    prune_(b, WandaConfig(sparsity=0.5), calib, sequential="block", progress=False)
    qa, qb = a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(qa, qb)                                   # first group: same input either way
    da, db = a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(da == 0, db == 0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("config", [WandaConfig(sparsity=0.5), SparseGPTConfig(nm=(2, 4)),
                                    MagnitudeConfig(sparsity=0.6, per="row")],
                         ids=lambda c: f"{method_for_config(c).name}-{c.nm or c.sparsity}")
def test_method_architecture_matrix(family, config, calib, tmp_path):
    model = tiny_model(family)
    spec = spec_for(model)
    embedding_zeros = [int((get_module(model, path).weight == 0).sum()) for path in spec.embeddings]
    report = prune_(model, config, calib, progress=False)
    n_linears = sum(len(group) for group in spec.groups) * model.config.num_hidden_layers
    assert len(report.layers) == n_linears
    for record in report.layers:
        assert record.problem is None
        assert record.achieved == pytest.approx(config.sparsity, abs=0.02)
        assert record.error is not None and 0 < record.error < 1.5
    scan = sparsity_report(model)
    assert scan["block_linear_sparsity"] == pytest.approx(config.sparsity, abs=0.02)
    # embeddings are not pruned (some families start with an all-zero padding row)
    assert [int((get_module(model, path).weight == 0).sum()) for path in spec.embeddings] == embedding_zeros
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)


def test_sparsegpt_per_layer_counts_per_column_block(calib):
    """70% of each 24-column block: the per-block floors sum to less than int(numel * 0.7), and
    verification must expect exactly that (a 70% SmolLM2 run once tripped over it)."""
    model = tiny_model("llama")
    config = SparseGPTConfig(sparsity=0.7, blocksize=24)
    report = prune_(model, config, calib, progress=False)
    q = next(r for r in report.layers if r.name.endswith("0.self_attn.q_proj"))     # (64, 64): blocks 24, 24, 16
    assert q.zeros == config.layer_zeros(64, 64, 0.7) == 2 * int(64 * 24 * 0.7) + int(64 * 16 * 0.7)
    assert q.zeros < int(64 * 64 * 0.7)


def test_magnitude_needs_no_data():
    model = tiny_model("gpt2")
    report = prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert all(r.error is None for r in report.layers)


def test_targets_ignore_and_overrides(calib):
    model = tiny_model("llama")
    config = WandaConfig(sparsity=0.5, ignore=(r"\.0\.mlp",), overrides={r"o_proj": 0.25})
    report = prune_(model, config, calib, progress=False)
    by_name = {r.name: r for r in report.layers}
    assert "model.layers.0.mlp.down_proj" not in by_name
    assert int((model.model.layers[0].mlp.down_proj.weight == 0).sum()) == 0
    assert by_name["model.layers.1.self_attn.o_proj"].achieved == pytest.approx(0.25)
    assert by_name["model.layers.1.mlp.down_proj"].achieved == pytest.approx(0.5)


def test_wanda_without_calibration_is_refused():
    with pytest.raises(ValueError, match="calibration"):
        prune_(tiny_model("llama"), WandaConfig(), None, progress=False)


def test_targets_matching_nothing_is_refused(calib):
    with pytest.raises(ValueError, match="select no linear"):
        prune_(tiny_model("llama"), WandaConfig(targets=("nonexistent",)), calib, progress=False)


def test_verification_names_the_layer_that_stayed_dense(calib, monkeypatch):
    """A method that silently leaves weights dense is caught and the layer is named."""
    from prunekit.catalog import get_method
    method = get_method("magnitude")
    broken = type(method)(method.name, method.config_cls, lambda W, stats, cfg: W, method.stats)
    monkeypatch.setattr("prunekit.prune.method_for_config", lambda cfg: broken)
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        prune_(tiny_model("llama"), MagnitudeConfig(sparsity=0.5), calib, progress=False)


def test_nan_in_weights_is_reported_with_its_layer(calib):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"block 1.*up_proj"):
        prune_(model, MagnitudeConfig(sparsity=0.5), None, progress=False)


def test_unsupported_architecture_is_refused(calib):
    from transformers import BertConfig, BertLMHeadModel
    model = BertLMHeadModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=VOCAB, is_decoder=True))
    with pytest.raises(ValueError, match="bert.*llama|llama.*bert"):
        prune_(model, WandaConfig(), calib, progress=False)
