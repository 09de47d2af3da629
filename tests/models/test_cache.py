"""models/cache.py: hand-written decode loops pass the KV cache under the name the model's forward takes."""
import torch
from torch import nn

from conftest import llama
from prunekit.models.cache import cache_keyword, returned_cache


class OldStyle(nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return input_ids


def test_the_keyword_follows_the_forward_signature():
    from transformers.modeling_outputs import CausalLMOutputWithPast
    # the release that returns `cache` takes `cache` too (the rename of both came together)
    expected = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert cache_keyword(llama(0)) == expected
    assert cache_keyword(OldStyle()) == "past_key_values"


def test_a_decode_step_through_the_keyword_equals_the_full_forward():
    model = llama(0).eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = returned_cache(model(input_ids=ids[:, :-1], use_cache=True))
        assert cache is not None and cache.get_seq_length() == 8
        step = model(input_ids=ids[:, -1:], use_cache=True, **{cache_keyword(model): cache}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_returned_cache_reads_either_name():
    class Old:
        past_key_values = "old"

    class New:
        cache = "new"
        past_key_values = "alias"

    assert returned_cache(Old()) == "old" and returned_cache(New()) == "new"
