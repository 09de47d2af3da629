"""Q-Tuning selection (prunekit.selection.qtuning): quadrants and their order on a hand-built error-uncertainty
plane, the context-aware token score and loss mask against hand computations, the per-token statistics on
fixed logits, exact and deterministic budgets end to end, and bad input."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import llama, word_tokenizer
from prunekit.selection import qtuning
from prunekit.selection.select import report_path, select

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCE = "the cat sat on the mat and the dog sat on the log"


def test_quadrants_and_order_on_a_hand_built_plane():
    # (error, uncertainty): Q2 = 0, 1; Q4 = 2, 3; Q3 = 4, 5; Q1 = 6 (planted gibberish: highest of both), 7
    error = [9, 8, 1, 2, 0.5, 1.5, 10, 7]
    uncertainty = [0.1, 0.2, 5, 4, 0.05, 0.3, 6, 4.5]
    order, quadrants = qtuning.quadrant_order(error, uncertainty)
    assert quadrants == [2, 2, 4, 4, 3, 3, 1, 1]
    # entry thresholds (ranks in sevenths): 0 -> 1/7, 2 -> 1/7, 1 -> 2/7, 3 -> 3/7; then Q3 (5: 4/7, 4: 1),
    # then Q1 (7: 4/7, 6: 1): the gibberish is the very last
    assert order == [0, 2, 1, 3, 5, 4, 7, 6]


def test_duplicates_share_a_quadrant():
    # three copies of one sample and three distinct ones: the copies share their mean ranks
    order, quadrants = qtuning.quadrant_order([1, 1, 1, 5, 6, 0.5], [2, 2, 2, 0.1, 0.2, 3])
    assert quadrants[0] == quadrants[1] == quadrants[2]
    assert sorted(order) == list(range(6))


def test_samples_with_nothing_to_score_come_last():
    order, quadrants = qtuning.quadrant_order([math.nan, 3.0, 1.0], [math.nan, 0.1, 2.0])
    assert order[-1] == 0 and quadrants[0] == 0
    assert set(quadrants[1:]) == {2, 4}


def test_token_score_and_keep_mask_by_hand():
    nll = torch.log(torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64))
    # s0 = .5*2 + .5*4 (its one neighbour), s1 = .5*4 + .5*(2+8)/2, s2 = .5*8 + .5*4
    assert torch.allclose(qtuning.token_scores(nll, 0.5), torch.tensor([3.0, 4.5, 6.0], dtype=torch.float64))
    assert torch.allclose(qtuning.token_scores(nll, 0.0), torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64))
    assert qtuning.token_keep_mask(nll, 2 / 3, 0.5).tolist() == [True, True, False]
    assert qtuning.token_keep_mask(nll, 0.01, 0.5).tolist() == [True, False, False]        # at least one stays
    # a 4-token sample: targets are tokens 1..3; the highest-scoring target (token 3) leaves the loss
    assert qtuning.loss_spans(4, 2, nll, {"token_keep": 2 / 3}) == [[1, 3]]
    # tokens past the scored ones always count; Q4 (and every other quadrant) is kept whole
    assert qtuning.loss_spans(6, 2, nll, {"token_keep": 2 / 3}) == [[1, 3], [4, 6]]
    assert qtuning.loss_spans(6, 4, nll) == [[1, 6]]
    assert qtuning.spans(torch.tensor([True, False, True, True])) == [[1, 2], [3, 5]]
    assert qtuning.mask_from_spans(6, [[1, 3], [4, 6]]).tolist() == [False, True, True, False, True, True]


class FixedLogits(nn.Module):
    """A 'model' whose logits are given: position t's logits are logits[t] whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits, requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        b, length = input_ids.shape
        return SimpleNamespace(logits=self.logits[:length].expand(b, length, -1))


class Ids:
    def encode(self, text):
        return [int(word) for word in text.split()]


