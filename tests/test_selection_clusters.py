"""Embedding selectors (prunekit.selection.clusters / entropy / embed): k-means on planted clusters,
duplicates dropped first by the concept-cluster selector, one pick per tight group first by the greedy
cover, exact budgets, determinism, the embedding hook (shape, padding-invariance, compact storage,
resumable runs) and the command line with a saved tiny model."""
import json

import pytest
import torch

from conftest import llama, word_tokenizer
from prunekit.selection import clusters, embed, entropy
from prunekit.selection.select import report_path, select

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def write_pool(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def distinct_texts(count):
    """`count` (< 676) different three-word texts of WORDS (the first two words tell them apart)."""
    return [f"{WORDS[i % 26]} {WORDS[i // 26 % 26]} {WORDS[(i * 7 + 3) % 26]}" for i in range(count)]


def groups(sizes, dim=16, spread=1e-3, seed=0):
    """Tight groups of points in `dim` dimensions, far apart (random directions of length 10), rows
    shuffled; returns (points, group of each row)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=generator)
    centres = 10 * centres / centres.norm(dim=1, keepdim=True)
    points = torch.cat([c + spread * torch.randn(n, dim, generator=generator) for c, n in zip(centres, sizes)])
    labels = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    perm = torch.randperm(len(points), generator=generator)
    return points[perm], labels[perm].tolist()


def test_kmeans_finds_planted_clusters_deterministically():
    generator = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = torch.cat([c + 0.7 * torch.randn(40, 2, generator=generator) for c in centres])
    planted = torch.arange(4).repeat_interleave(40)
    for seed in (0, 1, 2):
        centroids, labels = clusters.kmeans(points, 4, seed=seed)
        assert len(centroids) == 4
        for g in range(4):                                        # each planted cluster is one found cluster
            assert len(set(labels[planted == g].tolist())) == 1
        assert len(set(labels.tolist())) == 4
        again_c, again_l = clusters.kmeans(points, 4, seed=seed)
        assert torch.equal(labels, again_l) and torch.equal(centroids, again_c)
    _, few = clusters.kmeans(torch.zeros(5, 2), 3)                 # fewer distinct points than k
    assert few.tolist() == [0] * 5


def test_clusters_order_drops_duplicates_first_and_follows_complexity():
    """Three concepts: A is 30 copies of one point, B 30 tight points, C 30 spread points. The order keeps
    one copy of A, then prefers the complex (spread) C over the tight B, and puts A's copies last."""
    generator = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(16)[:3]
    a = centres[0].repeat(30, 1)
    b = centres[1] + 0.2 * torch.randn(30, 16, generator=generator)
    c = centres[2] + 2.0 * torch.randn(30, 16, generator=generator)
    points = torch.cat([a, b, c]).half()
    options = {"embeddings": points, "clusters": 3, "seed": 0}
    priority, labels = clusters.order_and_labels(None, [1] * 90, options)
    assert sorted(priority) == list(range(90))
    assert len({labels[i] for i in range(30)}) == 1 and len(set(labels)) == 3
    assert set(priority[-29:]) < set(range(30))                   # 29 copies of A: last
    assert sum(i < 30 for i in priority[:61]) == 1                # one representative of A among the first 61
    first = priority[:30]
    assert sum(i >= 60 for i in first) > sum(30 <= i < 60 for i in first)
    assert len(options["complexity"]) == 3
    assert clusters.order(None, [1] * 90, {"embeddings": points, "clusters": 3}) == priority
    with pytest.raises(ValueError, match="embeddings"):
        clusters.order(None, [1] * 4, {})


def test_entropy_first_picks_cover_each_group_once():
    sizes = [7, 6, 5, 4, 3]
    points, group = groups(sizes)
    order = entropy.order(None, [1] * len(group), {"embeddings": points.half()})
    assert sorted(order) == list(range(len(group)))
    assert [group[i] for i in order[:5]] == [0, 1, 2, 3, 4]        # biggest neighbourhood first, one each
    assert sorted(group[i] for i in order[5:10]) == [0, 1, 2, 3, 4]  # the second round: one more of each
    assert entropy.order(None, [1] * len(group), {"embeddings": points.half()}) == order


def test_greedy_cover_ties_go_to_the_lowest_index():
    import numpy as np
    covers = [np.array([0, 1]), np.array([0, 1]), np.array([2, 3]), np.array([2, 3]), np.array([4])]
    assert entropy.greedy_cover(covers) == [0, 2, 4, 1, 3]


def test_embed_batch_shape_padding_and_projection():
    texts = ["the cat sat on the mat", "dog", "the dog sat on the log and the cat"]
    tokenizer = word_tokenizer(texts)
    model = llama()
    vectors = embed.embed_batch(texts, model, tokenizer, {})
    assert vectors.shape == (3, 64) and vectors.dtype == torch.float32
    for i, text in enumerate(texts):                               # padding changes nothing
        alone = embed.embed_batch([text], model, tokenizer, {})[0]
        assert torch.allclose(vectors[i], alone, atol=1e-4)
    assert embed.embed_batch([""], model, tokenizer, {}).abs().sum() == 0
    reduced = embed.project(vectors, 16, seed=0)
    assert reduced.shape == (3, 16) and reduced.dtype == torch.float16
    assert torch.equal(reduced, embed.project(vectors, 16, seed=0))
    assert not torch.equal(reduced, embed.project(vectors, 16, seed=1))
    assert embed.project(vectors, 64).shape == (3, 64)             # already small enough: kept as is
    with pytest.raises(ValueError, match="between 1 and 1024"):
        embed.project(vectors, 1025)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    texts = distinct_texts(60) + ["the quick brown fox jumps over the lazy dog"]
    return llama(), word_tokenizer(texts)


def test_clusters_remove_duplicates_from_a_pool(tmp_path, model_and_tokenizer):
    """Five texts repeated 12 times among 60 distinct texts: at a budget below the number of distinct texts,
    the selection keeps at most one copy of each repeated text; random selection keeps many."""
    model, tokenizer = model_and_tokenizer
    repeated = distinct_texts(65)[60:]
    texts = distinct_texts(60) + repeated * 12
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    source = write_pool(tmp_path / "p.jsonl", [texts[i] for i in order])
    report = select(source, "clusters", "0.4", tmp_path / "s.jsonl", model=model, tokenizer=tokenizer,
                    progress=False)
    kept = read(tmp_path / "s.jsonl")
    assert report["samples"]["kept"] == len(kept) == round(0.4 * report["samples"]["pool"])
    for text in repeated:
        assert sum(r["text"] == text for r in kept) <= 1
    assert all("cluster" in r for r in kept)
    assert sum(row["kept"] for row in report["clusters"]) == len(kept)
    assert sum(row["size"] for row in report["clusters"]) == report["samples"]["pool"]
    select(source, "random", "0.4", tmp_path / "r.jsonl", progress=False)
    assert max(sum(r["text"] == t for r in read(tmp_path / "r.jsonl")) for t in repeated) > 1


@pytest.mark.parametrize("method", ["clusters", "entropy"])
def test_budgets_are_exact_and_selection_is_deterministic(tmp_path, model_and_tokenizer, method):
    model, tokenizer = model_and_tokenizer
    source = write_pool(tmp_path / "p.jsonl", distinct_texts(50) * 2)
    first = select(source, method, "0.3", tmp_path / "a.jsonl", model=model, tokenizer=tokenizer, progress=False)
    assert first["samples"] == {"pool": 90, "kept": 27, "dropped": 63}
    select(source, method, "0.3", tmp_path / "b.jsonl", model=model, tokenizer=tokenizer, progress=False)
    assert read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")
    counted = select(source, method, "11 samples", tmp_path / "c.jsonl", model=model, tokenizer=tokenizer,
                     progress=False)
    assert counted["samples"]["kept"] == 11 == len(read(tmp_path / "c.jsonl"))
    tokens = select(source, method, "40 tokens", tmp_path / "d.jsonl", model=model, tokenizer=tokenizer,
                    progress=False)
    assert 0 < tokens["tokens"]["kept"] <= 40
    assert "embeddings" not in first["options"]
    with pytest.raises(ValueError, match="pass --model"):
        select(source, method, "0.3", tmp_path / "e.jsonl", progress=False)


def test_embeddings_resume_from_the_run_dir(tmp_path, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    source = write_pool(tmp_path / "p.jsonl", distinct_texts(40))
    run = tmp_path / "run"
    select(source, "clusters", "0.5", tmp_path / "a.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
           progress=False)
    lines = (run / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 36 and len(json.loads(lines[0])["embedding"]) == embed.DIM
    (run / "scores.jsonl").write_text("\n".join(lines[:20]) + "\n" + lines[20][:9])   # interrupted mid-line
    calls = []
    real = clusters.embed_batch
    monkeypatch.setattr(clusters, "embed_batch", lambda texts, *a: calls.append(len(texts)) or real(texts, *a))
    select(source, "clusters", "0.5", tmp_path / "b.jsonl", model=model, tokenizer=tokenizer, run_dir=run,
           progress=False)
    assert sum(calls) == 16 and read(tmp_path / "a.jsonl") == read(tmp_path / "b.jsonl")


def test_embeddings_are_stored_compactly():
    """The stored form is float16 of `embed_dim` dimensions: 64 bytes per sample by default."""
    from array import array
    stored = array("H")
    stored.frombytes(embed.project(torch.randn(1000, 64), 32).numpy().tobytes())
    assert stored.itemsize * len(stored) / 1000 == 2 * embed.DIM == 64


def test_cli_select_clusters_and_report(tmp_path, tiny_model_dir, capsys):
    from prunekit.cli import main
    texts = [f"the {w} of the {v} is in the module" for w in ("object", "value", "class", "function", "name",
                                                               "exception") for v in ("statement", "pattern", "code",
                                                                                      "list")]
    source = write_pool(tmp_path / "p.jsonl", texts + texts[:6] * 3)
    out = tmp_path / "X.jsonl"
    assert main(["data", "select", str(source), "--method", "clusters", "--model", str(tiny_model_dir),
                 "--budget", "0.5", "--out", str(out), "--clusters", "3"]) == 0
    report = json.loads(report_path(out).read_text())
    assert report["samples"]["kept"] == round(0.5 * report["samples"]["pool"]) == len(read(out))
    assert len(report["clusters"]) == 3                          # the tiny tokenizer knows these words
    capsys.readouterr()
    assert main(["data", "report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clusters (kept / dropped of each)" in printed and "cluster 0: kept" in printed
    # the report with its plots: kept and dropped per cluster, drawn from the report record
    assert main(["report", str(out)]) == 0
    page = (tmp_path / "X.jsonl.report.html").read_text()
    assert 'id="fig-selection-clusters"' in page and (tmp_path / "X.jsonl.figures" / "selection-clusters.png").exists()
    markdown = (tmp_path / "X.jsonl.report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(line.split("|")[3]) for line in rows] == [c["kept"] for c in report["clusters"]]
    capsys.readouterr()
    assert main(["report", str(source)]) != 0                   # a .jsonl without a selection report beside it
    assert "p.jsonl.report.json beside it" in capsys.readouterr().err
    assert main(["data", "select", str(source), "--method", "entropy", "--model", str(tiny_model_dir),
                 "--budget", "5 samples", "--out", str(tmp_path / "E.jsonl")]) == 0
    assert len(read(tmp_path / "E.jsonl")) == 5 and "coverage radius" in capsys.readouterr().out
    assert main(["data", "select", str(source), "--method", "clusters", "--model", str(tiny_model_dir),
                 "--budget", "0.5", "--out", str(tmp_path / "Y.jsonl"), "--clusters", "0"]) != 0
