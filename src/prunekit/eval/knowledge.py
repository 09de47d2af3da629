"""Knowledge retention: does the pruned model still know the facts the dense model knew?

Follows the idea of LLM-KICK (Jaiswal et al., "Compressing LLMs: The Truth is Rarely Pure and
Never Simple", arXiv 2310.01382): perplexity can stay close to the dense model's while factual
recall collapses, so pruned models are also asked short factual questions. The questions ship with
prunekit (``eval/data/knowledge.jsonl``, one JSON object per line: ``id``, ``category``,
``question``, accepted ``answers``, four ``choices`` and the index ``correct``); a user can pass
their own file in the same format.

Every question is put after a fixed few-shot prefix (`FEW_SHOT`, examples that are not in the
scored set) as ``Question: ...\\nAnswer:`` and scored two ways:

* **exact match**: greedy generation of up to `MAX_NEW_TOKENS` tokens, cut at the first newline;
  right if its `normalize`d form equals a normalised accepted answer or starts with one followed
  by a space ("Paris is the capital" counts for "Paris");
* **multiple choice**: the summed log-likelihood of ``" " + choice`` after the same prompt, for
  each of the four choices; the rank of the correct choice (1 = best; a tie counts against it)
  gives the accuracy (share ranked first) and the mean rank. Forwards are batched (right padding
  with an attention mask), so 300 questions x 4 choices take well under a minute on SmolLM2-135M.

Against the dense model, `summarize` reports retention (model accuracy / dense accuracy) and
`kept_correct`, the share of the questions the dense model got right that the model still gets
right. No special tokens (BOS) are added, as everywhere in prunekit.
"""
from __future__ import annotations

import copy

import hashlib
import json
import re
import string
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.cache import cache_keyword, returned_cache

MAX_NEW_TOKENS = 8
CHOICES = 4
ROWS_PER_FORWARD = 64      # questions per forward pass (the few-shot prefix is shared, rows are short)
# Fixed few-shot examples; none of them is among the bundled questions (load_questions checks).
FEW_SHOT = (
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("How many strings does a standard violin have?", "4"),
    ("What is the main ingredient of guacamole?", "avocado"),
)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")          # the comma of "1,000", not of "3,14"
_LEADING_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_KEYS = {"id": str, "category": str, "question": str, "answers": list, "choices": list, "correct": int}


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------

def _is_punctuation(ch: str) -> bool:
    # string.punctuation also covers ASCII symbols ($, %, +) that Unicode files under "S"
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize(text: str) -> str:
    """Canonical form of an answer for exact match.

    Unicode NFKC, lowercase, stripped; thousands separators removed ("1,000" -> "1000");
    punctuation replaced by spaces except inside numbers (a decimal point between digits: "3.14",
    a minus sign opening a number: "-5"); whitespace collapsed; a leading article (a, an, the)
    removed. Accents are kept: "Brasília" and "Brasilia" are different answers, list both.
    """
    text = unicodedata.normalize("NFKC", text).lower().strip()
    text = _THOUSANDS.sub("", text)
    kept = []
    for i, ch in enumerate(text):
        before = text[i - 1] if i > 0 else " "
        after = text[i + 1] if i + 1 < len(text) else " "
        in_number = ((ch == "." and before.isdigit() and after.isdigit())
                     or (ch == "-" and before.isspace() and after.isdigit()))
        kept.append(" " if _is_punctuation(ch) and not in_number else ch)
    text = " ".join("".join(kept).split())
    return _LEADING_ARTICLE.sub("", text)


def exact_match(generation: str, answers) -> bool:
    """True if the normalised generation is an accepted answer, or starts with one and a space."""
    produced = normalize(generation)
    for answer in answers:
        target = normalize(answer)
        if target and (produced == target or produced.startswith(target + " ")):
            return True
    return False


def choice_rank(logliks: torch.Tensor, correct: int) -> int:
    """Rank of the correct choice by log-likelihood: 1 + the number of other choices scoring >= it."""
    others = torch.cat([logliks[:correct], logliks[correct + 1:]])
    return 1 + int((others >= logliks[correct]).sum())


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------

def bundled_path() -> Path:
    """The question set that ships with prunekit."""
    from importlib.resources import files
    return Path(str(files("prunekit").joinpath("eval/data/knowledge.jsonl")))


def load_questions(path=None) -> list[dict]:
    """Read and check a knowledge .jsonl (default: the bundled set); errors name the line to fix."""
    path = bundled_path() if path is None else Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"knowledge question file not found: {path}; pass a .jsonl with one question "
                                "per line (see prunekit.eval.knowledge)")
    few_shot = {normalize(q) for q, _ in FEW_SHOT}
    records, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        for key, kind in _KEYS.items():
            if type(record.get(key)) is not kind:
                raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {record.get(key)!r}")
        if not record["answers"] or not all(isinstance(a, str) and normalize(a) for a in record["answers"]):
            raise ValueError(f"{where}: 'answers' must be non-empty strings (after normalisation)")
        if len(record["choices"]) != CHOICES or not all(isinstance(c, str) and c for c in record["choices"]):
            raise ValueError(f"{where}: 'choices' must be {CHOICES} non-empty strings")
        if not 0 <= record["correct"] < CHOICES:
            raise ValueError(f"{where}: 'correct' must be an index in [0, {CHOICES}), got {record['correct']}")
        if record["id"] in seen:
            raise ValueError(f"{where}: duplicate id {record['id']!r}")
        if normalize(record["question"]) in few_shot:
            raise ValueError(f"{where}: {record['question']!r} is one of the few-shot examples; remove it")
        seen.add(record["id"])
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no questions")
    return records


