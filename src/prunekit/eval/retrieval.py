"""An offline code-retrieval task for LLMs used as text encoders (`prunekit.encoders`).

The paper this serves (arXiv 2410.14578) evaluates pruned LLM encoders on MTEB; prunekit works
offline, so its retrieval task is built from the same place as its default corpora: the Python
standard library's own `.py` files (`data._stdlib_sources`: no test suites, idlelib, lib2to3,
encodings or site-packages; read with `ast`, never imported).

    pair       one documented function or class (module level, or inside a class, as
               `data._docstrings` walks them): query = the first sentence of its docstring,
               document = its body without the docstring (the statements after it, dedented, with
               nested docstrings removed by `data.strip_docstrings`, cut at DOC_CHARS characters)
    filters    queries of at least QUERY_WORDS words and at most QUERY_CHARS characters; documents
               of at least DOC_MIN_CHARS characters; a pair whose query or document text occurred
               earlier (sorted path order) is dropped, so every query has exactly one correct
               document and no text is in both splits
    split      by source file: every EVAL_EVERY-th file of the sorted stdlib list (the 10th, 20th,
               ...) is held out for evaluation, all others give training pairs (fine-tuning and
               L3Prune's loss). A class and its methods come from the same file, so a method's body
               (part of its class's body) never crosses the split.
    recall@k   each evaluation query against every evaluation document (cosine of L2-normalised
               embeddings); a query counts when fewer than k other documents score at least as high
               as its own (ties count against it, so a model that embeds everything alike scores 0,
               not 1).

The pairs depend on the Python version, which every protocol records.
"""
from __future__ import annotations

import ast
import functools
import gc
import platform
import random
import re
import sysconfig
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

from ..data import EVAL_EVERY, _stdlib_sources, strip_docstrings

SPLITS = ("training", "evaluation")
QUERY_WORDS = 3           # a query has at least this many words
QUERY_CHARS = 300         # and at most this many characters
DOC_MIN_CHARS = 40        # a document has at least this many characters
DOC_CHARS = 2000          # and is cut (at a line end) to at most this many
EVAL_LIMIT = 200          # evaluation pairs `recall_at_k` draws by default (CPU-sized)
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class Pair(NamedTuple):
    """One retrieval item: `query` should find `document`; `origin` is "path.py:Qualified.name"."""
    query: str
    document: str
    origin: str


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence: its first paragraph on one line, up to the first '.', '!' or
    '?' that ends a sentence (followed by a space or the end)."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.search(r"[.!?](\s|$)", paragraph)
    return paragraph[:match.end()].strip() if match else paragraph


def _body(lines: list[str], node) -> str:
    """The statements after `node`'s docstring, dedented, nested docstrings removed, capped."""
    rest = node.body[1:]
    start = min([rest[0].lineno] + [d.lineno for d in getattr(rest[0], "decorator_list", [])]) - 1
    text = textwrap.dedent("\n".join(lines[start:node.end_lineno]))
    try:
        text = strip_docstrings(text)
    except (SyntaxError, ValueError):            # a body that does not parse alone: keep it as it is
        pass
    text = "\n".join(line for line in text.split("\n") if line.strip()).strip("\n")
    if len(text) > DOC_CHARS:
        cut = text.rfind("\n", 0, DOC_CHARS)
        text = text[:cut if cut > 0 else DOC_CHARS]
    return text


def _file_pairs(path: Path, name: str) -> list[Pair]:
    try:
        source = path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):                 # UnicodeDecodeError is a ValueError
        return []
    lines = source.split("\n")
    out = []

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if not isinstance(child, _DEFS):
                continue
            qualname = f"{prefix}{child.name}"
            doc = ast.get_docstring(child, clean=True)
            if doc and len(child.body) > 1:
                query, document = first_sentence(doc), _body(lines, child)
                if (len(query.split()) >= QUERY_WORDS and len(query) <= QUERY_CHARS
                        and len(document) >= DOC_MIN_CHARS):
                    out.append(Pair(query, document, f"{name}:{qualname}"))
            if isinstance(child, ast.ClassDef):
                visit(child, qualname + ".")

    visit(tree, "")
    return out


