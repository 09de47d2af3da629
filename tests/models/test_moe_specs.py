"""The Mixture-of-Experts specs (models/moe.py) fit the models transformers 5 builds: every linear
layer of every block is in a group, or is the router or a shared expert's gate; layers of one
group read the same input; the experts module is where the spec says, with the fused layout it
declares. (Routing against each family's own router: tests/test_experts.py.)"""
import pytest
import torch
from conftest import MOE_CONFIGS, VOCAB, tiny_moe

from prunekit.models import spec_for
from prunekit.models.moe import expert_count, is_moe_block
from prunekit.models.spec import get_module, has_module, is_linear


@pytest.mark.parametrize("family", sorted(MOE_CONFIGS))
def test_moe_spec_fits_the_model(family):
    model = tiny_moe(family)
    spec = spec_for(model)
    moe = spec.experts
    blocks = get_module(model, spec.blocks)
    listed = [name for group in spec.groups for name in group]
    calls = []
    handles = []
    moe_blocks = 0
    for index, block in enumerate(blocks):
        present = [name for name in listed if has_module(block, name)]
        assert all(is_linear(get_module(block, name)) for name in present), index
        linears = {name for name, module in block.named_modules() if is_linear(module)}
        allowed = set(present) | {moe.router} | {name for name in moe.shared if name.endswith("_gate")}
        assert linears <= allowed, f"block {index}: {sorted(linears - allowed)} are in no group"
        assert has_module(block, "self_attn.o_proj") and "self_attn.o_proj" in present
        if is_moe_block(block, moe):
            moe_blocks += 1
            experts = get_module(block, moe.experts)
            E, H = expert_count(block, moe), model.config.hidden_size
            gate_up, down = experts.gate_up_proj, experts.down_proj
            assert gate_up.shape[0] == down.shape[0] == E == getattr(model.config, moe.count_key)
            assert (gate_up.shape[1] if moe.transposed else gate_up.shape[2]) == H
            assert (down.shape[2] if moe.transposed else down.shape[1]) == H
        for g, group in enumerate(spec.groups):
            for name in group:
                if has_module(block, name):
                    handles.append(get_module(block, name).register_forward_pre_hook(
                        lambda module, args, index=index, g=g, name=name: calls.append((index, g, name, args[0]))))
    assert moe_blocks >= 2
    try:
        with torch.no_grad():
            model(torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0)))
    finally:
        for handle in handles:
            handle.remove()
    for index in range(len(blocks)):
        for g in range(len(spec.groups)):
            inputs = [x for i, h, _, x in calls if i == index and h == g]
            assert all(torch.equal(x, inputs[0]) for x in inputs), (index, spec.groups[g])
