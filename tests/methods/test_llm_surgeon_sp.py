"""The structured LLM Surgeon (`llm-surgeon-sp`): column costs and updates against the Kronecker quadratic,
multi-shot removal, the full output-gradient covariance, the family matrix with stock reload, bad input."""
import pytest
import torch
from conftest import NO_STOCK_HEADS, check_stock_reload_and_cache, tiny_model

from prunekit import prune_
from prunekit.cli import main
from prunekit.gradients import output_covariances
from prunekit.methods.llm_surgeon_sp import LLMSurgeonSPConfig, column_costs, remove_columns, surgeon_order, \
    unit_columns
from prunekit.models import spec_for
from prunekit.models.spec import get_module, weight_view
from prunekit.structured import coupled_groups, liar_update
from prunekit.surgery import block_widths

pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(n: int, seed: int, tokens: int = 64) -> torch.Tensor:
    X = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return X.T @ X + 0.1 * torch.eye(n, dtype=torch.float64)


def _quadratic(dW: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """1/2 vec(dW)^T (G (x) A) vec(dW), row-major vec: 1/2 tr(G dW A dW^T)."""
    return 0.5 * torch.trace(G @ dW @ A @ dW.T)


# --- the math on hand-built tensors -----------------------------------------------------------------------

@pytest.mark.parametrize("q", [1, 3])
def test_column_cost_is_the_kronecker_quadratic_of_the_update_and_nothing_feasible_is_cheaper(q):
    """Removing the columns Q with the update dW: dW zeroes them, its quadratic under G (x) A equals the
    cost, and moving any other column away from dW raises the quadratic (dW is the constrained minimiser)."""
    out, n = 5, 9
    W = torch.randn(out, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A, G = _spd(n, 1), _spd(out, 2)
    Ainv = torch.linalg.inv(A)
    columns = torch.arange(n - n % q).reshape(-1, q)                  # units of q columns
    costs = column_costs(W, G, Ainv, columns)
    for unit in range(columns.shape[0]):
        Q = columns[unit]
        W_new, _ = remove_columns(W, Ainv, Q)
        assert torch.all(W_new[:, Q] == 0)
        dW = W_new - W
        torch.testing.assert_close(_quadratic(dW, G, A), costs[unit])
        free = torch.ones(n, dtype=torch.bool)
        free[Q] = False
        for seed in range(3):
            nudge = torch.zeros_like(W)
            nudge[:, free] = 1e-2 * torch.randn(out, int(free.sum()), generator=torch.Generator().manual_seed(seed),
                                                dtype=torch.float64)
            assert _quadratic(dW + nudge, G, A) > costs[unit]


def test_one_column_cost_is_the_papers_formula():
    """1/2 w_j^T G w_j / [A^-1]_jj, the paper's column cost; G = None is G = I, a vector is a diagonal G."""
    W = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Ainv, G = torch.linalg.inv(_spd(6, 4)), _spd(4, 5)
    columns = torch.arange(6)[:, None]
    expected = 0.5 * torch.einsum("oj,op,pj->j", W, G, W) / Ainv.diagonal()
    torch.testing.assert_close(column_costs(W, G, Ainv, columns), expected)
    torch.testing.assert_close(column_costs(W, None, Ainv, columns), 0.5 * W.square().sum(0) / Ainv.diagonal())
    d = G.diagonal()
    torch.testing.assert_close(column_costs(W, d, Ainv, columns), column_costs(W, torch.diag(d), Ainv, columns))


def test_downdated_inverse_is_the_inverse_over_the_kept_columns_and_removals_compose():
    n = 8
    A = _spd(n, 6)
    W = torch.randn(3, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Ainv = torch.linalg.inv(A)
    W1, Ainv1 = remove_columns(W, Ainv, torch.tensor([1, 5]))
    kept = torch.tensor([0, 2, 3, 4, 6, 7])
    torch.testing.assert_close(Ainv1[kept][:, kept], torch.linalg.inv(A[kept][:, kept]))
    assert torch.all(Ainv1[[1, 5]] == 0) and torch.all(Ainv1[:, [1, 5]] == 0)
    # two rounds equal one: OBS updates on one quadratic compose
    W2, _ = remove_columns(W1, Ainv1, torch.tensor([3]))
    W_once, _ = remove_columns(W, Ainv, torch.tensor([1, 3, 5]))
    torch.testing.assert_close(W2, W_once)


def test_the_update_is_lias_least_squares_refit_so_the_drivers_compensation_applies_it():
    """The driver applies the final update through its `liar` compensation: with the same (undamped) X^T X
    both give the same kept columns."""
    X = torch.randn(200, 10, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    H = X.T @ X
    W = torch.randn(4, 10, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    removed = torch.tensor([2, 7])
    kept = torch.ones(10, dtype=torch.bool)
    kept[removed] = False
    W_surgeon, _ = remove_columns(W, torch.linalg.inv(H), removed)
    torch.testing.assert_close(W_surgeon[:, kept], W[:, kept] + liar_update(W, H, kept, damp=0.0))


def test_shots_keep_one_of_two_duplicate_inputs_where_one_shot_removes_both():
    """Columns 0 and 1 read the same input: alone, each costs ~0 (the other takes over), so one shot removes
    both; in two shots the second round sees column 1's cost after column 0 is gone and keeps it."""
    base = torch.randn(500, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    X = torch.cat([base[:, :1], base[:, :1], base], dim=1)             # (tokens, 7): 0 == 1 == 2
    X[:, 2] = torch.randn(500, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    A = X.T @ X
    A.diagonal().add_(1e-6 * A.diagonal().mean())
    W = torch.randn(6, 7, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    W[:, :2] = W[:, :2].sign() * 3.0                                   # the duplicates carry large weights
    columns = torch.arange(7)[:, None]
    one = surgeon_order(W, None, torch.linalg.inv(A), columns, n_remove=2, shots=1)
    two = surgeon_order(W, None, torch.linalg.inv(A), columns, n_remove=2, shots=2)
    assert set(torch.nonzero(one < 0).flatten().tolist()) == {0, 1}
    removed = set(torch.nonzero(two < 0).flatten().tolist())
    assert len(removed) == 2 and len(removed & {0, 1}) == 1


@pytest.mark.parametrize("shots", [1, 2, 3])
def test_order_removes_exactly_the_target_and_equal_heads_per_kv_group(shots):
    W = torch.randn(8, 24, generator=torch.Generator().manual_seed(13))
    Ainv = torch.linalg.inv(_spd(24, 14)).float()
    columns = unit_columns(torch.arange(24) // 4, 6)                   # 6 heads of 4 columns, 3 KV groups of 2
    scores = surgeon_order(W, None, Ainv, columns, n_remove=3, shots=shots, per_group=2)
    removed = torch.nonzero(scores < 0).flatten()
    assert removed.numel() == 3
    assert sorted((removed // 2).tolist()) == [0, 1, 2]                # one head from every KV group
    assert torch.all(scores[scores >= 0] >= 0) and scores.argsort()[:3].sort().values.tolist() == removed.tolist()


def test_unit_columns_refuses_units_of_unequal_width():
    assert unit_columns(torch.tensor([1, 0, 1, 0]), 2).tolist() == [[1, 3], [0, 2]]
    with pytest.raises(ValueError, match="same number"):
        unit_columns(torch.tensor([0, 0, 1]), 2)


# --- the output-gradient covariance ----------------------------------------------------------------------

@pytest.mark.parametrize("diagonal", [False, True])
def test_output_covariances_equal_the_output_gradients_autograd_gives(diagonal, calib):
    model = tiny_model("llama")
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    got = output_covariances(model, calib, names, samples=3, progress=False, diagonal=diagonal)
    expected = {name: 0 for name in names}
    outputs = {}
    for i in range(3):
        outputs.clear()

        def keep(name):
            def hook(module, args, output):
                output.retain_grad()
                outputs[name] = output
            return hook
        handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
        for p in model.parameters():
            p.requires_grad_(True)
        model(input_ids=calib[i:i + 1], labels=calib[i:i + 1]).loss.backward()
        for handle in handles:
            handle.remove()
        for name in names:
            g = outputs[name].grad.reshape(-1, outputs[name].shape[-1]).double()
            expected[name] = expected[name] + (g.square().sum(0) if diagonal else g.T @ g)
    model.zero_grad()
    for name in names:
        torch.testing.assert_close(got[name], expected[name].float(), rtol=1e-4, atol=1e-9)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# --- the driver, the family matrix, stock reload -----------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("curvature", ["kfac", "identity"])
def test_family_matrix_prunes_to_the_budget_and_reloads(family, curvature, calib, tmp_path):
    model = tiny_model(family)
    before = block_widths(model)
    report = prune_(model, LLMSurgeonSPConfig(sparsity=0.3, curvature=curvature, shots=3, gradient_samples=2,
                                              attention=family not in NO_STOCK_HEADS), calib, progress=False)
    assert 0.2 < report.removed_fraction < 0.4
    after = block_widths(model)
    assert all(a["channels"] < b["channels"] for a, b in zip(after, before))
    if family not in NO_STOCK_HEADS:
        assert all(a["heads"] < b["heads"] and a["heads"] % a["kv_heads"] == 0 for a, b in zip(after, before))
    check_stock_reload_and_cache(model, calib, tmp_path)


def test_the_driver_removes_the_units_the_shots_chose_and_applies_their_update(calib):
    """Uniform mode: the kept channels of block 0 are the ones `surgeon_order` keeps, and the consumer's kept
    columns moved (the correlated update) while the producers' kept rows did not."""
    from prunekit.stats import Hessian
    model = tiny_model("llama")
    cfg = LLMSurgeonSPConfig(sparsity=0.3, curvature="identity", attention=False, shots=2)
    block = model.model.layers[0]
    down = weight_view(block.mlp.down_proj).detach().clone()
    up = weight_view(block.mlp.up_proj).detach().clone()
    H = Hessian(down.shape[1], torch.device("cpu"))
    handle = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: H.update(a[0]))
    with torch.no_grad():
        model(calib)
    handle.remove()
    U, _, _ = H.inverse_cholesky(cfg.damp)
    group = coupled_groups(model, 0, block, cfg)[0]
    prune_(model, cfg, calib, progress=False, batch_size=8)
    kept = block.mlp.down_proj.weight.shape[1]
    scores = surgeon_order(down, None, U.T @ U, unit_columns(group.column_units, group.units), group.units - kept, 2)
    chosen = torch.nonzero(scores >= 0).flatten()
    torch.testing.assert_close(weight_view(block.mlp.up_proj), up[chosen])
    assert not torch.allclose(weight_view(block.mlp.down_proj), down[:, chosen], atol=1e-4)


def test_non_uniform_mode_ranks_one_rounds_costs_globally(calib):
    model = tiny_model("qwen2")
    report = prune_(model, LLMSurgeonSPConfig(sparsity=0.3, uniform=False, gradient_samples=2), calib,
                    progress=False)
    assert 0.2 < report.removed_fraction < 0.4


def test_kfac_and_identity_choose_differently(calib):
    """G reweights the output rows of each column's cost: on a tiny llama it changes which channels go."""
    widths = {}
    for curvature in ("kfac", "identity"):
        model = tiny_model("llama")
        prune_(model, LLMSurgeonSPConfig(sparsity=0.3, curvature=curvature, attention=False, gradient_samples=4),
               calib, progress=False)
        widths[curvature] = weight_view(get_module(model.model.layers[1], spec_for(model).channels.consumer)).clone()
    assert widths["kfac"].shape == widths["identity"].shape
    assert not torch.equal(widths["kfac"], widths["identity"])


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(compensate="none"), "correlated update"),
    (dict(compensate="bias"), "correlated update"),
    (dict(shots=0), "shots must be an integer"),
    (dict(shots=1.5), "shots must be an integer"),
    (dict(curvature="full"), "curvature must be 'kfac'"),
    (dict(damp=-1), "damp must be a number"),
    (dict(damp_g=float("inf")), "damp_g must be a number"),
    (dict(gradient_samples=0), "gradient_samples must be an integer"),
    (dict(sparsity=1.0), "sparsity must be a number in"),
])
def test_bad_config_is_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLMSurgeonSPConfig(**kwargs)


def test_cli_prunes_and_reports_bad_shots(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "llm-surgeon-sp", "--sparsity", "0.25", "--samples", "4",
                 "--seqlen", "16", "--shots", "2", "--curvature", "identity", "--no-eval", "--out", str(out)]) == 0
    recipe = (out / "prunekit.json").read_text()
    assert '"shots": 2' in recipe and '"curvature": "identity"' in recipe
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size < \
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.intermediate_size
    assert main(["prune", str(tiny_model_dir), "--method", "llm-surgeon-sp", "--sparsity", "0.25", "--set",
                 "steps.0.shots=0", "--no-eval", "--out", str(tmp_path / "bad")]) == 2
    assert "shots must be an integer" in capsys.readouterr().err