def questions_fingerprint(questions: list[dict]) -> str:
    """A short hash of the question set, so results on different sets are never compared."""
    blob = json.dumps(questions, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def build_prompt(question: str, shots: int) -> str:
    if not 0 <= shots <= len(FEW_SHOT):
        raise ValueError(f"knowledge_shots must be in [0, {len(FEW_SHOT)}], got {shots}")
    prefix = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT[:shots])
    return f"{prefix}Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------------------------
# Model runs
# ----------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _shared_prefix(encoded: list[list[int]]) -> list[int]:
    """The longest run of leading tokens that every prompt shares (the few-shot examples), but never
    a whole prompt: each prompt keeps at least one token of its own, whose logits start its answer."""
    shortest = min(len(e) for e in encoded)
    n = 0
    while n < shortest - 1 and all(e[n] == encoded[0][n] for e in encoded):
        n += 1
    return encoded[0][:n]


class _Prefix:
    """The shared prompt prefix, run through the model once; `cache(rows)` is a fresh copy of its
    key/value cache for a batch of `rows` sequences that continue it.

    Every question sits after the same few-shot examples (about 90 tokens with 3 shots, against
    about 15 of its own), so running the prefix once instead of once per question and choice cuts
    the knowledge suite's work about fivefold. The tokens are exactly those of the full prompts
    (the prefix is their common token prefix, not the prefix text tokenized on its own)."""

    def __init__(self, model, ids: list[int], device):
        from transformers import DynamicCache
        self.length = len(ids)
        self.past = None
        if ids:
            self.past = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([ids], device=device), use_cache=True, **{cache_keyword(model): self.past})

    def cache(self, rows: int):
        if self.past is None:
            return None
        past = copy.deepcopy(self.past)
        if rows > 1:
            past.batch_repeat_interleave(rows)
        return past


def _same_length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped by length, at most batch_size per group: equal-length rows need no
    padding, so each row's arithmetic is that of the row alone (no mask, no shifted positions)."""
    by_length: dict[int, list[int]] = {}
    for index, n in enumerate(lengths):
        by_length.setdefault(n, []).append(index)
    return [rows[i:i + batch_size] for _, rows in sorted(by_length.items()) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, device) -> list[str]:
    """Greedy continuations (up to MAX_NEW_TOKENS tokens) of each prompt, cut at the first newline.

    A plain greedy loop over the key/value cache (the argmax of the last position, fed back), on
    top of the shared prefix; a batch stops early once every row has produced a newline or EOS."""
    encoded = [_encode(tokenizer, p) for p in prompts]
    prefix = _Prefix(model, _shared_prefix(encoded), device)
    tails = [e[prefix.length:] for e in encoded]
    stop = {tokenizer.eos_token_id} - {None}
    answers: list[str] = [""] * len(prompts)
    # many short rows per forward: on a CPU one forward costs about the same for 8 or 64 short rows
    # (reading the weights dominates), and answers need up to MAX_NEW_TOKENS forwards per batch
    keyword = cache_keyword(model)
    for rows in _same_length_batches([len(t) for t in tails], max(batch_size, ROWS_PER_FORWARD)):
        past = prefix.cache(len(rows))
        ids = torch.tensor([tails[r] for r in rows], device=device)
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(MAX_NEW_TOKENS):
            out = model(input_ids=ids, use_cache=True, **{keyword: past})
            past = returned_cache(out)
            tokens = out.logits[:, -1].argmax(-1)                                  # (rows,)
            for k, token in enumerate(tokens.tolist()):
                if done[k]:
                    continue
                if token in stop:
                    done[k] = True
                    continue
                generated[k].append(token)
                done[k] = "\n" in tokenizer.decode(generated[k], skip_special_tokens=True)
            if all(done):
                break
            ids = tokens[:, None]
        for k, r in enumerate(rows):
            text = tokenizer.decode(generated[k], skip_special_tokens=True)
            answers[r] = text.split("\n", 1)[0].strip()
    return answers


