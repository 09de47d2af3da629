"""Long-context retrieval, offline: can the model still find one fact in a context of thousands of tokens?

Token pruning in prefill and KV-cache pruning at decode (issue 18, `prunekit.inference`) save
their compute by dropping context; what they must not drop is the one passage the answer needs.
Perplexity cannot show that (most tokens are predictable from a short window), so this suite
plants an answer at a known depth of a long prompt and asks for it back. Everything is built
from text every Python install has (the held-out split of the default corpus, `prunekit.data`)
and from seeded random strings: no download, and the same seed gives the same prompts.

Three tasks, each prompt filling a `context` budget measured with the model's own tokenizer:

* ``needle`` (needle in a haystack): consecutive sentences of held-out text, with the sentence
  ``The secret number of <Name> is <5 digits>.`` inserted at a sentence boundary at depth d of
  the text; the prompt ends ``Question: What is the secret number of <Name>?\\nAnswer: The
  secret number of <Name> is`` and the answer is the digits. Measures retrieval of one planted
  fact from natural text.
* ``kv-retrieval`` (as in "Lost in the Middle", arXiv 2307.03172): a JSON object of random
  8-hex-digit keys and values, one pair per line; the question asks for the value of the key of
  the pair at depth d. Every other line looks alike, so nothing but the exact key locates it:
  measures precise lookup among distractors, with no language prior to lean on.
* ``doc-qa`` (extractive question answering over a document): a sentence of held-out text is
  chosen, and the document is the text around it, placed so that the sentence sits at depth d.
  The question quotes the sentence's first `PREFIX_WORDS` words and asks how it continues; the
  answer is its next `ANSWER_WORDS` words. The answer span is in the document by construction,
  and it is the only possible answer: the quoted opening occurs exactly once in the whole
  held-out split (compared after `normalize`, so even near-duplicates are ruled out). Measures
  locating a passage from a quoted cue and reading the span that follows it. Only prose
  sentences qualify (at least PREFIX_WORDS + ANSWER_WORDS words of letters, digits and plain
  punctuation, starting with a capital), so the span is words, not code; and only answers that
  take fewer than ``max_new_tokens`` tokens, so that a generation can reach the whole answer.

Depths cycle through `DEPTHS` (10% ... 90%): sample i of a task uses ``DEPTHS[i % 5]``. A depth
is the share of the document's tokens before the answer; the one actually reached (the nearest
sentence, line or pair boundary) is measured with the tokenizer and recorded as ``depth_actual``.

Budget: every prompt has at most ``context - max_new_tokens`` tokens (no special tokens added,
as everywhere in prunekit), so the prompt and its answer together fit the context; at a context
equal to the model's limit (``max_position_embeddings``; 8192 for SmolLM2) no position beyond it
is used. Contexts above the limit are refused. The filler grows until one more sentence (or KV
pair) would not fit, found by bisection on the tokenizer's exact count. A haystack starts at a
random sentence of the split; where its sentences are too long for a small context, another is
drawn (up to `DRAWS` times) before the context is called too small.

Scoring: greedy generation (``do_sample=False``, batch 1, `MAX_NEW_TOKENS` new tokens, inside
``prunekit.inference.generation.pruning(model, token_pruning, kv_pruning)``); the decoded new text
is right when its `knowledge.normalize`d form (NFKC, lowercase, punctuation and newlines as
spaces, whitespace collapsed, a leading article dropped) equals the normalised answer or starts
with it followed by a space: "48213." and "48213 is the number" count for 48213, "482139" does
not. Newlines count as spaces because the documents wrap sentences across lines, so a model that
copies a span faithfully may copy a line break too.
"""
from __future__ import annotations

import bisect
import itertools
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import cached_property

import torch

from .knowledge import exact_match, normalize

