"""Calibration and evaluation text, turned into token tensors.

Pruning methods such as Wanda and SparseGPT need a few hundred windows of real text to
estimate activation statistics (*calibration*), and a pruned model is judged by its
perplexity on *held-out* text (*evaluation*). This module is the one place that decides
where that text comes from, how it is split, and how it becomes tokens:

* `load_text(source, split)` resolves a source to `(text, description)`. Sources are
  - ``"default"``: an offline corpus every Python install already has, so prunekit works
    without a network and without shipping or downloading any text: the standard
    library's own documentation, i.e. the language-reference topics of
    ``pydoc_data.topics`` plus docstrings read with `ast` (never by importing modules)
    from the stdlib's ``.py`` files. Its content depends on the Python version, which is
    therefore recorded in every description and protocol.
  - ``"code"``: the second offline domain, Python source code: the stdlib's own ``.py`` files
    with their docstrings removed (comments kept). Docstrings are removed because they *are*
    the default corpus: left in, the two domains would share their prose, and a model
    calibrated on one would partly have seen the other. Comments stay because real code has
    them and the default corpus does not contain them. ``"prose"`` is another name of
    ``"default"`` (same text, same protocol, reported as ``source=default``), so that the two
    domains of `DOMAINS` can be named side by side: ``--calib code`` / ``--calib prose``.
    Like the hub names below, these names win over a same-named file or directory (``./code``).
  - a local ``.txt`` file, a ``.jsonl`` file (one JSON object per line with a ``text``
    field), or a directory of such files (read recursively, in sorted order);
  - ``"wikitext2"``, ``"c4"``, ``"ptb"``: Hugging Face datasets, the usual benchmarks of
    the pruning literature (needs ``pip install datasets`` and a network, or a warm cache).
    These names win over a same-named file in the working directory; write ``./c4`` for that.
* Calibration and evaluation text never overlap. Hub datasets use their native splits
  (train vs. test/validation). The offline corpora and local sources are split by
  documents: every 10th document (the 10th, 20th, ...) is held out for evaluation, the
  rest is calibration text, and exact duplicate documents are dropped first so that no
  document can land on both sides (in the offline corpora, repeated long paragraphs too).
  A source that is a single document is cut at a paragraph (or line) boundary near 90% of
  its length.
* `calibration_data` tokenizes the calibration split once and draws seeded random windows
  of exactly ``seqlen`` tokens from it (the GPTQ/SparseGPT/Wanda recipe); `evaluation_data`
  tokenizes the whole evaluation split once and returns it with a protocol (source, split,
  token count, text hash, tokenizer) so a perplexity can always be reported together with
  what it was measured on. No BOS or other special tokens are added anywhere.
"""
from __future__ import annotations

