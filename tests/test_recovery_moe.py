"""Recovery for Mixture-of-Experts models: router-kd (Router KD, arXiv 2603.02217) and expert-kd
(MoE-Pruner's expert-wise distillation, arXiv 2410.12013): what they train, what they leave
bit-identical, the zeros of the fused 3-D expert weights, the loss, resume, refusals, CLI."""
import argparse
import copy

import pytest
import torch
from conftest import MOE_CONFIGS, llama, tiny_moe, tiny_tokenizer

import prunekit.catalog  # noqa: F401  (registers the methods)
from prunekit.models import spec_for
from prunekit.models.moe import expert_output, is_moe_block
from prunekit.models.spec import get_module
from prunekit.recovery import (ExpertDistillation, ExpertKDConfig, RouterKDConfig, expert_parameters, pruned_tensors,
                               recover_, router_parameters)
from prunekit.recovery import cli as recovery_cli
from prunekit.recovery import train
from prunekit.surgery import keep_experts_

WINDOWS = torch.randint(0, 16, (16, 16), generator=torch.Generator().manual_seed(0))   # 16 of 128 tokens


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: tiny matrices, one thread


def moe_blocks(model):
    """(block, spec.experts) for every decoder block that routes to experts."""
    spec = spec_for(model)
    return [(block, spec.experts) for block in get_module(model, spec.blocks) if is_moe_block(block, spec.experts)]


def confident_moe(family="mixtral"):
    """A tiny MoE whose predictions are sharp and whose experts matter, so routing changes show in the logits."""
    model = tiny_moe(family)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for block, moe in moe_blocks(model):
            experts = get_module(block, moe.experts)
            experts.gate_up_proj.mul_(5)
            experts.down_proj.mul_(5)
    return model


def without_experts(teacher, keep=(0, 2, 4, 5, 7)):
    """The teacher with experts removed from every MoE block (surgery.keep_experts_)."""
    student = copy.deepcopy(teacher)
    for block, moe in moe_blocks(student):
        keep_experts_(block, moe, torch.tensor(keep))
    return student


def with_perturbed_routers(teacher, scale=0.5):
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block, moe in moe_blocks(student):
            router = get_module(block, moe.router)
            router.weight.add_(torch.randn(router.weight.shape, generator=g) * scale)
    return student


def sparsified_experts(teacher, fraction=0.5, seed=3):
    """The teacher with a random `fraction` of every fused expert weight set to exactly zero."""
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in expert_parameters(student).values():
            tensor[torch.rand(tensor.shape, generator=g) < fraction] = 0.0
    return student


def snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@torch.no_grad()
def kl_to_teacher(student, teacher, windows=WINDOWS):
    return float(train.distillation_loss(student(input_ids=windows).logits, teacher(input_ids=windows).logits, 1.0))


# ----------------------------------------------------------------------------- registry, configs, recipes

def test_registered_for_recovery_with_recipe_steps():
    from prunekit.catalog import get_method
    from prunekit.recipe import step_from_dict, step_to_dict

    for name, cls in (("router-kd", RouterKDConfig), ("expert-kd", ExpertKDConfig)):
        method = get_method(name)
        assert method.scope == "recover" and method.config_cls is cls and method.needs_calibration
        assert cls().needs_teacher
    step = step_from_dict({"method": "router-kd", "steps": 50, "temperature": 2.0})
    assert step == RouterKDConfig(steps=50, temperature=2.0)
    assert step_from_dict(step_to_dict(step)) == step
    step = step_from_dict({"method": "expert-kd", "steps": 50, "expert_weight": 1000.0})
    assert step == ExpertKDConfig(steps=50, expert_weight=1000.0)
    with pytest.raises(ValueError, match="expert_weight must be a number.*without quotes"):
        step_from_dict({"method": "expert-kd", "expert_weight": "1e3"})   # what YAML makes of 1e3: text
    with pytest.raises(ValueError, match="unknown key 'rank' in step"):
        step_from_dict({"method": "router-kd", "rank": 8})              # router-kd has no adapters
    with pytest.raises(ValueError, match="expert_weight"):
        ExpertKDConfig(expert_weight=0)
    with pytest.raises(ValueError, match="temperature"):
        RouterKDConfig(temperature=0)


def test_trainable_sets_are_the_routers_and_the_fused_experts():
    model = tiny_moe("gpt_oss")                     # a router bias, expert biases (2-D: not trained)
    routers = router_parameters(model)
    assert sorted(routers) == sorted(f"model.layers.{i}.mlp.router.{p}" for i in range(3) for p in ("weight", "bias"))
    experts = expert_parameters(model)
    assert sorted(experts) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in range(3)
                                     for p in ("gate_up_proj", "down_proj"))
    model = tiny_moe("deepseek_v3")                 # block 0 dense; the correction bias is a buffer
    assert sorted(router_parameters(model)) == ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    assert all(t.dim() == 3 for t in expert_parameters(model).values())
    assert set(expert_parameters(model)) <= set(pruned_tensors(model))   # the zero check covers the experts


