"""The LLM Surgeon (arXiv 2312.17244): Kronecker factors against brute-force curvature, the cost
(Eq. 9) and update (Eq. 10-11) against the dense-F formulas, the shot schedule, the error against
magnitude pruning, the CLI on tiny models with a stock reload, and bad input."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prunekit.cli import main
from prunekit.gradients import WithGradient
from prunekit.masks import lowest, nm_violations
from prunekit.methods.llm_surgeon import LLMSurgeonConfig, _mask_for_shot, inverse_factor, kronecker_costs, \
    kronecker_update, llm_surgeon, surgeon_prune
from prunekit.stats import Hessian, OutputGradientCovariance
from prunekit.updates import obs_sweep

from conftest import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return M @ M.T / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def constrained_minimiser(W, pruned, F):
    """Brute force Eq. 10-11: the delta minimising 1/2 d^T F d with (w + d)_Q = 0, F on row-major vec(W)."""
    w = W.reshape(-1)
    Q = torch.nonzero(pruned.reshape(-1)).flatten()
    Finv = torch.linalg.inv(F)
    lam = torch.linalg.solve(Finv[Q][:, Q], w[Q])
    return (w - Finv[:, Q] @ lam).reshape(W.shape)


# --- curvature: G (x) A against the exact Fisher / Gauss-Newton matrix ---------------------------------

def test_kronecker_factors_equal_the_exact_fisher_for_one_sample():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)    # so the full backward hook sees inputs
    target = torch.tensor([2])
    A, G = Hessian(4, torch.device("cpu")), OutputGradientCovariance(3, torch.device("cpu"))
    handle = layer.register_full_backward_hook(lambda module, grad_in, grad_out: G.update(grad_out[0]))
    A.update(x.detach())
    loss = nn.functional.cross_entropy(layer(x), target)
    grad, _ = torch.autograd.grad(loss, (layer.weight, x))                # the hook fires with the input's gradient
    handle.remove()
    fisher = torch.outer(grad.reshape(-1), grad.reshape(-1))             # (12, 12), row-major vec(W)
    assert G.tokens == 1 and A.tokens == 1
    torch.testing.assert_close(torch.kron(G.G64, A.H64), fisher, rtol=1e-6, atol=1e-9)
    assert fisher.abs().max() > 1e-3                                     # not trivially zero


def test_kronecker_factors_differ_from_the_fisher_for_several_samples():
    """The factorisation is an approximation: with two samples the sum of Kronecker products is not one."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    A, G = Hessian(4, torch.device("cpu")), OutputGradientCovariance(3, torch.device("cpu"))
    fisher = torch.zeros(12, 12, dtype=torch.float64)
    for seed in range(2):
        x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        y = layer(x)
        (dy,) = torch.autograd.grad(nn.functional.cross_entropy(y, torch.tensor([seed])), y)
        G.update(dy)
        A.update(x)
        grad = torch.outer(dy[0], x[0])
        fisher += torch.outer(grad.reshape(-1), grad.reshape(-1))
    # E[g g^T] (x) E[x x^T] against E[(g g^T) (x) (x x^T)]
    assert not torch.allclose(torch.kron(G.G64, A.H64) / 2, fisher, rtol=1e-3)


def test_squared_error_gauss_newton_is_identity_kron_A_for_many_samples():
    """L = 1/2 ||X W^T - T||^2: the Hessian w.r.t. vec(W) is I (x) X^T X exactly, for any number of tokens."""
    torch.manual_seed(0)
    X, T = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda w: 0.5 * (X @ w.reshape(3, 4).T - T).square().sum(),
                                                torch.zeros(12, dtype=torch.float64))
    A = Hessian(4, torch.device("cpu"))
    A.update(X)
    # the observer multiplies in float32 (stats.py), hence float32 tolerances
    torch.testing.assert_close(hessian, torch.kron(torch.eye(3, dtype=torch.float64), A.H64), rtol=1e-5, atol=1e-5)


