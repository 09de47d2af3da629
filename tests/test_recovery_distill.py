"""distill: full-parameter distillation of width- and depth-pruned models from the dense teacher
(Minitron, arXiv 2407.14679 / 2408.11796): the KL falls on held-out windows, the hidden-state loss,
the token budget, exact resume, gradient checkpointing, kept zeros, the memory refusal, the CLI."""
import copy
import json
import math

import pytest
import torch
from conftest import recover_cli, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import prunekit.catalog  # noqa: F401  (registers the methods)
from prunekit import prune_
from prunekit.depth import remove_blocks
from prunekit.methods.wanda_sp import WandaSPConfig
from prunekit.models.spec import weight_view
from prunekit.recovery import DistillConfig, block_linears, format_summary, recover_
from prunekit.recovery import distill
from prunekit.recovery.train import CHECKPOINT, distillation_loss

WINDOWS = torch.randint(0, 16, (32, 16), generator=torch.Generator().manual_seed(0))   # 16 of 128 tokens: learnable
HELD_OUT = torch.randint(0, 16, (16, 16), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: tiny matrices, one thread


def confident_teacher():
    """The dense tiny Llama with a sharp output layer, so pruning visibly changes its predictions."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def width_pruned(teacher):
    """The teacher with 30% of its heads and FFN channels removed (Wanda-SP): hidden size unchanged."""
    student = copy.deepcopy(teacher)
    prune_(student, WandaSPConfig(sparsity=0.3), WINDOWS[:8], progress=False)
    assert student.model.layers[0].mlp.down_proj.in_features < teacher.model.layers[0].mlp.down_proj.in_features
    return student


@pytest.fixture(scope="module")
def pair():
    teacher = confident_teacher()
    return teacher, width_pruned(teacher)


def kl_to_teacher(student, teacher, ids=HELD_OUT):
    with torch.no_grad():
        return float(distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0))


def state(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config

def test_config_is_registered_validated_and_round_trips():
    from prunekit.catalog import get_method
    from prunekit.recipe import step_from_dict, step_to_dict

    method = get_method("distill")
    assert method.scope == "recover" and method.config_cls is DistillConfig and method.fn is recover_
    assert DistillConfig().steps == 200 and DistillConfig().needs_teacher
    budget = DistillConfig(tokens=1000, batch_size=4)
    assert budget.steps is None and budget.resolved(16).steps == math.ceil(1000 / 64) == 16
    assert budget.resolved(16).windows_needed == 64 and budget.resolved(16).tokens is None
    assert DistillConfig(tokens=64, batch_size=4).resolved(16).steps == 1                # whole steps
    with pytest.raises(ValueError, match="resolved"):
        _ = budget.windows_needed
    for cfg in (budget, DistillConfig(hidden_weight=0.5, teacher_blocks=[1, 3], gradient_checkpointing=True)):
        assert step_from_dict(step_to_dict(cfg)) == cfg
    assert step_to_dict(budget) == {"method": "distill", "tokens": 1000}
    for bad, match in (({"steps": 10, "tokens": 100}, "give one of them"), ({"tokens": 0}, "tokens"),
                       ({"hidden_weight": -1}, "hidden_weight"), ({"teacher_blocks": [0, -1]}, "teacher_blocks"),
                       ({"temperature": 0}, "temperature"), ({"gradient_checkpointing": "yes"}, "checkpointing")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)


def test_teacher_blocks_follow_the_recorded_removals():
    record = {"steps": [{"removed_blocks": [0]}, {"method": "wanda-sp", "removed_blocks": []}, {"sparsity": 0.5},
                        {"removed_blocks": [1]}]}
    assert distill.teacher_blocks_from_record(record, 4, 2) == (1, 3)     # [1, 2, 3], then position 1 goes
    assert distill.teacher_blocks_from_record({"steps": [{"removed_blocks": []}]}, 4, 4) is None
    with pytest.raises(ValueError, match="student has 3"):
        distill.teacher_blocks_from_record(record, 4, 3)
    with pytest.raises(ValueError, match="does not start from this teacher"):
        distill.teacher_blocks_from_record({"steps": [{"removed_blocks": [5]}]}, 4, 3)


# ----------------------------------------------------------------------------- training

def test_distillation_lowers_the_kl_on_held_out_windows(pair):
    teacher, pruned = pair
    student = copy.deepcopy(pruned)
    teacher_state = state(teacher)
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    before = kl_to_teacher(student, teacher)

    report = recover_(student, DistillConfig(steps=12, lr=1e-3), WINDOWS, teacher=teacher, progress=False)

    after = kl_to_teacher(student, teacher)
    assert after < 0.6 * before, (before, after)
    assert report["distill"]["kl_after"] < report["distill"]["kl_before"] == report["loss_before"]
    assert report["trainable_parameters"] == sum(p.numel() for p in student.parameters())     # every parameter
    assert report["distill"]["hidden_error_before"] is None and report["distill"]["teacher_blocks"] is None
    assert report["sparsity_before"] == report["sparsity_after"] == 0.0 and report["zeros_kept"]
    assert same_state(state(teacher), teacher_state)                   # the teacher is never modified
    assert {name: p.requires_grad for name, p in student.named_parameters()} == flags
    assert "distill: T^2 KL to the teacher" in format_summary(report)


def test_the_hidden_state_loss_lowers_its_error(pair):
    teacher, pruned = pair
    student = copy.deepcopy(pruned)
    report = recover_(student, DistillConfig(steps=12, lr=1e-3, hidden_weight=1.0), WINDOWS, teacher=teacher,
                      progress=False)
    section = report["distill"]
    assert section["teacher_blocks"] == [0, 1]                          # width pruning: block i with block i
    assert section["hidden_error_after"] < 0.8 * section["hidden_error_before"]
    assert section["kl_after"] < section["kl_before"]
    assert "normalised hidden-state MSE" in report["loss_protocol"] and report["loss_after"] < report["loss_before"]
    assert kl_to_teacher(student, teacher) < kl_to_teacher(pruned, teacher)


def test_a_token_budget_becomes_whole_steps_and_resume_equals_one_run(pair, tmp_path):
    teacher, pruned = pair
    per_step = 4 * WINDOWS.shape[1]
    common = dict(lr=1e-3, hidden_weight=0.5, checkpoint_every=2)
    reference = copy.deepcopy(pruned)
    full = recover_(reference, DistillConfig(tokens=5 * per_step + 1, **common), WINDOWS, teacher=teacher,
                    progress=False)
    assert full["steps"] == 6 and full["tokens"] == 6 * per_step and full["token_budget"] == 5 * per_step + 1
    assert f"({6 * per_step:,} tokens used of a budget of {5 * per_step + 1:,}" in format_summary(full)

    # 3 steps (given as steps), then on to the same budget in tokens with gradient checkpointing switched on
    student = copy.deepcopy(pruned)
    recover_(student, DistillConfig(steps=3, **common), WINDOWS, teacher=teacher, run_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 3
    resumed = recover_(student, DistillConfig(
        tokens=5 * per_step + 1, gradient_checkpointing=True, **common), WINDOWS, teacher=teacher,
        run_dir=tmp_path, resume=True, progress=False)
    assert resumed["resumed_from"] == 3 and resumed["losses"] == full["losses"]
    assert same_state(state(student), state(reference))
    with pytest.raises(ValueError, match="settings differ"):
        recover_(copy.deepcopy(pruned), DistillConfig(steps=8, **{**common, "hidden_weight": 1.0}), WINDOWS,
                 teacher=teacher, run_dir=tmp_path, resume=True, progress=False)


def test_gradient_checkpointing_recomputes_the_blocks_and_changes_nothing(pair):
    teacher, pruned = pair
    results = {}
    for flag in (False, True):
        student = copy.deepcopy(pruned)
        with_gradients = []           # the FFN of block 0, called with gradients: training forwards and recomputes
        mlp = student.model.layers[0].mlp
        handle = mlp.register_forward_pre_hook(lambda *_, seen=with_gradients: seen.append(torch.is_grad_enabled()))
        recover_(student, DistillConfig(steps=3, lr=1e-3, gradient_checkpointing=flag), WINDOWS, teacher=teacher,
                 progress=False)
        handle.remove()
        assert "forward" not in vars(student.model.layers[0])           # the wrapper is gone
        results[flag] = (state(student), sum(with_gradients))
    assert results[False][1] == 3 and results[True][1] == 6             # the backward pass ran each block again
    assert same_state(results[True][0], results[False][0])


def test_unstructured_zeros_are_kept_and_chance_zeros_of_a_dense_model_too(pair):
    teacher, pruned = pair
    student = copy.deepcopy(pruned)
    with torch.no_grad():                       # Wanda-like 50% zeros inside the width-pruned blocks
        for module in block_linears(student).values():
            W = weight_view(module)                                                   # (out, in)
            W.scatter_(1, W.abs().argsort(dim=1)[:, : W.shape[1] // 2], 0.0)
        student.model.norm.weight[:3] = 0.0    # not a pruned tensor: free to move
    zeros = {name: weight_view(m) == 0 for name, m in block_linears(student).items()}
    before = {name: weight_view(m).clone() for name, m in block_linears(student).items()}
    report = recover_(student, DistillConfig(steps=4, lr=1e-3), WINDOWS, teacher=teacher, progress=False)
    for name, module in block_linears(student).items():
        assert torch.equal(weight_view(module) == 0, zeros[name]), name
        assert not torch.equal(weight_view(module), before[name]), name
    assert report["sparsity_before"] == report["sparsity_after"] == pytest.approx(0.5, abs=0.02)
    assert bool((student.model.norm.weight[:3] != 0).all())

    dense = copy.deepcopy(pruned)              # a dense model with three exact zeros by chance: they are held too
    q = dense.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        q[0, :3] = 0.0
    recover_(dense, DistillConfig(steps=2, lr=1e-3), WINDOWS, teacher=teacher, progress=False)
    assert torch.equal(q[0, :3], torch.zeros(3)) and int((q == 0).sum()) == 3


def test_depth_pruned_students_pair_blocks_only_when_told(pair):
    teacher, _ = pair
    student = copy.deepcopy(teacher)
    remove_blocks(student, [0])                                       # block 0 of the student is teacher block 1
    with pytest.raises(ValueError, match="nothing records which were removed.*hidden_weight 0"):
        recover_(student, DistillConfig(steps=1, hidden_weight=1.0), WINDOWS, teacher=teacher, progress=False)
    report = recover_(student, DistillConfig(steps=1, lr=1e-3, hidden_weight=1.0, teacher_blocks=(1,)), WINDOWS,
                      teacher=teacher, progress=False)
    assert report["distill"]["teacher_blocks"] == [1]
    assert 0 < report["distill"]["hidden_error_before"] < 1              # the same weights, another input
    recover_(student, DistillConfig(steps=1, lr=1e-3), WINDOWS, teacher=teacher, progress=False)   # logits only
    with pytest.raises(ValueError, match="out of range"):
        recover_(student, DistillConfig(steps=1, hidden_weight=1.0, teacher_blocks=(2,)), WINDOWS, teacher=teacher,
                 progress=False)


def test_a_run_that_cannot_fit_is_refused_before_anything_moves(pair, monkeypatch):
    teacher, pruned = pair
    student = copy.deepcopy(pruned)
    plain = distill.estimate_memory(student, teacher, DistillConfig(), 512, torch.device("cpu"))
    lighter = distill.estimate_memory(student, teacher, DistillConfig(gradient_checkpointing=True), 512,
                                      torch.device("cpu"))
    params = sum(p.numel() for p in student.parameters()) * 4
    assert plain.student == params and plain.optimizer == 3 * params and lighter.activations < plain.activations
    assert "memory on cpu: at least" in plain.line("cpu")
    original = state(student)
    monkeypatch.setattr(distill, "free_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"does not fit.*--gradient-checkpointing.*--batch-size.*--method kd"):
        recover_(student, DistillConfig(steps=1), WINDOWS, teacher=teacher, progress=False)
    assert same_state(state(student), original)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """Saved checkpoints: the dense teacher, a width-pruned and a depth-pruned student (both with prunekit.json),
    and a depth-pruned student without one."""
    from prunekit.cli import main
    root = tmp_path_factory.mktemp("distill")
    common = ["--no-eval", "--samples", "4", "--seqlen", "32"]
    assert main(["prune", str(tiny_model_dir), "--method", "wanda-sp", "--sparsity", "0.3", *common,
                 "--out", str(root / "width")]) == 0
    assert main(["prune", str(tiny_model_dir), "--method", "last-k", "--layers", "1", *common,
                 "--out", str(root / "depth")]) == 0
    bare = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    remove_blocks(bare, [0])
    bare.save_pretrained(root / "bare")
    tiny_tokenizer().save_pretrained(root / "bare")
    return {"teacher": tiny_model_dir, "width": root / "width", "depth": root / "depth", "bare": root / "bare"}


TRAIN = ["--data", "default", "--batch-size", "2", "--seqlen", "16", "--lr", "1e-3", "--no-progress"]


def test_cli_distils_a_width_pruned_checkpoint_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "recovered"
    argv = [str(saved["width"]), "--method", "distill", "--teacher", str(saved["teacher"]), "--tokens", "200",
            "--checkpoint-every", "3", "--gradient-checkpointing", *TRAIN, "--out", str(out),
            "--json", str(tmp_path / "report.json")]
    assert recover_cli(argv) == 0
    printed = capsys.readouterr().out
    steps = math.ceil(200 / (2 * 16))
    assert "memory on cpu: at least" in printed
    assert f"{steps} steps x 2 windows x 16 tokens ({steps * 32:,} tokens used of a budget of 200" in printed
    assert "distill: T^2 KL to the teacher" in printed and "gradient checkpointing on" in printed
    assert not (tmp_path / "recovered.checkpoints").exists()

    recovery = json.loads((out / "prunekit.json").read_text())["recovery"]
    assert recovery["method"] == "distill" and recovery["steps"] == steps and recovery["token_budget"] == 200
    assert recovery["teacher"] == str(saved["teacher"])
    assert recovery["distill"]["kl_after"] < recovery["distill"]["kl_before"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()          # a stock checkpoint
    pruned = AutoModelForCausalLM.from_pretrained(saved["width"]).eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert not torch.equal(loaded.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight)


def test_cli_pairs_depth_pruned_blocks_from_the_record(saved, tmp_path, capsys):
    out = tmp_path / "recovered"
    argv = [str(saved["depth"]), "--method", "distill", "--teacher", str(saved["teacher"]), "--steps", "2",
            "--hidden-weight", "1", "--checkpoint-every", "0", *TRAIN, "--out", str(out)]
    assert recover_cli(argv) == 0
    assert "normalised hidden-state MSE" in capsys.readouterr().out
    recovery = json.loads((out / "prunekit.json").read_text())["recovery"]
    assert recovery["distill"]["teacher_blocks"] == [1]                  # last-k removed block 0 of 2


def test_cli_bad_combinations_fail_with_one_clear_message(saved, tmp_path, capsys):
    teacher = str(saved["teacher"])
    cases = [
        ([str(saved["width"]), "--method", "distill", "--teacher", teacher, "--steps", "3", "--tokens", "100"],
         "--steps and --tokens both set the training budget"),
        ([str(saved["width"]), "--method", "lora", "--tokens", "100"], "--tokens does not apply to --method lora"),
        ([str(saved["width"]), "--method", "kd", "--hidden-weight", "1"], "--hidden-weight does not apply"),
        ([str(saved["bare"]), "--method", "distill", "--teacher", teacher, "--steps", "1", "--hidden-weight", "1",
          *TRAIN], "nothing records which were removed"),
    ]
    for argv, message in cases:
        assert recover_cli([*argv, "--out", str(tmp_path / "out")]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("prunekit: error:") == 1, (argv, err)
    assert not (tmp_path / "out").exists()
