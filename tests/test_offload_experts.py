"""Out of core (`--offload disk`: one MoE block resident), expert removal and pruning inside
experts write exactly what the in-memory run writes, and the result loads the same way."""
import json

import pytest
import torch
from conftest import VOCAB, saved_tensors, tiny_moe
from transformers import AutoModelForCausalLM

import prunekit.catalog  # registers the methods
from prunekit.io.offload import prune_out_of_core
from prunekit.methods.moe_pruner import MoePrunerConfig
from prunekit.methods.reap import ReapConfig
from prunekit.prune import prune_

assert prunekit.catalog
CALIB = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family,step", [("mixtral", ReapConfig(sparsity=0.5)),
                                         ("deepseek_v3", ReapConfig(experts=4)),
                                         ("qwen2_moe", MoePrunerConfig(sparsity=0.5, expert_min_tokens=4))],
                         ids=["reap-mixtral", "reap-deepseek", "moe-pruner-qwen2"])
def test_out_of_core_equals_in_memory(tmp_path, family, step):
    dense = tmp_path / "dense"
    tiny_moe(family).save_pretrained(dense, max_shard_size="60KB")
    assert len(list(dense.glob("*.safetensors"))) > 1               # several input shards
    memory = AutoModelForCausalLM.from_pretrained(dense).eval()
    prune_(memory, step, CALIB, device="cpu", progress=False)
    memory.save_pretrained(tmp_path / "memory")
    expected = saved_tensors(tmp_path / "memory")

    _, out, _ = prune_out_of_core(dense, step, CALIB, tmp_path / "disk", progress=False)
    got = saved_tensors(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    disk_config = json.loads((out / "config.json").read_text())
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
        assert disk_config.get(key) == memory_config.get(key), key
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(CALIB[:1]).logits, memory(CALIB[:1]).logits, atol=1e-6)
