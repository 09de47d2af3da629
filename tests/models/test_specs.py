"""Every model spec against a real 2-layer model of its family: names resolve, every linear of a
block is listed once, the layers of a group read the same tensor, groups run in declared order."""
import dataclasses
import types

import pytest
import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForCausalLM

from prunekit.models import SPECS, spec_for, supported_model_types
from prunekit.models.spec import ModelSpec, get_module, in_features, is_linear, weight_view

VOCAB = 128
_GQA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=VOCAB)

# One tiny config per supported model_type (a new spec without an entry here fails a test).
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_GQA),
    "mistral": lambda: transformers.MistralConfig(**_GQA, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**_GQA),
    "qwen3": lambda: transformers.Qwen3Config(**_GQA, head_dim=16),
    "gemma": lambda: transformers.GemmaConfig(**_GQA, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**_GQA, head_dim=16, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_GQA, head_dim=16, sliding_window=8,
                                                         layer_types=["sliding_attention", "full_attention"]),
    "phi3": lambda: transformers.Phi3Config(**_GQA, pad_token_id=0, eos_token_id=0),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, num_hidden_layers=2,
                                          vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
}


def build(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()


def spec_problems(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Everything wrong with `spec` for `model`, found statically and by one hooked forward."""
    problems = []
    blocks = get_module(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) != model.config.num_hidden_layers:
        return [f"{spec.blocks} is not a ModuleList of num_hidden_layers blocks"]
    listed = [name for group in spec.groups for name in group]
    for index, block in enumerate(blocks):
        linears = {name for name, module in block.named_modules() if is_linear(module)}
        for name in listed:
            try:
                if not is_linear(get_module(block, name)):
                    problems.append(f"block {index}: {name} is not a linear layer")
            except AttributeError:
                problems.append(f"block {index}: {name} does not exist")
        problems += [f"block {index}: {name} is not in any group" for name in sorted(linears - set(listed))]
    if problems:
        return problems

    calls = []   # (block, group, name, input) per call, in call order
    handles = []
    for index, block in enumerate(blocks):
        for g, group in enumerate(spec.groups):
            for name in group:
                def hook(module, args, index=index, g=g, name=name):
                    calls.append((index, g, name, args[0] if args else None))
                handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()

    for index in range(len(blocks)):
        mine = [(g, name, x) for i, g, name, x in calls if i == index]
        names = [name for _, name, _ in mine]
        if sorted(names) != sorted(listed):
            problems.append(f"block {index}: expected one call of each of {listed}, got {names}")
            continue
        order = [g for g, _, _ in mine]
        if order != sorted(order):
            problems.append(f"block {index}: groups called in order {order}, not as declared: {names}")
        for g, group in enumerate(spec.groups):
            inputs = {name: x for h, name, x in mine if h == g}
            if any(x is None for x in inputs.values()):
                problems.append(f"block {index}: a layer of {group} got no positional input")
                continue
            first = inputs[group[0]]
            for name in group[1:]:
                if not torch.equal(inputs[name], first):
                    problems.append(f"block {index}: {name} does not read the same input as {group[0]}")
    return problems


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return build(request.param)


def test_every_supported_type_has_a_tiny_config():
    from conftest import MOE_CONFIGS          # the MoE families: tests/models/test_moe_specs.py
    from test_ssm import SSM_CONFIGS          # the state-space and hybrid families: tests/models/test_ssm.py
    assert sorted([*CONFIGS, *MOE_CONFIGS, *SSM_CONFIGS]) == supported_model_types()


def test_spec_fits_the_model(model):
    spec = spec_for(model)
    assert model.config.model_type in spec.model_types
    assert spec_for(model.config) is spec
    blocks = get_module(model, spec.blocks)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == model.config.num_hidden_layers == 2
    assert spec_problems(model, spec) == []
    assert spec.embeddings
    for path in spec.embeddings:
        assert isinstance(get_module(model, path), nn.Embedding), path
    assert is_linear(get_module(model, spec.lm_head))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_the_checker_catches_wrong_specs(family):
    """The checks above can fail: each deliberately broken spec is reported."""
    model = build(family)
    spec = spec_for(model)
    qkv, o, up, down = spec.groups
    swapped = dataclasses.replace(spec, groups=(qkv, up, o, down))
    merged = dataclasses.replace(spec, groups=(qkv + o, up, down))
    missing = dataclasses.replace(spec, groups=(qkv, o, up))
    bogus = dataclasses.replace(spec, groups=(qkv, o, up, down + ("mlp.nope",)))
    assert any("not as declared" in p for p in spec_problems(model, swapped))
    assert any("does not read the same input" in p for p in spec_problems(model, merged))
    assert any(f"{down[0]} is not in any group" in p for p in spec_problems(model, missing))
    assert any("does not exist" in p for p in spec_problems(model, bogus))


def test_registry_is_consistent():
    types_ = [t for spec in SPECS for t in spec.model_types]
    assert len(types_) == len(set(types_))
    assert supported_model_types() == sorted(types_)
    for spec in SPECS:
        for model_type in spec.model_types:
            assert spec_for(types.SimpleNamespace(model_type=model_type)) is spec


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError) as err:
        spec_for(transformers.BertConfig())
    message = str(err.value)
    assert "'bert'" in message
    assert ", ".join(sorted(supported_model_types())) in message


def test_gpt2_with_cross_attention_is_refused():
    config = CONFIGS["gpt2"]()
    config.add_cross_attention = True
    with pytest.raises(ValueError, match="add_cross_attention"):
        spec_for(config)


def test_weight_view_is_out_by_in():
    """Linear and GPT-2's Conv1D: module(x) == x @ weight_view(module).T + bias."""
    gpt2, opt = build("gpt2"), build("opt")
    modules = [gpt2.transformer.h[0].attn.c_attn, gpt2.transformer.h[0].mlp.c_proj,
               opt.model.decoder.layers[0].fc1, opt.model.decoder.layers[0].fc2]
    assert type(modules[0]).__name__ == "Conv1D" and isinstance(modules[2], nn.Linear)
    for module in modules:
        W = weight_view(module)
        x = torch.randn(3, W.shape[1])
        with torch.no_grad():
            y = module(x)
        assert W.shape == (y.shape[-1], x.shape[-1]) and in_features(module) == x.shape[-1]
        torch.testing.assert_close(y, x @ W.T + module.bias)
        assert W.data_ptr() == module.weight.data_ptr()   # a view, so writes reach the module