import ast
import functools
import gc
import hashlib
import json
import os
import platform
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SPLITS = ("calibration", "evaluation")
EVAL_EVERY = 10                    # every 10th document is held out for evaluation
DEFAULT_DOCSTRING_CHARS = 1_000_000  # cap on the docstring part of the default corpus
CODE_CHARS = 1_500_000             # cap on the code corpus (about the size of the default corpus)
CODE_FILE_CHARS = 40_000           # at most this much of one module, so that no large module dominates
CODE_FILE_STEP = 5                 # code files are taken every 5th of the sorted list first (see _code_order)
DOMAINS = ("code", "prose")        # the two offline text domains; `prunekit eval --domains` reports both
ALIASES = {"prose": "default"}     # other names of a source: same text, same protocol
# encodings: mostly codec tables; pydoc_data: read directly as the reference topics
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                        "__pycache__", "encodings", "pydoc_data"})
_TEXT_SUFFIXES = (".txt",)
_JSONL_SUFFIXES = (".jsonl",)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (online); the table is what tests monkeypatch to run the same code offline
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubDataset:
    """How one named benchmark maps onto `datasets.load_dataset` calls.

    splits: our split name -> keyword arguments of `datasets.load_dataset` (must select one split).
    text_field: the text column. separator: how rows are joined (as in the papers' scripts).
    max_documents: our split name -> keep only the first N rows (None: all).
    """
    description: str
    splits: dict[str, dict[str, Any]]
    text_field: str = "text"
    separator: str = "\n\n"
    max_documents: dict[str, int | None] = field(default_factory=dict)


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset(
        description="WikiText-2 (wikitext-2-raw-v1)",
        splits={"calibration": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "train"},
                "evaluation": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}},
        text_field="text", separator="\n\n"),
    "c4": HubDataset(
        description="C4 (allenai/c4 en; first train shard / first validation shard)",
        splits={"calibration": {"path": "allenai/c4", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                "split": "train"},
                "evaluation": {"path": "allenai/c4",
                               "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                               "split": "validation"}},
        text_field="text", separator=" ",
        # the whole train shard is ~800 MB of text; SparseGPT/Wanda evaluate on the first 1100 validation rows
        max_documents={"calibration": 20_000, "evaluation": 1100}),
    "ptb": HubDataset(
        description="Penn Treebank (ptb_text_only)",
        splits={"calibration": {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "split": "train"},
                "evaluation": {"path": "ptb-text-only/ptb_text_only", "name": "penn_treebank", "split": "test"}},
        text_field="sentence", separator=" "),
}

ACCEPTED_SOURCES = ('"default" or "prose" (offline: Python stdlib documentation), "code" (offline: Python stdlib '
                    'source code), a path to a .txt or .jsonl file or to a directory of them, or a Hugging Face '
                    'dataset name: ' + ", ".join(sorted(HUB_DATASETS)))


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("hub dataset sources (wikitext2, c4, ptb) need the `datasets` package: "
                          "pip install datasets  (or use source='default' or a local file)") from err
    return datasets


def hub_text(spec: HubDataset, split: str) -> tuple[str, str]:
    """Load one split of a hub dataset with `datasets.load_dataset` and join its text column."""
    _check_split(split)
    datasets = _import_datasets()
    kwargs = dict(spec.splits[split])
    dataset = datasets.load_dataset(**kwargs)
    if isinstance(dataset, dict) or not hasattr(dataset, "column_names"):
        raise ValueError(f"load_dataset({kwargs}) did not return a single split; add 'split' to the arguments")
    if spec.text_field not in dataset.column_names:
        raise ValueError(f"{spec.description}: no column {spec.text_field!r} (columns: {dataset.column_names})")
    rows = len(dataset)
    limit = spec.max_documents.get(split)
    if limit is not None and rows > limit:
        dataset = dataset.select(range(limit))
    texts = [t if isinstance(t, str) else "" for t in dataset[spec.text_field]]
    text = spec.separator.join(texts)
    where = kwargs.get("split")
    kept = f"first {len(texts)} of {rows} rows" if len(texts) < rows else f"{rows} rows"
    return text, f"{spec.description}; {split}: {where} split, {kept}"


# ----------------------------------------------------------------------------------------------
# The default corpus: Python's own documentation, read from the installed stdlib
# ----------------------------------------------------------------------------------------------

_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(node) -> list[str]:
    """Docstrings of a module and of its classes/functions (recursively, not inside function bodies)."""
    out = []
    doc = ast.get_docstring(node, clean=True)
    if doc:
        out.append(doc)
    for child in node.body:
        if isinstance(child, _DEFS):
            out.extend(_docstrings(child))
    return out


def _stdlib_sources(root: Path) -> list[Path]:
    paths = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        paths.extend(Path(directory, f) for f in files if f.endswith(".py"))
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=1)
def _default_documents(docstring_chars: int = DEFAULT_DOCSTRING_CHARS) -> tuple[tuple[str, ...], str]:
    """The stdlib-documentation corpus as documents, built once per process (about a second).

    Documents: each `pydoc_data.topics` entry (sorted by key), then, for each stdlib `.py` file in
    sorted path order, its docstrings joined by blank lines (each distinct docstring once),
    until `docstring_chars` characters of docstrings have been collected. Long paragraphs that
    repeat are then kept at their first occurrence only, so the splits cannot share them.
    """
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:           # some distributions strip pydoc_data; the docstrings still work
        topics = {}
    docs.extend(topics[k].strip() for k in sorted(topics) if topics[k].strip())
    n_topics = len(docs)

    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    chars = modules = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()        # ast.parse allocates millions of nodes; with torch loaded, GC passes double the time
    try:
        for path in (_stdlib_sources(root) if root.is_dir() else []):
            if chars >= docstring_chars:
                break
            try:
                source = path.read_bytes()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source, filename=str(path))
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
                continue
            fresh = []
            for doc in _docstrings(tree):
                if doc not in seen:
                    seen.add(doc)
                    fresh.append(doc)
            del tree
            if fresh:
                document = "\n\n".join(fresh)
                docs.append(document)
                chars += len(document)
                modules += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    if not docs:
        raise RuntimeError(f"the default corpus is empty: no pydoc_data.topics and no stdlib sources under {root}")
    docs = _drop_repeated_paragraphs(docs)
    about = (f"pydoc_data.topics ({n_topics} topics) + docstrings of {modules} stdlib modules "
             f"(read with ast from {root}, capped at {docstring_chars:,} characters)")
    return tuple(docs), about


