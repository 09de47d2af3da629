"""Recovery fine-tuning keeps the zeros: masked LoRA (+ rsLoRA), PERP, distillation, resume, CLI."""
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import recover_cli, tiny_model
from prunekit.models.spec import weight_view
from prunekit.recovery import (KDConfig, LoraRecoverConfig, PerpConfig, attach_masked_lora, block_linears,
                               recover_)
from prunekit.recovery import train
from prunekit.recovery.masked_lora import _MaskedDelta, masked_delta


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: tiny matrices, one thread


def prune_by_hand(model, sparsity=0.5):
    """Zero the smallest-|W| half of every row of every block linear."""
    with torch.no_grad():
        for module in block_linears(model).values():
            W = weight_view(module)                                               # (out, in)
            W.scatter_(1, W.abs().argsort(dim=1)[:, : int(W.shape[1] * sparsity)], 0.0)
    return model


def confident_llama(family="llama"):
    """A tiny model with a sharp output layer, so pruning visibly changes its predictions."""
    model = tiny_model(family)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def pruned_llama(family="llama"):
    return prune_by_hand(confident_llama(family))


def zero_masks(model):
    return {name: weight_view(module) == 0 for name, module in block_linears(model).items()}


def same_masks(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_plain(model, cls="LlamaForCausalLM"):
    """No peft wrapper, adapter tensor or patched forward is left behind."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    assert type(model).__name__ == cls
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert not any("lora" in key for key in model.state_dict())
    assert not any("forward" in vars(m) for m in block_linears(model).values())


WINDOWS = torch.randint(0, 16, (32, 16), generator=torch.Generator().manual_seed(0))  # 16 of 128 tokens: learnable


# ----------------------------------------------------------------------------- configs and registry

def test_configs_registered_validated_and_recipe_steps():
    from prunekit.recipe import step_from_dict, step_to_dict
    from prunekit.catalog import get_method

    for name, cls in (("lora", LoraRecoverConfig), ("perp", PerpConfig), ("kd", KDConfig)):
        method = get_method(name)
        assert method.scope == "recover" and method.config_cls is cls and method.needs_calibration
    step = step_from_dict({"method": "lora", "steps": 200, "rank": 16, "rslora": True})
    assert step == LoraRecoverConfig(steps=200, rank=16, rslora=True)
    assert step_to_dict(step) == {"method": "lora", "rslora": True}         # defaults are not written
    assert step_from_dict(step_to_dict(step)) == step
    assert step_from_dict({"method": "perp", "steps": 200}) == PerpConfig(steps=200)
    assert step_from_dict({"method": "kd", "steps": 200}).needs_teacher
    with pytest.raises(ValueError, match="unknown key 'rank' in step"):
        step_from_dict({"method": "perp", "rank": 8})           # PERP trains no adapters

    assert LoraRecoverConfig(lr="1e-4").lr == 1e-4             # YAML reads 1e-4 as a string
    assert LoraRecoverConfig(rank=8).lora_alpha == 8.0          # alpha defaults to the rank
    assert LoraRecoverConfig(rank=16, alpha=32).scaling == 2.0
    assert LoraRecoverConfig(rank=16, alpha=32, rslora=True).scaling == 32 / math.sqrt(16)
    assert LoraRecoverConfig(steps=10, batch_size=3).windows_needed == 30
    for bad, match in (({"steps": 0}, "steps"), ({"lr": -1}, "lr"), ({"rank": 0}, "rank"),
                       ({"dropout": 1.0}, "dropout"), ({"batch_size": True}, "batch_size"),
                       ({"seqlen": 1}, "seqlen"), ({"checkpoint_every": -1}, "checkpoint_every")):
        with pytest.raises(ValueError, match=match):
            LoraRecoverConfig(**bad)
    with pytest.raises(ValueError, match="temperature"):
        KDConfig(temperature=0)
    with pytest.raises(ValueError, match="kd_weight"):
        KDConfig(kd_weight=1.5)


# ----------------------------------------------------------------------------- masked LoRA

def test_masked_delta_gradients_match_plain_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(6, 8, generator=g) > 0.5
    ours = _MaskedDelta.apply(x, A, B, mask, 0.7)
    reference = F.linear(x, torch.where(mask, (B @ A) * 0.7, 0.0))
    torch.testing.assert_close(ours, reference)
    upstream = torch.randn(ours.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((ours * upstream).sum(), (x, A, B))
    expected = torch.autograd.grad((reference * upstream).sum(), (x, A, B))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.equal(masked_delta(A, B, mask, 0.7)[~mask], torch.zeros(int((~mask).sum()), dtype=A.dtype))


@pytest.mark.parametrize("family, rslora", [("llama", False), ("llama", True), ("gpt2", False)])
def test_masked_forward_is_the_merged_model(family, rslora):
    model = pruned_llama(family)          # gpt2: Conv1D layers store (in, out), peft's fan_in_fan_out
    before = zero_masks(model)
    ids = WINDOWS[:4]
    lora = attach_masked_lora(model, block_linears(model), rank=4, alpha=8, rslora=rslora)
    expected_scale = 8 / math.sqrt(4) if rslora else 8 / 4
    assert lora.scaling == expected_scale
    assert all(layer.scaling["default"] == expected_scale for layer in lora.layers.values())
    with torch.no_grad():
        for _key, tensor in lora.parameters().items():
            tensor.normal_(0, 0.2)                              # B starts at zero: make the update real
        adapted = model(input_ids=ids).logits
    merged_model = lora.merge_and_unload()
    assert merged_model is model
    assert_plain(model, type(model).__name__)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-5)
    assert same_masks(zero_masks(model), before)
    with pytest.raises(RuntimeError, match="already"):
        lora.unload()


# ----------------------------------------------------------------------------- the methods

METHODS = {
    "lora": LoraRecoverConfig(steps=12, lr=1e-2, rank=4),
    "lora-rslora": LoraRecoverConfig(steps=12, lr=1e-2, rank=4, rslora=True),
    "perp": PerpConfig(steps=12, lr=1e-2),
    "kd": KDConfig(steps=12, lr=3e-3, rank=4),
}


@pytest.mark.parametrize("which", list(METHODS))
def test_recovery_lowers_the_loss_and_keeps_every_zero(which, tmp_path):
    cfg = METHODS[which]
    model = pruned_llama()
    teacher = confident_llama() if cfg.needs_teacher else None
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else None
    masks = zero_masks(model)
    weights = {name: weight_view(m).clone() for name, m in block_linears(model).items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    report = recover_(model, cfg, WINDOWS, teacher=teacher, progress=False)

    assert report["loss_after"] < report["loss_before"]
    assert sum(report["losses"][-3:]) < sum(report["losses"][:3])
    assert same_masks(zero_masks(model), masks)                 # every zero stays zero (and nothing new)
    assert report["sparsity_before"] == report["sparsity_after"] == 0.5
    assert report["steps"] == len(report["losses"]) == 12 and report["zeros_kept"]
    assert report["tokens"] == 12 * cfg.batch_size * WINDOWS.shape[1]
    assert_plain(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    changed = [name for name, m in block_linears(model).items() if not torch.equal(weight_view(m), weights[name])]
    if cfg.trains == "norms_biases":
        assert changed == [] and report["trainable_parameters"] == 64 * 5      # 2 x 2 block norms + final norm
    else:
        assert len(changed) == len(weights)                     # LoRA merged into every block linear
        assert report["lora"]["scaling"] == cfg.scaling
    if teacher is not None:
        assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_recovered_model_round_trips_through_save_pretrained(tmp_path):
    model = pruned_llama()
    recover_(model, LoraRecoverConfig(steps=3, lr=1e-2, rank=4), WINDOWS, progress=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert same_masks(zero_masks(loaded), zero_masks(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=WINDOWS[:2]).logits, model(input_ids=WINDOWS[:2]).logits)


def test_kd_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        recover_(pruned_llama(), KDConfig(steps=1), WINDOWS, progress=False)


# ----------------------------------------------------------------------------- checkpoint and resume

RESUMABLE = LoraRecoverConfig(steps=10, lr=1e-2, rank=4, dropout=0.1, checkpoint_every=3)  # dropout: RNG restored too


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    reference = pruned_llama()
    full = recover_(reference, RESUMABLE, WINDOWS, run_dir=tmp_path / "full", progress=False)

    # interrupt the 7th training step (probe losses run without gradients and are not counted)
    model = pruned_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    objective = train.objective

    def interrupted(*args, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 7:
                raise KeyboardInterrupt
        return objective(*args, **kwargs)

    monkeypatch.setattr(train, "objective", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover_(model, RESUMABLE, WINDOWS, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(train, "objective", objective)
    assert_plain(model)                                         # adapters discarded, weights untouched
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    state = torch.load(tmp_path / "run" / train.CHECKPOINT, weights_only=True)
    assert state["step"] == 6

    with pytest.raises(FileExistsError, match="resume"):
        recover_(model, RESUMABLE, WINDOWS, run_dir=tmp_path / "run", progress=False)
    resumed = recover_(model, RESUMABLE, WINDOWS, run_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed["resumed_from"] == 6
    assert resumed["losses"] == full["losses"]
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_more_steps_continue_a_finished_run_and_mismatches_are_refused(tmp_path):
    short = LoraRecoverConfig(steps=4, lr=1e-2, rank=4, checkpoint_every=2)
    recover_(pruned_llama(), short, WINDOWS, run_dir=tmp_path, progress=False)
    longer = LoraRecoverConfig(steps=6, lr=1e-2, rank=4, checkpoint_every=2)
    continued = pruned_llama()
    recover_(continued, longer, WINDOWS, run_dir=tmp_path, resume=True, progress=False)
    reference = pruned_llama()
    recover_(reference, longer, WINDOWS, progress=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(continued.state_dict()[key], value), key

    with pytest.raises(ValueError, match="settings differ"):
        recover_(pruned_llama(), LoraRecoverConfig(steps=8, lr=1e-3, rank=4, checkpoint_every=2), WINDOWS,
                 run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="training windows differ"):
        recover_(pruned_llama(), LoraRecoverConfig(steps=8, lr=1e-2, rank=4, checkpoint_every=2), WINDOWS[1:],
                 run_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="beyond steps=2"):
        recover_(pruned_llama(), LoraRecoverConfig(steps=2, lr=1e-2, rank=4, checkpoint_every=2), WINDOWS,
                 run_dir=tmp_path, resume=True, progress=False)


# ----------------------------------------------------------------------------- command line


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("method", ["lora", "kd"])
def test_cli_end_to_end(method, tiny_pruned_dir, tmp_path, capsys):
    before = tree_digest(tiny_pruned_dir)
    out = tmp_path / "recovered"
    report_path = tmp_path / "report.json"
    argv = [str(tiny_pruned_dir), "--data", "default", "--method", method, "--steps", "3", "--batch-size", "2",
            "--seqlen", "16", "--rank", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--no-progress",
            "--out", str(out), "--json", str(report_path)]
    assert recover_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "sparsity after merge: 50.00% (before 50.00%)" in printed and "loss:" in printed

    assert tree_digest(tiny_pruned_dir) == before               # the input is never written
    assert not (tmp_path / "recovered.checkpoints").exists()  # checkpoint removed after the export
    meta = json.loads((out / "prunekit.json").read_text())
    source = json.loads((tiny_pruned_dir / "prunekit.json").read_text())
    assert meta["source"] == source["source"] and meta["steps"] == source["steps"]   # the pruning record stays
    recovery = meta["recovery"]
    assert recovery["method"] == method and recovery["steps"] == 3 and recovery["zeros_kept"]
    assert recovery["input_record"]["saved_at"] == source["saved_at"]
    assert recovery["teacher"] == (source["source"]["path"] if method == "kd" else None)
    assert json.loads(report_path.read_text())["losses"]

    loaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    assert same_masks(zero_masks(loaded), zero_masks(original))
    assert not any("lora" in key for key in loaded.state_dict())

    assert recover_cli(argv) == 2                               # the output exists now
    assert "already exists" in capsys.readouterr().err


def test_cli_bad_input_fails_early_with_a_clear_message(tiny_pruned_dir, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), "--method", "lora"], "model directory not found"),
        ([str(tiny_pruned_dir), "--method", "loar"], "unknown recovery method 'loar'. Did you mean 'lora'?"),
        ([str(tiny_pruned_dir), "--method", "wanda"], "unknown recovery method 'wanda'"),
        ([str(tiny_pruned_dir), "--method", "perp", "--rank", "8"], "--rank does not apply to --method perp"),
        ([str(tiny_pruned_dir), "--method", "lora", "--teacher", str(tiny_model_dir)], "--teacher applies to"),
        ([str(tiny_model_dir), "--method", "kd"], "kd needs the dense model"),   # no prunekit.json: no source
        ([str(tiny_pruned_dir), "--method", "lora", "--steps", "0"], "steps must be"),
        ([str(tiny_pruned_dir), "--method", "lora", "--checkpoint-every", "0", "--resume"], "--resume needs"),
    ]
    for argv, message in cases:
        assert recover_cli([*argv, "--out", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert recover_cli([str(tiny_pruned_dir), "--method", "lora", "--out", str(tiny_pruned_dir / "inside")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prunekit_cli_wiring(tiny_pruned_dir, tmp_path, capsys):
    from prunekit import cli
    assert "recover" in cli._parser().format_help()
    assert cli.main(["recover", str(tmp_path / "missing"), "--method", "lora", "--out", str(tmp_path / "o")]) == 2
    assert "model directory not found" in capsys.readouterr().err
