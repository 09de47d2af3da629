"""ARMOR (arXiv 2510.05528): an N:M core between block-diagonal wrappers, found by block coordinate
descent on the layer's proxy loss. Exact algebra on hand-built tensors, the guarantees on random
layers (never worse than SparseGPT, exact N:M core, block-diagonal wrappers), then tiny models
pruned, exported and reloaded with `prunekit.load_pruned`, and bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, tiny_model, tiny_tokenizer
from prunekit.catalog import get_method
from prunekit.cli import main
from prunekit.io.export import save_pretrained_atomic
from prunekit.io.loading import load_pruned
from prunekit.masks import nm_violations
from prunekit.methods.armor import (ArmorConfig, BlockDiagonal, armor, armor_factorize, dense, left, overhead,
                                    proxy_loss, right, wrapped_layers, wrapper_parameters)
from prunekit.methods.sparsegpt import SparseGPTConfig, sparsegpt
from prunekit.methods.wanda import WandaConfig, wanda
from prunekit.models.spec import weight_view
from prunekit.prune import prune_
from prunekit.stats import Hessian

pytestmark = pytest.mark.usefixtures("one_thread")


def layer_problem(seed: int, out_features: int = 32, in_features: int = 64, tokens: int = 256):
    """A random weight and correlated, unevenly scaled inputs X (tokens, in), with their Hessian observer."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=generator)
    mix = torch.randn(in_features, in_features, generator=generator) / in_features ** 0.5
    X = (torch.randn(tokens, in_features, generator=generator) @ mix + 0.3 * torch.randn(tokens, in_features,
                                                                                         generator=generator))
    X = X * torch.linspace(0.2, 3.0, in_features)
    stats = Hessian(in_features, torch.device("cpu"))
    stats.update(X)
    return W, X, stats


def output_error(W, X, computed) -> float:
    """||X W^T - X computed^T||^2 in float64, straight from the inputs (not through H)."""
    return float((X.double() @ (W.double() - computed.double()).T).square().sum())


# ------------------------------------------------------------------ exact algebra on hand-built tensors