def test_dense_models_are_refused_with_the_model_type():
    model, teacher = llama(), llama()
    for cfg, what in ((RouterKDConfig(steps=1), "router-kd trains the routers"),
                      (ExpertKDConfig(steps=1), "expert-kd trains the routed experts")):
        with pytest.raises(ValueError, match=f"{what} of a Mixture-of-Experts model; 'llama' "
                                             r"\(LlamaForCausalLM\) has none"):
            recover_(model, cfg, WINDOWS, teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        recover_(tiny_moe("mixtral"), RouterKDConfig(steps=1), WINDOWS, progress=False)


# ----------------------------------------------------------------------------- router-kd

@pytest.mark.parametrize("family, make_student", [("mixtral", without_experts), ("mixtral", with_perturbed_routers),
                                                  ("gpt_oss", with_perturbed_routers),
                                                  ("deepseek_v3", with_perturbed_routers)])
def test_router_kd_trains_only_the_routers_and_lowers_the_kl(family, make_student):
    teacher = confident_moe(family)
    student = make_student(teacher)
    teacher_state, before = snapshot(teacher), snapshot(student)
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    routers = set(router_parameters(student))
    kl_before = kl_to_teacher(student, teacher)

    report = recover_(student, RouterKDConfig(steps=10, lr=3e-2, batch_size=8), WINDOWS, teacher=teacher,
                      progress=False)

    after = snapshot(student)
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed == routers                        # every router tensor moved, nothing else (buffers included)
    assert report["trainable_parameters"] == sum(p.numel() for p in router_parameters(student).values())
    assert kl_to_teacher(student, teacher) < kl_before
    assert report["loss_after"] < report["loss_before"]
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    assert "KL(teacher || student)" in report["loss_protocol"]


# ----------------------------------------------------------------------------- expert-kd

@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_mse_is_the_sum_over_experts_of_each_experts_mse(family):
    teacher = tiny_moe(family)
    student = sparsified_experts(teacher)
    (block, moe), (teacher_block, _) = moe_blocks(student)[-1], moe_blocks(teacher)[-1]
    experts, teacher_experts = get_module(block, moe.experts), get_module(teacher_block, moe.experts)
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    index = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(12)])
    index[index == 6] = 1                            # expert 6 gets no token; expert 1 more than others
    with ExpertDistillation(student, teacher) as distiller, torch.no_grad():
        got = distiller._block_loss(experts, teacher_experts, x, index)
    expected = 0.0
    with torch.no_grad():
        for i in range(8):
            tokens = (index == i).any(dim=-1)
            if tokens.any():
                expected += float(((expert_output(experts, x[tokens], i)
                                    - expert_output(teacher_experts, x[tokens], i)) ** 2).mean())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_expert_kd_keeps_every_zero_of_the_experts_and_lowers_its_loss():
    teacher = confident_moe("mixtral")
    student = sparsified_experts(teacher)
    experts_before = {key: t.detach().clone() for key, t in expert_parameters(student).items()}
    before, teacher_state = snapshot(student), snapshot(teacher)

    report = recover_(student, ExpertKDConfig(steps=8, lr=1e-3, batch_size=8), WINDOWS, teacher=teacher,
                      progress=False)

    after = snapshot(student)
    assert {key for key in after if not torch.equal(after[key], before[key])} == set(experts_before)
    for key, tensor in expert_parameters(student).items():
        zero = experts_before[key] == 0
        assert torch.equal(tensor[zero], torch.zeros(int(zero.sum())))          # every zero exactly zero
        assert not torch.equal(tensor[~zero], experts_before[key][~zero])       # the rest trained
    assert report["sparsity_after"] == report["sparsity_before"] > 0.25
    assert report["loss_after"] < report["loss_before"]
    assert sum(report["losses"][-3:]) < sum(report["losses"][:3])
    assert report["expert_kd"]["expert_weight"] > 0 and report["expert_kd"]["blocks"] == 3
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_expert_kd_balances_lambda_as_moe_pruner_initialises_it():
    teacher = confident_moe("mixtral")
    student = sparsified_experts(teacher)
    cfg = ExpertKDConfig(steps=1, lr=1e-12, batch_size=16)     # one batch: all windows; a step that changes nothing
    with ExpertDistillation(student, teacher) as distiller, torch.no_grad():
        ce, expert = train.expert_kd_terms(student, WINDOWS, distiller)
    report = recover_(student, cfg, WINDOWS, teacher=teacher, progress=False)
    assert report["expert_kd"]["expert_weight"] == pytest.approx(float(ce) / float(expert), rel=1e-4)
    assert report["loss_before"] == pytest.approx(2 * float(ce), rel=1e-4)   # lambda * L_expert = L_CE at the start


def test_expert_kd_refuses_a_teacher_with_other_experts():
    teacher = tiny_moe("mixtral")
    with pytest.raises(ValueError, match="pairs expert i of the student with expert i of the teacher.*router-kd"):
        recover_(without_experts(teacher), ExpertKDConfig(steps=1), WINDOWS, teacher=teacher, progress=False)