@functools.lru_cache(maxsize=1)
def _all_pairs() -> tuple[dict[str, tuple[Pair, ...]], dict]:
    """Both splits, built once per process, and what they were built from."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = _stdlib_sources(root) if root.is_dir() else []
    splits: dict[str, list[Pair]] = {split: [] for split in SPLITS}
    seen_queries: set[str] = set()
    seen_documents: set[str] = set()
    candidates = files = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()                    # as in data._default_documents: ast.parse allocates many nodes
    try:
        for index, path in enumerate(paths):
            split = "evaluation" if (index + 1) % EVAL_EVERY == 0 else "training"
            found = _file_pairs(path, path.relative_to(root).as_posix())
            files += bool(found)
            for pair in found:
                candidates += 1
                if pair.query in seen_queries or pair.document in seen_documents:
                    continue
                seen_queries.add(pair.query)
                seen_documents.add(pair.document)
                splits[split].append(pair)
    finally:
        if gc_was_enabled:
            gc.enable()
    if not splits["evaluation"] or not splits["training"]:
        raise RuntimeError(f"the retrieval task is empty: no documented functions in stdlib sources under {root}")
    about = {"source": f"documented functions and classes of the Python {platform.python_version()} standard "
                       f"library ({files} of {len(paths)} .py files under {root}, read with ast)",
             "query": "first sentence of the docstring",
             "document": f"the body without its docstring (nested docstrings removed, at most {DOC_CHARS} "
                         "characters)",
             "split_rule": f"by source file: every {EVAL_EVERY}th file of the sorted list is evaluation, the "
                           "rest training; pairs whose query or document text occurred earlier are dropped",
             "candidates": candidates,
             "pairs": {split: len(found) for split, found in splits.items()}}
    return {split: tuple(found) for split, found in splits.items()}, about


def retrieval_pairs(split: str = "evaluation", limit: int | None = None, seed: int = 0) -> list[Pair]:
    """The pairs of `split` ("training" or "evaluation"), all of them in sorted-path order, or a
    seeded random sample of `limit` of them (same seed, same sample)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    pairs = list(_all_pairs()[0][split])
    if limit is None:
        return pairs
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive number of pairs (or None for all), got {limit!r}")
    if limit >= len(pairs):
        return pairs
    return random.Random(seed).sample(pairs, limit)


def task_description() -> dict:
    """How the task is built (source, split rule, pair counts), for reports."""
    return dict(_all_pairs()[1])


def recall_at_k(model, tokenizer, k: Sequence[int] | int = (1, 10), *, pairs: Sequence | None = None,
                limit: int | None = EVAL_LIMIT, seed: int = 0, pooling: str = "mean", batch_size: int = 16,
                max_length: int | None = None) -> dict:
    """Recall@k of `model` as an encoder: {"recall@1": ..., "recall@10": ..., "protocol": {...}}.

    `pairs`: (query, document) pairs to use instead of the task's evaluation split (then `limit`
    and `seed` are not used). The protocol beside the numbers says what they were measured on:
    counts, source, split rule, pooling, tokens per text and the tie rule."""
    from ..encoders import MAX_LENGTH, embed
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise ValueError(f"k must be positive integers, e.g. k=(1, 10); got {k!r}")
    max_length = MAX_LENGTH if max_length is None else max_length
    if pairs is None:
        chosen = retrieval_pairs("evaluation", limit, seed)
        protocol = {**task_description(), "split": "evaluation",
                    "sample": "all pairs" if limit is None else f"seeded random sample of {limit} (seed {seed})"}
    else:
        chosen = list(pairs)
        protocol = {"source": "pairs given by the caller"}
    if not chosen:
        raise ValueError("no pairs to evaluate")
    if max(ks) > len(chosen):
        raise ValueError(f"k={max(ks)} is larger than the corpus of {len(chosen)} documents; lower k or evaluate "
                         "more pairs (limit)")
    queries = embed(model, tokenizer, [p[0] for p in chosen], pooling=pooling, batch_size=batch_size,
                    max_length=max_length)
    documents = embed(model, tokenizer, [p[1] for p in chosen], pooling=pooling, batch_size=batch_size,
                      max_length=max_length)
    scores = queries @ documents.T                                    # (queries, documents) cosines
    own = scores.diagonal().unsqueeze(1)
    rank = (scores >= own).sum(1) - 1                                 # other documents at least as close
    result = {f"recall@{x}": float((rank < x).float().mean()) for x in ks}
    result["protocol"] = {**protocol, "queries": len(chosen), "documents": len(chosen), "pooling": pooling,
                          "max_length_tokens": max_length, "similarity": "cosine",
                          "ties": "a document scoring as high as the correct one ranks before it"}
    return result