def test_block_products_and_proxy_loss_by_hand():
    A = torch.tensor([[[2.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [0.0, 1.0]]])         # diag(A0, A1), (4, 4)
    M = torch.arange(8.0).reshape(4, 2)
    expected = torch.tensor([[0.0, 2.0], [6.0, 9.0], [10.0, 12.0], [6.0, 7.0]])
    assert torch.equal(left(A, M), expected)
    assert torch.equal(dense(A), torch.tensor([[2.0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]))
    assert torch.equal(right(M.T, A), M.T @ dense(A))
    block = BlockDiagonal(A.clone())
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(block(x), x @ dense(A).T)                                    # [2, 6, 7, 4]
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    S = torch.tensor([[0.0, 0.0, 3.0, 4.0]])
    eye = torch.eye(4)[None]
    one = torch.eye(1)[None]
    assert proxy_loss(W, one, S, eye, torch.eye(4)) == 5.0                          # 1^2 + 2^2
    H = torch.diag(torch.tensor([1.0, 10.0, 1.0, 1.0]))
    assert proxy_loss(W, one, S, eye, H) == 41.0                                    # 1 + 10 * 4


def test_overhead_formula():
    assert wrapper_parameters(64, 96, 32) == 2 * 32 ** 2 + 3 * 32 ** 2
    assert wrapper_parameters(64, 96, 128) == 64 ** 2 + 96 ** 2                     # capped at each dimension
    assert wrapper_parameters(32, 64, 1) == 32 + 64                                 # diagonal wrappers


# ------------------------------------------------------------------ the guarantees on random layers

@pytest.mark.parametrize("seed", range(4))
def test_proxy_loss_never_above_sparsegpt(seed):
    W, X, stats = layer_problem(seed)
    reference = sparsegpt(W, stats, SparseGPTConfig(nm=(2, 4)))
    core, factors = armor(W, stats, ArmorConfig(nm=(2, 4), block_size=8, iterations=4))
    armor_error = output_error(W, X, dense(factors.A) @ core @ dense(factors.B))
    sparsegpt_error = output_error(W, X, reference)
    assert factors.losses[0] == pytest.approx(sparsegpt_error, rel=1e-4)           # starts from SparseGPT's 2:4
    assert armor_error <= sparsegpt_error
    assert armor_error < 0.9 * sparsegpt_error                                      # and does better
    assert all(b <= a for a, b in zip(factors.losses, factors.losses[1:]))          # monotone descent
    assert factors.losses[-1] == pytest.approx(armor_error, rel=1e-3)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_core_is_exactly_n_of_m(nm):
    W, _, stats = layer_problem(7)
    core, _ = armor(W, stats, ArmorConfig(nm=nm, block_size=16, iterations=3))
    n, m = nm
    zeros = (core == 0).reshape(core.shape[0], -1, m).sum(-1)                       # zeros per group
    assert torch.equal(zeros, torch.full_like(zeros, n))
    assert nm_violations(core, n, m) == 0


def test_zero_iterations_return_the_initialisation():
    W, _, stats = layer_problem(3)
    core, factors = armor(W, stats, ArmorConfig(nm=(2, 4), block_size=1, iterations=0))
    assert torch.equal(core, sparsegpt(W, stats, SparseGPTConfig(nm=(2, 4))))
    assert torch.equal(factors.A, torch.ones(32, 1, 1)) and torch.equal(factors.B, torch.ones(64, 1, 1))
    assert len(factors.losses) == 1
    core, _ = armor(W, stats, ArmorConfig(nm=(2, 4), block_size=1, iterations=0, init="wanda"))
    assert torch.equal(core, wanda(W, stats, WandaConfig(nm=(2, 4))))


def test_wrappers_are_block_diagonal():
    W, _, stats = layer_problem(5, out_features=48, in_features=64)
    _, factors = armor(W, stats, ArmorConfig(nm=(2, 4), block_size=16, iterations=3))
    assert factors.A.shape == (3, 16, 16) and factors.B.shape == (4, 16, 16)
    for blocks, size in ((factors.A, 48), (factors.B, 64)):
        full = dense(blocks)
        inside = torch.block_diag(*[torch.ones(16, 16)] * (size // 16)).bool()
        assert torch.equal(full[~inside], torch.zeros(int((~inside).sum())))        # exactly zero off the blocks
        assert not torch.equal(blocks, torch.eye(16).repeat(size // 16, 1, 1))     # and the blocks were fitted


def test_full_blocks_fit_a_small_layer_exactly():
    # A (out, out) and B (in, in) dense and invertible have more freedom than W: the loss goes to ~0
    W, _, stats = layer_problem(2, out_features=8, in_features=16)
    core = sparsegpt(W, stats, SparseGPTConfig(nm=(2, 4)))
    factors = armor_factorize(W, stats.H, core, (2, 4), block_size=16, iterations=6)
    assert factors.losses[-1] < 1e-6 * factors.losses[0]


# ------------------------------------------------------------------ in a model: the engine, export, reload

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_api_prune_export_reload(family, calib, tmp_path):
    model = tiny_model(family)
    with torch.no_grad():
        dense_logits = model(calib[:2]).logits
    report = prune_(model, ArmorConfig(nm=(2, 4), block_size=16, iterations=2), calib, progress=False)
    wrapped = wrapped_layers(model)
    assert set(wrapped) == {r.name for r in report.layers} and all(b == (16, 16) for b in wrapped.values())
    for name, module in model.named_modules():
        if name in wrapped:
            core = weight_view(module)
            assert nm_violations(core, 2, 4) == 0                                # the stored weight is the core
            A, B = dense(module.armor_out.weight), dense(module.armor_in.weight)
            x = torch.randn(3, core.shape[1])
            expected = x @ (A @ core @ B).T + (module.bias if module.bias is not None else 0)
            torch.testing.assert_close(module(x), expected)                      # the layer computes A S B x + b
    expected = sum(wrapper_parameters(*weight_view(model.get_submodule(n)).shape, 16) for n in wrapped)
    assert overhead(model) == expected
    assert sum(int(r.note.split(" = ")[1].split(" ")[0]) for r in report.layers) == expected   # in the report
    assert all(r.problem is None for r in report.layers)
    with torch.no_grad():
        pruned_logits = model(calib[:2]).logits
    assert not torch.allclose(pruned_logits, dense_logits)

    out = save_pretrained_atomic(model, None, tmp_path / "out", metadata={"steps": [report.to_dict()]})
    reloaded, _ = load_pruned(out)
    assert set(wrapped_layers(reloaded)) == set(wrapped)
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, pruned_logits)
    stock = AutoModelForCausalLM.from_pretrained(out)                              # the core alone, wrappers dropped
    with torch.no_grad():
        assert not torch.allclose(stock(calib[:2]).logits, pruned_logits)


def test_reload_without_a_record_and_refuse_a_record_that_disagrees(calib, tmp_path):
    model = tiny_model("llama")
    report = prune_(model, ArmorConfig(nm=(2, 4), block_size=32, iterations=1), calib, progress=False)
    with torch.no_grad():
        pruned_logits = model(calib[:2]).logits
    bare = save_pretrained_atomic(model, None, tmp_path / "bare")          # no armor step in its prunekit.json
    reloaded, _ = load_pruned(bare)
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, pruned_logits)      # found by the safetensors keys
    record = report.to_dict()
    record["layers"] = record["layers"] + [dict(record["layers"][0], name="model.layers.1.mlp.extra_proj")]
    wrong = save_pretrained_atomic(model, None, tmp_path / "wrong", metadata={"steps": [record]})
    with pytest.raises(ValueError, match="export is incomplete"):
        load_pruned(wrong)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


FAST = ["--samples", "4", "--seqlen", "32", "--no-eval"]


def test_cli_prune_records_overhead_and_reloads(llama_dir, tmp_path, capsys):
    out = tmp_path / "armor"
    assert main(["prune", str(llama_dir), "--method", "armor", "--nm", "2:4", "--block-size", "32",
                 "--set", "steps.0.iterations=2", "--out", str(out), *FAST]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    step = record["steps"][0]
    assert step["method"] == "armor" and step["config"]["block_size"] == 32
    model, _ = load_pruned(out)
    wrapped = wrapped_layers(model)
    assert len(wrapped) == 14 and {name for name in wrapped} == {layer["name"] for layer in step["layers"]}
    expected = sum(wrapper_parameters(*weight_view(model.get_submodule(n)).shape, 32) for n in wrapped)
    assert overhead(model) == expected
    assert sum(int(layer["note"].split(" = ")[1].split(" ")[0]) for layer in step["layers"]) == expected
    assert "loads with prunekit.load_pruned: its linears carry block-diagonal wrappers" in capsys.readouterr().out
    # no llama.cpp graph computes the wrappers: a GGUF of the cores alone is refused, from the export and the prune
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "armor.gguf")]) == 2
    assert "block-diagonal wrappers" in capsys.readouterr().err and not (tmp_path / "armor.gguf").exists()
    assert main(["prune", str(llama_dir), "--method", "armor", "--nm", "2:4", "--block-size", "32", "--out",
                 str(tmp_path / "g"), "--export-format", "gguf", *FAST]) == 2
    assert "export safetensors" in capsys.readouterr().err
    assert record["sparsity"]["block_linear_sparsity"] == 0.5
    # the reloaded model computes A S B: the same as a stock model whose weights are the folded products
    folded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for name in wrapped:
            wrapper = model.get_submodule(name)
            product = dense(wrapper.armor_out.weight) @ weight_view(wrapper) @ dense(wrapper.armor_in.weight)
            weight_view(folded.get_submodule(name)).copy_(product)
        tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(tokens).logits, folded(tokens).logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(nm=None, sparsity=0.5), "N:M pattern"),
    (dict(sparsity=0.6), "sparsity is its N:M pattern"),
    (dict(update="obs"), "update must be 'none'"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(iterations=-1), "iterations must be an integer >= 0"),
    (dict(init="magnitude"), "init must be one of"),
    (dict(overrides={"mlp": 0.3}), "ignore"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArmorConfig(**kwargs)


def test_block_size_must_divide_each_dimension():
    W, _, stats = layer_problem(1, out_features=48, in_features=64)
    with pytest.raises(ValueError, match=r"does not divide the output dimension 48.*--block-size 16"):
        armor(W, stats, ArmorConfig(block_size=32, iterations=1))


def test_cli_bad_block_size_writes_nothing(llama_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    # the MLP's 96 channels are not a multiple of 64
    assert main(["prune", str(llama_dir), "--method", "armor", "--nm", "2:4", "--block-size", "64",
                 "--out", str(out), *FAST]) != 0
    assert "does not divide" in capsys.readouterr().err and not out.exists()


def test_moe_experts_are_refused_and_the_other_layers_wrapped(calib):
    from conftest import tiny_moe
    model = tiny_moe("mixtral")
    with pytest.raises(ValueError, match=r"fused routed experts.*--ignore experts"):
        prune_(model, ArmorConfig(block_size=16, iterations=1), calib, progress=False)
    model = tiny_moe("mixtral")
    report = prune_(model, ArmorConfig(block_size=16, iterations=1, ignore=("experts",)), calib, progress=False)
    assert set(wrapped_layers(model)) == {r.name for r in report.layers} and len(report.layers) == 12


def test_registered_as_a_calibrated_linear_method():
    method = get_method("armor")
    assert method.scope == "linear" and method.stats is Hessian and method.config_cls is ArmorConfig
