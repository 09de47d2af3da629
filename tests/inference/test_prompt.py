"""Prompt pruning (prunekit.inference.prompt) on a tiny random Llama and on a hand-built induction model.

Surprisal references are computed here straight from the model's forward (float64 log-softmax), one
sequence at a time, without the batching, padding and windowing of the implementation.
"""
from types import SimpleNamespace

import pytest
import torch

from conftest import llama
from prunekit.inference import PromptPruningConfig
from prunekit.inference import prompt as pp
from prunekit.inference.prompt import example_scores, prune_prompt, split_prompt, token_surprisal

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = ["Answer each question with one word .",
            "Q: what is two plus two ? A: four",
            "Q: what color is the sky at noon ? A: blue",
            "Q: where does the sun rise ? A: east",
            "Q: what do cows drink ? A: water"]
QUESTION = "Q: what do fish live in ? A:"
PROMPT = "\n\n".join(EXAMPLES + [QUESTION])


def bos_tokenizer(lines):
    """A word-level tokenizer (trained offline on `lines`) that puts <s> before every text, as Llama's does:
    the counts must include the special tokens the tokenizer adds."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(lines, trainers.WordLevelTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tok():
    return bos_tokenizer(EXAMPLES + [QUESTION, "the cat sat on a mat", "dogs run fast in parks",
                                     "capital of france paris"])


@pytest.fixture(scope="module")
def model():
    return llama(0)


def ids_of(tokenizer, text, special=True):
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def direct_surprisal(model, ids):
    """-log p(ids[t] | ids[:t]) for t >= 1, from one plain forward of the whole sequence."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return [float("nan")] + [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def is_subsequence(small, big):
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


# ---------------------------------------------------------------------------------------------------------

def test_split_prompt_gives_the_prompt_back_and_keeps_the_last_block_as_the_question():
    parts = split_prompt(PROMPT, "\n\n")
    assert parts.question == QUESTION and [e.strip() for e in parts.examples] == EXAMPLES
    for text in ("\n\nA\n\n\n\nB\n\nQ?\n\n", "no separator at all", "A\n\n  \n\nQ?"):
        parts = split_prompt(text, "\n\n")
        assert "".join(parts.examples) + parts.question == text
    parts = split_prompt("\n\nA\n\n\n\nB\n\nQ?\n\n", "\n\n")
    assert parts.examples == ["\n\nA\n\n\n\n", "B\n\n"] and parts.question == "Q?\n\n"
    assert split_prompt("just a question", "\n\n").examples == []


@pytest.mark.parametrize("mode", ["examples", "tokens"])
def test_a_prompt_that_fits_comes_back_unchanged(model, tok, mode):
    ids = ids_of(tok, PROMPT)
    out = prune_prompt(model, tok, PROMPT, PromptPruningConfig(mode=mode, budget=len(ids)))
    assert out.text == PROMPT and out.input_ids.tolist() == ids and out.input_ids.dtype == torch.long
    assert out.removed == [] and out.original_tokens == out.kept_tokens == len(ids)
    assert ids[0] == tok.bos_token_id                   # the count includes the BOS the tokenizer adds
    assert "nothing removed" in out.account() and f"{len(ids)} tokens" in out.account()


def test_example_scores_are_the_drop_in_the_questions_surprisal(model, tok):
    """score = mean surprisal of the question alone - mean surprisal of the question after the example."""
    parts = split_prompt(PROMPT, "\n\n")
    n_question = len(ids_of(tok, QUESTION, special=False))
    alone = direct_surprisal(model, ids_of(tok, QUESTION))[1:]
    assert len(alone) == n_question
    expected = []
    for example in parts.examples:
        with_example = direct_surprisal(model, ids_of(tok, example + QUESTION))[-n_question:]
        expected.append(sum(alone) / n_question - sum(with_example) / n_question)
    assert example_scores(model, tok, parts) == pytest.approx(expected, abs=1e-4)


def test_examples_mode_fits_keeps_the_question_last_and_drops_lowest_scores_first(model, tok):
    budget = 30
    original = ids_of(tok, PROMPT)
    out = prune_prompt(model, tok, PROMPT, PromptPruningConfig(mode="examples", budget=budget))
    assert out.kept_tokens == len(out.input_ids) <= budget < out.original_tokens == len(original)
    assert out.input_ids.tolist() == ids_of(tok, out.text)            # the text is exactly what the ids say
    assert out.text.endswith("\n\n" + QUESTION)
    kept = out.text.split("\n\n")[:-1]
    assert kept and is_subsequence(kept, EXAMPLES) and len(kept) + len(out.removed) == len(EXAMPLES)
    scores = example_scores(model, tok, split_prompt(PROMPT, "\n\n"))
    removed = [r.index for r in out.removed]
    assert removed == sorted(removed, key=lambda i: scores[i])       # lowest score first
    assert max(scores[i] for i in removed) <= min(scores[EXAMPLES.index(k)] for k in kept)
    # dropping one example fewer would not have fitted: the loop stops at the first fit
    last = removed[-1]
    almost = "\n\n".join([e for i, e in enumerate(EXAMPLES) if i not in removed or i == last] + [QUESTION])
    assert len(ids_of(tok, almost)) > budget


