"""What a data selector chooses from and how much it keeps: a streamed pool of text samples, a budget,
and the `selected.jsonl` (+ its report) it writes.

A *pool* is the calibration side of a source (the same names as `--calib`/`--data`), read as a stream
of samples and never held whole, so that a pool of millions of samples costs the memory of a few
numbers per sample:

  * ``default`` / ``prose`` / ``code``: the offline corpora's documents on the calibration side of
    `prunekit.data`'s split (every 10th unique document is held out for evaluation);
  * a ``.jsonl`` file (one object per line, the text in `text_field`), a ``.txt`` file (one sample per
    blank-line-separated paragraph) or a directory of them (recursively, in sorted order), read line by
    line; every 10th non-empty sample (the 10th, 20th, ...) is held out for evaluation, which is
    `prunekit.data`'s rule for a source without duplicate documents;
  * a Hugging Face dataset name (``wikitext2``, ``c4``, ``ptb``): its calibration split, streamed
    (`datasets.load_dataset(..., streaming=True)`).

With `split_tokens` (``data select --split-tokens N``, ``recover --split-tokens N``) every sample longer
than N tokens is cut into consecutive pieces of at most N tokens, at token boundaries, after the held-out
rule has been applied to the whole samples (so a document is never half held out). A budget then chooses
among passages instead of whole documents: a pool of a few long documents, as the offline corpora are
(hundreds of words, some thousands), leaves a selector nothing to choose between at 20% of its tokens.

A *budget* is a fraction of the pool's samples (``0.2``), a number of samples (``500 samples``) or of
tokens (``20000 tokens``, counted with the model's tokenizer).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import data

HELD_OUT_EVERY = data.EVAL_EVERY


@dataclass(frozen=True)
class Budget:
    """How much a selection keeps: kind "fraction" (of the samples), "samples" or "tokens"."""
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.value:g} of the samples" if self.kind == "fraction" else f"{int(self.value):,} {self.kind}"


def parse_budget(text) -> Budget:
    """"0.2" -> 20% of the samples; "500 samples"; "20000 tokens" (also "20k tokens", "20000t")."""
    if isinstance(text, Budget):
        return text
    raw = str(text).strip().lower()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(k|m)?\s*(tokens?|t|samples?|s)?", raw)
    if not match:
        raise ValueError(f"budget must be a fraction (0.2), N samples or N tokens (e.g. 20000 tokens); got {text!r}")
    number = float(match.group(1)) * {None: 1, "k": 1e3, "m": 1e6}[match.group(2)]
    unit = match.group(3)
    if unit is None and not match.group(2):
        if not 0 < number < 1:
            raise ValueError(f"a budget without a unit is a fraction of the pool in (0, 1), got {text!r} (write "
                             "'N samples' or 'N tokens' for a count)")
        return Budget("fraction", number)
    if number < 1 or number != int(number):
        raise ValueError(f"budget {text!r}: a count of samples or tokens must be a positive integer")
    return Budget("tokens" if unit and unit.startswith("t") else "samples", int(number))


def split_text(text: str, tokenizer, size: int) -> list[str]:
    """`text` cut into consecutive pieces of at most `size` tokens, at token boundaries. With a fast
    tokenizer (character offsets) the pieces are slices of `text` that join back to it exactly; a tokenizer
    without offsets cuts its token ids and decodes each piece. Pieces of nothing but whitespace are left out.
    The count is of the whole text's tokens: tokenised on its own, a piece can differ by a token at a cut
    (a character split between two byte-level tokens goes whole to the next piece)."""
    if size < 1:
        raise ValueError(f"split_tokens must be at least 1, got {size}")
    try:
        offsets = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                            return_attention_mask=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):
        offsets = None
    if offsets is not None:
        if len(offsets) <= size:
            return [text]
        cuts = [0, *(offsets[i][0] for i in range(size, len(offsets), size)), len(text)]
        pieces = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    else:
        ids = data.tokenize(tokenizer, text).tolist()
        if len(ids) <= size:
            return [text]
        pieces = [tokenizer.decode(ids[i:i + size]) for i in range(0, len(ids), size)]
    return [piece for piece in pieces if piece.strip()]


class Pool:
    """A re-iterable stream of the text samples of one source's calibration side (see the module doc)."""

    def __init__(self, source: str | os.PathLike = "default", text_field: str = "text", *,
                 split_tokens: int | None = None, tokenizer=None):
        if split_tokens is not None and (tokenizer is None or split_tokens < 1):
            raise ValueError("--split-tokens N cuts samples into pieces of N tokens: it needs a model's tokenizer "
                             f"(pass --model) and N >= 1; got N={split_tokens}")
        self.source, self.text_field = source, text_field
        self.split_tokens, self.tokenizer = split_tokens, tokenizer
        name = data.ALIASES.get(source, source) if isinstance(source, str) else source
        if isinstance(name, str) and name in ("default", "code"):
            self.kind = name
        elif isinstance(name, str) and name in data.HUB_DATASETS:
            self.kind = "hub"
        else:
            path = Path(name).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"data source not found: {path} (accepted: {data.ACCEPTED_SOURCES})")
            self.kind, self.path = "local", path
            self.files = self._files(path)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        suffixes = (".jsonl", ".txt")
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes),
                           key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise ValueError(f"{path}: the directory holds no .txt or .jsonl files")
            return files
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
        return [path]

    def describe(self) -> str:
        split = (f"; samples split into pieces of at most {self.split_tokens} tokens"
                 if self.split_tokens is not None else "")
        if self.kind in ("default", "code"):
            return (f"{self.kind} (offline corpus, calibration side: every {HELD_OUT_EVERY}th unique document held "
                    f"out{split})")
        if self.kind == "hub":
            return f"{data.HUB_DATASETS[self.source].description}, calibration split, streamed{split}"
        return (f"{self.path} ({len(self.files)} file{'s' if len(self.files) > 1 else ''}; every {HELD_OUT_EVERY}th "
                f"sample held out for evaluation{split})")

    def __iter__(self) -> Iterator[str]:
        if self.split_tokens is None:
            yield from self._samples()
        else:
            for text in self._samples():
                yield from split_text(text, self.tokenizer, self.split_tokens)

    def _samples(self) -> Iterator[str]:
        """The source's whole samples on the calibration side (held-out ones skipped)."""
        if self.kind in ("default", "code"):
            docs, _ = data._default_documents() if self.kind == "default" else data._code_documents()
            unique = list(dict.fromkeys(d for d in docs if d.strip()))
            yield from (d for i, d in enumerate(unique) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
        elif self.kind == "hub":
            yield from self._hub()
        else:
            count = 0
            for text in self._local():
                count += 1
                if count % HELD_OUT_EVERY:
                    yield text

    def _hub(self) -> Iterator[str]:
        spec = data.HUB_DATASETS[self.source]
        datasets = data._import_datasets()
        rows = datasets.load_dataset(**spec.splits["calibration"], streaming=True)
        limit = spec.max_documents.get("calibration")
        for number, row in enumerate(rows):
            if limit is not None and number >= limit:
                break
            text = row.get(spec.text_field)
            if isinstance(text, str) and text.strip():
                yield text

    def _local(self) -> Iterator[str]:
        for path in self.files:
            if path.suffix.lower() == ".jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._paragraphs(path)

    def _jsonl(self, path: Path) -> Iterator[str]:
        for text in data.jsonl_texts(path, self.text_field, " (choose the field with --text-field)"):
            if text.strip():
                yield text

    @staticmethod
    def _paragraphs(path: Path) -> Iterator[str]:
        lines: list[str] = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
        if lines:
            yield "".join(lines).rstrip("\n")


def write_selection(out: str | os.PathLike, pool: Pool, keep: set[int], scores=None, labels=None) -> int:
    """Stream `pool` once more and write the kept samples (`keep`: their indices) to `out` as JSON lines
    {"text", "index", "score"?, "cluster"?}, atomically. Returns the number written."""
    from ..io.atomic import write_atomic
    written = 0

    def write(tmp: Path) -> None:
        nonlocal written
        with open(tmp, "w", encoding="utf-8") as handle:
            for index, text in enumerate(pool):
                if index not in keep:
                    continue
                record = {"text": text, "index": index}
                if scores is not None:
                    record["score"] = round(float(scores[index]), 6)
                if labels is not None:
                    record["cluster"] = int(labels[index])
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
    write_atomic(out, write)
    return written