@torch.no_grad()
def choice_logliks(model, tokenizer, prompts: list[str], choices: list[list[str]], batch_size: int,
                   device) -> torch.Tensor:
    """Summed log-likelihood of " " + choice after each prompt: (questions, CHOICES) float64.

    The shared few-shot prefix runs once; each (question, choice) row continues its cache."""
    encoded = [_encode(tokenizer, p) for p in prompts]
    prefix = _Prefix(model, _shared_prefix(encoded), device)
    rows = []                                # (prompt tail ids, continuation ids)
    for context, options in zip(encoded, choices):
        for option in options:
            continuation = _encode(tokenizer, " " + option)
            if not continuation:
                raise ValueError(f"the choice {option!r} tokenizes to nothing")
            rows.append((context[prefix.length:], continuation))
    scores = torch.zeros(len(rows), dtype=torch.float64)
    from .perplexity import LOGITS_BUDGET_BYTES, vocab_size
    longest = max(len(c) + len(t) for c, t in rows)
    per_forward = max(batch_size * CHOICES, min(ROWS_PER_FORWARD * CHOICES,
                                                LOGITS_BUDGET_BYTES // (longest * vocab_size(model) * 4)))
    keyword = cache_keyword(model)
    for batch in _same_length_batches([len(c) + len(t) for c, t in rows], per_forward):
        ids = torch.tensor([rows[r][0] + rows[r][1] for r in batch], device=device)
        logits = model(input_ids=ids, use_cache=True, **{keyword: prefix.cache(len(batch))}).logits
        for k, r in enumerate(batch):
            tail, continuation = rows[r]
            # the logits at position p predict the token at p + 1
            logp = F.log_softmax(logits[k, len(tail) - 1:len(tail) - 1 + len(continuation)].float(), dim=-1)
            target = torch.tensor(continuation, device=logp.device)
            scores[r] = float(logp.gather(1, target[:, None]).double().sum())
        del logits
    return scores.view(len(prompts), CHOICES)


def run_knowledge(model, tokenizer, questions: list[dict], *, shots: int = 3, batch_size: int = 8,
                  device="cpu") -> list[dict]:
    """Per-question results of one model: id, category, generation, exact (bool), logliks, rank."""
    if tokenizer is None:
        raise ValueError("the knowledge suite needs the model's tokenizer; save it next to the model")
    prompts = [build_prompt(q["question"], shots) for q in questions]
    generations = generate_answers(model, tokenizer, prompts, batch_size, device)
    logliks = choice_logliks(model, tokenizer, prompts, [q["choices"] for q in questions], batch_size, device)
    out = []
    for q, generation, scores in zip(questions, generations, logliks):
        out.append({"id": q["id"], "category": q["category"], "generation": generation,
                    "exact": exact_match(generation, q["answers"]), "logliks": [round(float(s), 6) for s in scores],
                    "rank": choice_rank(scores, q["correct"])})
    return out


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------

def _accuracies(results: list[dict]) -> dict:
    n = len(results)
    return {"questions": n,
            "exact_match": sum(r["exact"] for r in results) / n,
            "mc_accuracy": sum(r["rank"] == 1 for r in results) / n,
            "mc_mean_rank": sum(r["rank"] for r in results) / n}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(results: list[dict], baseline: list[dict] | None = None, *, shots: int = 3,
              fingerprint: str | None = None) -> dict:
    """Accuracy (and, with the dense model's per-question results, retention) of a knowledge run."""
    if not results:
        raise ValueError("no knowledge results to summarize")
    out = _accuracies(results)
    categories = sorted({r["category"] for r in results})
    out["per_category"] = {c: _accuracies([r for r in results if r["category"] == c]) for c in categories}
    protocol = (f"{len(results)} factual questions, {shots}-shot 'Question: ...\\nAnswer:' prompts; exact match: "
                f"greedy generation of up to {MAX_NEW_TOKENS} tokens cut at the first newline, normalised "
                f"(NFKC, lowercase, no punctuation or leading article) against the accepted answers; multiple "
                f"choice: summed log-likelihood of ' ' + each of {CHOICES} choices, rank of the correct one "
                "(ties count against); no special tokens added (LLM-KICK style, arXiv 2310.01382)")
    if fingerprint:
        out["questions_sha256"] = fingerprint
    if baseline is not None:
        dense = {r["id"]: r for r in baseline}
        if set(dense) != {r["id"] for r in results}:
            raise ValueError("the dense reference was scored on another question set; recompute the reference")
        base = _accuracies(baseline)
        base["per_category"] = {c: _accuracies([r for r in baseline if r["category"] == c]) for c in categories}
        out["baseline"] = base
        out["retention_exact"] = _ratio(out["exact_match"], base["exact_match"])
        out["retention_mc"] = _ratio(out["mc_accuracy"], base["mc_accuracy"])
        dense_right_mc = [r for r in results if dense[r["id"]]["rank"] == 1]
        dense_right_exact = [r for r in results if dense[r["id"]]["exact"]]
        out["kept_correct"] = (sum(r["rank"] == 1 for r in dense_right_mc) / len(dense_right_mc)
                               if dense_right_mc else None)
        out["kept_correct_exact"] = (sum(r["exact"] for r in dense_right_exact) / len(dense_right_exact)
                                     if dense_right_exact else None)
        protocol += ("; retention = model accuracy / dense accuracy; kept_correct = share of the questions the "
                     "dense model ranks correctly (multiple choice) that the model still ranks first "
                     "(kept_correct_exact: the same for exact match)")
    out["protocol"] = protocol
    return out