def _drop_repeated_paragraphs(docs: list[str], min_chars: int = 64) -> list[str]:
    """Keep each paragraph of `min_chars`+ characters only at its first occurrence in the corpus.

    The reference topics quote one another (the "compound" topic contains the "class" topic, ...)
    and related classes share docstring paragraphs; without this, the same passage could sit in
    both the calibration and the evaluation split.
    """
    seen: set[str] = set()
    out = []
    for doc in docs:
        kept = []
        for paragraph in doc.split("\n\n"):
            key = paragraph.strip()
            if len(key) >= min_chars:
                if key in seen:
                    continue
                seen.add(key)
            kept.append(paragraph)
        if any(p.strip() for p in kept):
            out.append("\n\n".join(kept))
    return out


def default_description() -> str:
    """Short description of the default (prose) corpus, with the Python version its content depends on."""
    return f"stdlib docs, Python {platform.python_version()}"


# ----------------------------------------------------------------------------------------------
# The code corpus: Python's own source, docstrings removed (they are the default corpus)
# ----------------------------------------------------------------------------------------------

def _code_order(paths: list[Path], step: int = CODE_FILE_STEP) -> list[Path]:
    """The sorted file list visited every `step`th file, first from the 1st, then from the 2nd, ...

    A capped corpus read in plain sorted order would hold only the alphabetical start of the stdlib
    (asyncio, ctypes, email, ...); this fixed interleaving spreads the same cap over all of it.
    """
    return [paths[i] for offset in range(step) for i in range(offset, len(paths), step)]


