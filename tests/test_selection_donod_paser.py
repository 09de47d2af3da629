"""DONOD and PASER selection (prunekit.selection.donod / paser): TOPSIS against a hand computation, the
probe's DON / NOD against a real SGD step, noise ranked last by DONOD, PASER's budget following a planted
capability loss, exact and deterministic budgets, JSON-clean reports and bad input."""
import copy
import gc
import json
import math
import weakref

import numpy as np
import pytest
import torch

from conftest import VOCAB, llama, word_tokenizer
from prunekit.selection import donod, paser
from prunekit.selection.select import report_path, select

SENTENCE = "the cat sat on the mat and the dog sat on the log"
NUMBERS = "one two three four five six seven eight nine ten eleven twelve"
NOISE = "zq xv kj wp mm qq bb yy"


def write_pool(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def rotations(sentence, count):
    words = sentence.split()
    return [" ".join(words[i:] + words[:i]) for i in range(count)]


def trained(texts, tokenizer, steps=60, seed=0):
    """A tiny Llama trained on `texts` (a few dozen Adam steps): a model with a meaningful loss."""
    model = llama(seed)
    rows = [tokenizer.encode(t) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_topsis_matches_a_hand_computation():
    matrix = [[1.0, 2.0], [3.0, 1.0], [2.0, 4.0]]            # column 0 a benefit, column 1 a cost
    c0, c2 = math.sqrt(1 + 9 + 4), math.sqrt(4 + 1 + 16)      # vector norms of the columns
    v = [[0.5 * a / c0, 0.5 * b / c2] for a, b in matrix]     # equal weights
    best, worst = (3 * 0.5 / c0, 1 * 0.5 / c2), (1 * 0.5 / c0, 4 * 0.5 / c2)
    expected = []
    for row in v:
        d_best, d_worst = math.dist(row, best), math.dist(row, worst)
        expected.append(d_worst / (d_best + d_worst))
    closeness = donod.topsis(matrix, (True, False))
    assert closeness == pytest.approx(expected, rel=1e-12)
    assert closeness == pytest.approx([0.4305, 1.0, 0.2743], abs=1e-4)
    embeddings = torch.tensor(matrix + [[math.nan, math.nan]])
    assert donod.order([0.0] * 4, [1] * 4, {"embeddings": embeddings}) == [1, 0, 2, 3]   # NaN (unscored) last
    weighted = donod.topsis(matrix, (True, False), weights=[1.0, 0.0])                   # DON alone
    assert np.argsort(-weighted).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="weights"):
        donod.topsis(matrix, (True, False), weights=[1.0])


def test_the_probe_is_one_exact_sgd_step_on_the_head():
    """DON and NOD from the closed form equal ||W - lr g|| - ||W|| and ||lr g|| of a real step (autograd on
    the LM head, mean next-token loss); the model is left untouched."""
    tokenizer = word_tokenizer([SENTENCE, NOISE])
    model = llama(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.5
    text = "the dog sat on the mat and the cat"
    got = donod.probe([text, "cat"], model, tokenizer, {"probe_lr": lr})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.tensor([tokenizer.encode(text)])
    probe_model = copy.deepcopy(model)
    probe_model.zero_grad()
    probe_model(input_ids=ids, labels=ids).loss.backward()
    weight = probe_model.get_output_embeddings().weight
    w, g = weight.detach().double(), weight.grad.double()
    don = float((w - lr * g).norm() - w.norm())
    nod = float((lr * g).norm())
    assert float(got[0, 0]) * lr == pytest.approx(don, rel=1e-3)
    assert float(got[0, 1]) * lr == pytest.approx(nod, rel=1e-4)
    assert torch.isnan(got[1]).all()                                     # one token: nothing to probe


def test_donod_ranks_noise_and_empty_samples_last(tmp_path):
    """A model trained on two sentences: gibberish, a long random-token sample and one-token samples are the
    last a DONOD budget keeps; the budget is exact and the selection deterministic."""
    tokenizer = word_tokenizer([SENTENCE, NUMBERS, NOISE])
    model = trained([SENTENCE, NUMBERS], tokenizer)
    words = (SENTENCE + " " + NUMBERS + " " + NOISE).split()
    rng = np.random.default_rng(0)
    random_long = " ".join(rng.choice(words, 48))
    good = rotations(SENTENCE, 4)[:1] + [SENTENCE, NUMBERS, SENTENCE, NUMBERS, SENTENCE]
    bad = [NOISE, random_long, "cat", "mm qq zq", "kj"]
    texts = good[:3] + bad[:2] + good[3:] + bad[2:]
    source = write_pool(tmp_path / "p.jsonl", texts)
    pool = [t for i, t in enumerate(texts) if i % 10 != 9]                # the pool's calibration side
    keep = sum(t in good for t in pool)
    options = {"probe_lr": 1e-3}
    report = select(source, "donod", f"{keep} samples", tmp_path / "a.jsonl", model=model, tokenizer=tokenizer,
                    options=options, progress=False)
    kept = [r["text"] for r in read(tmp_path / "a.jsonl")]
    assert len(kept) == keep == report["samples"]["kept"] and set(kept) <= set(good)
    criteria = donod.probe([SENTENCE, NOISE, random_long], model, tokenizer, options)
    assert criteria[0, 1] < criteria[1, 1] and criteria[0, 1] < criteria[2, 1]    # NOD: noise steps further
    assert criteria[0, 0] > criteria[1, 0] and criteria[0, 0] > criteria[2, 0]    # DON: noise shrinks the head
    select(source, "donod", f"{keep} samples", tmp_path / "b.jsonl", model=model, tokenizer=tokenizer,
           options=options, progress=False)
    assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")


def _planted():
    """A dense model trained on two kinds of text and a 'pruned' copy whose head forgot the words of the
    first kind only (their output rows zeroed)."""
    cats, numbers = rotations(SENTENCE, 10), rotations(NUMBERS, 10)
    tokenizer = word_tokenizer([SENTENCE, NUMBERS, NOISE])
    dense = trained(cats + numbers, tokenizer, steps=80)
    pruned = copy.deepcopy(dense)
    only_cats = set(SENTENCE.split()) - set(NUMBERS.split())
    with torch.no_grad():
        for word in only_cats:
            pruned.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(word)] = 0.0
    return cats, numbers, tokenizer, dense, pruned


def test_paser_budget_follows_the_planted_capability_loss(tmp_path):
    cats, numbers, tokenizer, dense, pruned = _planted()
    texts = [t for pair in zip(cats, numbers) for t in pair] + [NOISE * 2]
    source = write_pool(tmp_path / "p.jsonl", texts)
    options = {"pruned": pruned, "clusters": 2}
    report = select(source, "paser", "6 samples", tmp_path / "a.jsonl", model=dense, tokenizer=tokenizer,
                    options=options, progress=False)
    kept = [r["text"] for r in read(tmp_path / "a.jsonl")]
    assert len(kept) == 6 == report["samples"]["kept"]
    assert sum(t in cats for t in kept) >= 5, kept                         # the cluster the pruned model lost on
    assert "pruned" not in report["options"] and json.loads(report_path(tmp_path / "a.jsonl").read_text())
    gaps = paser.score_batch(cats[:2] + numbers[:2] + ["cat"], dense, tokenizer, {"pruned": pruned})
    assert min(gaps[:2]) > 10 * max(abs(g) for g in gaps[2:4]) and gaps[4] == math.inf
    assert all("cluster" in r and "score" in r for r in read(tmp_path / "a.jsonl"))   # label and gap beside each
    select(source, "paser", "6 samples", tmp_path / "b.jsonl", model=dense, tokenizer=tokenizer,
           options=options, progress=False)
    assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")


def test_paser_orders_gibberish_after_everything():
    """Hand-built stored vectors: two clusters, the lossy one first by gap, a dense-NLL outlier and a sample
    with nothing to compare last."""
    embeddings = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.1, 2.1], [1.0, -0.1, 2.2], [-1.0, 0.0, 2.0],
                               [-1.0, 0.1, 2.1], [-1.0, -0.1, 9.0], [1.0, 0.05, math.inf]])
    gaps = [3.0, 1.0, 2.0, 0.0, 0.0, 5.0, math.inf]
    options = {"embeddings": embeddings, "clusters": 2}
    priority, labels = paser.order_and_labels(gaps, [5] * 7, options)
    assert priority[:3] == [0, 2, 1] and priority[-2:] == [5, 6] and options["conflicts"] == 1
    assert labels[0] == labels[1] == labels[2] != labels[3] == labels[4]
    assert sorted(options["cluster_loss"]) == pytest.approx([0.0, 2.0])