# --- cost and update --------------------------------------------------------------------------------

def test_cost_is_eq9_against_the_dense_inverse():
    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G, A = spd(3, 1), spd(4, 2)
    Finv = torch.linalg.inv(torch.kron(G, A))
    expected = 0.5 * W.reshape(-1).square() / Finv.diagonal()
    cost = kronecker_costs(W, torch.linalg.inv(G), torch.linalg.inv(A))
    torch.testing.assert_close(cost.reshape(-1), expected)


def test_update_with_identity_G_is_the_obs_update_for_one_removed_weight():
    torch.manual_seed(0)
    X = torch.randn(64, 8) @ torch.randn(8, 8)                            # correlated inputs
    stats = Hessian(8, torch.device("cpu"))
    stats.update(X)
    U, _, _ = stats.inverse_cholesky(0.01)
    Ainv = U.T @ U
    W = torch.randn(5, 8)
    pruned = torch.zeros(5, 8, dtype=torch.bool)
    pruned[2, 0] = True
    updated = kronecker_update(W, pruned, None, Ainv)
    expected = W.clone()
    expected[2] -= W[2, 0] / Ainv[0, 0] * Ainv[0]                       # OBS: dw = -w_q / [H^-1]_qq H^-1 e_q
    torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-6)
    assert updated[2, 0] == 0 and torch.equal(updated[[0, 1, 3, 4]], W[[0, 1, 3, 4]])
    # SparseGPT's sweep with the same mask: column 0 is the first, so its update reaches every column
    torch.testing.assert_close(obs_sweep(W, stats, sparsity=0.5, fixed=pruned), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows_apart", [False, True])
def test_full_G_update_is_the_constrained_minimiser_of_the_kronecker_quadratic(rows_apart):
    W = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    G, A = spd(3, 4), spd(4, 5)
    pruned = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    expected = constrained_minimiser(W, pruned, torch.kron(G, A))
    updated = kronecker_update(W, pruned, torch.linalg.inv(G), torch.linalg.inv(A), correlate=100)
    torch.testing.assert_close(updated, expected)
    exact = kronecker_update(W, pruned, torch.linalg.inv(G), torch.linalg.inv(A), cg_steps=1000, cg_tol=1e-10)
    torch.testing.assert_close(exact, expected)
    if rows_apart:     # solved one row at a time, a full G is an approximation: the rows interact through G
        apart = kronecker_update(W, pruned, torch.linalg.inv(G), torch.linalg.inv(A), correlate=1)
        assert not torch.allclose(apart, expected)
        assert bool((apart[pruned] == 0).all())


def test_diagonal_G_rows_are_exact_and_equal_the_full_path():
    W = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    g, A = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64), spd(6, 7)
    pruned = torch.rand(4, 6, generator=torch.Generator().manual_seed(8)) < 0.5
    expected = constrained_minimiser(W, pruned, torch.kron(torch.diag(g), A))
    Ainv = torch.linalg.inv(A)
    torch.testing.assert_close(kronecker_update(W, pruned, 1 / g, Ainv), expected)
    torch.testing.assert_close(kronecker_update(W, pruned, torch.diag(1 / g), Ainv, correlate=1), expected)
    torch.testing.assert_close(kronecker_update(W, pruned, None, Ainv), expected)   # diag G cancels in a row


def test_inverse_factor_dampens_by_the_mean_diagonal():
    g = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(inverse_factor(g, 0.5), 1 / (g + 1.0))
    G = torch.diag(g)
    torch.testing.assert_close(inverse_factor(G, 0.5), torch.diag(1 / (g + 1.0)))


# --- shots ------------------------------------------------------------------------------------------

def _factors(in_features=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, in_features, generator=g) @ torch.randn(in_features, in_features, generator=g)
    stats = Hessian(in_features, torch.device("cpu"))
    stats.update(X)
    U, _, _ = stats.inverse_cholesky(0.01)
    return X, stats, U.T @ U


