"""`prunekit prune` with expert methods on a saved tiny Mixtral: the flags, the stated expected
effect, the export that stock transformers reloads, and refusals that write nothing."""
import json

import torch
from transformers import AutoModelForCausalLM

from prunekit.cli import main

FAST = ["--samples", "4", "--seqlen", "32", "--no-eval"]


def test_prune_experts_exports_a_stock_checkpoint(tiny_moe_dir, tmp_path, capsys):
    out = tmp_path / "reap"
    assert main(["prune", str(tiny_moe_dir), "--method", "reap", "--experts", "6", "--out", str(out), *FAST]) == 0
    said = capsys.readouterr()
    assert "active compute" in said.out + said.err                 # the expected effect, stated up front
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 6 and config["num_experts_per_tok"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 6
    record = json.loads((out / "prunekit.json").read_text())
    assert record["structure"]["stock"] is True
    assert all(w["experts"] == 6 for w in record["structure"]["widths"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_non_uniform_experts_reload_with_load_pruned(tiny_moe_dir, tmp_path):
    from prunekit.io.loading import load
    out = tmp_path / "non-uniform"
    assert main(["prune", str(tiny_moe_dir), "--method", "expert-frequency", "--sparsity", "0.5", "--non-uniform",
                 "--out", str(out), *FAST]) == 0
    record = json.loads((out / "prunekit.json").read_text())
    counts = [w["experts"] for w in record["structure"]["widths"]]
    assert sum(counts) == 12
    model, _ = load(str(out))
    assert [b.mlp.experts.gate_up_proj.shape[0] for b in model.model.layers] == counts


def test_too_few_experts_for_top_k_is_refused_and_writes_nothing(tiny_moe_dir, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["prune", str(tiny_moe_dir), "--method", "reap", "--experts", "1", "--out", str(out), *FAST]) == 2
    assert "num_experts_per_tok=2" in capsys.readouterr().err
    assert not out.exists()


def test_expert_method_on_a_dense_model_names_the_type(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["prune", str(tiny_model_dir), "--method", "reap", "--sparsity", "0.5", "--out", str(out), *FAST]) == 2
    assert "'llama' (LlamaForCausalLM) has no experts" in capsys.readouterr().err
    assert not out.exists()


def test_offload_disk_equals_in_memory(tiny_moe_dir, tmp_path):
    from conftest import saved_tensors
    outs = {}
    for mode in ("memory", "disk"):
        out = tmp_path / mode
        extra = ["--offload", "disk"] if mode == "disk" else []
        assert main(["prune", str(tiny_moe_dir), "--method", "reap", "--sparsity", "0.25", "--out", str(out),
                     *extra, *FAST]) == 0
        outs[mode] = saved_tensors(out)
    assert sorted(outs["memory"]) == sorted(outs["disk"])
    assert any(".experts.5.w1.weight" in name for name in outs["disk"])        # per-expert keys, as transformers
    for name, tensor in outs["memory"].items():
        assert torch.equal(tensor, outs["disk"][name]), name
