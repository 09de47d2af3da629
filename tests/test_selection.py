"""Data selection (prunekit.selection): budgets, the streamed pool and its held-out side, the random and
perplexity selectors on hand-built cases, exact budgets, determinism, resumable scoring, bad input, and
memory that does not grow with the text of a large pool."""
import json
import math

import pytest

from conftest import llama, word_tokenizer
from prunekit.selection import perplexity, random as random_selector
from prunekit.selection.pool import Budget, Pool, parse_budget
from prunekit.selection.select import fill, report_path, select


def write_pool(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_budgets_parse_and_bad_ones_are_refused():
    assert parse_budget("0.2") == Budget("fraction", 0.2)
    assert parse_budget("500 samples") == Budget("samples", 500)
    assert parse_budget("20k tokens") == Budget("tokens", 20000) == parse_budget("20000t")
    for bad in ("0", "1.5", "0 samples", "2.5 tokens", "abc", "-3"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_the_pool_streams_the_calibration_side(tmp_path):
    pool = Pool(write_pool(tmp_path / "p.jsonl", [f"s{i}" for i in range(1, 31)] + ["", "  "]))
    assert list(pool) == [f"s{i}" for i in range(1, 31) if i % 10]          # s10, s20, s30 held out; blanks skipped
    txt = tmp_path / "d" / "a.txt"
    txt.parent.mkdir()
    txt.write_text("one\ntwo\n\nthree\n\n\nfour")
    assert list(Pool(tmp_path / "d")) == ["one\ntwo", "three", "four"]
    with pytest.raises(ValueError, match="'body' field"):
        list(Pool(tmp_path / "p.jsonl", text_field="body"))
    default = Pool("default")
    held_out = set()
    from prunekit import data
    docs, _ = data._default_documents()
    unique = list(dict.fromkeys(d for d in docs if d.strip()))
    held_out = {d for i, d in enumerate(unique) if i % 10 == 9}
    assert not held_out & set(default)


def test_random_selection_is_exact_and_seeded(tmp_path):
    source = write_pool(tmp_path / "p.jsonl", [f"sample {i} " + "word " * (i % 7) for i in range(200)])
    first = select(source, "random", "0.25", tmp_path / "a.jsonl", seed=1, progress=False)
    assert first["samples"] == {"pool": 180, "kept": 45, "dropped": 135}
    again = select(source, "random", "0.25", tmp_path / "b.jsonl", seed=1, progress=False)
    other = select(source, "random", "0.25", tmp_path / "c.jsonl", seed=2, progress=False)
    assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl") != read(tmp_path / "c.jsonl")
    assert first["samples"] == again["samples"] == other["samples"]
    kept = select(source, "random", "30 samples", tmp_path / "d.jsonl", progress=False)
    assert kept["samples"]["kept"] == 30 and report_path(tmp_path / "d.jsonl").is_file()


def test_a_token_budget_is_never_exceeded_and_nearly_filled():
    lengths = [5, 9, 3, 7, 2, 8]
    kept = fill([1, 0, 3, 5, 2, 4], lengths, Budget("tokens", 20))
    assert kept == [1, 0, 2, 4] and sum(lengths[i] for i in kept) == 19       # 7 and 8 skipped: they overflow
    with pytest.raises(ValueError, match="larger than the pool"):
        fill([0], [5], Budget("tokens", 6))
    with pytest.raises(ValueError, match="larger than the pool"):
        fill([0], [5], Budget("samples", 2))


def test_perplexity_bands_on_known_scores():
    scores = [3.0, 1.0, math.inf, 5.0, 2.0, 4.0]
    assert perplexity.order(scores, [1] * 6, {"band": "low"}) == [1, 4, 0, 5, 3, 2]
    assert perplexity.order(scores, [1] * 6, {"band": "high"}) == [3, 5, 0, 4, 1, 2]
    assert perplexity.order(scores, [1] * 6, {"band": "middle"})[:3] == [0, 4, 5]   # the median, then its neighbours
    assert perplexity.order(scores, [1] * 6, {"band": "middle"})[-1] == 2        # nothing to score: last
    with pytest.raises(ValueError, match="band"):
        perplexity.order(scores, [1] * 6, {"band": "top"})
    assert random_selector.order([0] * 4, [1] * 4, {"seed": 0}) == random_selector.order([0] * 4, [1] * 4, {"seed": 0})


def test_perplexity_scores_are_the_models_nll_and_gibberish_goes(tmp_path):
    """A model that has learned one sentence: its perplexity selector keeps that sentence and drops noise
    and one-token samples first (band low)."""
    import torch
    sentence = "the cat sat on the mat and the dog sat on the log"
    tokenizer = word_tokenizer([sentence, "zq xv kj wp mm qq"])
    model = llama()
    ids = torch.tensor([tokenizer.encode(sentence)] * 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    scores = perplexity.score_batch([sentence, "zq xv kj wp mm qq", "cat"], model, tokenizer, {})
    with torch.no_grad():
        expected = float(model(input_ids=ids[:1], labels=ids[:1]).loss)
    assert scores[0] == pytest.approx(expected, rel=1e-3) and scores[1] > scores[0] and scores[2] == math.inf
    texts = [sentence] * 4 + ["zq xv kj wp mm qq", "cat", sentence, "mm qq zq", sentence, "kj"]
    source = write_pool(tmp_path / "p.jsonl", texts)
    select(source, "perplexity", "5 samples", tmp_path / "s.jsonl", model=model, tokenizer=tokenizer,
           options={"band": "low"}, progress=False)
    assert {r["text"] for r in read(tmp_path / "s.jsonl")} == {sentence}


def test_scoring_resumes_from_the_run_dir(tmp_path, monkeypatch):
    source = write_pool(tmp_path / "p.jsonl", [f"text number {i}" for i in range(40)])
    run = tmp_path / "run"
    calls = []
    real = perplexity.score_batch
    monkeypatch.setattr(perplexity, "score_batch", lambda texts, *a: calls.append(len(texts)) or [1.0] * len(texts))
    select(source, "perplexity", "0.5", tmp_path / "a.jsonl", model=object(), run_dir=run, progress=False)
    assert sum(calls) == 36
    lines = (run / "scores.jsonl").read_text().splitlines()
    (run / "scores.jsonl").write_text("\n".join(lines[:20]) + "\n" + lines[20][:5])     # interrupted mid-line
    calls.clear()
    select(source, "perplexity", "0.5", tmp_path / "b.jsonl", model=object(), run_dir=run, progress=False)
    assert sum(calls) == 16 and read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")
    monkeypatch.setattr(perplexity, "score_batch", real)


def test_bad_input_is_refused_and_the_source_is_never_overwritten(tmp_path):
    source = write_pool(tmp_path / "p.jsonl", ["a b c"] * 5)
    before = source.read_text()
    with pytest.raises(ValueError, match="overwrite"):
        select(source, "random", "0.5", source, progress=False)
    with pytest.raises(ValueError, match="larger than the pool"):
        select(source, "random", "10 samples", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ValueError, match="pass --model"):
        select(source, "perplexity", "0.5", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        select(source, "random", "3 tokens", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ValueError, match="unknown selection method"):
        select(source, "oracle", "0.5", tmp_path / "o.jsonl", progress=False)
    with pytest.raises(ValueError, match=r"\.jsonl"):
        select(source, "random", "0.5", tmp_path / "o.txt", progress=False)
    with pytest.raises(FileNotFoundError):
        select(tmp_path / "missing.jsonl", "random", "0.5", tmp_path / "o.jsonl", progress=False)
    assert source.read_text() == before and not (tmp_path / "o.jsonl").exists()


def test_a_million_samples_stream_in_flat_memory(tmp_path):
    """1M samples of ~100 characters (about 100 MB of text): the selection holds a few numbers per sample,
    not the text; Python's peak allocation stays far below the text's size."""
    import tracemalloc
    source = tmp_path / "big.jsonl"
    with source.open("w") as handle:
        for i in range(1_000_000):
            handle.write('{"text": "sample %07d %s"}\n' % (i, "lorem ipsum dolor sit amet " * 3))
    tracemalloc.start()
    report = select(source, "random", "1000 samples", tmp_path / "s.jsonl", progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert report["samples"]["pool"] == 900_000 and report["samples"]["kept"] == 1000
    assert peak < 0.5 * source.stat().st_size, f"peak {peak / 2**20:.0f} MiB"


def test_cli_select_and_report(tmp_path, capsys):
    from prunekit.cli import main
    source = write_pool(tmp_path / "p.jsonl", [f"sample {i}" for i in range(30)])
    assert main(["data", "select", str(source), "--method", "random", "--budget", "10 samples", "--out",
                 str(tmp_path / "s.jsonl")]) == 0
    assert main(["data", "report", str(tmp_path / "s.jsonl")]) == 0
    assert "kept 10 of 27 samples" in capsys.readouterr().out
    assert main(["data", "select", str(source), "--method", "random", "--budget", "2", "--out",
                 str(tmp_path / "t.jsonl")]) != 0
    for bad, message in ((["--split-tokens", "8"], "pass --model"), (["--split-tokens", "0"], "at least 1")):
        assert main(["data", "select", str(source), "--method", "random", "--budget", "0.5", *bad, "--out",
                     str(tmp_path / "u.jsonl")]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "u.jsonl").exists()


def test_calibration_selection_picks_windows_of_the_pool(tiny_model_dir, tmp_path):
    import torch

    from prunekit.io.loading import load
    from prunekit.recipe import CALIBRATION_SELECTORS, Calibration
    from prunekit.selection import NAMES
    from prunekit.selection.select import SELECTORS
    from prunekit.selection.windows import select_windows
    assert set(CALIBRATION_SELECTORS) <= set(SELECTORS) and set(NAMES) == set(SELECTORS)
    model, tokenizer = load(str(tiny_model_dir))
    windows = torch.randint(3, 100, (12, 16), generator=torch.Generator().manual_seed(0))
    windows[6:] = windows[0]                                    # half the pool is one window repeated
    kept, line = select_windows(model, tokenizer, windows, "clusters", 4)
    assert kept.numel() == 4 and "kept 4 of 12" in line
    assert sum(torch.equal(windows[i], windows[0]) for i in kept.tolist()) <= 1
    with pytest.raises(ValueError, match="pool must be larger"):
        select_windows(model, tokenizer, windows, "random", 12)
    with pytest.raises(ValueError, match="calibration.select"):
        Calibration(select="oracle")
    with pytest.raises(ValueError, match="larger than samples"):
        Calibration(samples=8, select="random", pool=8)


def test_calibration_scores_are_kept_and_reused_for_the_same_model_and_pool(tiny_model_dir, tmp_path):
    import torch

    from prunekit.io.loading import load
    from prunekit.recipe import Calibration
    from prunekit.selection.windows import select_windows
    model, tokenizer = load(str(tiny_model_dir))
    windows = torch.randint(3, 100, (12, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    first, _ = select_windows(model, tokenizer, windows, "perplexity", 4, scores_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("perplexity-*/scores.jsonl"))) == 1
    calls.clear()
    again, _ = select_windows(model, tokenizer, windows, "perplexity", 4, scores_dir=tmp_path)
    assert torch.equal(first, again) and not calls                   # the kept scores, no model pass
    other = windows.clone()
    other[0] = 5
    select_windows(model, tokenizer, other, "perplexity", 4, scores_dir=tmp_path)       # another pool
    assert calls and len(list(tmp_path.glob("perplexity-*"))) == 2
    calls.clear()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)                          # another model (a pruned one, say)
    select_windows(model, tokenizer, windows, "perplexity", 4, scores_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("perplexity-*"))) == 3
    with pytest.raises(ValueError, match="set select too"):
        Calibration(scores=str(tmp_path))


def test_prune_with_calib_select(tiny_model_dir, tmp_path):
    from prunekit.cli import main
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "4",
                 "--seqlen", "16", "--calib-select", "perplexity", "--calib-pool", "12", "--calib-scores",
                 str(tmp_path / "scores"), "--no-eval", "--out", str(out)]) == 0
    assert len(list((tmp_path / "scores").glob("perplexity-*/scores.jsonl"))) == 1
    record = json.loads((out / "prunekit.json").read_text())
    chosen = record["calibration"]["select"]
    assert chosen["method"] == "perplexity" and chosen["pool"] == 12 and len(chosen["kept"]) == 4


def test_calibration_scores_are_refused_across_processes(tiny_model_dir, tmp_path, monkeypatch):
    from prunekit import api, distributed
    from prunekit.io.loading import load
    from prunekit.recipe import recipe_from_dict
    model, tokenizer = load(str(tiny_model_dir))
    recipe = recipe_from_dict({"model": str(tiny_model_dir), "steps": [{"method": "wanda", "sparsity": 0.5}],
                               "calibration": {"samples": 4, "seqlen": 16, "select": "perplexity", "pool": 8,
                                               "scores": str(tmp_path)}})
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="every process would append"):
        api._calibration(recipe, tokenizer, {}, lambda *_: None, model)
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    assert api._calibration(recipe, tokenizer, {}, lambda *_: None, model).shape == (4, 16)


def test_split_text_cuts_at_token_boundaries_and_joins_back_exactly():
    from prunekit.data import tokenize
    from prunekit.selection.pool import split_text
    text = "alpha beta, gamma delta.\nepsilon zeta eta theta iota kappa lambda mu"
    tokenizer = word_tokenizer([text])
    count = len(tokenize(tokenizer, text))
    assert count == 14                                         # the punctuation is a token
    pieces = split_text(text, tokenizer, 4)
    assert "".join(pieces) == text                              # slices of the text, nothing lost or added
    assert [len(tokenize(tokenizer, p)) for p in pieces] == [4, 4, 4, 2]
    assert split_text(text, tokenizer, 14) == [text] == split_text(text, tokenizer, 100)
    assert split_text("alpha beta   ", tokenizer, 1) == ["alpha ", "beta   "]
    with pytest.raises(ValueError, match="at least 1"):
        split_text(text, tokenizer, 0)


def test_a_split_pool_holds_out_whole_samples_and_a_budget_chooses_pieces(tmp_path):
    docs = [" ".join(f"d{d}w{i}" for i in range(31)) for d in range(20)]          # 31 words of its own each
    source = write_pool(tmp_path / "p.jsonl", docs)
    tokenizer = word_tokenizer(docs)
    with pytest.raises(ValueError, match="tokenizer"):
        Pool(source, split_tokens=8)
    pool = Pool(source, split_tokens=8, tokenizer=tokenizer)
    pieces = list(pool)
    assert len(pieces) == 18 * 4                                 # docs 10 and 20 held out whole, 31 = 8+8+8+7
    origin = lambda piece: piece.split()[0].split("w")[0]       # noqa: E731  (the document a piece is from)
    assert {origin(p) for p in pieces} == {f"d{d}" for d in range(20) if d not in (9, 19)}
    assert "split into pieces of at most 8 tokens" in pool.describe()
    whole = select(source, "random", "0.2", tmp_path / "whole.jsonl", tokenizer=tokenizer, progress=False)
    split = select(source, "random", "0.2", tmp_path / "split.jsonl", tokenizer=tokenizer, split_tokens=8,
                   progress=False)
    assert whole["samples"]["kept"] == 4 and split["samples"]["kept"] == 14     # 20% of 18 documents / 72 pieces
    assert split["tokens"]["pool"] == whole["tokens"]["pool"] == 18 * 31
    kept = [r["text"] for r in read(tmp_path / "split.jsonl")]
    assert len({origin(p) for p in kept}) > 4                  # pieces of more documents than 4 whole ones
    assert "split into pieces" in split["protocol"]
    again = select(source, "random", "240 tokens", tmp_path / "t.jsonl", tokenizer=tokenizer, split_tokens=8,
                   progress=False)
    assert 240 - 7 <= again["tokens"]["kept"] <= 240             # never over; short of it by less than a piece
    with pytest.raises(ValueError, match="--split-tokens"):
        select(source, "random", "0.2", tmp_path / "x.jsonl", split_tokens=8, progress=False)


def test_clusters_and_entropy_share_their_stored_embeddings(tiny_model_dir, tmp_path):
    """Both store only the model's embeddings, so the second of them reuses the first's scoring pass, for
    calibration windows (`--calib-scores`) as for `data select --run-dir`; other selectors are refused there."""
    import torch

    from prunekit.io.loading import load
    from prunekit.selection.windows import select_windows
    model, tokenizer = load(str(tiny_model_dir))
    windows = torch.randint(3, 100, (12, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))     # any pass of the model
    select_windows(model, tokenizer, windows, "clusters", 4, scores_dir=tmp_path)
    assert calls and [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["embedding"]
    calls.clear()
    select_windows(model, tokenizer, windows, "entropy", 4, scores_dir=tmp_path)
    assert not calls and len(list(tmp_path.iterdir())) == 1
    source = write_pool(tmp_path / "p.jsonl", [f"text number {i} of the pool" for i in range(12)])
    run = tmp_path / "run"
    select(source, "entropy", "0.5", tmp_path / "a.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
           progress=False)
    calls.clear()
    select(source, "clusters", "0.5", tmp_path / "b.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
           progress=False)
    assert not calls
    with pytest.raises(ValueError, match="holds scores of 'entropy', not 'perplexity'"):
        select(source, "perplexity", "0.5", tmp_path / "c.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
               progress=False)
