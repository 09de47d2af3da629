"""Out-of-core pruning (`--offload disk`) writes exactly what the in-memory engine writes."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, llama_config, saved_tensors, tiny_model
from prunekit.prune import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.core.residency import ShardReader, empty_model
from prunekit.io.offload import prune_out_of_core


def _save(model, path, shard=None):
    if shard:
        model.save_pretrained(path, max_shard_size=shard)
    else:
        model.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("config", [MagnitudeConfig(sparsity=0.5), WandaConfig(sparsity=0.5),
                                    SparseGPTConfig(sparsity=0.5), WandaConfig(nm=(2, 4))],
                         ids=["magnitude", "wanda", "sparsegpt", "wanda-2:4"])
@pytest.mark.parametrize("sequential", ["true", "block"])
def test_out_of_core_equals_in_memory(tmp_path, calib, family, config, sequential):
    dense = _save(tiny_model(family), tmp_path / "dense", shard="40KB")
    assert len(list(dense.glob("*.safetensors"))) > 1               # the reader follows the index
    calib_ = None if isinstance(config, MagnitudeConfig) else calib

    model = AutoModelForCausalLM.from_pretrained(dense).eval()
    prune_(model, config, calib_, device="cpu", sequential=sequential, progress=False)
    expected = saved_tensors(_save(model, tmp_path / "memory"))

    _, out, _ = prune_out_of_core(dense, config, calib_, tmp_path / "disk", sequential=sequential, progress=False)
    got = saved_tensors(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert all(f.startswith("model-") for f in index["weight_map"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)                  # stock loader
    for name, tensor in reloaded.state_dict().items():
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
    assert not list(tmp_path.glob(".disk.tmp-*"))                         # staging swapped into place


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_empty_model_has_no_weights_but_real_buffers(family):
    """Every buffer (rotary tables, Gemma's embedding scale) equals the one of a normally built model,
    and building it patches nothing process-wide."""
    model = tiny_model(family)
    register = torch.nn.Module.register_parameter
    skeleton = empty_model(model.config)
    assert torch.nn.Module.register_parameter is register
    assert all(p.is_meta for p in skeleton.parameters())
    buffers = dict(skeleton.named_buffers())
    assert buffers.keys() == dict(model.named_buffers()).keys()
    for name, buffer in model.named_buffers():
        assert not buffers[name].is_meta
        torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (skeleton.get_output_embeddings().weight is skeleton.get_input_embeddings().weight) == tied


def test_shard_reader_single_file(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    reader = ShardReader(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(reader.get(name), model.state_dict()[name])
    with pytest.raises(KeyError, match="not in the checkpoint"):
        reader.get("nope")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        ShardReader(tmp_path / "missing")


def test_output_never_overwrites_the_input(tmp_path):
    dense = _save(tiny_model("llama"), tmp_path / "dense")
    with pytest.raises(ValueError, match="input model"):
        prune_out_of_core(dense, MagnitudeConfig(sparsity=0.5), None, dense / "out", progress=False)


_RSS_CHILD = r"""
import json, sys, torch
from pathlib import Path
import transformers
from prunekit.io.offload import prune_out_of_core
from prunekit.recipe import step_from_dict

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
model_dir, out, weight_bytes, step = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(1)
calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
with torch.device("meta"):             # imports the modeling code: part of the baseline, not of the run
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))
baseline = status("VmHWM:")            # torch + transformers + prunekit imported
budget = weight_bytes // 3
prune_out_of_core(model_dir, step_from_dict(step), calib, out, progress=False)
peak = status("VmHWM:")
print(json.dumps({"baseline": baseline, "budget": budget, "peak": peak, "weights": weight_bytes}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A synthetic llama of 48 blocks (about 480 MB of weights) in 40 MB shards."""
    config = llama_config(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
                          num_hidden_layers=48)
    torch.manual_seed(0)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    weight_bytes = sum(p.numel() * 4 for p in skeleton.parameters())
    path = tmp_path_factory.mktemp("big") / "big"
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, max_shard_size="40MB")
    return path, weight_bytes


@pytest.mark.parametrize("step", [
    {"method": "wanda", "sparsity": 0.5},
    {"method": "flap", "sparsity": 0.2, "uniform": False},          # scores every block, then a second pass
    {"method": "block-influence", "layers": 8},                     # kept blocks written renumbered
], ids=["wanda", "flap-adaptive", "block-influence"])
def test_peak_rss_stays_under_a_third_of_the_weights(tmp_path, big_model, step):
    """A synthetic llama whose weights are 3x the memory budget prunes out of core within it, for an
    unstructured, a width and a depth method. 48 blocks: what one block and the fixed costs take
    (50-100 MB, depending on the allocator) must stay well inside the budget, which only the number
    of blocks makes large.

    The cap is checked on the child's exact peak resident set (VmHWM), not enforced with
    `resource.setrlimit`: Linux ignores RLIMIT_RSS, and RLIMIT_AS counts address space, which
    memory-mapped shards and spill files fill without being resident (measured on this model:
    the virtual peak grows by 450-800 MB while the resident peak grows by 60-170 MB)."""
    import subprocess
    import sys
    from pathlib import Path
    model_dir, weight_bytes = big_model
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(model_dir), str(tmp_path / "out"),
                           str(weight_bytes), json.dumps(step)], capture_output=True, text=True,
                          env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(m)
    assert m["weights"] > 100 * 2**20
    assert m["peak"] - m["baseline"] < m["budget"], m     # about one block + activations, not the model
    names = ShardReader(tmp_path / "out").names()
    if step["method"] == "block-influence":
        assert sum(".layers.0.self_attn.q_proj.weight" in n for n in names) == 1
        assert not any(".layers.40." in n for n in names)        # 48 - 8 blocks, numbered 0..39
        assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 40
    elif step["method"] == "flap":         # bias compensation gives the compensated linears of every block a bias
        biases = sum(n.endswith(".bias") for n in names)
        assert biases > 0 and biases % 48 == 0
        assert len(names) == len(ShardReader(model_dir).names()) + biases
    else:
        assert len(names) == len(ShardReader(model_dir).names())