def _character_column(line: str, byte_offset: int) -> int:
    """`ast` column offsets count UTF-8 bytes; the same position counted in characters of `line`."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def strip_docstrings(source: str) -> str:
    """`source` (Python) without the docstrings of its module, classes and functions; all else unchanged.

    A docstring on lines of its own is removed with those lines; one that shares a line with other
    code, or is the only statement of a class or function body, becomes ``pass`` so that the code
    stays valid Python. Comments, other string literals and the layout are kept. Raises
    SyntaxError (or ValueError) when `source` does not parse.
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")   # ast counts lines the same way
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # invalid escape sequences in old code
        tree = ast.parse(source)
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, *_DEFS)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.append((first, not isinstance(node, ast.Module) and len(node.body) == 1))
    del tree
    lines = source.split("\n")
    for node, only_statement in sorted(docstrings, key=lambda item: item[0].lineno, reverse=True):
        first, last = node.lineno - 1, node.end_lineno - 1
        head = lines[first][:_character_column(lines[first], node.col_offset)]
        tail = lines[last][_character_column(lines[last], node.end_col_offset):]
        if not head.strip() and not tail.strip() and not only_statement:
            lines[first:last + 1] = []
        else:
            lines[first:last + 1] = [head + "pass" + tail]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _code_documents(code_chars: int = CODE_CHARS, file_chars: int = CODE_FILE_CHARS) -> tuple[tuple[str, ...], str]:
    """The stdlib-source corpus as documents (one per module), built once per process (about a second).

    The stdlib's `.py` files (the same files the default corpus reads: no test suites, idlelib,
    lib2to3, encodings or site-packages) are visited in the fixed order of `_code_order`; each file
    that is UTF-8 and parses becomes one document: its source without docstrings
    (`strip_docstrings`), cut at a blank line before `file_chars` characters, until `code_chars`
    characters have been collected. The documents are then put back in sorted path order, and long
    blocks that repeat are kept at their first occurrence only, so the splits cannot share them.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[tuple[str, str]] = []
    chars = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()        # as in _default_documents: ast.parse allocates many nodes
    try:
        for path in (_code_order(_stdlib_sources(root)) if root.is_dir() else []):
            if chars >= code_chars:
                break
            try:
                code = strip_docstrings(path.read_bytes().decode("utf-8")).strip("\n")
            except (OSError, SyntaxError, ValueError):           # UnicodeDecodeError is a ValueError
                continue
            if len(code) > file_chars:
                cut = code.rfind("\n\n", 0, file_chars)
                code = code[:cut if cut > 0 else file_chars].rstrip("\n")
            if code.strip():
                chosen.append((path.relative_to(root).as_posix(), code))
                chars += len(code)
    finally:
        if gc_was_enabled:
            gc.enable()
    if not chosen:
        raise RuntimeError(f"the code corpus is empty: no readable stdlib sources under {root}")
    docs = _drop_repeated_paragraphs([code for _, code in sorted(chosen)])
    about = (f"source of {len(chosen)} stdlib modules, docstrings removed (read from {root}: every "
             f"{CODE_FILE_STEP}th file of the sorted list first, at most {file_chars:,} characters per file, "
             f"capped at {code_chars:,} characters)")
    return tuple(docs), about


def code_description() -> str:
    """Short description of the code corpus, with the Python version its content depends on."""
    return f"stdlib code, Python {platform.python_version()}"


# ----------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------

def jsonl_texts(path: Path, field: str = "text", hint: str = "") -> Iterator[str]:
    """The `field` string of each object of a .jsonl file, streamed line by line (blank lines skipped).
    A line that is not a JSON object with a string `field` raises a ValueError naming the file and line,
    followed by `hint` (how the caller chooses the field)."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}, line {number}: expected a JSON object with a {field!r} field{hint}")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}, line {number}: the {field!r} field is not a string")
            yield record[field]


def _read_file(path: Path) -> list[str]:
    """The documents of one local .txt/.jsonl file; a file that is not UTF-8 text is named."""
    if path.suffix.lower() not in _JSONL_SUFFIXES + _TEXT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    try:
        docs = (list(jsonl_texts(path)) if path.suffix.lower() in _JSONL_SUFFIXES
                else [path.read_text(encoding="utf-8")])
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); calibration and evaluation "
                         "files must be UTF-8 .txt or .jsonl") from None
    if any("\x00" in doc for doc in docs):
        raise ValueError(f"{path}: holds NUL bytes, so it looks like a binary file, not text")
    return docs


def _local_documents(path: Path) -> tuple[list[str], str]:
    if path.is_dir():
        files = sorted((p for p in path.rglob("*")
                        if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES + _JSONL_SUFFIXES),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"{path}: the directory holds no .txt or .jsonl files")
        docs = [doc for f in files for doc in _read_file(f)]
        about = f"local directory {path} ({len(files)} files)"
    else:
        docs = _read_file(path)
        about = f"local file {path}"
    if not any(doc.strip() for doc in docs):
        raise ValueError(f"{path}: holds no text (empty or whitespace only)")
    return docs, about


