"""prunekit.eval.perplexity against a naive one-window-at-a-time loop, on a tiny random Llama.

The reference loop is written independently of the implementation: non-overlapping windows
for stride == seqlen, and the loop of the Hugging Face perplexity guide for stride < seqlen,
with the negative log-likelihood taken from a float64 log-softmax.
"""
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunekit.data import EvalText
from prunekit.eval import PerplexityResult, perplexity
from conftest import llama

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return llama(0, hidden_size=32, intermediate_size=64, max_position_embeddings=128)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (203,), generator=torch.Generator().manual_seed(0))


def naive(model, ids, seqlen, stride):
    """exp(mean NLL) and the number of scored tokens, one window per forward."""
    nlls = []
    with torch.no_grad():
        if stride == seqlen:
            for i in range(ids.numel() // seqlen):
                window = ids[i * seqlen: (i + 1) * seqlen]
                logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
                nlls.append(-logp[:-1].gather(1, window[1:, None])[:, 0])
        else:
            prev_end = 0
            for begin in range(0, ids.numel(), stride):
                end = min(begin + seqlen, ids.numel())
                trg_len = end - prev_end                      # may differ from stride on the last loop
                window = ids[begin:end]
                logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
                nll = -logp[:-1].gather(1, window[1:, None])[:, 0]
                nlls.append(nll[-trg_len:])
                prev_end = end
                if end == ids.numel():
                    break
    nll = torch.cat(nlls)
    return math.exp(nll.mean().item()), nll.numel()


def test_non_overlapping_matches_naive_and_counts_exactly(model, ids):
    result = perplexity(model, ids, seqlen=32)
    ppl, count = naive(model, ids, 32, 32)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.tokens_scored == count == 6 * 31          # 203 // 32 windows, first token of each unscored
    assert (result.windows, result.stride, result.dropped_tokens, result.tokens) == (6, 32, 11, 203)
    assert result.nll_per_token == pytest.approx(math.log(ppl), rel=1e-5)
    assert "trailing 11 tokens dropped" in str(result)


@pytest.mark.parametrize("seqlen, stride, n", [(32, 8, 203), (32, 5, 203), (16, 15, 203), (8, 1, 40)])
def test_sliding_windows_match_naive_and_score_every_token_once(model, ids, seqlen, stride, n):
    ids = ids[:n]
    result = perplexity(model, ids, seqlen=seqlen, stride=stride, batch_size=4)
    ppl, count = naive(model, ids, seqlen, stride)
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.tokens_scored == count == ids.numel() - 1
    assert result.dropped_tokens == 0 and result.stride == stride


def test_sliding_context_changes_the_number(model, ids):
    # guards the comparison above: more context per scored token must give a different value
    assert perplexity(model, ids, seqlen=32, stride=8).ppl != pytest.approx(perplexity(model, ids, seqlen=32).ppl,
                                                                           rel=1e-5)


@pytest.mark.parametrize("stride", [None, 8])
def test_batch_size_does_not_change_the_result(model, ids, stride):
    results = [perplexity(model, ids, seqlen=32, stride=stride, batch_size=b) for b in (1, 3, None)]
    for r in results[1:]:
        assert r.ppl == pytest.approx(results[0].ppl, rel=1e-6)
        assert (r.tokens_scored, r.windows) == (results[0].tokens_scored, results[0].windows)
    assert results[-1].batch_size == results[-1].windows            # auto: all windows fit in 512 MB here


def test_uniform_logits_give_the_vocabulary_size(model, ids):
    uniform = AutoModelForCausalLM.from_config(model.config).eval()
    with torch.no_grad():
        uniform.lm_head.weight.zero_()                              # every logit 0: p = 1/VOCAB
    result = perplexity(uniform, ids, seqlen=32, stride=8)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll_per_token == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_result_prints_and_serializes_its_protocol(model, ids):
    text = EvalText(ids=ids, protocol={"source": "default", "description": "stdlib docs, Python 3.11.7",
                                       "split": "evaluation", "tokens": ids.numel()})
    result = perplexity(model, text, seqlen=64, stride=64)
    assert isinstance(result, PerplexityResult)
    assert re.fullmatch(r"ppl \d+\.\d\d \[source=default \(stdlib docs, Python 3\.11\.7\), split=evaluation, "
                        r"seqlen=64, stride=64, windows=3, tokens scored=189, trailing 11 tokens dropped\]",
                        str(result)), str(result)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["ppl"] == result.ppl and d["tokens_scored"] == 189 and d["source"]["split"] == "evaluation"
    assert d["protocol"] in str(result) and "dropped" in d["mode"]
    text.protocol.update(tokens_in_split=1000)
    assert "split=evaluation (first 203 of 1000 tokens), seqlen=64" in str(perplexity(model, text, seqlen=64))
    tagged = perplexity(model, ids[None], seqlen=64, protocol={"source": "mine"})   # (1, n) is accepted too
    assert tagged.ppl == result.ppl and str(tagged).split(" [")[1].startswith("source=mine, seqlen=64")


def test_model_state_is_restored_and_device_is_honoured(model, ids):
    model.train()
    try:
        before = perplexity(model, ids, seqlen=32, device="cpu")
        assert model.training                                       # evaluated in eval mode, then restored
    finally:
        model.eval()
    assert before.ppl == pytest.approx(perplexity(model, ids, seqlen=32).ppl, rel=1e-6)
    assert next(model.parameters()).device.type == "cpu"


def test_argument_errors(model, ids):
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, seqlen=32, stride=33)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:31], seqlen=32)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        perplexity(model, ids, seqlen=129)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, ids.view(7, 29), seqlen=8)
    with pytest.raises(TypeError):
        perplexity(model, ids.float(), seqlen=8)
