"""The two offline text domains, code (stdlib source) and prose (stdlib docs, the default corpus), and
`prunekit eval --domains`, which reports the perplexity on both.

A pruning calibrated on one domain is judged on both, so the domains must be real (code looks like
code, prose does not), deterministic, split without overlap, and not share text with each other.
"""
import ast
import json
import platform
import random
import re

import pytest
import torch
from transformers import AutoTokenizer

from prunekit import data
from prunekit.cli import main
from prunekit.data import calibration_data, evaluation_data, load_text, strip_docstrings

DEF_LINE = re.compile(r"\s*(async\s+)?def \w+\(")


def both_splits(source):
    return [load_text(source, split) for split in data.SPLITS]


def share_of_def_lines(text):
    lines = [line for line in text.split("\n") if line.strip()]
    return sum(bool(DEF_LINE.match(line)) for line in lines) / len(lines)


def sampled_overlap(text, other, samples=500, width=100, seed=0):
    """How many of `samples` random `width`-character pieces of `text` occur verbatim in `other`."""
    rng = random.Random(seed)
    return sum(text[i: i + width] in other for i in (rng.randrange(len(text) - width) for _ in range(samples)))


# ----------------------------------------------------------------------------------- the code corpus

def test_code_corpus_is_deterministic_python_and_versioned():
    (cal, cal_desc), (ev, ev_desc) = both_splits("code")
    assert 500_000 < len(cal) + len(ev) <= data.CODE_CHARS
    assert 0.03 < len(ev) / (len(cal) + len(ev)) < 0.2                # about a tenth is held out
    assert cal_desc.startswith(f"stdlib code, Python {platform.python_version()}; calibration")
    assert "evaluation" in ev_desc
    assert share_of_def_lines(cal) > 0.03 and share_of_def_lines(ev) > 0.03
    assert "import " in cal and "return " in cal
    data._code_documents.cache_clear()                                  # rebuild from scratch: same text
    assert both_splits("code") == [(cal, cal_desc), (ev, ev_desc)]


def test_code_splits_are_disjoint():
    (cal, _), (ev, _) = both_splits("code")
    assert sampled_overlap(ev, cal) == 0 and sampled_overlap(cal, ev) == 0
    cal_blocks = {b.strip() for b in cal.split("\n\n") if len(b.strip()) >= 64}
    assert not [b for b in ev.split("\n\n") if b.strip() in cal_blocks]


def test_code_and_prose_are_different_domains():
    code = "\n\n".join(text for text, _ in both_splits("code"))
    prose = "\n\n".join(text for text, _ in both_splits("prose"))
    assert sampled_overlap(code, prose) == 0 and sampled_overlap(prose, code) == 0   # docstrings are prose only
    assert share_of_def_lines(prose) < 0.005 < 0.03 < share_of_def_lines(code)


def test_prose_is_another_name_of_default(tiny_model_dir):
    assert both_splits("prose") == both_splits("default")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prose, default = evaluation_data(tokenizer, "prose", 200), evaluation_data(tokenizer, "default", 200)
    assert prose.protocol == default.protocol and prose.protocol["source"] == "default"
    assert torch.equal(prose.ids, default.ids)
    assert torch.equal(calibration_data(tokenizer, "prose", samples=2, seqlen=16),
                       calibration_data(tokenizer, "default", samples=2, seqlen=16))


def test_calibration_and_evaluation_tokens_from_code(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)          # the tokenizer of the CLI tests
    windows = calibration_data(tokenizer, "code", samples=4, seqlen=32, seed=0)
    assert windows.shape == (4, 32) and windows.dtype == torch.long
    assert torch.equal(windows, calibration_data(tokenizer, "code", samples=4, seqlen=32, seed=0))
    assert 0 <= int(windows.min()) and int(windows.max()) < len(tokenizer)
    held_out = evaluation_data(tokenizer, "code", max_tokens=100)
    assert len(held_out) == 100 and held_out.protocol["source"] == "code"
    assert held_out.protocol["python"] == platform.python_version()
    assert "docstrings removed" in held_out.protocol["corpus"]


def test_unknown_source_lists_the_domains():
    with pytest.raises(ValueError, match='"prose".*"code"'):
        load_text("kode", "calibration")


# ----------------------------------------------------------------------------------- how it is built

