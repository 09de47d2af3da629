"""The bundled knowledge-retention question set (src/prunekit/eval/data/knowledge.jsonl) is well formed.

The knowledge suite (LLM-KICK style, arXiv 2310.01382) scores a free answer by exact match after
normalisation and a multiple-choice answer by the log-likelihood rank of the correct option, so a
defect in the data silently changes the score: a duplicated question counts twice, a distractor
that normalises to an accepted answer makes a right answer "wrong", an answer that normalises to
"" matches everything. These tests read the file the way the package ships it (through
importlib.resources) and check each of those properties.

Answers are compared through the package's own `normalize`, whose behaviour on the spec's
examples is pinned by `test_normalizer_follows_the_spec`.
"""
import importlib.util
import json
import re
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pytest

from prunekit.eval.knowledge import normalize as _normalize

CATEGORIES = {"geography", "chemistry", "units", "dates", "arithmetic", "words", "science",
              "everyday"}
KEYS = {"id": str, "category": str, "question": str, "answers": list, "choices": list,
        "correct": int}
REPO = Path(__file__).resolve().parents[2]

# One answer = words of letters/digits ("H2O", "Brasília") and numbers ("4.5", "-5"), one space
# apart. With nothing else in them, deleting punctuation or replacing it by a space cannot give
# different results, so any faithful implementation of the spec normalises answers identically.
_ANSWER = re.compile(r"(?:-?\d+(?:\.\d+)?|[^\W_]+)(?: (?:-?\d+(?:\.\d+)?|[^\W_]+))*")


def load_bundled() -> list[dict]:
    resource = files("prunekit").joinpath("eval/data/knowledge.jsonl")
    lines = resource.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def records():
    return load_bundled()


def all_answers(records):
    return [answer for record in records for answer in record["answers"]]


def test_normalizer_follows_the_spec():
    assert _normalize("  The   Pacific\tOcean ") == "pacific ocean"
    assert _normalize("An apple.") == "apple"
    assert _normalize("a dog") == "dog"
    assert _normalize("Theatre") == "theatre"                    # an article only as a whole word
    assert _normalize("1,000") == "1000"
    assert _normalize("1,000,000 people") == "1000000 people"
    assert _normalize("3.14") == "3.14"
    assert _normalize("-5") == "-5"
    assert _normalize("minus 5!") == "minus 5"
    assert _normalize("It is 4.5.") == "it is 4.5"
    assert _normalize("well-known") == "well known"
    assert _normalize("Ｈ２Ｏ") == "h2o"                          # NFKC folds full-width forms
    assert _normalize("Brasília") == "brasília"                  # letters with accents are kept


def test_at_least_300_questions_with_keys_of_the_right_type(records):
    assert len(records) >= 300
    for record in records:
        assert set(record) == set(KEYS), record.get("id")
        for key, kind in KEYS.items():
            assert type(record[key]) is kind, (record["id"], key)
        assert record["answers"] and all(type(a) is str for a in record["answers"]), record["id"]
        assert all(type(c) is str for c in record["choices"]), record["id"]
        assert record["question"].endswith("?"), record["id"]


def test_ids_are_unique_and_prefixed(records):
    ids = [record["id"] for record in records]
    assert [i for i, n in Counter(ids).items() if n > 1] == []
    assert all(re.fullmatch(r"[a-z]+-\d{3}", i) for i in ids)
    prefixes = {}
    for record in records:             # one prefix per category, so an id says its category
        prefixes.setdefault(record["category"], set()).add(record["id"].split("-")[0])
    assert all(len(p) == 1 for p in prefixes.values()), prefixes


def test_questions_are_unique_after_normalisation(records):
    keys = [" ".join(record["question"].lower().split()) for record in records]
    assert [q for q, n in Counter(keys).items() if n > 1] == []


def test_categories_are_known_and_each_has_at_least_20(records):
    counts = Counter(record["category"] for record in records)
    assert set(counts) <= CATEGORIES, set(counts) - CATEGORIES
    assert set(counts) == CATEGORIES, CATEGORIES - set(counts)
    assert min(counts.values()) >= 20, counts


def test_choices_are_four_distinct_options_with_the_canonical_answer_correct(records):
    for record in records:
        choices = record["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, record["id"]
        assert len({_normalize(c) for c in choices}) == 4, record["id"]
        assert 0 <= record["correct"] < 4, record["id"]
        assert choices[record["correct"]] == record["answers"][0], record["id"]


def test_no_distractor_normalises_to_an_accepted_answer(records):
    for record in records:
        accepted = {_normalize(a) for a in record["answers"]}
        distractors = [c for i, c in enumerate(record["choices"]) if i != record["correct"]]
        assert [d for d in distractors if _normalize(d) in accepted] == [], record["id"]


def test_answers_normalise_to_distinct_non_empty_fixed_points(records):
    for record in records:
        normalised = [_normalize(a) for a in record["answers"]]
        assert all(normalised), record["id"]
        assert all(_normalize(n) == n for n in normalised), record["id"]
        assert len(set(normalised)) == len(normalised), (record["id"], normalised)


def test_answers_use_only_words_and_plain_numbers(records):
    # no punctuation whose handling the spec leaves open (see _ANSWER), no thousands separators
    bad = [a for a in all_answers(records) if not _ANSWER.fullmatch(a)]
    assert bad == []


def test_correct_position_is_balanced_within_each_category(records):
    by_category = {}
    for record in records:
        by_category.setdefault(record["category"], Counter())[record["correct"]] += 1
    for category, positions in by_category.items():
        counts = [positions[i] for i in range(4)]
        assert max(counts) - min(counts) <= 1, (category, counts)


def test_bundled_file_is_what_the_generator_writes(records):
    script = REPO / "scripts" / "make_knowledge.py"
    if not script.exists():
        pytest.skip(f"{script} is not in this checkout (only the jsonl ships in the wheel)")
    spec = importlib.util.spec_from_file_location("make_knowledge", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == records, "run `python scripts/make_knowledge.py` and commit the jsonl"
