"""Prompt pruning: fit a few-shot prompt into a token budget before generation, scored by the model itself.

    pruned = prune_prompt(model, tokenizer, prompt, PromptPruningConfig(mode="examples", budget=2048))
    print(pruned.account())
    model.generate(pruned.input_ids[None].to(device), ...)      # generate from the ids, not from the text

The prompt is cut at `cfg.separator` into blocks. The last block that is not blank is the question: it, and
anything after it, is never touched. Every block before it is an example (one that can be dropped); an
instruction block at the top is an example too, so it stays only if the model finds it useful (in examples
mode) or loses its least informative tokens like any example (in tokens mode). Blank blocks (runs of
separators) travel with the example before them, so that `"".join(examples) + question == prompt`.

Two modes (after CoT-Influx, arXiv 2312.08901, which prunes whole shots and then tokens to fit more shots in
a context, and the surprisal-based pruning of arXiv 2508.05988 and the LLMLingua family):

  examples  Each example is scored by how much it helps the model read the question: the question's mean
            surprisal (negative log-likelihood per token, nats) without the example, minus its mean surprisal
            with the example as the only context. A high score means the example makes the question more
            predictable (it shares its format, vocabulary, reasoning pattern); a score near zero or below
            means the model gets nothing from it. Why this criterion rather than the example's own surprisal:
            an example's own surprisal says how unusual it is, not whether it bears on this question, and a
            rare-but-irrelevant example would be kept over a plain-but-relevant one. Scoring each example
            alone against the question (rather than leaving it out of the full prompt) costs one batched
            forward over short rows instead of one full-prompt forward per example; it does not see
            redundancy between examples. Examples are dropped lowest score first (ties: the earlier example
            first) until the re-encoded prompt fits; the kept ones keep their order.
  tokens    One forward pass over the prompt gives each token's surprisal given everything before it;
            the least surprising tokens of the examples part (predictable, so carrying the least
            information) are dropped until the prompt fits. Token order is kept, the question's tokens and
            special tokens (the tokenizer's BOS, chat markers) are never dropped. Surprisal is computed once
            on the whole prompt and not recomputed after drops (LLMLingua recomputes per segment; one pass
            is what a budget check before generation can afford).

Tokenization subtlety (tokens mode): the result is a subsequence of the prompt's token ids. Decoding those
ids gives a readable `text`, but encoding that text again need not give the same ids (a dropped token can
let its neighbours merge into other tokens), so the count can differ from `kept_tokens`. `PrunedPrompt`
therefore carries both; `input_ids` is what fits the budget and what generation must use. In examples mode
the text is the original prompt with whole blocks cut out and `input_ids` is its encoding, so both agree.

Token counts are always those of the prompt as the model sees it: `tokenizer(text)["input_ids"]`, with the
special tokens the tokenizer adds (a BOS, say).

Long prompts: tokens mode scores a prompt longer than the model's context (`max_position_embeddings` /
`n_positions`, capped at MAX_WINDOW tokens to bound the logits' memory) in overlapping windows that
advance by half a window, so every token after the first window is scored with at least half a window of
context. Examples mode scores short rows (one example and the question); an example that does not fit in the
context with the question is cut from its start, and a question that does not fit in the context by itself
is refused with a ValueError.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from .configs import PromptPruningConfig

MAX_WINDOW = 4096                  # longest scoring window (tokens), whatever the model's context
LOGITS_BUDGET_BYTES = 256 * 2**20   # rows per forward are chosen so that float32 logits stay under this
TARGETS_PER_SOFTMAX = 1024         # positions whose float32 log-softmax is taken at once
PREVIEW_CHARS = 60


@dataclass(frozen=True)
class PromptParts:
    """A prompt cut into its droppable examples and its question: `"".join(examples) + question` is the
    prompt. Each example carries its trailing separator (and any blank blocks after it)."""
    examples: list[str]
    question: str


@dataclass(frozen=True)
class RemovedExample:
    """One few-shot example dropped in examples mode: `index` is its 0-based position among the examples,
    `tokens` its own token count, `score` its usefulness (nats per question token; see the module doc)."""
    index: int
    tokens: int
    score: float
    preview: str


@dataclass(frozen=True)
class RemovedTokens:
    """What tokens mode dropped: `count` tokens at `positions` (indices into the original ids), with
    surprisal from `lowest` to `highest` nats; `common` lists the most often dropped tokens as (text, count)."""
    count: int
    lowest: float
    highest: float
    positions: tuple[int, ...]
    common: tuple[tuple[str, int], ...] = ()


@dataclass
class PrunedPrompt:
    """The prompt after pruning. `input_ids` (1-D LongTensor, on the CPU) is what fits the budget and what to
    generate from; `text` is its readable form (in tokens mode a decoding: see the module doc).
    `candidates` is how many examples (examples mode) or example tokens (tokens mode) could be dropped."""
    text: str
    input_ids: torch.Tensor
    original_tokens: int
    kept_tokens: int
    removed: list = field(default_factory=list)
    mode: str = "examples"
    budget: int = 0
    candidates: int = 0

    def account(self) -> str:
        """A few lines saying how many tokens went, and which examples or what kind of tokens."""
        head = f"prompt pruning ({self.mode}): "
        if not self.removed:
            return head + (f"{self.original_tokens:,} tokens fit the budget of {self.budget:,}; "
                           "nothing removed")
        lines = [head + f"{self.original_tokens:,} -> {self.kept_tokens:,} tokens (budget {self.budget:,})"]
        for item in self.removed:
            if isinstance(item, RemovedExample):
                lines.append(f"  removed example {item.index + 1}/{self.candidates} ({item.tokens:,} tokens, "
                             f"score {item.score:.3f}): {item.preview!r}")
            else:
                common = ", ".join(f"{text!r} x{n}" for text, n in item.common)
                lines.append(f"  removed {item.count:,} of {self.candidates:,} example tokens, surprisal "
                             f"{item.lowest:.3f} to {item.highest:.3f} nats" + (f"; most often {common}"
                                                                                if common else ""))
        if self.mode == "examples":
            lines.append(f"  kept {self.candidates - len(self.removed)} of {self.candidates} examples "
                         "(score: how much the example lowers the question's surprisal, nats/token)")
        return "\n".join(lines)


def split_prompt(prompt: str, separator: str) -> PromptParts:
    """Cut `prompt` at `separator`: the last non-blank block (and whatever follows it) is the question, each
    non-blank block before it an example; blank blocks stay with the example before them (leading ones with
    the first example), so joining the parts gives the prompt back exactly."""
    blocks = prompt.split(separator)
    last = max((i for i, block in enumerate(blocks) if block.strip()), default=len(blocks) - 1)
    examples: list[str] = []
    pending = ""
    for block in blocks[:last]:
        if not block.strip() and examples:
            examples[-1] += block + separator
        elif not block.strip():
            pending += block + separator
        else:
            examples.append(pending + block + separator)
            pending = ""
    return PromptParts(examples=examples, question=pending + separator.join(blocks[last:]))


def prune_prompt(model, tokenizer, prompt: str, cfg: PromptPruningConfig) -> PrunedPrompt:
    """Fit `prompt` into `cfg.budget` tokens by dropping whole examples or low-surprisal example tokens.

    A prompt that already fits comes back unchanged (same text, the tokenizer's ids, nothing removed).
    Raises ValueError when the question alone (the last block) has more tokens than the budget."""
    if not isinstance(cfg, PromptPruningConfig):
        raise TypeError(f"cfg must be a PromptPruningConfig, got {type(cfg).__name__}")
    ids = _encode(tokenizer, prompt)
    if len(ids) <= cfg.budget:
        return PrunedPrompt(text=prompt, input_ids=_ids_tensor(ids), original_tokens=len(ids),
                            kept_tokens=len(ids), removed=[], mode=cfg.mode, budget=cfg.budget,
                            candidates=0)
    parts = split_prompt(prompt, cfg.separator)
    question_tokens = len(_encode(tokenizer, parts.question))
    if question_tokens > cfg.budget:
        raise ValueError(f"the question (the prompt's last {cfg.separator!r}-separated block) alone has "
                         f"{question_tokens:,} tokens, more than the budget of {cfg.budget:,}: raise the budget "
                         "or shorten the question")
    if cfg.mode == "examples":
        return _prune_examples(model, tokenizer, parts, ids, cfg)
    return _prune_tokens(model, tokenizer, prompt, parts, ids, cfg)


def example_scores(model, tokenizer, parts: PromptParts) -> list[float]:
    """Each example's usefulness for the question: the question's mean surprisal (nats/token) alone minus
    its mean surprisal after the example. All rows (the question alone, then each example followed by the
    question) go through the model in as few batched forwards as the logits' memory allows.

    The same question tokens are scored in every row: the last m before any special tokens the tokenizer
    appends, m being the fewest question tokens any row has (a token's tokenization can change where an
    example meets the question). A question with no token to score gives every example 0.0."""
    if not parts.examples:
        return []
    lead, trail = _added_specials(tokenizer, parts.question)
    base = _encode(tokenizer, parts.question)
    scored = len(base) - trail - max(lead, 1)               # the first token is scored only after a BOS
    rows = [base]
    for example in parts.examples:
        row = _encode(tokenizer, example + parts.question)
        before = _common_prefix(_encode(tokenizer, example), row)
        scored = min(scored, len(row) - trail - max(before, 1))
        rows.append(row)
    if scored <= 0:
        return [0.0] * len(parts.examples)
    limit = _context(model)
    if limit is not None:
        if limit - lead - trail - scored < 1:
            raise ValueError(f"the question needs {lead + scored + trail + 1:,} positions to be scored, more "
                             f"than the model's context of {limit:,}: examples cannot be scored")
        rows = [row if len(row) <= limit else row[:lead] + row[len(row) - (limit - lead):] for row in rows]
    targets = [list(range(len(row) - trail - scored, len(row) - trail)) for row in rows]
    means = [float(s.mean()) for s in _surprisal_at(model, rows, targets)]
    return [means[0] - mean for mean in means[1:]]


def token_surprisal(model, ids, window: int | None = None) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) in nats for every position t of the 1-D `ids` (float32, CPU); position 0 has
    nothing before it and gets NaN. One forward when the ids fit in `window` (default: the model's context,
    at most MAX_WINDOW); longer ids are scored in windows of that length starting every half window, each
    token in the first window that reaches it with the earlier windows' tokens already scored."""
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if window is None:
        window = min(_context(model) or MAX_WINDOW, MAX_WINDOW)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    out = torch.full((len(ids),), float("nan"))
    begins, rows, targets = [], [], []
    begin, done = 0, 1                                  # done: positions below it are scored (or unscorable)
    while done < len(ids):
        end = min(begin + window, len(ids))
        begins.append(begin)
        rows.append(ids[begin:end])
        targets.append(list(range(done - begin, end - begin)))
        done = end
        begin += window // 2
    for begin, row_targets, values in zip(begins, targets, _surprisal_at(model, rows, targets)):
        out[torch.tensor(row_targets, dtype=torch.long) + begin] = values
    return out


def _prune_examples(model, tokenizer, parts: PromptParts, ids: list[int], cfg) -> PrunedPrompt:
    scores = example_scores(model, tokenizer, parts)
    kept = list(range(len(parts.examples)))
    removed, text, new_ids = [], parts.question, ids
    for index in sorted(kept, key=lambda i: (scores[i], i)):
        kept.remove(index)
        example = parts.examples[index]
        removed.append(RemovedExample(index=index, tokens=len(_encode(tokenizer, example, special=False)),
                                      score=scores[index], preview=_preview(example)))
        text = "".join(parts.examples[i] for i in kept) + parts.question
        new_ids = _encode(tokenizer, text)
        if len(new_ids) <= cfg.budget:
            break
    return PrunedPrompt(text=text, input_ids=_ids_tensor(new_ids), original_tokens=len(ids),
                        kept_tokens=len(new_ids), removed=removed, mode=cfg.mode, budget=cfg.budget,
                        candidates=len(parts.examples))


def _prune_tokens(model, tokenizer, prompt: str, parts: PromptParts, ids: list[int], cfg) -> PrunedPrompt:
    lead, trail = _added_specials(tokenizer, prompt)
    question_start = len(prompt) - len(parts.question)
    # tokens entirely before the question: where encoding the examples alone agrees with the whole prompt
    first_question = min(_common_prefix(_encode(tokenizer, prompt[:question_start]), ids), len(ids) - trail)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    droppable = [t for t in range(lead, first_question) if ids[t] not in special]
    excess = len(ids) - cfg.budget
    if excess > len(droppable):
        raise ValueError(f"the question and special tokens take {len(ids) - len(droppable):,} tokens of the "
                         f"prompt, more than the budget of {cfg.budget:,}: raise the budget")
    surprisal = token_surprisal(model, ids)
    rank = torch.nan_to_num(surprisal, nan=float("inf")).tolist()      # position 0 (no BOS) goes last
    dropped = sorted(sorted(droppable, key=lambda t: (rank[t], t))[:excess])
    gone = set(dropped)
    kept = [token for t, token in enumerate(ids) if t not in gone]
    body = [token for t, token in enumerate(ids) if t not in gone and lead <= t < len(ids) - trail]
    text = tokenizer.decode(body, skip_special_tokens=False)
    values = [float(surprisal[t]) for t in dropped]
    common = Counter(tokenizer.decode([ids[t]], skip_special_tokens=False) for t in dropped).most_common(5)
    summary = RemovedTokens(count=len(dropped), lowest=min(values), highest=max(values),
                            positions=tuple(dropped), common=tuple(common))
    return PrunedPrompt(text=text, input_ids=_ids_tensor(kept), original_tokens=len(ids), kept_tokens=len(kept),
                        removed=[summary], mode=cfg.mode, budget=cfg.budget, candidates=len(droppable))


def _surprisal_at(model, rows: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]:
    """For each row, -log p(row[t] | row[:t]) at its target positions t (all >= 1), float32 on the CPU.
    Rows are right-padded and batched (longest first) so that a batch's float32 logits stay under
    LOGITS_BUDGET_BYTES; right padding leaves every real token's causal context as it is."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    vocab = _vocab(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    was_training = model.training
    if was_training:                                    # dropout would make the signal noise
        model.eval()
    try:
        with torch.inference_mode():
            start = 0
            while start < len(order):
                width = len(rows[order[start]])
                per_batch = max(1, LOGITS_BUDGET_BYTES // (width * vocab * 4))
                batch = order[start:start + per_batch]
                start += len(batch)
                input_ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for b, i in enumerate(batch):
                    input_ids[b, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                    mask[b, :len(rows[i])] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                for b, i in enumerate(batch):
                    at = torch.tensor(targets[i], dtype=torch.long)
                    pieces = []
                    for chunk in at.split(TARGETS_PER_SOFTMAX):     # bounds the float32 log-softmax's memory
                        logp = logits[b, (chunk - 1).to(logits.device)].float().log_softmax(-1)
                        pieces.append(-logp.gather(-1, input_ids[b, chunk].to(logp.device)[:, None])[:, 0].cpu())
                    out[i] = torch.cat(pieces)
    finally:
        if was_training:
            model.train()
    return [values.clone() for values in out]


def _encode(tokenizer, text: str, special: bool = True) -> list[int]:
    """`text` as the model sees it (with the tokenizer's special tokens unless `special` is False); no
    truncation, and no warning about the tokenizer's maximum length: the budget is what counts here."""
    return list(tokenizer(text, add_special_tokens=special, truncation=False, verbose=False,
                          return_attention_mask=False)["input_ids"])


def _added_specials(tokenizer, text: str) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after `text` (a BOS, an EOS)."""
    full, plain = _encode(tokenizer, text), _encode(tokenizer, text, special=False)
    extra = len(full) - len(plain)
    if extra <= 0:
        return 0, 0
    for lead in range(extra + 1):
        if full[lead:lead + len(plain)] == plain:
            return lead, extra - lead
    return extra, 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids_tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)


def _preview(example: str) -> str:
    words = " ".join(example.split())
    return words if len(words) <= PREVIEW_CHARS else words[:PREVIEW_CHARS - 3].rstrip() + "..."


def _configs(model) -> list:
    config = getattr(model, "config", None)
    configs = [config] if config is not None else []
    if config is not None and callable(getattr(config, "get_text_config", None)):
        configs.append(config.get_text_config())
    return configs


def _context(model) -> int | None:
    """The model's context length in tokens, if its config says."""
    for config in _configs(model):
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _vocab(model) -> int:
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    for config in _configs(model):
        if isinstance(getattr(config, "vocab_size", None), int):
            return config.vocab_size
    return 2**17                                        # unknown: assume a large vocabulary (small batches)
