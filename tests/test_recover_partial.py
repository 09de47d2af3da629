"""Partial-layer fine-tuning (arXiv 2411.15558): only the last k blocks, the final norm and the LM head move."""
import pytest
import torch

from conftest import llama
from prunekit.depth import remove_blocks
from prunekit.models.spec import weight_view
from prunekit.recovery import format_summary
from prunekit.recovery.partial import PartialConfig, partial_parameters, recover_partial
from prunekit.registry import method_for_config

WINDOWS = torch.randint(0, 16, (16, 16), generator=torch.Generator().manual_seed(0))   # 16 of 128 tokens: learnable


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: tiny matrices, one thread


def depth_pruned(**overrides):
    """A 4-block tiny Llama with its last block removed (reverse-order, 1 of 4): 3 blocks remain."""
    model = llama(num_hidden_layers=4, **overrides)
    remove_blocks(model, [3])
    return model


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_registered_as_a_recovery_method_and_checked():
    from prunekit.recipe import step_from_dict, step_to_dict

    method = method_for_config(PartialConfig())
    assert method.name == "partial" and method.scope == "recover" and method.fn is recover_partial
    cfg = PartialConfig(blocks=2, steps=10)
    assert step_from_dict(step_to_dict(cfg)) == cfg
    assert (PartialConfig().blocks, PartialConfig().lr, PartialConfig().head) == (3, 1e-5, True)
    with pytest.raises(ValueError, match="blocks"):
        PartialConfig(blocks=-1)
    with pytest.raises(ValueError, match="head must be"):
        PartialConfig(head="yes")
    with pytest.raises(ValueError, match="more than the model's 3 decoder blocks"):
        recover_partial(depth_pruned(), PartialConfig(blocks=4, steps=1), WINDOWS)


def test_only_the_last_blocks_the_final_norm_and_the_head_change_and_the_loss_falls():
    model = depth_pruned()
    before = snapshot(model)
    report = recover_partial(model, PartialConfig(blocks=1, steps=25, lr=1e-3, batch_size=4), WINDOWS, progress=False)
    chosen = {name for name in before if name.startswith(("model.layers.2.", "model.norm.", "lm_head."))}
    assert set(report["partial"]["trained"]) == chosen and report["partial"]["blocks"] == [2]
    for name, param in model.named_parameters():
        if name in chosen:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed"
    assert report["loss_after"] < report["loss_before"] - 0.05
    assert report["trainable_parameters"] == sum(before[name].numel() for name in chosen)
    assert not report["partial"]["tied_embedding"]
    assert all(p.requires_grad for p in model.parameters())                  # flags as they were
    assert "recovery: partial" in format_summary(report)


def test_a_tied_head_trains_the_shared_embedding_and_stays_tied_unless_head_is_off():
    model = depth_pruned(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = snapshot(model)
    report = recover_partial(model, PartialConfig(blocks=1, steps=5, lr=1e-3), WINDOWS, progress=False)
    assert report["partial"]["tied_embedding"] and "model.embed_tokens.weight" in report["partial"]["trained"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])

    frozen = depth_pruned(tie_word_embeddings=True)
    before = snapshot(frozen)
    report = recover_partial(frozen, PartialConfig(blocks=1, head=False, steps=5, lr=1e-3), WINDOWS, progress=False)
    assert torch.equal(frozen.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert set(partial_parameters(frozen, 1, False)) == set(report["partial"]["trained"])
    assert not any(name.startswith(("lm_head", "model.embed_tokens")) for name in report["partial"]["trained"])


def test_a_trained_blocks_zeros_stay_zero():
    model = depth_pruned()
    W = weight_view(model.model.layers[2].mlp.up_proj)
    with torch.no_grad():
        W[:, ::2] = 0.0                                                     # an unstructured-pruned block
    zeros = W == 0
    report = recover_partial(model, PartialConfig(blocks=1, steps=10, lr=1e-2), WINDOWS, progress=False)
    assert bool((W[zeros] == 0).all()) and report["zeros_kept"]
    assert report["sparsity_after"] == pytest.approx(report["sparsity_before"])


def test_resume_continues_a_run_exactly(tmp_path):
    cfg = PartialConfig(blocks=1, steps=6, lr=1e-3, batch_size=2, checkpoint_every=3)
    straight = depth_pruned()
    recover_partial(straight, cfg, WINDOWS, run_dir=tmp_path / "straight", progress=False)
    resumed = depth_pruned()
    recover_partial(resumed, PartialConfig(blocks=1, steps=3, lr=1e-3, batch_size=2, checkpoint_every=3), WINDOWS,
                    run_dir=tmp_path / "resumed", progress=False)
    report = recover_partial(resumed, cfg, WINDOWS, run_dir=tmp_path / "resumed", resume=True, progress=False)
    assert report["resumed_from"] == 3
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_cli_partial(tiny_model_dir, tmp_path):
    from prunekit.cli import main
    out = tmp_path / "recovered"
    assert main(["recover", str(tiny_model_dir), "--method", "partial", "--blocks", "1", "--no-head", "--steps", "2",
                 "--batch-size", "2", "--seqlen", "16", "--out", str(out), "--no-progress"]) == 0
    from safetensors.torch import load_file
    before, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm")) for k in changed)
