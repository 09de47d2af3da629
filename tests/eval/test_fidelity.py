"""Fidelity metrics on hand-made logits with known answers, and a tiny model against itself."""
import math

import pytest
import torch

from prunekit.eval.fidelity import (divergent_tokens, fidelity_windows, greedy_continuations, prompt_starts,
                                    teacher_forced_argmax, token_kl, top1_agreement)


def test_token_kl_known_values():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).log()
    q_logits = torch.tensor([[0.25, 0.75], [0.5, 0.5]]).log()
    kl = token_kl(p, q_logits)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert kl[1].item() == pytest.approx(math.log(2), abs=1e-6)   # zero-probability term contributes 0, not nan


def test_token_kl_is_zero_for_equal_distributions_and_shift_invariant():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    dense = torch.log_softmax(logits, -1)
    assert token_kl(dense, logits + 3.0).abs().max().item() < 1e-5
    assert token_kl(dense, logits).shape == (3, 5)


def test_token_kl_infinite_when_model_rules_out_a_dense_token():
    dense = torch.tensor([[0.5, 0.5]]).log()
    logits = torch.tensor([[0.0, -math.inf]])
    assert token_kl(dense, logits).item() == math.inf


def test_top1_agreement():
    dense = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0]]), -1)
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 2.0]])
    assert top1_agreement(dense, logits).tolist() == [1.0, 0.0, 1.0]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_divergent_tokens_known_answers():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = torch.tensor([[1, 2, 3, 4],      # no divergence
                              [1, 9, 3, 9],      # first at 1, two of four
                              [0, 0, 0, 0]])     # first at 0, all four
    fdt, sdt = divergent_tokens(predicted, reference)
    assert fdt.tolist() == [4, 1, 0]
    assert sdt.tolist() == [0.0, 0.5, 1.0]


def test_fidelity_windows_and_prompt_starts():
    ids = torch.arange(100)
    assert fidelity_windows(ids, 16, 40).shape == (3, 16)     # ceil(40 / 16)
    assert fidelity_windows(ids, 16, 4096).shape == (6, 16)   # capped by the text
    with pytest.raises(ValueError, match="fewer than one window"):
        fidelity_windows(ids[:10], 16, 40)
    assert prompt_starts(100, 3, 20) == [0, 40, 80]
    assert prompt_starts(100, 1, 20) == [0]


def test_greedy_continuation_is_the_dense_argmax_and_self_agrees(tiny_llama):
    prompts = torch.randint(0, 128, (5, 6), generator=torch.Generator().manual_seed(2))
    y = greedy_continuations(tiny_llama, prompts, 7, batch_size=2, device="cpu")
    assert y.shape == (5, 7)
    # an independent step-by-step greedy loop without cache
    seq = prompts.clone()
    with torch.no_grad():
        for _ in range(7):
            seq = torch.cat([seq, tiny_llama(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, 6:], y)
    fdt, sdt = divergent_tokens(teacher_forced_argmax(tiny_llama, prompts, y, 2, "cpu"), y)
    assert fdt.tolist() == [7] * 5 and sdt.tolist() == [0.0] * 5


@pytest.fixture(scope="module")
def tiny_llama():
    from conftest import tiny_model
    return tiny_model("llama")
