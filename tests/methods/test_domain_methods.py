"""Domain-specific pruning: D-Pruner (arXiv 2405.06275), contextual pruning (Mini-GPTs, arXiv 2312.12682)
and SEAP (arXiv 2503.07605).

Exact answers on hand-built tensors first; then a tiny Llama with a planted FFN channel that fires only on
"code" tokens (ids < 64), never on "prose" tokens (ids >= 64): pruning for code keeps it, pruning for prose
drops it (D-Pruner's general-data regulariser keeps it for prose too); then the family matrix with stock reload;
then bad input.
"""
import math

import pytest
import torch

from conftest import VOCAB, check_stock_reload_and_cache, llama, tiny_model
from prunekit import engine
from prunekit.catalog import get_method
from prunekit.cli import _parser, prune_args_to_dict
from prunekit.core.residency import current
from prunekit.gradients import WithGradient
from prunekit.methods.contextual import ContextualConfig, MeanAbs
from prunekit.methods.d_pruner import (DPrunerConfig, d_pruner, dual_importance, gradient_moments, layer_importances,
                                       taylor_importance)
from prunekit.methods.seap import SEAPConfig, logistic_sparsities, wifv
from prunekit.prune import prune_
from prunekit.report import PruneReport

pytestmark = pytest.mark.usefixtures("one_thread")

CODE, PROSE = range(0, VOCAB // 2), range(VOCAB // 2, VOCAB)
D0, PLANTED = 0, 5          # the hidden dimension only code tokens carry; the channel that reads it


# ----------------------------------------------------------------------------------------- exact math

def test_taylor_importance_is_the_second_order_loss_change_of_zeroing_each_weight():
    W = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    g = torch.tensor([[0.5, 1.0], [-2.0, 3.0]])
    F = torch.tensor([[1.0, 4.0], [8.0, 1.0]])
    # |-g w + 1/2 F w^2|: 2 -> |-1 + 2| = 1;  -1 -> |1 + 2| = 3;  0.5 -> |1 + 1| = 2;  0 -> 0
    assert torch.equal(taylor_importance(W, g, F), torch.tensor([[1.0, 3.0], [2.0, 0.0]]))


def test_dual_importance_adds_the_rescaled_general_curvature():
    W = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    F = torch.tensor([[2.0, 2.0], [2.0, 2.0]])                 # mean 2
    G = torch.tensor([[0.0, 1.0], [0.0, 3.0]])                 # mean 1: rescaled by 2 / 1
    # |-g w + (1/2 F + lam * 2 G) w^2| with lam = 0.5: G' = lam * 2 * G = G
    expected = torch.tensor([[0.0, 8.0], [1.0, 5.0]])
    torch.testing.assert_close(dual_importance(W, g, F, G, 0.5), expected)
    torch.testing.assert_close(dual_importance(W, g, F, G, 0.0), taylor_importance(W, g, F))
    torch.testing.assert_close(dual_importance(W, g, F, torch.zeros_like(G), 3.0), taylor_importance(W, g, F))
    # scale-free: scaling the general importance changes nothing
    torch.testing.assert_close(dual_importance(W, g, F, 1000 * G, 0.5), expected)


def test_d_pruner_keeps_the_highest_dual_scores_of_each_row():
    W = torch.arange(1.0, 9.0).reshape(2, 4)
    S = torch.tensor([[0.1, 9.0, 0.2, 5.0], [7.0, 0.3, 0.4, 8.0]])
    out = d_pruner(W, WithGradient(None, S, windows=1), DPrunerConfig(sparsity=0.5))
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 0.0, 4.0], [5.0, 0.0, 0.0, 8.0]]))


def test_d_pruner_without_its_pre_pass_says_so():
    with pytest.raises(TypeError, match="pre-pass"):
        d_pruner(torch.ones(2, 4), None, DPrunerConfig())


