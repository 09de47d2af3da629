"""The long-context suite on small contexts: prompts fill their token budget and hold the answer at the
stated depth, the builders are deterministic, a model that reads the prompt scores 1 and one that does not
scores 0, pruning configs reach `pruning(...)`, contexts past the model's limit are refused, and
`prunekit eval --suite long-context` runs end to end on a tiny checkpoint."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import llama, tiny_tokenizer
from prunekit.cli import main
from prunekit.data import tokenize
from prunekit.eval.long_context import (ANSWER_WORDS, DEPTHS, MAX_NEW_TOKENS, PREFIX_WORDS, TASKS, LongContextTasks,
                                        check_contexts, long_context_suite, parse_contexts, score)
from prunekit.eval.suites import EvalProtocol, evaluate, parse_suites

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXTS = (256, 512)
VOCAB = 2000


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE of VOCAB tokens trained offline on the default corpus's calibration split (about
    2.8 characters a token, near a real tokenizer's 3-4; conftest's 320-token BPE needs twice the tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.data import load_text
    text, _ = load_text("default", "calibration")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text[:300_000].splitlines(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tasks(bpe):
    return LongContextTasks(bpe)


@pytest.fixture(scope="module")
def words():
    return tiny_tokenizer()


def _solve(prompt: str) -> str:
    """Answer a prompt from its text alone, as a perfect reader would (nothing from the builder)."""
    document, question = prompt.rsplit("\n\nQuestion: ", 1)
    if question.startswith("What is the secret number of"):
        name = re.match(r"What is the secret number of (\w+)\?", question).group(1)
        return " " + re.search(rf"The secret number of {name} is (\d+)\.", document).group(1) + ".\n"
    if question.startswith("What is the value of the key"):
        key = re.match(r'What is the value of the key "(\w+)"', question).group(1)
        return re.search(rf'"{key}": "(\w+)"', document).group(1) + '".'
    quote = re.search(r'begins with "(.*)" continue\?', question).group(1).split()
    text = document.split()
    starts = [i for i in range(len(text)) if text[i:i + len(quote)] == quote]
    assert len(starts) == 1, "the quoted opening must occur once in the document"
    after = starts[0] + len(quote)
    return " " + " ".join(text[after:after + ANSWER_WORDS]) + " and more"


class Reader(torch.nn.Module):
    """A stand-in model whose `generate` decodes the prompt and answers it (or, `garbage`, never does)."""

    def __init__(self, tokenizer, limit=8192, garbage=False):
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=limit)
        self.tokenizer, self.garbage, self.calls = tokenizer, garbage, []

    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, do_sample=True, **kwargs):
        assert do_sample is False and input_ids.shape[0] == 1 and attention_mask.shape == input_ids.shape
        self.calls.append(input_ids.shape[1])
        prompt = self.tokenizer.decode(input_ids[0].tolist())
        text = " 1 banana split" if self.garbage else _solve(prompt)
        new = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype)], dim=1)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context, fill, depth_error", [(256, 0.5, 0.3), (1024, 0.85, 0.1)])
def test_prompts_fill_the_budget_and_hold_the_answer_at_its_depth(tasks, bpe, task, context, fill, depth_error):
    """Sentences are tens of tokens, so a small context is filled and placed coarsely, a larger one finely."""
    limit = context - MAX_NEW_TOKENS
    for index in range(len(DEPTHS)):
        sample = tasks.sample(task, context, index)
        assert sample.depth == DEPTHS[index]
        assert list(sample.ids) == tokenize(bpe, sample.prompt).tolist()            # the exact tokens
        assert fill * limit <= len(sample.ids) <= limit                              # full, never over
        assert abs(sample.depth_actual - sample.depth) <= depth_error
        held = sample.prompt[sample.answer_at:sample.document_end]
        if task == "needle":
            assert held.startswith("The secret number of ") and re.fullmatch(r"\d{5}", sample.answer)
            assert held.split(".", 1)[0].endswith(f" is {sample.answer}")
            assert sample.prompt[:sample.answer_at][-1].isspace()                    # at a boundary
        elif task == "kv-retrieval":
            key = re.search(r'the key "(\w+)" is "$', sample.prompt).group(1)
            assert held.startswith(f'"{key}": "{sample.answer}"')
            assert sample.prompt.count(f'"{key}"') == 3                             # the pair and the question
        else:
            quote = re.search(r'begins with "(.*)" continue\?', sample.prompt).group(1)
            assert held.split()[:PREFIX_WORDS + ANSWER_WORDS] == (quote + " " + sample.answer).split()
            assert sample.prompt.endswith(f"Answer: {quote}")
        if task != "doc-qa":                                                          # not given away
            assert sample.answer not in sample.prompt[sample.document_end:]


def test_the_haystack_is_the_held_out_split_cut_at_sentences(tasks):
    from prunekit.data import load_text
    assert "".join(tasks.units) == load_text("default", "evaluation")[0]          # nothing lost, nothing added
    assert max(len(unit) for unit in tasks.units) <= 400
    assert sum(unit.rstrip().endswith(".") for unit in tasks.units) > len(tasks.units) / 2


def test_the_builders_are_deterministic_per_seed(bpe, tasks):
    again = LongContextTasks(bpe)
    assert again.sample("doc-qa", 256, 3) == tasks.sample("doc-qa", 256, 3)       # order and instance do not matter
    for task in TASKS:
        assert again.sample(task, 256, 1) == tasks.sample(task, 256, 1)
        other = LongContextTasks(bpe, seed=1).sample(task, 256, 1)
        assert other.prompt != tasks.sample(task, 256, 1).prompt
    assert tasks.sample("needle", 256, 0).prompt != tasks.sample("needle", 256, 5).prompt   # same depth, new draw


def test_a_word_level_tokenizer_measures_the_budget_too(words):
    word_tasks = LongContextTasks(words, seed=2)
    for task in TASKS:
        sample = word_tasks.sample(task, 128, 4)
        assert 128 - MAX_NEW_TOKENS - 32 <= len(sample.ids) <= 128 - MAX_NEW_TOKENS


def test_a_reader_scores_one_and_garbage_scores_zero(bpe):
    reader = Reader(bpe)
    out = long_context_suite(reader, bpe, CONTEXTS, samples=5)
    assert out["accuracy"] == 1.0 and out["prompts"] == 30 == len(reader.calls)
    assert max(reader.calls) <= 512 - MAX_NEW_TOKENS
    for task in TASKS:
        for context in CONTEXTS:
            cell = out["per_task"][task][str(context)]
            assert cell == {"accuracy": 1.0, "correct": 5, "samples": 5,
                            "by_depth": {f"{d:g}": 1.0 for d in DEPTHS}}
    assert set(out["per_context"]) == {"256", "512"} and out["per_context"]["512"]["accuracy"] == 1.0
    assert out["per_context"]["256"]["seconds"] >= 0
    for needed in ("needle", "kv-retrieval", "doc-qa", "contexts 256, 512", "depths 0.1, 0.3, 0.5, 0.7, 0.9",
                   "seed 0", "do_sample=False", f"max_new_tokens {MAX_NEW_TOKENS}", "token_pruning none",
                   "stdlib docs", "5 prompts per task"):
        assert needed in out["protocol"], needed
    json.dumps(out)
    garbage = long_context_suite(Reader(bpe, garbage=True), bpe, (256,), samples=5)
    assert garbage["accuracy"] == 0.0 and all(not r["correct"] for r in garbage["records"])


def test_score():
    assert score(" 48213.", "48213") and score("48213 is the number", "48213")
    assert not score(" 482139", "48213") and not score("", "48213") and not score("4821", "48213")
    assert score('ea98e965".', "ea98e965")
    assert score("\nalready\n   present, the value is kept", "already present, the value")
    assert not score("already present, then", "already present, the value")


def test_pruning_configs_are_passed_through(bpe, monkeypatch):
    import contextlib
    import importlib

    generate = importlib.import_module("prunekit.inference.generation")
    seen = []

    @contextlib.contextmanager
    def recording(model, token_pruning=None, kv_pruning=None, tokenizer=None):
        seen.append((token_pruning, kv_pruning, tokenizer))
        yield model

    monkeypatch.setattr(generate, "pruning", recording)
    token, kv = object(), object()
    out = long_context_suite(Reader(bpe), bpe, (256,), samples=1, token_pruning=token, kv_pruning=kv)
    assert seen[0] == (token, kv, bpe)              # entered once for the suite (with the tokenizer: calibration)
    assert all(entry[:2] == (None, None) for entry in seen[1:])     # each answer adds nothing
    assert f"token_pruning {token}" in out["protocol"] and f"kv_pruning {kv}" in out["protocol"]


def test_prompt_pruning_fits_every_prompt_into_its_budget_and_keeps_the_question(bpe, tasks):
    from prunekit.eval.long_context import fitted
    from prunekit.inference import PromptPruningConfig
    model = llama(vocab_size=VOCAB)
    cfg = PromptPruningConfig(mode="tokens", budget=120)
    for task in TASKS:
        sample = tasks.sample(task, 256, 0)
        same, ids, extra = fitted(model, bpe, sample, cfg)
        question = bpe(sample.prompt[sample.document_end:], add_special_tokens=False)["input_ids"]
        assert same is sample and len(ids) <= 120 < len(sample.ids) == extra["prompt_tokens_before"]
        assert extra["prompt_tokens_after"] == len(ids) and list(ids[-len(question) + 2:]) == question[2:]
        assert fitted(model, bpe, sample, None) == (sample, sample.ids, {})
    out = long_context_suite(model, bpe, (256,), samples=1, prompt_pruning=cfg)
    assert all(r["prompt_tokens_after"] <= 120 < r["prompt_tokens_before"] for r in out["records"])
    assert out["per_context"]["256"]["prompt_tokens"][1] <= 120
    assert 0 <= out["per_context"]["256"]["prompt_pruning_seconds"] <= out["per_context"]["256"]["seconds"]
    assert f"prompt_pruning {cfg}" in out["protocol"]
    # a budget every prompt fits: the prompts are the suite's own, so the answers are too
    roomy = long_context_suite(model, bpe, (256,), samples=1, prompt_pruning=PromptPruningConfig(mode="tokens",
                                                                                                 budget=256))
    plain = long_context_suite(model, bpe, (256,), samples=1)
    assert [r["generation"] for r in roomy["records"]] == [r["generation"] for r in plain["records"]]
    assert all(r["prompt_tokens_after"] == r["prompt_tokens_before"] for r in roomy["records"])


def test_contexts_beyond_the_limit_are_refused(bpe):
    with pytest.raises(ValueError, match="context 512 exceeds the model's limit of 500 tokens"):
        long_context_suite(Reader(bpe, limit=500), bpe, CONTEXTS)
    assert check_contexts("256,128", SimpleNamespace(max_position_embeddings=256)) == (128, 256)
    assert check_contexts([4096], SimpleNamespace()) == (4096,)                     # no stated limit
    assert parse_contexts("8192, 2048,2048") == (2048, 8192) and parse_contexts(512) == (512,)
    for bad in ("", "2k", [32], [True], [1.5]):
        with pytest.raises(ValueError, match="contexts must be"):
            parse_contexts(bad)
    with pytest.raises(ValueError, match="too small for the doc-qa task"):
        LongContextTasks(bpe, max_new_tokens=60).sample("doc-qa", 64, 0)


def test_the_suite_through_evaluate_on_a_tiny_llama(bpe):
    protocol = EvalProtocol(contexts="256", long_context_samples=2)
    assert protocol.contexts == (256,) and EvalProtocol.from_dict(protocol.to_dict()) == protocol
    assert parse_suites("all") == ("perplexity", "fidelity", "knowledge")              # long-context: by name only
    model = llama(vocab_size=VOCAB)
    out = evaluate(model, bpe, "long-context", protocol)
    result = out["suites"]["long-context"]
    assert result["prompts"] == 2 * len(TASKS) and 0.0 <= result["accuracy"] <= 1.0
    assert out["protocol"]["contexts"] == [256] and out["protocol"]["long_context_samples"] == 2
    json.dumps(out)
    with pytest.raises(ValueError, match="add long-context"):
        evaluate(model, bpe, "perplexity", protocol, token_pruning=object())
    with pytest.raises(ValueError, match="long_context_samples"):
        EvalProtocol(long_context_samples=0)


def test_cli_runs_the_suite_and_prints_the_protocol(tiny_model_dir, tmp_path, capsys):
    report = tmp_path / "long.json"
    assert main(["eval", str(tiny_model_dir), "--suite", "long-context", "--context", "128",
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for task in TASKS:
        assert f"long-context {task}: 128: " in printed
    assert "long-context protocol: 10 prompts per task and context" in printed and "contexts 128 tokens" in printed
    saved = json.loads(report.read_text())["suites"]["long-context"]
    assert saved["prompts"] == 30 and saved["contexts"] == [128]
    assert main(["eval", str(tiny_model_dir), "--suite", "long-context", "--context", "4096"]) == 2
    assert "exceeds the model's limit of 2048 tokens" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--context", "128"]) == 2
    assert "--suite long-context" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--suite", "long-context", "--context", "512", "--long-context-samples",
                 "1", "--prompt-pruning", "tokens", "--budget", "400", "--json", str(report)]) == 0
    assert "prompt_pruning PromptPruningConfig(mode='tokens', budget=400" in capsys.readouterr().out
    saved = json.loads(report.read_text())["suites"]["long-context"]
    assert all(r["prompt_tokens_after"] <= 400 < r["prompt_tokens_before"] for r in saved["records"])
    assert main(["eval", str(tiny_model_dir), "--prompt-pruning", "tokens", "--budget", "64"]) == 2
    assert "--suite long-context" in capsys.readouterr().err