@pytest.mark.parametrize("per", ["row", "layer"])
def test_every_shot_hits_its_point_of_the_linear_schedule(per):
    _, _, Ainv = _factors()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for shot in range(1, 6):
        mask = _mask_for_shot(kronecker_costs(W, None, Ainv), pruned, 1.0 if shot == 5 else shot / 5, 0.5, None,
                              per)
        assert bool(mask[pruned].all())                                  # earlier removals stay removed
        if per == "row":
            assert (mask.sum(dim=1) == int(32 * 0.5 * shot / 5)).all()
        else:
            assert int(mask.sum()) == int(16 * 32 * 0.5 * shot / 5)
        W, pruned = kronecker_update(W, mask, None, Ainv), mask
    assert int((W == 0).sum()) == 256


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_shots_prune_whole_groups_and_end_exactly_nm(nm):
    _, _, Ainv = _factors()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    groups = 16 * 32 // nm[1]
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for shot in range(1, 6):
        mask = _mask_for_shot(kronecker_costs(W, None, Ainv), pruned, 1.0 if shot == 5 else shot / 5, 0.5, nm,
                              "layer")
        per_group = mask.reshape(16, -1, nm[1]).sum(dim=2)
        assert set(per_group.unique().tolist()) <= {0, nm[0]}          # a group is pruned whole, or not yet
        assert int((per_group == nm[0]).sum()) == int(groups * (1.0 if shot == 5 else shot / 5))
        W, pruned = kronecker_update(W, mask, None, Ainv), mask
    assert nm_violations(W, *nm) == 0 and int((W == 0).sum()) == 16 * 32 // 2


@pytest.mark.parametrize("nm,per", [(None, "row"), (None, "layer"), ((2, 4), "layer")])
@pytest.mark.parametrize("shots", [1, 3, 5])
def test_surgeon_prune_counts_are_exact(nm, per, shots):
    _, _, Ainv = _factors()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    out = surgeon_prune(W, Ainv, None, sparsity=0.5 if nm is None else 0.5, nm=nm, per=per, shots=shots)
    if nm:
        assert nm_violations(out, *nm) == 0
    if per == "row":
        assert ((out == 0).sum(dim=1) == 16).all()
    assert int((out == 0).sum()) == 256


def test_error_is_not_above_magnitude_pruning():
    X, stats, _ = _factors(in_features=64, seed=4)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))

    def error(W_new):
        return float((X @ (W - W_new).T).norm() / (X @ W.T).norm())

    magnitude = W.masked_fill(lowest(W.abs(), 0.5, None, "layer"), 0)
    for shots in (1, 5):
        surgeon = llm_surgeon(W, stats, LLMSurgeonConfig(sparsity=0.5, shots=shots, curvature="identity"))
        assert int((surgeon == 0).sum()) == int((magnitude == 0).sum()) == 1024
        assert error(surgeon) < error(magnitude)
    surgeon_nm = llm_surgeon(W, stats, LLMSurgeonConfig(nm=(2, 4), curvature="identity"))
    assert error(surgeon_nm) < error(W.masked_fill(lowest(W.abs(), 0.0, (2, 4)), 0))


def test_diagonal_G_from_gradients_spares_rows_with_large_gradients():
    """per=layer: a row whose outputs move the loss most (large gradient) keeps more of its weights."""
    _, stats, _ = _factors()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    grad = torch.ones(16, 32)
    grad[:4] = 10.0
    cfg = LLMSurgeonConfig(sparsity=0.5, shots=2, curvature="gradient")
    out = llm_surgeon(W, WithGradient(stats, grad, windows=4), cfg)
    zeros = (out == 0).sum(dim=1)
    assert int(zeros.sum()) == 256
    assert zeros[:4].float().mean() < zeros[4:].float().mean()
    identity = llm_surgeon(W, stats, LLMSurgeonConfig(sparsity=0.5, shots=2, curvature="identity"))
    assert not torch.equal(out, identity)