TASKS = ("needle", "kv-retrieval", "doc-qa")
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_CONTEXTS = (2048, 4096, 8192)
DEFAULT_SAMPLES = 10              # per task and context: every depth twice
MAX_NEW_TOKENS = 16               # 5 digits or 8 hex digits take at most 9; doc-qa answers are drawn to fit
MIN_CONTEXT = 64
PREFIX_WORDS = 6                  # doc-qa: words of the sentence quoted in the question
ANSWER_WORDS = 4                  # doc-qa: words that must follow
KEY_DIGITS = 8                    # kv-retrieval: hex digits of a key and of a value
MIN_FILLER = 2                    # sentences (or pairs) a prompt must hold, else the context is too small
DRAWS = 8                         # haystacks drawn for one prompt before a context is called too small
_ROOM = 1.25                      # a haystack is drawn where the split holds 1.25x the context
LONG_UNIT_CHARS = 300             # a paragraph longer than this with no sentence end is split at its lines
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n\s*")
_PROSE_WORD = re.compile(r"[A-Za-z0-9'(),.;:_-]*[A-Za-z0-9][A-Za-z0-9'(),.;:_-]*")
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


# ----------------------------------------------------------------------------------------------
# Contexts and scoring
# ----------------------------------------------------------------------------------------------

def parse_contexts(contexts) -> tuple[int, ...]:
    """"2048,4096" / [2048, 4096] / 2048 -> (2048, 4096): distinct integers >= MIN_CONTEXT, ascending."""
    if isinstance(contexts, str):
        parts = [p.strip() for p in contexts.split(",") if p.strip()]
        try:
            contexts = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"contexts must be comma-separated token counts such as 2048,4096,8192, "
                             f"got {contexts!r}") from None
    elif isinstance(contexts, int) and not isinstance(contexts, bool):
        contexts = [contexts]
    if (not isinstance(contexts, (list, tuple)) or not contexts
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= MIN_CONTEXT for c in contexts)):
        raise ValueError(f"contexts must be token counts >= {MIN_CONTEXT} such as (2048, 4096, 8192), "
                         f"got {contexts!r}")
    return tuple(sorted(set(contexts)))


def context_limit(config) -> int | None:
    """The model's context length (``max_position_embeddings`` or ``n_positions``), None if it states none."""
    from ..data import default_seqlen
    limit = default_seqlen(config, cap=sys.maxsize)
    return None if limit == sys.maxsize else limit


def check_contexts(contexts, config) -> tuple[int, ...]:
    """`parse_contexts`, and a ValueError naming the limit for any context the model cannot take."""
    contexts = parse_contexts(contexts)
    limit = context_limit(config)
    too_long = [c for c in contexts if limit is not None and c > limit]
    if too_long:
        raise ValueError(f"context {', '.join(map(str, too_long))} exceeds the model's limit of {limit} tokens "
                         f"(max_position_embeddings); choose contexts up to {limit}")
    return contexts