def test_gradient_moments_are_the_mean_gradient_and_the_mean_squared_gradient():
    model = llama()
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    moments = gradient_moments(model, ids, [name], progress=False)[name]
    weight = model.get_submodule(name).weight
    per_window = [torch.autograd.grad(model(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss, weight)[0]
                  for i in range(3)]
    torch.testing.assert_close(moments[0], torch.stack(per_window).mean(0), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(moments[1], torch.stack(per_window).square().mean(0), atol=1e-9, rtol=1e-5)
    assert weight.grad is None


def test_logistic_sparsities_follow_the_reference_shape_with_the_target_mean():
    rho = logistic_sparsities(8, 0.25, k=0.8, x0=0.3, first=2, last=2)
    assert rho[:2] == [0.0, 0.0] and rho[-2:] == [0.0, 0.0]
    assert math.isclose(sum(rho) / 8, 0.25)                  # the mean over every block is the target
    sigmoid = [1 / (1 + math.exp(-0.8 * (x - 0.3))) for x in (0, 1 / 3, 2 / 3, 1)]
    scale = 0.25 * 8 / sum(sigmoid)
    assert rho[2:6] == pytest.approx([scale * s for s in sigmoid], rel=1e-12)
    assert rho[2] < rho[3] < rho[4] < rho[5]                  # deeper blocks lose more
    assert logistic_sparsities(3, 0.3, first=0, last=0) == pytest.approx(
        [3 * 0.3 * s / sum(sigmoid[:1] + [1 / (1 + math.exp(-0.8 * (x - 0.3))) for x in (0.5, 1)])
         for s in [1 / (1 + math.exp(-0.8 * (x - 0.3))) for x in (0, 0.5, 1)]])


def test_wifv_is_input_variance_times_column_energy():
    W = torch.tensor([[1.0, 0.0, 2.0], [1.0, 3.0, 0.0]])
    var = torch.tensor([2.0, 1.0, 0.5])
    assert torch.equal(wifv(W, var), torch.tensor([4.0, 9.0, 2.0]))


def test_mean_abs_observer_averages_over_every_token_of_every_chunk():
    stats = MeanAbs(3, torch.device("cpu"))
    stats.update(torch.tensor([[[1.0, -2.0, 0.0], [-3.0, 2.0, 0.0]]]))     # (batch, seq, in)
    stats.update(torch.tensor([[[2.0, 0.0, -6.0]]]))
    assert stats.tokens == 3
    assert torch.equal(stats.mean_abs, torch.tensor([2.0, 4 / 3, 2.0]))


# ----------------------------------------------------------------------------------------- a planted domain

def planted_llama():
    """A tiny Llama whose channel PLANTED (in both blocks) reads only hidden dimension D0, which only code
    tokens carry (prose tokens have 0 there, and no layer writes D0), so it is exactly 0 on prose."""
    model = llama(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=g))
        emb[list(CODE), D0] = 2 + 4 * torch.rand(len(CODE), generator=g)
        emb[list(PROSE), D0] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[D0] = 0
            mlp = layer.mlp
            mlp.down_proj.weight[D0] = 0
            mlp.gate_proj.weight[PLANTED] = 0
            mlp.gate_proj.weight[PLANTED, D0] = 2.0
            mlp.up_proj.weight[PLANTED, D0] = 2.0
            mlp.down_proj.weight[:, PLANTED] = 0.5 * torch.randn(mlp.down_proj.weight.shape[0], generator=g)
            mlp.down_proj.weight[D0, PLANTED] = 0
    return model


def domain_windows(tokens: range, n: int = 8, seqlen: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tokens.start + torch.randint(0, len(tokens), (n, seqlen), generator=g)


def planted_kept(model, block: int) -> bool:
    gate = model.model.layers[block].mlp.gate_proj.weight
    row = torch.zeros(gate.shape[1])
    row[D0] = 2.0
    return bool((gate == row).all(dim=1).any())


@pytest.mark.parametrize("method, config", [
    ("contextual", ContextualConfig(sparsity=0.1)),
    ("seap", SEAPConfig(sparsity=0.1, attention=False, distribution="uniform")),
])
def test_width_methods_keep_the_planted_channel_for_code_and_drop_it_for_prose(method, config):
    for domain, kept in ((CODE, True), (PROSE, False)):
        model = planted_llama()
        report = prune_(model, config, domain_windows(domain), progress=False)
        assert report.widths[0]["channels"] == 80                 # 16 of 96 channels removed per block
        assert [planted_kept(model, b) for b in (0, 1)] == [kept, kept], (method, domain)
        scores = report.scores["channels"][0]
        assert (max(scores) if kept else min(scores)) == scores[PLANTED]   # the most / least active channel


def test_contextual_ranks_heads_too_when_asked():
    model = planted_llama()
    report = prune_(model, ContextualConfig(sparsity=0.2, attention=True), domain_windows(CODE), progress=False)
    assert "heads" in report.scores and report.widths[0]["heads"] < 4


def run_d_pruner(model, cfg, calib, scores):
    """prune_ for a linear method whose registered prescore the driver runs: the plan, the scores as each
    layer's `stats.grad`, the engine (what the linear-driver hook described in d_pruner.py does)."""
    method = get_method("d-pruner")
    groups = engine.plan(model, cfg)
    report = PruneReport(method=method.name, config=cfg, sequential="true", calibration_windows=calib.shape[0],
                         calibration_seqlen=calib.shape[1])
    options = engine.LinearOptions(device=torch.device("cpu"), cache_device=torch.device("cpu"), residency=current(),
                                   progress=False, windows=calib.shape[0], gradients=scores)
    engine.prune_linear_(model, method, cfg, calib, groups, report, options)
    return report


DOWN = [f"model.layers.{b}.mlp.down_proj" for b in (0, 1)]


def planted_column(model, block: int):
    """The planted channel's down_proj column, without row D0 (zero whatever happens)."""
    column = model.model.layers[block].mlp.down_proj.weight[:, PLANTED]
    return torch.cat([column[:D0], column[D0 + 1:]])


@pytest.mark.parametrize("domain, general, lam, kept", [
    (CODE, PROSE, 1.0, True),        # the domain needs the channel
    (PROSE, CODE, 0.0, False),       # prose alone never uses it: its weights score 0, the lowest of each row
    (PROSE, CODE, 1e4, True),        # the general (code) importance, weighted heavily, keeps it for prose too
])
def test_d_pruner_keeps_the_weights_the_domain_or_the_general_data_needs(domain, general, lam, kept):
    model = planted_llama()
    cfg = DPrunerConfig(sparsity=0.05, lam=lam, targets=(r"mlp\.down_proj",))
    calib = domain_windows(domain, n=4)
    scores = layer_importances(model, calib, domain_windows(general, n=4, seed=1), DOWN, cfg, progress=False)
    run_d_pruner(model, cfg, calib, scores)
    for block in (0, 1):
        column = planted_column(model, block)
        assert bool((column != 0).all()) if kept else bool((column == 0).all()), (block, lam)
        rows = model.model.layers[block].mlp.down_proj.weight
        assert int((rows[1:] == 0).sum(dim=1).min()) >= int(96 * 0.05)       # every row holds its zeros


# ----------------------------------------------------------------------------------------- the family matrix

FAMILIES = ["llama", "qwen2", "gemma2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("config", [ContextualConfig(sparsity=0.25, attention=True),
                                    SEAPConfig(sparsity=0.25, distribution="uniform"),
                                    SEAPConfig(sparsity=0.25, distribution="uniform", uniform=False)],
                         ids=["contextual", "seap", "seap-global"])
def test_width_family_matrix_reloads_stock(family, config, calib, tmp_path):
    model = tiny_model(family)
    report = prune_(model, config, calib, progress=False)
    assert 0.1 < report.removed_fraction < 0.4
    check_stock_reload_and_cache(model, calib, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_d_pruner_family_matrix_through_its_pre_pass(family, calib, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny_model(family)
    model.name_or_path = str(tiny_model_dir)          # the tokenizer of its general windows (vocabulary <= VOCAB)
    cfg = DPrunerConfig(sparsity=0.5, domain="code", gradient_samples=2, general_samples=2)
    groups = engine.plan(model, cfg)
    scores = get_method("d-pruner").prescore(model, calib, cfg, names=engine.layer_names(groups), progress=False)
    assert set(scores) == set(engine.layer_names(groups))
    report = run_d_pruner(model, cfg, calib, scores)
    assert all(layer.problem is None for layer in report.layers)
    assert all(layer.zeros >= layer.numel // 2 for layer in report.layers)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calib[:2]).logits, model(calib[:2]).logits)


def test_d_pruner_general_windows_come_from_the_other_domain(tiny_model_dir):
    from prunekit.data import calibration_data
    from prunekit.methods.d_pruner import general_windows
    from transformers import AutoTokenizer
    model = tiny_model("llama")
    model.name_or_path = str(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for domain, general in (("code", "prose"), ("prose", "code"), (None, "prose")):
        cfg = DPrunerConfig(domain=domain, general_samples=3)
        assert cfg.general_source == general
        assert torch.equal(general_windows(model, cfg, 12), calibration_data(tokenizer, general, 3, 12, 0))


# ----------------------------------------------------------------------------------------- the command line

def cli_step(*argv):
    raw = prune_args_to_dict(_parser().parse_args(["prune", "default", "--sparsity", "0.3", *argv]))
    return raw["calibration"]["source"], raw["eval"]["data"], raw["steps"][0]


def test_domain_flag_sets_the_calibration_and_the_d_pruner_domain():
    assert cli_step("--method", "d-pruner", "--domain", "code") == (
        "code", "code", {"method": "d-pruner", "sparsity": 0.3, "domain": "code"})
    assert cli_step("--method", "contextual", "--domain", "code") == (
        "code", "code", {"method": "contextual", "sparsity": 0.3})
    assert cli_step("--method", "seap", "--domain", "prose", "--calib", "prose")[0] == "prose"
    assert cli_step("--method", "seap", "--calib", "code")[:2] == ("code", "code")


# ----------------------------------------------------------------------------------------- bad input

def test_domain_flag_conflicting_with_calib_is_refused():
    with pytest.raises(ValueError, match="--domain code calibrates on code"):
        cli_step("--method", "seap", "--domain", "code", "--calib", "prose")


@pytest.mark.parametrize("make, match", [
    (lambda: DPrunerConfig(sparsity=1.5), "sparsity"),
    (lambda: DPrunerConfig(sparsity=-0.1), "sparsity"),
    (lambda: ContextualConfig(sparsity=1.0), "sparsity"),
    (lambda: SEAPConfig(sparsity=-0.2), "sparsity"),
    (lambda: DPrunerConfig(domain="code", general="code"), "general data"),
    (lambda: DPrunerConfig(domain="prose", general="default"), "general data"),
    (lambda: DPrunerConfig(domain="prose"), None),
    (lambda: DPrunerConfig(lam=-1.0), "lam"),
    (lambda: DPrunerConfig(lam=float("nan")), "lam"),
    (lambda: DPrunerConfig(general_samples=0), "general_samples"),
    (lambda: DPrunerConfig(domain=""), "domain"),
    (lambda: SEAPConfig(distribution="cosine"), "distribution"),
    (lambda: SEAPConfig(uniform=False), "uniform=false"),
    (lambda: SEAPConfig(protect_first=-1), "protect_first"),
    (lambda: SEAPConfig(logistic_k=float("inf")), "logistic_k"),
])
def test_bad_configs_are_refused_with_the_fix(make, match):
    if match is None:
        assert make().general_source == "code"
        return
    with pytest.raises(ValueError, match=match):
        make()


def test_logistic_shares_that_cannot_be_met_are_refused():
    with pytest.raises(ValueError, match="leave none"):
        logistic_sparsities(4, 0.2, first=2, last=2)
    with pytest.raises(ValueError, match="would remove"):
        logistic_sparsities(6, 0.6, first=2, last=2)
    with pytest.raises(ValueError, match="leave none"):
        SEAPConfig(sparsity=0.2).block_sparsity(0, 2)       # the paper's 2 + 2 protected blocks of a 2-block model


def test_seap_logistic_shares_reach_the_blocks(calib):
    """The width driver budgets each block with SEAP's logistic share: deeper blocks lose more, the protected
    ones nothing, the whole model about `sparsity`."""
    model = llama(num_hidden_layers=6)
    cfg = SEAPConfig(sparsity=0.2, protect_first=1, protect_last=1)
    report = prune_(model, cfg, calib, progress=False)
    channels = [w["channels"] for w in report.widths]
    assert channels[0] == channels[-1] == 96 and channels[1] >= channels[2] >= channels[3] >= channels[4] < 96
    assert report.removed_fraction == pytest.approx(0.2, abs=0.03)


def test_unknown_domain_is_refused_with_the_accepted_sources(tiny_model_dir, calib):
    model = tiny_model("llama")
    model.name_or_path = str(tiny_model_dir)
    cfg = DPrunerConfig(domain="code", general="nosuch", general_samples=1)
    with pytest.raises(ValueError, match="unknown text source 'nosuch'"):
        get_method("d-pruner").prescore(model, calib, cfg, names=["model.layers.0.mlp.down_proj"], progress=False)


def test_d_pruner_needs_a_tokenizer_for_its_general_windows(calib):
    with pytest.raises(ValueError, match="name_or_path"):
        get_method("d-pruner").prescore(tiny_model("llama"), calib, DPrunerConfig(),
                                        names=["model.layers.0.mlp.down_proj"], progress=False)