def test_the_zero_check_covers_the_fused_expert_weights(monkeypatch):
    teacher = confident_moe("mixtral")
    student = with_perturbed_routers(sparsified_experts(teacher))
    key = "model.layers.1.mlp.experts.down_proj"
    tensor = expert_parameters(student)[key]
    where = (tensor == 0).nonzero()[0].tolist()
    objective = train.objective

    def buggy(model, *args, **kwargs):               # a bug that writes into a pruned expert weight
        if torch.is_grad_enabled():
            with torch.no_grad():
                expert_parameters(model)[key][tuple(where)] = 1.0
        return objective(model, *args, **kwargs)

    monkeypatch.setattr(train, "objective", buggy)
    with pytest.raises(RuntimeError, match=f"1 pruned weights nonzero \\({key}: 1\\)"):
        recover_(student, RouterKDConfig(steps=1, lr=1e-2), WINDOWS, teacher=teacher, progress=False)


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_every_moe_family_trains_exactly_its_routers_or_its_experts(family):
    teacher = tiny_moe(family)
    student = with_perturbed_routers(teacher)
    before = snapshot(student)
    recover_(student, RouterKDConfig(steps=2, lr=1e-2, batch_size=4), WINDOWS, teacher=teacher, progress=False)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(router_parameters(student))

    student = sparsified_experts(teacher)
    before = snapshot(student)
    report = recover_(student, ExpertKDConfig(steps=2, lr=1e-3, batch_size=4), WINDOWS, teacher=teacher,
                      progress=False)
    experts = expert_parameters(student)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(experts)
    assert all(torch.equal(t == 0, before[k] == 0) for k, t in experts.items())          # zeros kept, none added
    assert report["zeros_kept"] and report["sparsity_after"] == report["sparsity_before"]


# ----------------------------------------------------------------------------- checkpoint and resume

@pytest.mark.parametrize("cfg, make_student", [
    (RouterKDConfig(steps=6, lr=3e-2, batch_size=4, checkpoint_every=2), without_experts),
    (ExpertKDConfig(steps=6, lr=1e-3, batch_size=4, checkpoint_every=2), sparsified_experts)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(cfg, make_student, tmp_path, monkeypatch):
    teacher = confident_moe("mixtral")
    reference = make_student(teacher)
    full = recover_(reference, cfg, WINDOWS, teacher=teacher, run_dir=tmp_path / "full", progress=False)

    model = make_student(teacher)
    original = snapshot(model)
    calls = {"n": 0}
    objective = train.objective

    def interrupted(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
        return objective(*args, **kwargs)

    monkeypatch.setattr(train, "objective", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover_(model, cfg, WINDOWS, teacher=teacher, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(train, "objective", objective)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())   # trained tensors restored
    state = torch.load(tmp_path / "run" / train.CHECKPOINT, weights_only=True)
    assert state["step"] == 4

    resumed = recover_(model, cfg, WINDOWS, teacher=teacher, run_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed["resumed_from"] == 4
    assert resumed["losses"] == full["losses"]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------- command line

def recover_cli(argv):
    parser = argparse.ArgumentParser(prog="prunekit")
    recovery_cli.add_parser(parser.add_subparsers(required=True))
    return parser.parse_args(["recover", *argv])


def test_cli_flags_map_to_the_moe_configs():
    args = recover_cli(["dir", "--method", "router-kd", "--steps", "5", "--temperature", "2", "--out", "o"])
    assert recovery_cli.config_from_args(args) == RouterKDConfig(steps=5, temperature=2.0)
    args = recover_cli(["dir", "--method", "expert-kd", "--expert-weight", "10", "--out", "o"])
    assert recovery_cli.config_from_args(args) == ExpertKDConfig(expert_weight=10.0)
    for argv, message in ((["--method", "router-kd", "--rank", "4"], "--rank does not apply to --method router-kd"),
                          (["--method", "router-kd", "--expert-weight", "1"], "--expert-weight does not apply"),
                          (["--method", "expert-kd", "--temperature", "2"], "--temperature does not apply")):
        with pytest.raises(ValueError, match=message):
            recovery_cli.config_from_args(recover_cli(["dir", *argv, "--out", "o"]))


def test_cli_router_kd_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    teacher = confident_moe("mixtral")
    student = with_perturbed_routers(teacher)
    tokenizer = tiny_tokenizer()
    for model, path in ((teacher, tmp_path / "teacher"), (student, tmp_path / "student")):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    out = tmp_path / "recovered"
    args = recover_cli([str(tmp_path / "student"), "--method", "router-kd", "--teacher", str(tmp_path / "teacher"),
                        "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--lr", "1e-2", "--no-progress",
                        "--out", str(out)])
    assert args.handler(args) == 0
    assert "recovery: router-kd, 2 steps" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(out)
    given = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    changed = {k for k, v in loaded.state_dict().items() if not torch.equal(v, given.state_dict()[k])}
    assert changed == set(router_parameters(given))