# ----------------------------------------------------------------------------------------------
# Splitting: deterministic, by documents, never overlapping
# ----------------------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _cut_point(text: str) -> int:
    """A paragraph (else line, else word) boundary near 90% of `text`, else exactly 90%."""
    n = len(text)
    target = int(n * 0.9)
    lo, hi = int(n * 0.75), int(n * 0.97)
    for sep in ("\n\n", "\n", " "):
        candidates = [p for p in (text.rfind(sep, 0, target), text.find(sep, target)) if lo <= p <= hi and p > 0]
        if candidates:
            return min(candidates, key=lambda p: abs(p - target))
    return max(1, min(n - 1, target))


def split_documents(docs: list[str] | tuple[str, ...], split: str) -> tuple[str, str]:
    """Join the documents of one split; returns (text, how the split was made)."""
    _check_split(split)
    unique = list(dict.fromkeys(d for d in docs if d.strip()))
    dropped = sum(1 for d in docs if d.strip()) - len(unique)
    note = f", {dropped} duplicate documents dropped" if dropped else ""
    if not unique:
        raise ValueError("the source holds no text")
    if len(unique) == 1:
        text = unique[0]
        if len(text.strip()) < 2:
            raise ValueError("the source holds too little text to split into calibration and evaluation parts")
        cut = _cut_point(text)
        part = text[:cut] if split == "calibration" else text[cut:]
        side = "first" if split == "calibration" else "last"
        return part.strip("\n"), f"{split}: {side} part of a single document, cut at character {cut:,} of {len(text):,}"
    if len(unique) < EVAL_EVERY:
        held = {len(unique) - 1}
        rule = "the last document is held out for evaluation"
    else:
        held = set(range(EVAL_EVERY - 1, len(unique), EVAL_EVERY))
        rule = f"every {EVAL_EVERY}th document is held out for evaluation"
    chosen = [d for i, d in enumerate(unique) if (i in held) == (split == "evaluation")]
    return "\n\n".join(chosen), f"{split}: {len(chosen)} of {len(unique)} documents ({rule}{note})"


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Text:
    text: str
    source: str          # the source as given (name or path)
    about: str           # short description of the corpus
    corpus: str          # long description of what was read
    rule: str            # how this split was made
    python: str | None = None


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith((".", "~"))
            or source.lower().endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES))


def _resolve(source: str | os.PathLike, split: str) -> _Text:
    _check_split(split)
    if isinstance(source, str):
        source = ALIASES.get(source, source)
    if isinstance(source, str) and source == "default":
        docs, corpus = _default_documents()
        text, rule = split_documents(docs, split)
        return _Text(text, "default", default_description(), corpus, rule, platform.python_version())
    if isinstance(source, str) and source == "code":
        docs, corpus = _code_documents()
        text, rule = split_documents(docs, split)
        return _Text(text, "code", code_description(), corpus, rule, platform.python_version())
    if isinstance(source, str) and source in HUB_DATASETS:
        spec = HUB_DATASETS[source]
        text, about = hub_text(spec, split)
        return _Text(text, source, spec.description, about, about.split("; ", 1)[-1])
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a string or a path, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.exists():
        docs, about = _local_documents(path)
        text, rule = split_documents(docs, split)
        return _Text(text, str(source), about, about, rule)
    if isinstance(source, os.PathLike) or _looks_like_path(source):
        raise FileNotFoundError(f"text source not found: {path}")
    raise ValueError(f"unknown text source {source!r}; accepted: {ACCEPTED_SOURCES}")