def test_strip_docstrings_keeps_code_comments_and_other_strings():
    source = ('#!/usr/bin/env python\n'
              '"""Module docstring,\n\non several lines."""\n'
              'import os  # a comment stays\n'
              'TEMPLATE = """not a docstring"""\n\n'
              'class Empty(Exception):\n    """Only a docstring."""\n\n'
              'class Point:\n    "Point docstring."\n    x = 0\n\n'
              '    def norm(self):\n        """Method docstring."""\n        return abs(self.x)\n\n'
              'def f(s="é"): "one-liner docstring after a non-ASCII default"; return s\n'
              'def g():  # déjà vu\n    """Docstring after a non-ASCII comment."""\n    return 1\r\n')
    stripped = strip_docstrings(source)
    assert "docstring" not in stripped.replace("not a docstring", "")
    assert "# a comment stays" in stripped and 'TEMPLATE = """not a docstring"""' in stripped
    assert "class Empty(Exception):\n    pass\n" in stripped
    assert "class Point:\n    x = 0\n" in stripped and "def norm(self):\n        return abs(self.x)" in stripped
    assert 'def f(s="é"): pass; return s' in stripped and "\r" not in stripped      # columns count bytes
    ast.parse(stripped)                                                   # still valid Python
    assert strip_docstrings(stripped) == stripped


def test_code_corpus_reads_utf8_sources_and_skips_tests(tmp_path, monkeypatch):
    stdlib = tmp_path / "stdlib"
    skipped = ["test/test_x.py", "idlelib/idle_test/test_y.py", "lib2to3/tests/z.py", "encodings/cp.py",
               "site-packages/pkg.py"]
    for relative in skipped:
        (stdlib / relative).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / relative).write_text(f"SKIPPED = {relative!r}\n")
    (stdlib / "alpha.py").write_text('"""Alpha docstring."""\nimport sys\n\n\ndef alpha():\n    return sys.argv\n')
    (stdlib / "beta.py").write_bytes(b"# -*- coding: latin-1 -*-\nNAME = '\xe9t\xe9'\n")   # not UTF-8
    (stdlib / "broken.py").write_text("def (:\n")
    (stdlib / "empty.py").write_text('"""Only a module docstring."""\n')
    (stdlib / "gamma.py").write_text("\n\n".join(f"def gamma_{i}():\n    return {i}" for i in range(200)))
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    docs, about = data._code_documents.__wrapped__(file_chars=500)    # bypass the process-wide cache
    assert docs[0] == "import sys\n\n\ndef alpha():\n    return sys.argv"
    assert docs[1].startswith("def gamma_0():\n    return 0\n\ndef gamma_1()") and len(docs[1]) <= 500
    assert len(docs) == 2 and "SKIPPED" not in "".join(docs) and "source of 2 stdlib modules" in about


def test_code_order_spreads_the_cap_over_the_sorted_list():
    assert data._code_order(list(range(12)), step=5) == [0, 5, 10, 1, 6, 11, 2, 7, 3, 8, 4, 9]


# ----------------------------------------------------------------------------------- the command line

FAST = ["--seqlen", "32", "--max-tokens", "320"]


def test_eval_domains_reports_code_and_prose_with_protocols(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir), "--domains", *FAST, "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    code = next(line for line in printed.splitlines() if line.startswith("perplexity on code: "))
    prose = next(line for line in printed.splitlines() if line.startswith("perplexity on prose: "))
    assert "[source=code (stdlib code, Python" in code and "[source=default (stdlib docs, Python" in prose
    for line in (code, prose):
        assert "split=evaluation (first 320 of" in line and "seqlen=32" in line and "tokens scored=" in line
    result = json.loads(report.read_text())
    assert list(result["domains"]) == ["code", "prose"] and "perplexity" not in result
    assert result["domains"]["code"]["source"]["source"] == "code"
    assert result["domains"]["prose"]["source"]["source"] == "default"
    assert all(r["ppl"] > 1 and r["tokens"] == 320 for r in result["domains"].values())


def test_eval_domains_with_a_baseline_measures_the_dense_model_on_each_domain(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--domains", *FAST,
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "perplexity on code (dense baseline): " in printed and "perplexity on prose (dense baseline): " in printed
    assert printed.count("(1.000x dense)") == 2
    domains = json.loads(report.read_text())["domains"]
    assert domains["code"]["ppl"] == domains["code"]["baseline"]["ppl"]        # compared with itself
    assert domains["code"]["source"]["sha256"] != domains["prose"]["source"]["sha256"]


def test_calibrating_on_code_from_the_command_line(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--calib", "code",
                 "--no-eval", "--samples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    assert json.loads((out / "prunekit.json").read_text())["calibration"]["source"] == "code"


@pytest.mark.parametrize("extra, message", [
    (["--data", "wikitext2"], "--data wikitext2 would not be used"),
    (["--suite", "knowledge"], "add perplexity to --suite"),
])
def test_eval_domains_refuses_what_it_would_ignore(tiny_model_dir, capsys, extra, message):
    assert main(["eval", str(tiny_model_dir), "--domains", *extra]) == 2
    assert message in capsys.readouterr().err
