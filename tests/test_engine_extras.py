"""What the engine adds around a method: gradient scores, N:M channel permutation, EoRA.

The key property: the activations the engine propagates to the next block are those of the
model it leaves behind (pruned, permuted, compensated), in both sequential orders.
"""
import pytest
import torch

from conftest import VOCAB, tiny_model
from prunekit import EoraConfig, GBLMConfig, PrunerZeroConfig, RIAConfig, WandaConfig
from prunekit.prune import prune_
from prunekit.eora import attach_adapters
from prunekit.masks import nm_violations
from prunekit.models import spec_for
from prunekit.models.spec import get_module, weight_view
from prunekit.surgery import permute_channels_


@pytest.fixture
def calib():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(3))


def _inputs_of_last_block(model, calib, run):
    """Inputs the last block receives while `run()` executes, concatenated over calls."""
    blocks = get_module(model, spec_for(model).blocks)
    seen = []
    handle = blocks[-1].register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (kwargs.get("hidden_states", args[0] if args else None)).detach().clone()), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_permute_channels_keeps_the_function(family, calib):
    model = tiny_model(family)
    spec = spec_for(model)
    with torch.no_grad():
        before = model(calib).logits
        block = get_module(model, spec.blocks)[0]
        columns = weight_view(get_module(block, spec.channels.consumer)).shape[1]
        permute_channels_(block, spec.channels, torch.randperm(columns, generator=torch.Generator().manual_seed(0)))
        after = model(calib).logits
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("sequential", ["true", "block"])
def test_ria_permutation_propagates_what_the_pruned_model_computes(sequential, calib, monkeypatch):
    import prunekit.engine as engine

    calls = []

    def always_permute(score, n, m):                 # force a permutation so the path always runs
        calls.append(score.shape)
        return torch.randperm(score.shape[1], generator=torch.Generator().manual_seed(len(calls)))
    monkeypatch.setattr(engine, "nm_permutation", always_permute)
    model = tiny_model("llama")
    propagated = _inputs_of_last_block(model, calib, lambda: prune_(
        model, RIAConfig(nm=(2, 4), permute=True), calib, sequential=sequential, progress=False, batch_size=2))
    assert len(calls) == 2                            # once per block, for the down projection
    for block in model.model.layers:
        for module in (block.mlp.down_proj, block.self_attn.q_proj):
            assert nm_violations(module.weight, 2, 4) == 0
    with torch.no_grad():
        fresh = _inputs_of_last_block(model, calib, lambda: [model(chunk) for chunk in calib.split(2)])
    assert torch.allclose(torch.cat(propagated[-2:]), torch.cat(fresh), atol=1e-5)


@pytest.mark.parametrize("sequential", ["true", "block"])
def test_eora_adapters_join_the_forward_pass_and_export_merge(sequential, calib):
    model = tiny_model("llama")
    reports = []
    propagated = _inputs_of_last_block(model, calib, lambda: reports.append(prune_(
        model, WandaConfig(sparsity=0.6), calib, sequential=sequential, progress=False, batch_size=2,
        compensate=EoraConfig(rank=4))))
    report = reports[0]
    assert len(report.adapters) == 14 and report.to_dict()["adapter_parameters"] > 0
    assert all(abs(r.achieved - 0.6) < 0.02 for r in report.layers)     # the weights stay sparse
    handles = attach_adapters(model, report.adapters)
    try:
        with torch.no_grad():
            fresh = _inputs_of_last_block(model, calib, lambda: [model(chunk) for chunk in calib.split(2)])
            with_adapters = model(calib).logits
        assert torch.allclose(torch.cat(propagated[-2:]), torch.cat(fresh), atol=1e-5)
    finally:
        for handle in handles:
            handle.remove()
    merged = tiny_model("llama")
    report_merged = prune_(merged, WandaConfig(sparsity=0.6), calib, sequential=sequential, progress=False,
                           batch_size=2, compensate=EoraConfig(rank=4, merge=True))
    with torch.no_grad():
        assert torch.allclose(merged(calib).logits, with_adapters, atol=1e-4)
    assert (merged.model.layers[0].mlp.down_proj.weight == 0).float().mean() < 0.01   # merging re-densifies
    assert report_merged.adapters


def test_eora_lowers_the_output_error_of_the_pruned_model(calib):
    dense = tiny_model("llama")
    with torch.no_grad():
        target = dense(calib).logits
    plain, compensated = tiny_model("llama"), tiny_model("llama")
    prune_(plain, WandaConfig(sparsity=0.7), calib, progress=False)
    prune_(compensated, WandaConfig(sparsity=0.7), calib, progress=False, compensate=EoraConfig(rank=8, merge=True))
    with torch.no_grad():
        assert (compensated(calib).logits - target).norm() < (plain(calib).logits - target).norm()


def test_eora_refuses_structured_steps(calib):
    from prunekit.methods.flap import FlapConfig
    with pytest.raises(ValueError, match="EoRA compensates unstructured"):
        prune_(tiny_model("llama"), FlapConfig(sparsity=0.2), calib, progress=False, compensate=EoraConfig(rank=4))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "opt", "gpt2"])
@pytest.mark.parametrize("config", [GBLMConfig(sparsity=0.5), GBLMConfig(nm=(2, 4), gradient="block"),
                                    PrunerZeroConfig(sparsity=0.5, gradient_samples=2),
                                    RIAConfig(nm=(2, 4), permute=True)],
                         ids=["gblm", "gblm-block-2:4", "pruner-zero", "ria-perm"])
def test_gradient_and_permutation_methods_on_every_family(family, config, calib):
    model = tiny_model(family)
    report = prune_(model, config, calib, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert all(r.problem is None for r in report.layers)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(before.values())                       # gradients left the model as they found it
    assert all(p.grad is None for p in model.parameters())