# --- the CLI on tiny models, stock reload ---------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family,extra", [
    ("llama", ["--sparsity", "0.5", "--set", "steps.0.shots=3"]),
    ("qwen2", ["--nm", "2:4", "--set", "steps.0.shots=2", "--set", "steps.0.curvature=identity"]),
])
def test_cli_prunes_and_the_output_loads_with_stock_transformers(family, extra, tiny_model_dir, qwen2_dir, tmp_path):
    source = tiny_model_dir if family == "llama" else qwen2_dir
    out = tmp_path / "out"
    assert main(["prune", str(source), "--method", "llm-surgeon", *extra, "--samples", "4", "--seqlen", "16",
                 "--no-eval", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(source)
    for block, dense_block in zip(model.model.layers, dense.model.layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            W = block.get_submodule(name).weight
            assert float((W == 0).float().mean()) == pytest.approx(0.5, abs=1e-9)
            if "--nm" in extra:
                assert nm_violations(W, 2, 4) == 0
            kept = W != 0                                              # kept weights were updated (Eq. 11)
            assert not torch.equal(W[kept], dense_block.get_submodule(name).weight[kept])


# --- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(shots=0), "shots must be an integer"),
    (dict(shots=True), "shots must be an integer"),
    (dict(shots=2.5), "shots must be an integer"),
    (dict(curvature="full"), "curvature must be 'gradient'"),
    (dict(update="none"), "use update 'obs'"),
    (dict(damp=-0.1), "damp must be a number"),
    (dict(damp_g=float("nan")), "damp_g must be a number"),
    (dict(correlate=0), "correlate must be an integer"),
    (dict(cg_steps=0), "cg_steps must be an integer"),
    (dict(cg_tol=0), "cg_tol must be a number"),
    (dict(gradient="hutchinson"), "gradient must be 'model'"),
    (dict(curvature="kfac", gradient="block"), "use gradient 'model' or curvature 'gradient'"),
])
def test_bad_config_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMSurgeonConfig(**kwargs)


def test_identity_curvature_needs_no_gradient_pass_and_gradient_curvature_does():
    assert not LLMSurgeonConfig(curvature="identity").uses_gradient
    assert LLMSurgeonConfig().uses_gradient and LLMSurgeonConfig(nm=(2, 4)).uses_gradient
    # where a diagonal G cancels, no backward pass is spent on it
    assert not LLMSurgeonConfig(per="row").uses_gradient and not LLMSurgeonConfig(nm=(2, 4), shots=1).uses_gradient
    _, stats, _ = _factors()
    with pytest.raises(TypeError, match="curvature 'identity'"):
        llm_surgeon(torch.randn(4, 32), stats, LLMSurgeonConfig())
    with pytest.raises(TypeError, match="stats.Hessian"):
        llm_surgeon(torch.randn(4, 32), None, LLMSurgeonConfig(curvature="identity"))


def test_nm_that_does_not_divide_the_inputs_is_refused():
    Ainv = torch.eye(6)
    with pytest.raises(ValueError, match="multiple of 4"):
        surgeon_prune(torch.randn(2, 6), Ainv, None, sparsity=0.5, nm=(2, 4))


def test_cli_bad_shots_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert main(["prune", str(tiny_model_dir), "--method", "llm-surgeon", "--sparsity", "0.5", "--set",
                 "steps.0.shots=0", "--no-eval", "--out", str(tmp_path / "out")]) == 2
    assert "shots must be an integer" in capsys.readouterr().err


def test_recipe_key_shots_round_trips():
    from prunekit.recipe import dump_recipe, load_recipe
    recipe = load_recipe("model: default\nsteps:\n  - {method: llm-surgeon, sparsity: 0.5, shots: 3, "
                         "curvature: identity}\n")
    assert recipe.steps[0].shots == 3 and recipe.steps[0].curvature == "identity"
    assert load_recipe(dump_recipe(recipe)) == recipe


@pytest.mark.parametrize("nm,per,shots", [(None, "row", 3), ((2, 4), "row", 3), ((2, 4), "layer", 1)])
def test_a_diagonal_G_cancels_where_rows_do_not_compete(nm, per, shots):
    """Why `uses_gradient` skips the backward pass there: the result is the same with and without G."""
    _, stats, Ainv = _factors()
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(9))
    ginv = 1 / torch.linspace(0.1, 10, 16)
    with_g = surgeon_prune(W, Ainv, ginv, sparsity=0.5, nm=nm, per=per, shots=shots)
    torch.testing.assert_close(with_g, surgeon_prune(W, Ainv, None, sparsity=0.5, nm=nm, per=per, shots=shots))
    assert not LLMSurgeonConfig(nm=nm, per=per, shots=shots).uses_gradient
    # ... and a layer-wide ranking is where it does not cancel
    layer = surgeon_prune(W, Ainv, ginv, sparsity=0.5, per="layer", shots=shots)
    assert not torch.equal(layer == 0, surgeon_prune(W, Ainv, None, sparsity=0.5, per="layer", shots=shots) == 0)


