"""The offline code-retrieval task (docstring first sentence -> body) and recall@k."""
import textwrap

import pytest
from conftest import llama, word_tokenizer

from prunekit.eval import retrieval
from prunekit.eval.retrieval import first_sentence, recall_at_k, retrieval_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["return the sum of two numbers", "open a file and read its lines", "sort the list in place",
         "parse a date from a string", "close the socket and free the buffer", "send the message to the server",
         "compute the hash of the data", "split the path into head and tail", "join the words with a space",
         "check whether the key is in the table", "count the calls made to the function", "write the bytes to disk"]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(TEXTS)


def _file(origin: str) -> str:
    return origin.split(":")[0]


def test_splits_do_not_overlap():
    train, held_out = retrieval_pairs("training"), retrieval_pairs("evaluation")
    assert len(train) > 1000 and len(held_out) > 100
    assert not {_file(p.origin) for p in train} & {_file(p.origin) for p in held_out}     # split by source file
    assert not {p.query for p in train} & {p.query for p in held_out}
    assert not {p.document for p in train} & {p.document for p in held_out}
    everything = train + held_out
    assert len({p.query for p in everything}) == len(everything)          # one correct document per query
    assert len({p.document for p in everything}) == len(everything)
    assert not [p.origin for p in everything if p.query in p.document]   # the docstring is not in the document


def test_split_follows_the_file_rule():
    import sysconfig
    from pathlib import Path

    from prunekit.data import EVAL_EVERY, _stdlib_sources
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [p.relative_to(root).as_posix() for p in _stdlib_sources(root)]
    held_out = {names.index(_file(p.origin)) for p in retrieval_pairs("evaluation")}
    trained = {names.index(_file(p.origin)) for p in retrieval_pairs("training")}
    assert all((i + 1) % EVAL_EVERY == 0 for i in held_out)
    assert not any((i + 1) % EVAL_EVERY == 0 for i in trained)


def test_pairs_are_deterministic():
    first = retrieval_pairs("evaluation", 40, seed=3)
    assert retrieval_pairs("evaluation", 40, seed=3) == first
    assert retrieval_pairs("evaluation", 40, seed=4) != first
    before = retrieval_pairs("training")
    retrieval._all_pairs.cache_clear()                                    # rebuilt from the files: the same
    assert retrieval_pairs("training") == before
    assert retrieval_pairs("evaluation", 40, seed=3) == first


def test_first_sentence():
    assert first_sentence("Return the sum. Raises on overflow.") == "Return the sum."
    assert first_sentence("Return x.y for\n    the object.\n\nMore text.") == "Return x.y for the object."
    assert first_sentence("No full stop here\n\nsecond paragraph.") == "No full stop here"
    assert first_sentence("Is it? Yes.") == "Is it?"


def test_file_pairs_on_a_planted_module(tmp_path):
    path = tmp_path / "planted.py"
    path.write_text(textwrap.dedent('''\
        """Module docstring."""


        def add(first, second):
            """Return the sum of two numbers. Longer text."""
            total = first + second  # a comment stays
            return total


        class Box:
            """A box that holds several items."""

            def put(self, item):
                """Put one item into the box."""
                self.items.append(item)
                return len(self.items)


        def short(x):
            """Too short."""
            return x


        def bare(x):
            """Only a docstring and nothing else."""
    '''))
    pairs = retrieval._file_pairs(path, "planted.py")
    by_name = {p.origin: p for p in pairs}
    assert set(by_name) == {"planted.py:add", "planted.py:Box", "planted.py:Box.put"}
    assert by_name["planted.py:add"].query == "Return the sum of two numbers."
    assert by_name["planted.py:add"].document == "total = first + second  # a comment stays\nreturn total"
    box = by_name["planted.py:Box"].document
    assert box.startswith("def put(self, item):") and "Put one item" not in box     # nested docstring removed
    assert by_name["planted.py:Box.put"].document == "self.items.append(item)\nreturn len(self.items)"


def test_recall_on_planted_pairs(tok):
    model = llama()
    same = recall_at_k(model, tok, (1, 10), pairs=[(t, t) for t in TEXTS])
    assert same["recall@1"] == 1.0 and same["recall@10"] == 1.0
    assert same["protocol"]["queries"] == len(TEXTS) and same["protocol"]["pooling"] == "mean"
    # each query's own document is another query's text: the identical text elsewhere always wins
    shifted = recall_at_k(model, tok, 1, pairs=[(t, TEXTS[(i + 1) % len(TEXTS)]) for i, t in enumerate(TEXTS)])
    assert shifted["recall@1"] == 0.0
    # every document alike: ties count against the query, so nothing is found at rank 1
    alike = recall_at_k(model, tok, (1, 12), pairs=[(t, "sort the list") for t in TEXTS])
    assert alike["recall@1"] == 0.0 and alike["recall@12"] == 1.0


def test_recall_matches_a_hand_count(tok):
    model = llama()
    pairs = [(t, TEXTS[(i + 3) % len(TEXTS)]) for i, t in enumerate(TEXTS)]
    from prunekit.encoders import embed
    q = embed(model, tok, [p[0] for p in pairs])
    d = embed(model, tok, [p[1] for p in pairs])
    scores = q @ d.T
    ranks = [int((scores[i] >= scores[i, i]).sum()) - 1 for i in range(len(pairs))]
    result = recall_at_k(model, tok, (1, 3, 5), pairs=pairs)
    for k in (1, 3, 5):
        assert result[f"recall@{k}"] == pytest.approx(sum(r < k for r in ranks) / len(pairs))


def test_recall_on_the_task_records_the_protocol(tok):
    model = llama()
    result = recall_at_k(model, tok, (1, 10), limit=20, max_length=16)
    protocol = result["protocol"]
    assert protocol["queries"] == 20 and protocol["split"] == "evaluation" and "seed 0" in protocol["sample"]
    assert "every 10th file" in protocol["split_rule"] and "standard library" in protocol["source"]
    assert 0 <= result["recall@1"] <= result["recall@10"] <= 1


def test_bad_input(tok):
    model = llama()
    pairs = [(t, t) for t in TEXTS]
    with pytest.raises(ValueError, match="larger than the corpus of 12 documents"):
        recall_at_k(model, tok, (1, 20), pairs=pairs)
    with pytest.raises(ValueError, match="positive integers"):
        recall_at_k(model, tok, (0, 1), pairs=pairs)
    with pytest.raises(ValueError, match="split"):
        retrieval_pairs("test")
    with pytest.raises(ValueError, match="limit"):
        retrieval_pairs("training", 0)
    with pytest.raises(ValueError, match="no pairs"):
        recall_at_k(model, tok, 1, pairs=[])