def load_text(source: str | os.PathLike = "default", split: str = "calibration") -> tuple[str, str]:
    """Return `(text, description)` of one split ("calibration" or "evaluation") of a source."""
    resolved = _resolve(source, split)
    return resolved.text, f"{resolved.about}; {resolved.rule}"


# ----------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------

def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor, without special tokens and without truncation."""
    from transformers import PreTrainedTokenizerBase
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so text cannot be turned into tokens; save the model's "
                         "tokenizer next to it (tokenizer.save_pretrained(DIR))")
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        # verbose=False: no "sequence longer than the model's maximum" warning; we cut windows ourselves
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                        return_attention_mask=False)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
        ids = getattr(ids, "ids", ids)          # a bare `tokenizers.Tokenizer` returns an Encoding
    else:
        raise TypeError(f"cannot tokenize with {type(tokenizer).__name__}: expected a Hugging Face tokenizer "
                        "or an object with encode(text) -> list[int]")
    return torch.as_tensor(list(ids), dtype=torch.long)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def calibration_data(tokenizer, source: str | os.PathLike = "default", samples: int = 128, seqlen: int = 512,
                     seed: int = 0) -> torch.Tensor:
    """`samples` random windows of exactly `seqlen` tokens from the calibration split: (samples, seqlen) int64.

    Window starts are drawn uniformly from [0, n - seqlen) with `torch.Generator().manual_seed(seed)`
    over the token stream of the whole calibration split (n tokens), as in GPTQ/SparseGPT/Wanda.
    """
    return calibration_windows(tokenizer, source, samples, seqlen, seed)[0]


def calibration_windows(tokenizer, source: str | os.PathLike = "default", samples: int = 128, seqlen: int = 512,
                        seed: int = 0):
    """`calibration_data`, and the `core.budget.Coverage` of the split that its windows read."""
    from .core.budget import coverage
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    resolved = _resolve(source, "calibration")
    ids = tokenize(tokenizer, resolved.text)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"the calibration split of {resolved.source!r} has {ids.numel()} tokens; "
                         f"windows of seqlen={seqlen} need at least {seqlen + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    windows = ids[starts[:, None] + torch.arange(seqlen)].contiguous()
    return windows, coverage(int(ids.numel()), starts.tolist(), seqlen)


@dataclass(frozen=True, eq=False)
class EvalText:
    """The evaluation split as one token stream, with the protocol that produced it."""
    ids: torch.Tensor
    protocol: dict

    def __len__(self) -> int:
        return int(self.ids.numel())


def evaluation_data(tokenizer, source: str | os.PathLike = "default", max_tokens: int | None = None) -> EvalText:
    """The whole evaluation split of `source` as tokens (optionally only its first `max_tokens`)."""
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be an integer >= 2 or None, got {max_tokens!r}")
    resolved = _resolve(source, "evaluation")
    ids = tokenize(tokenizer, resolved.text)
    total = int(ids.numel())
    if max_tokens is not None:
        ids = ids[:max_tokens].clone()
    protocol = {
        "source": resolved.source,
        "description": resolved.about,
        "corpus": resolved.corpus,
        "split": "evaluation",
        "split_rule": resolved.rule,
        "tokens": int(ids.numel()),
        "tokens_in_split": total,
        "max_tokens": max_tokens,
        "sha256": hashlib.sha256(resolved.text.encode("utf-8")).hexdigest()[:16],
        "tokenizer": _tokenizer_name(tokenizer),
        "special_tokens": "none added",
    }
    if resolved.python is not None:
        protocol["python"] = resolved.python
    return EvalText(ids=ids, protocol=protocol)


def default_seqlen(config, cap: int = 512) -> int:
    """Window length for calibration/evaluation: the model's context length, but never more than `cap`."""
    if not isinstance(cap, int) or cap < 2:
        raise ValueError(f"cap must be an integer >= 2, got {cap!r}")
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            configs.append(get_text())
        except Exception:
            pass
    for cfg in configs:
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return min(cap, value)
    return cap
