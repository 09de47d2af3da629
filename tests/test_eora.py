"""EoRA: the factors are optimal in the activation-weighted norm, and the exported PEFT adapter
computes exactly W_pruned x + B A x on a stock model."""
import json
import sys
import weakref

import pytest
import torch

from prunekit.eora import (EoraConfig, adapter_parameters, eora_factors, layer_rank, merge_adapters_,
                           save_peft_adapter, svd_factors, weighted_error)
from prunekit.models.spec import is_linear, weight_view
from prunekit.catalog import get_method
from prunekit.stats import Hessian

from conftest import VOCAB, tiny_model


def anisotropic_problem(seed, out_features=24, in_features=32, tokens=256):
    """A random error and H = X^T X of inputs whose feature scales span two decades, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out_features, in_features, generator=g)                       # (out, in)
    rotation, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=g))
    X = torch.randn(tokens, in_features, generator=g) * torch.logspace(0, 2, in_features) @ rotation
    return delta, X.T @ X                                                              # (in, in)


def test_eora_reaches_the_weighted_optimum_and_beats_svd():
    for seed in range(5):
        delta, H = anisotropic_problem(seed)
        B, A = eora_factors(delta, H, 4)
        assert B.shape == (24, 4) and A.shape == (4, 32) and B.dtype == A.dtype == torch.float32
        eora_err = weighted_error(delta, B, A, H)
        svd_err = weighted_error(delta, *svd_factors(delta, 4), H)
        assert eora_err < 0.9 * svd_err
        # Eckart-Young in the weighted norm, computed independently with a Cholesky square root of H
        L = torch.linalg.cholesky(H.double())
        optimum = torch.linalg.svdvals(delta.double() @ L)[4:].square().sum().item()
        assert eora_err == pytest.approx(optimum, rel=1e-4)


@pytest.mark.parametrize("shape", [(24, 32), (32, 24)])
def test_full_rank_reproduces_the_error(shape):
    delta, H = anisotropic_problem(1, *shape)
    for B, A in (eora_factors(delta, H, 100), svd_factors(delta, 100)):
        assert B.shape[1] == min(shape)              # rank capped at min(out, in)
        torch.testing.assert_close(B @ A, delta, atol=1e-4, rtol=1e-4)


def test_factors_are_balanced_and_scale_free():
    delta, H = anisotropic_problem(2)
    B, A = eora_factors(delta, H, 6)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1))
    B2, A2 = eora_factors(delta, 1e5 * H, 6)         # a sum over more tokens: same factors
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B2.norm(dim=0), B.norm(dim=0), atol=1e-4, rtol=1e-3)


def test_dead_inputs_and_empty_hessian_stay_finite():
    delta, _ = anisotropic_problem(3)
    X = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    X[:, [0, 7]] = 0                                  # dead input features: zero rows/columns of H
    H = X.T @ X
    B, A = eora_factors(delta, H, 8)
    assert torch.isfinite(B).all() and torch.isfinite(A).all()
    assert weighted_error(delta, B, A, H) <= weighted_error(delta, *svd_factors(delta, 8), H)
    B, A = eora_factors(delta, torch.zeros(32, 32), 8)   # no signal at all: plain SVD
    B_svd, A_svd = svd_factors(delta, 8)
    torch.testing.assert_close(B @ A, B_svd @ A_svd, atol=1e-4, rtol=1e-4)
    B, A = eora_factors(torch.zeros(24, 32), H, 4)   # nothing pruned: zero factors, not NaN
    assert not B.any() and not A.any()


def test_layer_rank():
    assert layer_rank(EoraConfig(rank=8), 64, 96) == 8
    assert layer_rank(EoraConfig(rank=100), 16, 96) == 16                  # capped at min(out, in)
    cfg = EoraConfig(budget=0.1)
    assert cfg.rank is None
    assert layer_rank(cfg, 64, 96) == 3                                     # floor(0.1*64*96/160) = 3
    assert 3 * (64 + 96) <= 0.1 * 64 * 96 < 4 * (64 + 96)
    assert layer_rank(EoraConfig(budget=0.001), 64, 96) == 1               # at least 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(rank=None), "set exactly one of rank and budget"),
    (dict(rank=8, budget=0.1), "set exactly one of rank and budget"),
    (dict(rank=None, budget=0.0), r"budget must be a number in \(0, 1\)"),
    (dict(rank=None, budget=1.0), r"budget must be a number in \(0, 1\)"),
    (dict(adapter_dir="../elsewhere"), "adapter_dir must be a relative folder"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EoraConfig(**kwargs)


def test_merge_warns_that_sparsity_is_lost():
    with pytest.warns(UserWarning, match="sparsity is lost"):
        EoraConfig(merge=True)


def test_registered_as_a_compensation_step():
    method = get_method("eora")
    assert method.scope == "compensate" and method.stats is Hessian and method.needs_calibration
    delta, H = anisotropic_problem(4)
    stats = Hessian(32, torch.device("cpu"))
    stats.H = H
    compensate = method.fn(EoraConfig(budget=0.1))                          # the engine's callback
    layer = torch.nn.Linear(32, 24, bias=False)
    W_pruned = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))
    W_dense = W_pruned + delta
    compensate("layer", layer, W_dense, W_pruned, stats)
    B, A = compensate.adapters["layer"]
    assert B.shape == (24, 1) and A.shape == (1, 32)                        # floor(0.1*24*32/56) = 1
    # the same float32 difference the callback sees ((W + delta) - W is delta up to rounding)
    B_direct, A_direct = eora_factors(W_dense - W_pruned, H, 1)
    torch.testing.assert_close(B @ A, B_direct @ A_direct)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + x @ A.T @ B.T)   # the hook adds the residual
    compensate.remove_hooks()
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


def test_a_new_stats_object_gets_its_own_basis_even_at_a_reused_id():
    """The callback caches one eigenbasis per stats object (q/k/v share one). A freed stats object's
    id can be reused by the next one, of another width: that must not hand back the old basis (the
    CI failure of sparsegpt-eora in two processes: 64x64 @ 96x96)."""
    compensate = get_method("eora").fn(EoraConfig(rank=2))
    g = torch.Generator().manual_seed(0)

    def call(width):
        stats = Hessian(width, torch.device("cpu"))
        X = torch.randn(64, width, generator=g)
        stats.H64 += (X.T @ X).double()
        stats.sums_changed()
        W = torch.randn(8, width, generator=g)
        compensate(f"w{width}", torch.nn.Linear(width, 8, bias=False), W, W * (W.abs() > 1), stats)
        return id(stats)

    call(6)
    for _ in range(50):          # CPython soon hands the freed 6-wide object's address to a 10-wide one
        call(10)
    stats = Hessian(4, torch.device("cpu"))
    stats.H = torch.eye(4)
    compensate("w4", torch.nn.Linear(4, 8, bias=False), torch.ones(8, 4), torch.zeros(8, 4), stats)
    watch = weakref.ref(stats)
    del stats
    assert watch() is None                   # the cached basis does not keep the group's Hessian alive
    B, A = compensate.adapters["w10"]
    assert B.shape == (8, 2) and A.shape == (2, 10)


def _prune_and_compensate(model, blocks_prefix):
    """Zero half of every block linear (by magnitude), EoRA-compensate with mixed ranks."""
    generator = torch.Generator().manual_seed(0)
    adapters = {}
    layers = [(name, module) for name, module in model.named_modules()
              if name.startswith(blocks_prefix) and is_linear(module)]
    for index, (name, module) in enumerate(layers):
        with torch.no_grad():
            W = weight_view(module)                                         # (out, in)
            dense = W.detach().clone()
            W.masked_fill_(W.abs() <= W.abs().median(), 0)
            X = torch.randn(128, W.shape[1], generator=generator) * torch.linspace(0.1, 3, W.shape[1])
            adapters[name] = eora_factors(dense - W, X.T @ X, (2, 4, 4)[index % 3])   # mixed ranks
    return adapters


@pytest.mark.parametrize("family, blocks_prefix", [("llama", "model.layers."), ("gpt2", "transformer.h.")])
def test_peft_adapter_matches_merged_model(tmp_path, family, blocks_prefix):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    adapters = _prune_and_compensate(model, blocks_prefix)
    model.save_pretrained(tmp_path / "pruned")
    path = save_peft_adapter(tmp_path / "pruned" / "eora_adapter", adapters, model)

    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4
    assert set(config["rank_pattern"].values()) == {2} and config["alpha_pattern"] == config["rank_pattern"]
    assert config["fan_in_fan_out"] == (family == "gpt2")

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    peft_model = PeftModel.from_pretrained(base, path).eval()
    merged = merge_adapters_(AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval(), adapters)
    with torch.no_grad():
        with_adapter, with_merge = peft_model(tokens).logits, merged(tokens).logits
        plain = model(tokens).logits
    torch.testing.assert_close(with_adapter, with_merge, atol=1e-5, rtol=0)
    assert not torch.allclose(with_adapter, plain, atol=1e-3)               # the adapter does something
    # the base weights under the adapter are still the sparse ones
    q = next(name for name in adapters)
    assert (weight_view(base.get_submodule(q).base_layer) == 0).float().mean() >= 0.5
    assert adapter_parameters(adapters) == sum(B.shape[1] * sum(weight_view(model.get_submodule(n)).shape)
                                               for n, (B, _) in adapters.items())


def test_saving_needs_no_peft_and_is_atomic(tmp_path, monkeypatch):
    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"
    adapters = {name: (torch.ones(64, 2), torch.ones(2, 96))}
    monkeypatch.setitem(sys.modules, "peft", None)                          # import peft would fail
    path = save_peft_adapter(tmp_path / "adapter", adapters, model)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file
    keys = sorted(load_file(path / "adapter_model.safetensors"))
    assert keys == [f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"]

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_peft_adapter(path, adapters, model)
    save_peft_adapter(path, adapters, model, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]              # no staging folders left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_peft_adapter(tmp_path / "notes", adapters, model, overwrite=True)

    with pytest.raises(ValueError, match="do not factor"):
        save_peft_adapter(tmp_path / "bad", {name: (torch.ones(96, 2), torch.ones(2, 64))}, model)
    with pytest.raises(KeyError, match="no module"):
        save_peft_adapter(tmp_path / "bad", {"model.layers.9.mlp.down_proj": adapters[name]}, model)
    with pytest.raises(ImportError, match="pip install peft"):
        from prunekit.eora import load_adapter
        load_adapter(model, path)
