"""bench/make_moe.py: MoEfication of a tiny random Llama into a stock Mixtral checkpoint (exact facts only)."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "make_moe.py"
HIDDEN, INTERMEDIATE, VOCAB = 32, 64, 64


def load_script():
    spec = importlib.util.spec_from_file_location("make_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_moe = load_script()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny random Llama, saved with save_pretrained and loaded back (tied embeddings, GQA)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():       # non-trivial norms so that copying them is checked
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("dense")
    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def calib_ids(samples=4, seqlen=16):
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(1))


def test_every_channel_in_exactly_one_expert(dense):
    for features, calib in (("gate", None), ("gate_up", None), ("activation", calib_ids())):
        info = {}
        make_moe.moefy(dense, experts=4, top_k=2, calib=calib, router="centroid", features=features, info=info)
        for groups in info["groups"]:
            channels = sorted(channel for group in groups for channel in group)
            assert channels == list(range(INTERMEDIATE))
            assert [len(group) for group in groups] == [INTERMEDIATE // 4] * 4


def test_balanced_assignment_respects_capacity():
    similarity = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.1, 0.0]])   # all prefer cluster 0
    labels = make_moe.balanced_assignment(similarity, capacity=2)
    assert labels.tolist() == [0, 0, 1, 1]


def test_experts_are_the_dense_slices_and_copies_are_exact(dense):
    info = {}
    moe = make_moe.moefy(dense, experts=4, top_k=2, info=info)
    config = moe.config
    assert config.model_type == "mixtral" and config.intermediate_size == INTERMEDIATE // 4
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.num_key_value_heads == 2 and config.head_dim == HIDDEN // 4
    assert config.tie_word_embeddings and moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    assert config.rope_parameters["rope_theta"] == 5000.0 and config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(dense_state[name], moe_state[name])
    for index in range(2):
        prefix = f"model.layers.{index}."
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert torch.equal(dense_state[prefix + name], moe_state[prefix + name])
        mlp, experts = dense.model.layers[index].mlp, moe.model.layers[index].mlp.experts
        for expert, group in enumerate(info["groups"][index]):
            size = len(group)
            assert torch.equal(experts.gate_up_proj[expert, :size], mlp.gate_proj.weight[group])   # (I/E, H)
            assert torch.equal(experts.gate_up_proj[expert, size:], mlp.up_proj.weight[group])
            assert torch.allclose(experts.down_proj[expert], 2 * mlp.down_proj.weight[:, group])   # (H, I/E)


@pytest.mark.parametrize("experts", [2, 4, 8])
def test_all_experts_with_uniform_router_equal_the_dense_mlp(dense, experts):
    """top_k = E, zero router (uniform weights 1/E) and down_proj scaled by top_k: MoE MLP == dense MLP."""
    moe = make_moe.moefy(dense, experts=experts, top_k=experts)
    hidden = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for index in range(2):
            block = moe.model.layers[index].mlp
            block.gate.weight.zero_()
            torch.testing.assert_close(block(hidden), dense.model.layers[index].mlp(hidden), atol=1e-5, rtol=1e-5)
        ids = calib_ids(2, 12)
        torch.testing.assert_close(moe(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_fitted_router_ranks_experts_by_output_norm(dense):
    """The fitted router and the fitted scale run; with E=2 and top_k=1 the router picks the larger expert mostly."""
    calib = calib_ids(8, 16)
    info = {}
    moe = make_moe.moefy(dense, experts=2, top_k=1, calib=calib, router="fit", scale="fit", info=info)
    assert len(info["down_scale"]) == 2 and all(value > 0 for value in info["down_scale"])
    inputs = make_moe.collect_mlp_inputs(dense, calib)[0]                        # (N, H)
    gate, up, down = make_moe.dense_weights(dense.model.layers[0].mlp)
    groups = torch.tensor(info["groups"][0])
    norms = make_moe.expert_output_norms(make_moe.intermediate_activations(inputs, gate, up), down, groups)
    chosen = (inputs @ moe.model.layers[0].mlp.gate.weight.T).argmax(dim=1)
    assert (chosen == norms.argmax(dim=1)).float().mean() > 0.7


def test_saved_checkpoint_reloads_as_mixtral_with_same_logits(dense, tmp_path):
    info = {}
    moe = make_moe.moefy(dense, experts=4, top_k=2, calib=calib_ids(), router="fit", info=info)
    out = tmp_path / "moe"
    ids = calib_ids(2, 12)
    make_moe.save_atomically(moe, None, out, record={"experts": 4}, check_ids=ids, groups=info["groups"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert json.loads((out / make_moe.RECORD_NAME).read_text()) == {"experts": 4}
    assert json.loads((out / make_moe.GROUPS_NAME).read_text()) == info["groups"]
    assert out.stat().st_mode & 0o055 == 0o055 & ~current_umask()       # not mkdtemp's 0700
    assert list(out.glob("*.safetensors")) and not list(tmp_path.glob(".moe.tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, MixtralForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, moe(input_ids=ids).logits, atol=0, rtol=0)
    with pytest.raises(FileExistsError):
        make_moe.save_atomically(moe, None, out)
    make_moe.save_atomically(moe, None, out, record={"experts": 5}, overwrite=True)
    assert json.loads((out / make_moe.RECORD_NAME).read_text()) == {"experts": 5}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["moe"]


def test_rejects_bad_settings(dense):
    with pytest.raises(ValueError, match="divisible"):
        make_moe.moefy(dense, experts=3, top_k=1)
    with pytest.raises(ValueError, match="top_k"):
        make_moe.moefy(dense, experts=4, top_k=5)
    with pytest.raises(ValueError, match="calibration"):
        make_moe.moefy(dense, experts=4, top_k=2, router="fit")