# --- the full G (curvature "kfac") ----------------------------------------------------------------------------

def test_kfac_prunes_with_the_full_output_covariance_and_differs_from_its_diagonal(calib):
    from prunekit import prune_
    results = {}
    for curvature in ("kfac", "gradient"):
        model = tiny_model("llama")
        prune_(model, LLMSurgeonConfig(sparsity=0.5, curvature=curvature, gradient_samples=2, shots=2), calib,
               progress=False)
        results[curvature] = model.model.layers[1].mlp.down_proj.weight.detach().clone()
        for name, module in model.model.layers.named_modules():
            if isinstance(module, nn.Linear):
                assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-9), name
    assert not torch.equal(results["kfac"], results["gradient"])


def test_conjugate_gradients_reach_the_joint_minimiser_where_the_references_chunks_do_not():
    """A layer of 24 x 32 with a full G: CG's update equals the brute-force constrained minimiser of the
    Kronecker quadratic; the reference's chunks (one row each here) and the G = I update end well above it."""
    out, n = 24, 32
    W = torch.randn(out, n, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    G, A = spd(out, 21), spd(n, 22)
    G = G + 2 * torch.ones(out, out, dtype=torch.float64)                   # strongly coupled rows
    pruned = torch.rand(out, n, generator=torch.Generator().manual_seed(23)) < 0.5
    Ginv, Ainv = torch.linalg.inv(G), torch.linalg.inv(A)

    def quadratic(V):
        dW = V - W
        return float(torch.trace(G @ dW @ A @ dW.T))
    expected = constrained_minimiser(W, pruned, torch.kron(G, A))
    torch.testing.assert_close(kronecker_update(W, pruned, Ginv, Ainv, cg_steps=2000, cg_tol=1e-10), expected)
    cg = kronecker_update(W, pruned, Ginv, Ainv)                               # the defaults: 1% of the first residual
    assert quadratic(cg) == pytest.approx(quadratic(expected), rel=1e-2)
    chunks = kronecker_update(W, pruned, Ginv, Ainv, correlate=n // 2)
    rows = kronecker_update(W, pruned, None, Ainv)
    assert quadratic(cg) < 0.7 * min(quadratic(rows), quadratic(chunks))


def test_kfac_without_its_covariance_is_a_clear_error():
    _, stats, _ = _factors()
    with pytest.raises(TypeError, match="output-gradient covariance G"):
        llm_surgeon(torch.randn(4, 32), stats, LLMSurgeonConfig(curvature="kfac"))
    with pytest.raises(TypeError, match="output-gradient covariance G"):    # a gradient of the weight's shape
        llm_surgeon(torch.randn(4, 32), WithGradient(stats, torch.randn(4, 32), windows=1),
                    LLMSurgeonConfig(curvature="kfac"))