def test_error_and_uncertainty_of_fixed_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    model, text = FixedLogits(logits), "0 1 2 0"
    (nll, entropy), = qtuning.token_stats([text], model, Ids(), {})
    logp = torch.log_softmax(logits.double(), -1)
    targets = [1, 2, 0]
    assert torch.allclose(nll, torch.stack([-logp[t, targets[t]] for t in range(3)]))
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1)[:3])
    vector = qtuning.embed_batch([text, "1"], model, Ids(), {})
    assert torch.allclose(vector[0].double(), torch.stack([nll.mean(), entropy.mean()]), atol=1e-6)
    assert torch.isnan(vector[1]).all()                                  # one token: nothing predicted


def _pool(path):
    words = SENTENCE.split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(12)]
    texts += ["log mat the on dog sat cat the", "the the the the the the"] * 3
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def test_select_end_to_end_exact_budget_and_deterministic(tmp_path):
    texts = _pool(tmp_path / "pool.jsonl")
    tokenizer = word_tokenizer(texts)
    model = llama(0)
    outs = []
    for run in range(2):
        out = tmp_path / f"sel{run}.jsonl"
        report = select(tmp_path / "pool.jsonl", "qtuning", "5 samples", out, model=model, tokenizer=tokenizer,
                        options={"token_keep": 0.5}, progress=False)
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    records = [json.loads(line) for line in outs[0].splitlines()]
    assert len(records) == 5 == report["samples"]["kept"]
    pool_size = report["samples"]["pool"]
    assert 5 <= pool_size // 2                         # 5 fit in Q2 + Q4 of the median split
    counted = 0
    for record in records:
        assert record["quadrant"] in ("Q2", "Q4") and record["cluster"] in (2, 4)
        assert record["tokens"] == len(tokenizer.encode(record["text"]))
        mask = qtuning.mask_from_spans(record["tokens"], record["loss_spans"])
        targets = record["tokens"] - 1
        if record["quadrant"] == "Q4":
            assert record["loss_spans"] == [[1, record["tokens"]]]
        else:
            assert int(mask.sum()) == max(1, round(0.5 * targets))
        counted += int(mask.sum())
    assert report["loss_mask"] == {"targets": sum(r["tokens"] - 1 for r in records), "loss_targets": counted}
    assert json.loads(report_path(tmp_path / "sel0.jsonl").read_text())["method"] == "qtuning"
    assert {row["cluster"] for row in report["clusters"]} <= {1, 2, 3, 4}


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="token_keep"):
        qtuning.token_keep_mask(torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="lambda"):
        qtuning.token_scores(torch.zeros(3), 1.5)
    with pytest.raises(ValueError, match="loss span"):
        qtuning.mask_from_spans(4, [[0, 2]])
    with pytest.raises(ValueError, match="two numbers per sample"):
        qtuning.order_and_labels([0.0], [3], {})
    _pool(tmp_path / "pool.jsonl")
    with pytest.raises(ValueError, match="--model"):
        select(tmp_path / "pool.jsonl", "qtuning", "0.5", tmp_path / "o.jsonl", progress=False)


def test_cli_data_select_qtuning(tmp_path, tiny_model_dir, capsys):
    from prunekit.cli import main
    _pool(tmp_path / "pool.jsonl")
    out = tmp_path / "q.jsonl"
    assert main(["data", "select", str(tmp_path / "pool.jsonl"), "--method", "qtuning", "--budget", "4 samples",
                 "--model", str(tiny_model_dir), "--token-keep", "0.6", "--neighbour-weight", "0.25",
                 "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and all("loss_spans" in r for r in records)
    report = json.loads(report_path(out).read_text())
    assert report["options"]["token_keep"] == 0.6 and report["options"]["neighbour_weight"] == 0.25
    assert "loss mask:" in capsys.readouterr().out
    assert main(["data", "select", str(tmp_path / "pool.jsonl"), "--method", "qtuning", "--budget", "0.5",
                 "--model", str(tiny_model_dir), "--token-keep", "0", "--out", str(tmp_path / "bad.jsonl")]) != 0
    assert "--token-keep" in capsys.readouterr().err
