"""Knowledge suite: normalisation and scoring on hand-made inputs, batched log-likelihoods against a
one-row-at-a-time computation, and a tiny model against itself (retention 1)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, word_tokenizer
from prunekit.eval.knowledge import (FEW_SHOT, build_prompt, choice_logliks, choice_rank, exact_match,
                                     generate_answers, load_questions, normalize, run_knowledge, summarize)

SMALL = Path(__file__).with_name("knowledge_small.jsonl")


def test_normalize():
    assert normalize("  The   Pacific\tOcean ") == "pacific ocean"
    assert normalize("An apple.") == "apple"
    assert normalize("Theatre") == "theatre"
    assert normalize("1,000,000 people") == "1000000 people"
    assert normalize("3.14") == "3.14" and normalize("-5") == "-5" and normalize("It is -5.") == "it is -5"
    assert normalize("It is 4.5.") == "it is 4.5"
    assert normalize("well-known") == "well known"
    assert normalize("Ｈ２Ｏ") == "h2o"
    assert normalize("Brasília!") == "brasília"
    assert normalize("50%") == "50"


def test_exact_match():
    assert exact_match(" Paris", ["Paris"])
    assert exact_match("Paris is the capital.", ["Paris"])
    assert not exact_match("Parisian", ["Paris"])
    assert exact_match("The Nile.", ["Nile"])
    assert exact_match("3,000", ["3000"])
    assert not exact_match("", ["Paris"])
    assert not exact_match("30000", ["3000"])


def test_choice_rank_ties_count_against():
    scores = torch.tensor([-1.0, -2.0, -1.0, -3.0])
    assert [choice_rank(scores, i) for i in range(4)] == [2, 3, 2, 4]
    assert choice_rank(torch.tensor([0.0, -1.0, -2.0, -3.0]), 0) == 1


def test_build_prompt():
    assert build_prompt("Q?", 0) == "Question: Q?\nAnswer:"
    q, a = FEW_SHOT[0]
    assert build_prompt("Q?", 1) == f"Question: {q}\nAnswer: {a}\n\nQuestion: Q?\nAnswer:"
    with pytest.raises(ValueError, match="knowledge_shots"):
        build_prompt("Q?", len(FEW_SHOT) + 1)


def _result(qid, category, exact, rank):
    return {"id": qid, "category": category, "exact": exact, "rank": rank}


def test_summarize_exact_numbers():
    dense = [_result("a", "x", True, 1), _result("b", "x", True, 1), _result("c", "y", False, 1),
             _result("d", "y", False, 3)]
    model = [_result("a", "x", True, 2), _result("b", "x", False, 1), _result("c", "y", True, 1),
             _result("d", "y", False, 4)]
    out = summarize(model, dense, shots=3)
    assert out["exact_match"] == 0.5 and out["mc_accuracy"] == 0.5 and out["mc_mean_rank"] == 2.0
    assert out["baseline"]["exact_match"] == 0.5 and out["baseline"]["mc_accuracy"] == 0.75
    assert out["retention_exact"] == 1.0
    assert out["retention_mc"] == pytest.approx(0.5 / 0.75)
    assert out["kept_correct"] == pytest.approx(2 / 3)          # dense right (MC) on a, b, c; model keeps b, c
    assert out["kept_correct_exact"] == 0.5                    # dense right (exact) on a, b; model keeps a
    assert out["per_category"]["y"] == {"questions": 2, "exact_match": 0.5, "mc_accuracy": 0.5, "mc_mean_rank": 2.5}
    assert "3-shot" in out["protocol"] and "retention" in out["protocol"]
    alone = summarize(model)
    assert "baseline" not in alone and "retention_mc" not in alone
    with pytest.raises(ValueError, match="another question set"):
        summarize(model, dense[:3])


def test_load_questions_checks_the_file(tmp_path):
    assert [q["id"] for q in load_questions(SMALL)][:2] == ["geo-001", "geo-002"]
    bad = tmp_path / "bad.jsonl"
    record = json.loads(SMALL.read_text().splitlines()[0])
    bad.write_text(json.dumps(record) + "\n" + json.dumps({**record, "id": "x-1", "correct": 4}) + "\n")
    with pytest.raises(ValueError, match="line 2: 'correct'"):
        load_questions(bad)
    bad.write_text(json.dumps({**record, "question": FEW_SHOT[1][0]}) + "\n")
    with pytest.raises(ValueError, match="few-shot"):
        load_questions(bad)
    bad.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="duplicate id"):
        load_questions(bad)
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def questions():
    return load_questions(SMALL)


@pytest.fixture(scope="module")
def tokenizer(questions):
    lines = [build_prompt(q["question"], 3) for q in questions] + [" ".join(q["choices"]) for q in questions]
    return word_tokenizer(lines)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_batched_logliks_equal_one_row_at_a_time(model, tokenizer, questions):
    prompts = [build_prompt(q["question"], 2) for q in questions]
    batched = choice_logliks(model, tokenizer, prompts, [q["choices"] for q in questions], 2, "cpu")
    assert batched.shape == (6, 4)
    for i, q in enumerate(questions):
        context = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(q["choices"]):
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            expected = sum(logp[len(context) - 1 + k, t].item() for k, t in enumerate(continuation))
            assert batched[i, j].item() == pytest.approx(expected, abs=1e-4)


def test_batched_generation_equals_one_at_a_time(model, tokenizer, questions):
    prompts = [build_prompt(q["question"], k % 4) for k, q in enumerate(questions)]   # different lengths
    batched = generate_answers(model, tokenizer, prompts, 4, "cpu")
    single = [generate_answers(model, tokenizer, [p], 1, "cpu")[0] for p in prompts]
    assert batched == single and all("\n" not in a for a in batched)


def test_model_against_itself_retains_everything(model, tokenizer, questions):
    dense = run_knowledge(model, tokenizer, questions, shots=3, batch_size=4)
    assert [r["id"] for r in dense] == [q["id"] for q in questions]
    assert all(1 <= r["rank"] <= 4 and isinstance(r["exact"], bool) for r in dense)
    again = run_knowledge(model, tokenizer, questions, shots=3, batch_size=4)
    out = summarize(again, dense)
    assert out["exact_match"] == out["baseline"]["exact_match"]
    assert out["mc_accuracy"] == out["baseline"]["mc_accuracy"]
    if out["baseline"]["mc_accuracy"] > 0:
        assert out["retention_mc"] == 1.0 and out["kept_correct"] == 1.0
    other = run_knowledge(tiny_model("llama", seed=3), tokenizer, questions, shots=3, batch_size=4)
    assert [r["logliks"] for r in other] != [r["logliks"] for r in dense]


def test_generation_over_the_shared_prefix_equals_transformers_generate(model, tokenizer, questions):
    """The prefix cache and the greedy loop are an optimisation: each answer must be what
    `model.generate` produces greedily from the whole prompt alone."""
    from transformers import GenerationConfig
    from prunekit.eval.knowledge import MAX_NEW_TOKENS
    prompts = [build_prompt(q["question"], 3) for q in questions]
    ours = generate_answers(model, tokenizer, prompts, 4, "cpu")
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                              pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    for prompt, answer in zip(prompts, ours):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        text = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        assert answer == text.split("\n", 1)[0].strip()
