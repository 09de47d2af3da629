"""Gradient magnitudes: the full-model estimator against a hand-written per-window autograd loop,
the block-local estimator's determinism, and that the model comes back untouched."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from prunekit.core.stream import block_stream
from prunekit.gradients import GradientScoreConfig, WithGradient, block_gradients, model_gradients
from prunekit.models.spec import get_module
from prunekit.stats import InputNorm

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def _snapshot(model):
    return {name: (p.detach().clone(), p.requires_grad, p.grad) for name, p in model.named_parameters()}


def _assert_untouched(model, before):
    for name, p in model.named_parameters():
        weight, flag, grad = before[name]
        assert torch.equal(p.detach(), weight), name
        assert p.requires_grad == flag, name
        assert p.grad is grad, name


def test_model_gradients_match_per_window_autograd(calib):
    model = tiny_model("llama")
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)                   # flags must come back as they were
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)       # and so must an existing .grad
    before = _snapshot(model)
    grads = model_gradients(model, calib, NAMES, samples=3, progress=False)
    _assert_untouched(model, before)
    assert model.training

    model.lm_head.weight.grad = None
    model.eval()
    expected = {name: torch.zeros_like(get_module(model, name).weight) for name in NAMES}
    for i in range(3):
        logits = model(calib[i:i + 1]).logits[0]                               # (seqlen, vocab)
        loss = F.cross_entropy(logits[:-1], calib[i, 1:])                      # next-token loss of one window
        loss.backward()
        for name in NAMES:
            weight = get_module(model, name).weight
            expected[name] += weight.grad.square()
            weight.grad = None
    for name in NAMES:
        assert grads[name].shape == get_module(model, name).weight.shape
        assert grads[name].dtype == torch.float32 and grads[name].device.type == "cpu"
        assert torch.allclose(grads[name], expected[name].sqrt(), rtol=1e-4, atol=1e-7)


def test_model_gradients_conv1d_is_out_in(calib):
    model = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_fc"                                          # Conv1D: stored (in, out)
    grads = model_gradients(model, calib, [name], samples=2, progress=False)
    module = get_module(model, name)
    assert grads[name].shape == module.weight.T.shape == (256, 64)
    ids = calib[:1]
    loss = model(input_ids=ids, labels=ids).loss
    first = torch.autograd.grad(loss, module.weight)[0].T                      # (out, in)
    assert bool((grads[name] >= first.abs() - 1e-6).all())                     # the norm over 2 windows bounds one
    with pytest.raises(TypeError, match="not a linear"):
        model_gradients(model, calib, ["transformer.h.0.ln_1"], samples=1, progress=False)


def test_block_gradients_deterministic_and_restoring(calib):
    model = tiny_model("llama")
    stream = block_stream(model, calib, batch_size=4, progress=False)
    step = next(stream)
    modules = {name: get_module(step.block, name) for name in ("self_attn.q_proj", "mlp.down_proj")}
    before = _snapshot(step.block)
    first = block_gradients(step, modules)
    _assert_untouched(step.block, before)
    again = block_gradients(step, modules)
    other = block_gradients(step, modules, seed=1)
    stream.close()
    for name, module in modules.items():
        assert first[name].shape == module.weight.shape and first[name].device.type == "cpu"
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])
        assert float(first[name].min()) >= 0 and float(first[name].max()) > 0


def test_with_gradient_and_config():
    stats = InputNorm(2, torch.device("cpu"))
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))                      # sq_norm (10, 20)
    grad = torch.tensor([[1.0, 2.0]])
    wrapped = WithGradient(stats, grad, windows=4, grad_windows=1)
    assert torch.equal(wrapped.sq_norm, torch.tensor([10.0, 20.0]))
    assert torch.equal(wrapped.mean_sq_norm, torch.tensor([2.5, 5.0]))
    assert torch.equal(wrapped.grad_l2, 2 * grad)                              # 1 of 4 windows: sqrt(4) times
    assert torch.equal(WithGradient(stats, grad, windows=4).grad_l2, grad)
    assert GradientScoreConfig().uses_gradient
    with pytest.raises(ValueError, match="'model'"):
        GradientScoreConfig(gradient="layer")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="gradient_samples"):
            GradientScoreConfig(gradient_samples=bad)