def test_paser_bad_input_is_refused(tmp_path):
    from prunekit.cli import main
    tokenizer = word_tokenizer([SENTENCE])
    dense = llama()
    with pytest.raises(ValueError, match="--pruned"):
        paser.score_batch([SENTENCE], dense, tokenizer, {})
    with pytest.raises(ValueError, match="vocabulary"):
        paser.score_batch([SENTENCE], dense, tokenizer, {"pruned": llama(vocab_size=VOCAB + 8)})
    source = write_pool(tmp_path / "p.jsonl", [SENTENCE] * 5)
    with pytest.raises(ValueError, match="--pruned"):
        select(source, "paser", "2 samples", tmp_path / "o.jsonl", model=dense, tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "o.jsonl").exists()
    base = ["data", "select", str(source), "--budget", "2 samples", "--out", str(tmp_path / "o.jsonl")]
    assert main(base + ["--method", "paser"]) != 0                           # no --pruned
    assert main(base + ["--method", "random", "--pruned", str(tmp_path)]) != 0
    assert main(base + ["--method", "random", "--probe-lr", "0"]) != 0
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_paser_and_donod_end_to_end(tmp_path, capsys):
    from prunekit.cli import main
    cats, numbers, tokenizer, dense, pruned = _planted()
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    source = write_pool(tmp_path / "p.jsonl", [t for pair in zip(cats, numbers) for t in pair])
    assert main(["data", "select", str(source), "--method", "paser", "--budget", "4 samples", "--model",
                 str(tmp_path / "dense"), "--pruned", str(tmp_path / "pruned"), "--clusters", "2", "--out",
                 str(tmp_path / "s.jsonl")]) == 0
    kept = [r["text"] for r in read(tmp_path / "s.jsonl")]
    assert len(kept) == 4 and sum(t in cats for t in kept) >= 3
    assert main(["data", "select", str(source), "--method", "donod", "--budget", "0.5", "--model",
                 str(tmp_path / "dense"), "--probe-lr", "1e-3", "--out", str(tmp_path / "d.jsonl")]) == 0
    report = json.loads(report_path(tmp_path / "d.jsonl").read_text())
    assert report["options"]["probe_lr"] == 1e-3 and report["samples"]["kept"] == 9
    assert "donod selection" in capsys.readouterr().out


def test_paser_dense_outputs_belong_to_their_model_and_do_not_keep_it_alive():
    """score_batch keeps the last batch's dense outputs for embed_batch. They are matched to the model by
    identity through a weak reference: another model gets its own outputs, and a freed model is not kept
    alive by the cache (whose id() a later model could then reuse)."""
    tokenizer = word_tokenizer([SENTENCE, NUMBERS])
    texts = [SENTENCE, NUMBERS]
    ids, mask = paser._batch(texts, tokenizer, 512)
    first, second = llama(0), llama(1)
    for model in (first, second, first):
        got = paser._dense(texts, model, tokenizer, {})["nll"]
        torch.testing.assert_close(got, paser._forward(model, ids, mask, hidden=False)[0])
    watch = weakref.ref(first)
    del first, model
    gc.collect()
    assert watch() is None