def test_examples_mode_follows_the_scorer(model, tok, monkeypatch):
    """With known scores the removal order is known: 1 (-1.0), then 4 (0.1), then 0 (0.5)."""
    monkeypatch.setattr(pp, "example_scores", lambda *args: [0.5, -1.0, 2.0, 3.0, 0.1])
    need = len(ids_of(tok, "\n\n".join(EXAMPLES[2:4] + [QUESTION])))
    out = prune_prompt(model, tok, PROMPT, PromptPruningConfig(budget=need))
    assert [r.index for r in out.removed] == [1, 4, 0]
    assert [r.score for r in out.removed] == [-1.0, 0.1, 0.5]
    assert out.text == "\n\n".join(EXAMPLES[2:4] + [QUESTION])
    assert out.removed[0].tokens == len(ids_of(tok, EXAMPLES[1] + "\n\n", special=False))
    assert out.removed[0].preview == EXAMPLES[1]


class InductionLM(torch.nn.Module):
    """A causal LM that predicts that a token is followed by whatever followed its latest earlier occurrence
    (and is uniform otherwise): an example that contains the question's phrases makes the question
    predictable, one that shares no word with it changes nothing."""

    def __init__(self, vocab: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=256)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            seen = {}
            for t, token in enumerate(row):
                if token in seen:
                    logits[b, t, row[seen[token] + 1]] = 8.0
                seen[token] = t
        return SimpleNamespace(logits=logits + self.anchor)


def test_the_example_the_model_learns_from_is_kept(tok):
    examples = ["the cat sat on a mat", "Q: capital of france ? A: paris", "dogs run fast in parks"]
    question = "Q: capital of france ? A:"
    prompt = "\n\n".join(examples + [question])
    model = InductionLM(len(tok))
    scores = example_scores(model, tok, split_prompt(prompt, "\n\n"))
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[2] == pytest.approx(0.0, abs=1e-6)
    assert scores[1] > 1.0
    budget = len(ids_of(tok, "\n\n".join([examples[1], question])))
    out = prune_prompt(model, tok, prompt, PromptPruningConfig(budget=budget))
    assert out.text == examples[1] + "\n\n" + question
    assert [r.index for r in out.removed] == [0, 2]                # a tie goes to the earlier example first


def test_tokens_mode_drops_the_least_surprising_example_tokens(model, tok):
    budget = 30
    ids = ids_of(tok, PROMPT)
    n_question = len(ids_of(tok, QUESTION, special=False))
    out = prune_prompt(model, tok, PROMPT, PromptPruningConfig(mode="tokens", budget=budget))
    assert out.kept_tokens == len(out.input_ids) == budget and out.original_tokens == len(ids)
    kept = out.input_ids.tolist()
    assert kept[0] == tok.bos_token_id and kept[-n_question:] == ids[-n_question:]
    surprisal = direct_surprisal(model, ids)
    candidates = range(1, len(ids) - n_question)                    # not the BOS, not the question
    lowest = sorted(candidates, key=lambda t: surprisal[t])[:len(ids) - budget]
    (summary,) = out.removed
    assert sorted(summary.positions) == sorted(lowest) and summary.count == len(ids) - budget
    assert kept == [token for t, token in enumerate(ids) if t not in set(lowest)]   # order kept
    assert summary.lowest == pytest.approx(min(surprisal[t] for t in lowest), abs=1e-4)
    assert summary.highest == pytest.approx(max(surprisal[t] for t in lowest), abs=1e-4)
    assert out.text.endswith(" ".join(QUESTION.replace(":", " :").split()))
    account = out.account()
    assert f"{len(ids)} -> {budget} tokens (budget {budget})" in account
    assert f"removed {len(ids) - budget} of {len(candidates)} example tokens" in account