def score(generation: str, answer: str) -> bool:
    """Exact match as the module docstring defines it: the normalised generation is the normalised
    answer, or starts with it and a space (newlines in the generation count as spaces)."""
    return exact_match(generation, [answer])


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One prompt of one task: the text, its tokens, the answer and where the answer sits.

    ``answer_at`` is the character offset in ``prompt`` of what holds the answer (the needle, the
    queried pair, the quoted sentence); ``document_end`` the offset where the question begins.
    ``depth_actual`` = tokens of ``prompt[:answer_at]`` / tokens of ``prompt[:document_end]``.
    """
    task: str
    context: int
    index: int
    depth: float
    prompt: str
    ids: tuple[int, ...]
    answer: str
    answer_at: int
    document_end: int
    depth_actual: float

    def record(self) -> dict:
        return {"task": self.task, "context": self.context, "index": self.index, "depth": self.depth,
                "depth_actual": round(self.depth_actual, 4), "prompt_tokens": len(self.ids), "answer": self.answer}


def _units(text: str) -> list[str]:
    """`text` cut into sentences (at ., ! or ? before whitespace, and at paragraph breaks), each
    keeping its trailing whitespace so that joining consecutive units restores the text exactly.
    A long unit without a sentence end (a grammar or code listing) is cut further at its lines."""
    units, start = [], 0
    for match in itertools.chain(_SENTENCE_END.finditer(text), [None]):
        end = match.end() if match is not None else len(text)
        unit = text[start:end]
        start = end
        if not unit.strip():
            continue
        if len(unit) <= LONG_UNIT_CHARS or "\n" not in unit.rstrip():
            units.append(unit)
            continue
        parts: list[str] = []
        for line in unit.splitlines(keepends=True):     # blank lines stay with the line before them
            if parts and (not line.strip() or not parts[-1].strip()):
                parts[-1] += line
            else:
                parts.append(line)
        units.extend(parts)
    return units


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text on its own (no special tokens): the estimate the fitting starts from."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return [len(i) for i in ids]


def _take(cumulative: list[int], start: int, budget: float) -> int:
    """How many units from `start` on fit in `budget` tokens (cumulative[i] = tokens of units[:i])."""
    return bisect.bisect_right(cumulative, cumulative[start] + budget, lo=start) - 1 - start


def _take_back(cumulative: list[int], end: int, budget: float) -> int:
    """How many units ending just before `end` add up to nearest `budget` tokens (the fewer on a tie)."""
    first = bisect.bisect_left(cumulative, cumulative[end] - budget, hi=end)      # the most that fit
    over = max(first - 1, 0)                                                     # one more
    return end - min((first, over), key=lambda j: (abs(cumulative[end] - cumulative[j] - budget), -j))


def _name(rng: random.Random) -> str:
    """A made-up, pronounceable place name ("Moravelo"): no model knows a fact about it."""
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(3, 4))).capitalize()


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(4 * KEY_DIGITS):0{KEY_DIGITS}x}"


def _nearest(cumulative: list[int], boundaries, target: float) -> int:
    """Of `boundaries` (unit indices: the boundary before that unit), the one whose cumulative token
    count is nearest to `target` (the earlier one on a tie)."""
    return min(boundaries, key=lambda k: (abs(cumulative[k] - target), k))


def _ends_sentence(unit: str) -> bool:
    """A unit after which a new sentence can start: it ends with . ! ? or a paragraph break."""
    body = unit.rstrip()
    return body[-1:] in (".", "!", "?") or unit[len(body):].count("\n") >= 2


class LongContextTasks:
    """Builds the prompts of the three tasks from a tokenizer and a text source (its held-out split).

    `sample(task, context, index)` is a pure function of (source, tokenizer, seed, task, context,
    index, max_new_tokens): each prompt draws from its own `random.Random` seeded with a string
    of those values, so adding samples or contexts never changes the prompts already there.
    """

    def __init__(self, tokenizer, source="default", *, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS):
        if tokenizer is None:
            raise ValueError("the long-context suite needs the model's tokenizer; save it next to the model")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.tokenizer, self.source, self.seed, self.max_new_tokens = tokenizer, source, seed, max_new_tokens

    # -- the held-out text, read and measured once ------------------------------------------------

    @cached_property
    def _split(self) -> tuple[str, str]:
        from ..data import load_text
        return load_text(self.source, "evaluation")

    @cached_property
    def units(self) -> list[str]:
        """The held-out split as sentences (see `_units`): what the haystacks are made of."""
        units = _units(self._split[0])
        if len(units) < MIN_FILLER:
            raise ValueError(f"the evaluation split of {self.source!r} holds too little text for the long-context "
                             "suite")
        return units

    @cached_property
    def cumulative(self) -> list[int]:
        """cumulative[i]: tokens of units[:i], each unit tokenized on its own (an estimate within a few
        tokens of the joined text's count; the exact count decides in `_fit`)."""
        return [0, *itertools.accumulate(_token_counts(self.tokenizer, self.units))]

    @cached_property
    def _sentence_ends(self) -> list[int]:
        """Boundaries (unit indices) where a sentence starts: the needle goes in at one of them."""
        return [k for k in range(1, len(self.units)) if _ends_sentence(self.units[k - 1])]

    @cached_property
    def _normalized_split(self) -> str:
        return normalize(self._split[0])

    @cached_property
    def _qa_candidates(self) -> list[int]:
        """Units that qualify as doc-qa sentences (the uniqueness of the quote is checked when drawn)."""
        want = PREFIX_WORDS + ANSWER_WORDS
        out = []
        for i, unit in enumerate(self.units):
            words = unit.split()[:want]
            if len(words) == want and words[0][0].isupper() and all(_PROSE_WORD.fullmatch(w) for w in words):
                out.append(i)
        return out

    def prepare(self) -> None:
        """Read, cut and measure the held-out text now (about a second) rather than in the first prompt."""
        self.cumulative, self._sentence_ends, self._qa_candidates, self._normalized_split  # noqa: B018

    def describe(self) -> str:
        """What the haystack text is (source, Python version, split rule)."""
        return self._split[1]

    # -- one prompt ------------------------------------------------------------------------------

    def sample(self, task: str, context: int, index: int) -> Sample:
        """Prompt `index` of `task` at `context` tokens (depth ``DEPTHS[index % 5]``)."""
        if task not in TASKS:
            raise ValueError(f"unknown long-context task {task!r}; choose from {', '.join(TASKS)}")
        (context,) = parse_contexts([context])
        limit = context - self.max_new_tokens
        depth = DEPTHS[index % len(DEPTHS)]
        rng = random.Random(f"prunekit long-context/{self.seed}/{task}/{context}/{index}")
        build = {"needle": self._needle, "kv-retrieval": self._kv, "doc-qa": self._doc_qa}[task]
        for _ in range(DRAWS):      # a small context may not hold the first draw's long sentences: draw again
            fitted = self._fit(*build(rng, depth, limit), limit)
            if fitted is not None:
                break
        else:
            raise ValueError(f"context {context} is too small for the {task} task: its question and at least "
                             f"{MIN_FILLER} sentences or pairs must fit in {limit} tokens (context - "
                             f"max_new_tokens {self.max_new_tokens}); tried {DRAWS} haystacks")
        (prompt, answer, answer_at, document_end), ids = fitted
        if not self._answerable(answer):
            raise ValueError(f"max_new_tokens {self.max_new_tokens} is too few for the {task} answer {answer!r}")
        before = len(self._encode(prompt[:answer_at]))
        document = len(self._encode(prompt[:document_end]))
        return Sample(task=task, context=context, index=index, depth=depth, prompt=prompt, ids=tuple(ids),
                      answer=answer, answer_at=answer_at, document_end=document_end,
                      depth_actual=before / max(document, 1))

    def _encode(self, text: str) -> list[int]:
        from ..data import tokenize
        return tokenize(self.tokenizer, text).tolist()

    def _fit(self, render, filler, limit: int):
        """The prompt of the largest filler budget whose exact token count is at most `limit`, and its ids;
        None if no prompt with MIN_FILLER units fits.

        `render(budget)` lays out units (or pairs) adding up to about `budget` tokens by the estimate
        and returns (prompt, answer, answer_at, document_end), or None below two units; `filler(budget)`
        says how many it uses. Bisection over budgets 0 .. 2 * limit: a larger budget never gives a
        shorter prompt, so this finds the point where one more sentence would not fit."""
        lo, hi, best = 0, 2 * limit, None
        while lo <= hi:
            budget = (lo + hi) // 2
            built = render(budget)
            ids = self._encode(built[0]) if built is not None else None
            if ids is not None and len(ids) <= limit:
                best, lo = (built, ids, budget), budget + 1
            else:
                hi = budget - 1
        if best is None or filler(best[2]) < MIN_FILLER:
            return None
        return best[:2]

    def _start(self, rng: random.Random, limit: int) -> int:
        """A random first unit after which the split still holds more text than the context needs."""
        cumulative = self.cumulative
        last = bisect.bisect_right(cumulative, cumulative[-1] - _ROOM * limit) - 1
        if last < 0:
            raise ValueError(f"context {limit + self.max_new_tokens} needs more text than the evaluation split of "
                             f"{self.source!r} holds ({cumulative[-1]} tokens)")
        return rng.randint(0, min(last, len(self.units) - 1))

    def _needle(self, rng: random.Random, depth: float, limit: int):
        name, number = _name(rng), str(rng.randint(10_000, 99_999))
        needle = f"The secret number of {name} is {number}."
        question = (f"\n\nQuestion: What is the secret number of {name}?\n"
                    f"Answer: The secret number of {name} is")
        units, cumulative = self.units, self.cumulative
        start = self._start(rng, limit)

        def filler(budget: int) -> int:
            return _take(cumulative, start, budget)

        def render(budget: int):
            n = filler(budget)
            if n < 2:
                return None
            end = start + n
            # a sentence boundary strictly inside the window; a line boundary only if it has none
            inside = self._sentence_ends[bisect.bisect_left(self._sentence_ends, start + 1):
                                         bisect.bisect_left(self._sentence_ends, end)] or range(start + 1, end)
            at = _nearest(cumulative, inside, cumulative[start] + depth * (cumulative[end] - cumulative[start]))
            head = "".join(units[start:at])
            head += "" if head[-1].isspace() else " "
            document = (head + needle + " " + "".join(units[at:end])).rstrip()
            return document + question, number, len(head), len(document)

        return render, filler

    def _kv(self, rng: random.Random, depth: float, limit: int):
        pairs: list[tuple[str, str]] = []
        seen: set[str] = set()
        cumulative = [0]
        while cumulative[-1] < _ROOM * limit:                 # draw pairs until they overfill the context
            batch = []
            while len(batch) < 64:
                key = _hex(rng)
                if key not in seen:
                    seen.add(key)
                    batch.append((key, _hex(rng)))
            pairs.extend(batch)
            for tokens in _token_counts(self.tokenizer, [f'"{k}": "{v}",\n' for k, v in batch]):
                cumulative.append(cumulative[-1] + tokens)
        header = "JSON data:\n{\n"

        def filler(budget: int) -> int:
            return _take(cumulative, 0, budget)

        def render(budget: int):
            n = filler(budget)
            if n < 2:
                return None
            query = _nearest(cumulative, range(n), depth * cumulative[n])
            lines = [f'"{k}": "{v}"' for k, v in pairs[:n]]
            document = header + ",\n".join(lines) + "\n}"
            key, value = pairs[query]
            answer_at = len(header) + sum(len(line) + 2 for line in lines[:query])     # + 2: ",\n"
            question = (f'\n\nQuestion: What is the value of the key "{key}" in the JSON data above?\n'
                        f'Answer: The value of the key "{key}" is "')
            return document + question, value, answer_at, len(document)

        return render, filler

    def _doc_qa(self, rng: random.Random, depth: float, limit: int):
        units, cumulative = self.units, self.cumulative
        total, need = cumulative[-1], _ROOM * limit
        room = [i for i in self._qa_candidates
                if cumulative[i] >= depth * need and total - cumulative[i + 1] >= (1 - depth) * need]
        rng.shuffle(room)
        target = next((i for i in room if self._unique(i) and self._answerable(self._qa_answer(i))), None)
        if target is None:
            raise ValueError(f"no sentence of the evaluation split of {self.source!r} can be the doc-qa target at "
                             f"depth {depth} of a {limit + self.max_new_tokens}-token context (too little prose "
                             "text, or a context too long for it)")
        quote, answer = " ".join(units[target].split()[:PREFIX_WORDS]), self._qa_answer(target)
        question = (f'\n\nQuestion: In the document above, how does the sentence that begins with "{quote}" '
                    f"continue?\nAnswer: {quote}")

        def layout(budget: int) -> tuple[int, int]:
            """Units before and after the target: `depth` of the budget before it, the rest after."""
            before = _take_back(cumulative, target, depth * budget)
            spent = cumulative[target + 1] - cumulative[target - before]
            return before, _take(cumulative, target + 1, budget - spent) if budget >= spent else 0

        def filler(budget: int) -> int:
            return sum(layout(budget)) + 1

        def render(budget: int):
            before, after = layout(budget)
            head = "".join(units[target - before:target])
            document = (head + "".join(units[target:target + 1 + after])).rstrip()
            return document + question, answer, len(head), len(document)

        return render, filler

    def _qa_answer(self, unit: int) -> str:
        return " ".join(self.units[unit].split()[PREFIX_WORDS:PREFIX_WORDS + ANSWER_WORDS])

    def _answerable(self, answer: str) -> bool:
        """The answer, after a space, takes at most max_new_tokens - 1 tokens: generation can reach it."""
        return len(self._encode(" " + answer)) < self.max_new_tokens

    def _unique(self, unit: int) -> bool:
        """The quoted opening of `unit` occurs once in the held-out split (after normalisation)."""
        quote = normalize(" ".join(self.units[unit].split()[:PREFIX_WORDS]))
        return bool(quote) and self._normalized_split.count(quote) == 1


# ----------------------------------------------------------------------------------------------
# Running a model
# ----------------------------------------------------------------------------------------------

def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def answer(model, tokenizer, ids, *, max_new_tokens: int = MAX_NEW_TOKENS, device=None, token_pruning=None,
           kv_pruning=None) -> str:
    """The model's greedy continuation of the prompt `ids` (batch 1), decoded without special tokens."""
    from ..inference.generation import pruning
    device = _device_of(model) if device is None else torch.device(device)
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if t is not None), None)
    extra = {} if pad is None else {"pad_token_id": pad}
    with pruning(model, token_pruning=token_pruning, kv_pruning=kv_pruning):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return tokenizer.decode(out[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def protocol_line(tasks: LongContextTasks, contexts, samples: int, token_pruning=None, kv_pruning=None,
                  prompt_pruning=None) -> str:
    """Everything that fixes the suite's numbers, in one line."""
    return (f"{samples} prompts per task and context, tasks {', '.join(TASKS)}: needle ('The secret number of "
            f"<Name> is <5 digits>.' planted at a sentence boundary), kv-retrieval (JSON object of random "
            f"{KEY_DIGITS}-hex-digit keys and values), doc-qa (the next {ANSWER_WORDS} words of a sentence whose "
            f"first {PREFIX_WORDS} words are quoted, the quote unique in the split, the answer under "
            f"{tasks.max_new_tokens} tokens); haystacks from the held-out "
            f"text {tasks.describe()}; contexts {', '.join(map(str, contexts))} tokens, each prompt <= context - "
            f"{tasks.max_new_tokens} tokens by tokenizer {_tokenizer_name(tasks.tokenizer)}, no special tokens; "
            f"depths {', '.join(f'{d:g}' for d in DEPTHS)} cycled; seed {tasks.seed}; greedy (do_sample=False, "
            f"batch 1, max_new_tokens {tasks.max_new_tokens}); exact match: the normalised generation (NFKC, "
            f"lowercase, punctuation and newlines as spaces, leading article dropped) equals or starts with the "
            f"normalised answer and a space; token_pruning {token_pruning or 'none'}, kv_pruning "
            f"{kv_pruning or 'none'}, prompt_pruning {prompt_pruning or 'none'}")


def long_context_suite(model, tokenizer, contexts=DEFAULT_CONTEXTS, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                       source="default", token_pruning=None, kv_pruning=None, prompt_pruning=None,
                       max_new_tokens: int = MAX_NEW_TOKENS, device=None) -> dict:
    """Accuracy of `model` on the three tasks at each context length; JSON-ready.

    Returns ``accuracy`` (mean over every task and context; every cell has `samples` prompts),
    ``per_task[task][context]`` (accuracy, correct, samples, accuracy by depth), ``per_context``
    (accuracy over the tasks, wall ``seconds`` spent building and answering -- a record, not a
    benchmark -- and the prompt token range), ``records`` (every prompt: depth reached, tokens,
    answer, generation, correct) and ``protocol``. `token_pruning` / `kv_pruning` are passed as
    they are to `prunekit.inference.generation.pruning`, entered once around every generation.
    `prompt_pruning` (a `PromptPruningConfig`) first fits every prompt into its budget
    (`prunekit.inference.prompt.prune_prompt`, before and outside the other mechanisms, as `generate`
    does); each record then holds the prompt's tokens before and after, and ``per_context`` the
    seconds the pruning took (``prompt_pruning_seconds``, inside ``seconds``).
    """
    contexts = check_contexts(contexts, model.config)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    tasks = LongContextTasks(tokenizer, source, seed=seed, max_new_tokens=max_new_tokens)
    tasks.prepare()                 # outside the timings
    records: list[dict] = []
    per_context: dict[str, dict] = {}
    training = getattr(model, "training", False)
    if training:
        model.eval()
    from ..inference.generation import pruning
    try:
        # one pruning set-up for the whole suite (streaming heads calibrate once, on the default corpus)
        # prompts are built (and fitted into a prompt-pruning budget) first, with the model stock: the
        # pruning mechanisms below own the cache and attention of every forward inside their block
        prompts: dict[int, list] = {}
        for context in contexts:
            started = time.perf_counter()
            prompts[context] = [fitted(model, tokenizer, tasks.sample(task, context, index), prompt_pruning)
                                for task in TASKS for index in range(samples)]
            per_context[str(context)] = {"seconds": time.perf_counter() - started}
        with pruning(model, token_pruning, kv_pruning, tokenizer=tokenizer), torch.inference_mode():
            for context in contexts:
                started = time.perf_counter()
                for sample, ids, extra in prompts[context]:
                    generation = answer(model, tokenizer, ids, max_new_tokens=max_new_tokens, device=device)
                    records.append({**sample.record(), **extra, "generation": generation,
                                    "correct": score(generation, sample.answer)})
                cell = per_context[str(context)]
                lengths = [len(ids) for _, ids, _ in prompts[context]]
                if prompt_pruning is not None:
                    cell["prompt_pruning_seconds"] = round(sum(e["prompt_pruning_seconds"]
                                                               for _, _, e in prompts[context]), 3)
                cell["seconds"] = round(cell["seconds"] + time.perf_counter() - started, 3)
                cell["prompt_tokens"] = [min(lengths), max(lengths)]
    finally:
        if training:
            model.train()
    per_task: dict[str, dict] = {}
    for task in TASKS:
        per_task[task] = {}
        for context in contexts:
            cell = [r for r in records if r["task"] == task and r["context"] == context]
            per_task[task][str(context)] = {
                "accuracy": sum(r["correct"] for r in cell) / len(cell), "correct": sum(r["correct"] for r in cell),
                "samples": len(cell),
                "by_depth": {f"{d:g}": _share([r for r in cell if r["depth"] == d]) for d in DEPTHS
                             if any(r["depth"] == d for r in cell)}}
    for context in contexts:
        per_context[str(context)]["accuracy"] = _share([r for r in records if r["context"] == context])
    return {"accuracy": _share(records), "prompts": len(records), "contexts": list(contexts), "tasks": list(TASKS),
            "samples": samples, "per_task": per_task, "per_context": per_context, "records": records,
            "protocol": protocol_line(tasks, contexts, samples, token_pruning, kv_pruning, prompt_pruning)}


def fitted(model, tokenizer, sample: Sample, prompt_pruning=None) -> tuple[Sample, tuple, dict]:
    """(sample, the ids to generate from, what the record adds): the sample's own ids, or its prompt fitted
    into `prompt_pruning`'s budget (its question, the last blank-line-separated block, is never touched)."""
    if prompt_pruning is None:
        return sample, sample.ids, {}
    from ..inference.prompt import prune_prompt
    started = time.perf_counter()
    pruned = prune_prompt(model, tokenizer, sample.prompt, prompt_pruning)
    ids = tuple(pruned.input_ids.tolist())
    return sample, ids, {"prompt_tokens_before": pruned.original_tokens, "prompt_tokens_after": len(ids),
                         "prompt_pruning_seconds": round(time.perf_counter() - started, 3)}


def _share(records: list[dict]) -> float:
    return sum(r["correct"] for r in records) / len(records)


def summary_lines(result: dict) -> list[str]:
    """Lines for the command line: one per task (accuracy at each context), the mean, the protocol."""
    lines = []
    for task, cells in result["per_task"].items():
        shown = ", ".join(f"{context}: {cell['accuracy']:.2%} ({cell['correct']}/{cell['samples']})"
                          for context, cell in cells.items())
        lines.append(f"long-context {task}: {shown}")
    seconds = ", ".join(f"{context}: {cell['seconds']:.1f} s" for context, cell in result["per_context"].items())
    lines.append(f"long-context mean exact match {result['accuracy']:.2%} over {result['prompts']} prompts "
                 f"(wall time per context {seconds})")
    lines.append(f"long-context protocol: {result['protocol']}")
    return lines
