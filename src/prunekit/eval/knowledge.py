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

import hashlib
import json
import re
import string
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_NEW_TOKENS = 8
CHOICES = 4
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


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], batch_size: int, device) -> list[str]:
    """Greedy continuations (up to MAX_NEW_TOKENS tokens) of each prompt, cut at the first newline."""
    from transformers import GenerationConfig
    pad = _pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=0, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [_encode(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        # left padding: every row's next token comes right after its own prompt
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(text.split("\n", 1)[0].strip())
    return answers


@torch.no_grad()
def choice_logliks(model, tokenizer, prompts: list[str], choices: list[list[str]], batch_size: int,
                   device) -> torch.Tensor:
    """Summed log-likelihood of " " + choice after each prompt: (questions, CHOICES) float64."""
    from .perplexity import LOGITS_BUDGET_BYTES, _vocab_size
    rows = []                                # (context ids, continuation ids)
    for prompt, options in zip(prompts, choices):
        context = _encode(tokenizer, prompt)
        for option in options:
            continuation = _encode(tokenizer, " " + option)
            if not continuation:
                raise ValueError(f"the choice {option!r} tokenizes to nothing")
            rows.append((context, continuation))
    vocab = _vocab_size(model)
    width = max(len(c) + len(t) for c, t in rows)
    per_forward = max(1, min(batch_size * CHOICES, LOGITS_BUDGET_BYTES // (width * vocab * 4)))
    pad = _pad_id(tokenizer)
    scores = []
    for start in range(0, len(rows), per_forward):
        batch = rows[start:start + per_forward]
        lengths = [len(c) + len(t) for c, t in batch]
        longest = max(lengths)
        # right padding: positions (and so the model's arithmetic) of real tokens do not depend on padding
        ids = torch.tensor([c + t + [pad] * (longest - n) for (c, t), n in zip(batch, lengths)], device=device)
        mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for row, (context, continuation) in enumerate(batch):
            begin = len(context)
            # the logits at position p predict the token at p + 1
            logp = F.log_softmax(logits[row, begin - 1:begin - 1 + len(continuation)].float(), dim=-1)
            target = torch.tensor(continuation, device=logp.device)
            scores.append(float(logp.gather(1, target[:, None]).double().sum()))
        del logits
    return torch.tensor(scores, dtype=torch.float64).view(len(prompts), CHOICES)


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