def test_tokens_mode_with_a_byte_level_tokenizer_keeps_the_question_text(bpe):
    """Byte-level BPE decodes exactly, so the kept text ends with the question verbatim; the ids are a
    subsequence of the prompt's ids (re-encoding the text may give other ids: generate from input_ids)."""
    model = llama(0, vocab_size=len(bpe))
    prompt = ("The river runs through the old town.\n\nIt was a cold and quiet morning in the hills."
              "\n\nWhere does the river run?")
    ids = ids_of(bpe, prompt)
    budget = len(ids) - 10
    out = prune_prompt(model, bpe, prompt, PromptPruningConfig(mode="tokens", budget=budget))
    assert out.kept_tokens == budget and is_subsequence(out.input_ids.tolist(), ids)
    assert out.text.endswith("\n\nWhere does the river run?")
    assert bpe.decode(out.input_ids.tolist()) == out.text


def test_token_surprisal_matches_a_plain_forward_and_scores_long_prompts_in_windows():
    model = llama(1, max_position_embeddings=32)
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    got = token_surprisal(model, ids)                               # window 32, a new window every 16 tokens
    assert torch.isnan(got[0]) and torch.isfinite(got[1:]).all()
    assert got[1:32].tolist() == pytest.approx(direct_surprisal(model, ids[:32])[1:], abs=1e-4)
    assert got[32:48].tolist() == pytest.approx(direct_surprisal(model, ids[16:48])[16:], abs=1e-4)
    assert got[64:].tolist() == pytest.approx(direct_surprisal(model, ids[48:])[16:], abs=1e-4)
    short = token_surprisal(model, ids[:20])
    assert short[1:].tolist() == pytest.approx(direct_surprisal(model, ids[:20])[1:], abs=1e-4)


def test_small_memory_budgets_split_the_work_but_not_the_numbers(model, tok, monkeypatch):
    """One row per forward and three positions per log-softmax give the same numbers as one big batch."""
    parts = split_prompt(PROMPT, "\n\n")
    ids = ids_of(tok, PROMPT)
    scores, surprisal = example_scores(model, tok, parts), token_surprisal(model, ids)
    monkeypatch.setattr(pp, "LOGITS_BUDGET_BYTES", 1)
    monkeypatch.setattr(pp, "TARGETS_PER_SOFTMAX", 3)
    assert example_scores(model, tok, parts) == pytest.approx(scores, abs=1e-5)
    torch.testing.assert_close(token_surprisal(model, ids), surprisal, equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["examples", "tokens"])
def test_each_scoring_is_one_forward_and_leaves_the_model_as_it_was(model, tok, mode):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    try:
        prune_prompt(model, tok, PROMPT, PromptPruningConfig(mode=mode, budget=30))
    finally:
        handle.remove()
        training = model.training
        model.eval()
    assert len(calls) == 1 and training


def test_a_budget_below_the_question_is_a_clear_error(model, tok):
    n = len(ids_of(tok, QUESTION))
    with pytest.raises(ValueError, match=rf"question .* alone has {n} tokens, more than the budget of {n - 1}"):
        prune_prompt(model, tok, PROMPT, PromptPruningConfig(budget=n - 1))
    with pytest.raises(ValueError, match=rf"alone has {n} tokens"):
        prune_prompt(model, tok, QUESTION, PromptPruningConfig(mode="tokens", budget=n - 1))
    assert prune_prompt(model, tok, PROMPT, PromptPruningConfig(budget=n)).text == QUESTION


def test_examples_longer_than_the_context_are_cut_and_a_question_longer_is_refused(tok):
    model = llama(0, max_position_embeddings=12)
    parts = split_prompt(PROMPT, "\n\n")                            # question: 11 tokens with the BOS
    assert len(example_scores(model, tok, parts)) == len(EXAMPLES)
    with pytest.raises(ValueError, match="model's context of 8: examples cannot be scored"):
        example_scores(llama(0, max_position_embeddings=8), tok, parts)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="examples or tokens"):
        PromptPruningConfig(mode="sentences")
    with pytest.raises(ValueError, match="positive number of tokens"):
        PromptPruningConfig(budget=0)


def test_the_account_names_the_counts_and_the_removed_examples(model, tok):
    out = prune_prompt(model, tok, PROMPT, PromptPruningConfig(budget=30))
    account = out.account()
    assert account.startswith(f"prompt pruning (examples): {out.original_tokens} -> {out.kept_tokens} tokens "
                              "(budget 30)")
    for item in out.removed:
        assert f"removed example {item.index + 1}/{len(EXAMPLES)} ({item.tokens} tokens, score {item.score:.3f})" \
            in account
        assert repr(item.preview) in account
    assert f"kept {len(EXAMPLES) - len(out.removed)} of {len(EXAMPLES)} examples" in account
