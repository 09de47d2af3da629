"""LLMs as text encoders pruned by depth (arXiv 2410.14578): InfoNCE, pooling, the initial loss of
every cut, L3Prune's rule, last-k, pruning with stock reload, the fine-tune and the CLI."""
import copy
import json
import math

import pytest
import torch
from conftest import TINY_CONFIGS, llama, word_tokenizer
from transformers import AutoModelForCausalLM

from prunekit.encoders import (contrastive_loss, cut_losses, embed, finetune_encoder_, l3prune, last_k,
                               prune_encoder_)

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "return the sum of two numbers", "open a file and read its lines", "sort the list in place",
    "parse a date from a string", "close the socket and free the buffer", "send the message to the server",
    "compute the hash of the data", "split the path into head and tail", "join the words with a space",
    "check whether the key is in the table", "count the calls made to the function", "write the bytes to disk",
]
DOCS = [
    "a plus b", "with open path as f lines", "items sort key", "date parse text format",
    "sock close buffer free", "server send message", "hash data digest", "head tail split path",
    "space join words", "key in table", "calls count function", "disk write bytes",
]
PAIRS = list(zip(SENTENCES, DOCS))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(SENTENCES + DOCS)


def deep(family: str, blocks: int = 4, seed: int = 0):
    """A tiny model of `family` with `blocks` decoder blocks."""
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = blocks
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(blocks)]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


# ---------------------------------------------------------------- InfoNCE on hand-built embeddings

def test_infonce_known_values():
    eye = torch.eye(2)
    # matched: each query's logits are (1, 0) / t with the positive first -> log(1 + e^(-1/t))
    assert float(contrastive_loss(eye, eye, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(contrastive_loss(eye, eye, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # swapped: the positive scores 0 and the negative 1 -> log(1 + e^(1/t))
    assert float(contrastive_loss(eye, eye.flip(0), 1.0)) == pytest.approx(math.log(1 + math.e), abs=1e-6)
    # cosine similarity: the scale of a row does not matter
    assert float(contrastive_loss(3 * eye, 0.5 * eye, 1.0)) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # three rows, one query: [cos 1, cos 0, cos -1] -> -log(e / (e + 1 + e^-1)), averaged with two others
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    expected = [math.log(math.e + 1 + math.exp(-1)) - 1, math.log(1 + math.e + 1) - 1,
                math.log(math.exp(-1) + 1 + math.e) - 1]
    assert float(contrastive_loss(q, q, 1.0)) == pytest.approx(sum(expected) / 3, abs=1e-6)


@pytest.mark.parametrize("q, d, t, match", [
    (torch.ones(2, 3), torch.ones(3, 3), 0.05, "same shape"),
    (torch.ones(3), torch.ones(3), 0.05, "same shape"),
    (torch.ones(2, 3), torch.ones(2, 3), 0.0, "temperature"),
])
def test_infonce_bad_input(q, d, t, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(q, d, t)


# ---------------------------------------------------------------- pooling

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_padded_batch_equals_each_text_alone(tok, family, pooling):
    model = deep(family, 2)
    texts = SENTENCES[:5] + ["sort"]                       # lengths 6, 7, 5, 6, 8, 1 words
    batched = embed(model, tok, texts, pooling=pooling, batch_size=6)
    alone = torch.cat([embed(model, tok, [t], pooling=pooling) for t in texts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.norm(dim=1), torch.ones(len(texts)), atol=1e-5)


def test_pooling_matches_a_hand_computation(tok):
    model = llama()
    ids = torch.tensor([tok(SENTENCES[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]            # (seq, hidden)
    mean = embed(model, tok, [SENTENCES[0]], pooling="mean")[0]
    torch.testing.assert_close(mean, torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-5, rtol=1e-4)
    # last: an EOS token is appended and its hidden state taken
    with_eos = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
    with torch.no_grad():
        last_hidden = model.model(input_ids=with_eos).last_hidden_state[0, -1]
    last = embed(model, tok, [SENTENCES[0]], pooling="last")[0]
    torch.testing.assert_close(last, torch.nn.functional.normalize(last_hidden, dim=0), atol=1e-5, rtol=1e-4)


def test_embed_bad_input(tok):
    model = llama()
    with pytest.raises(ValueError, match="pooling"):
        embed(model, tok, ["a"], pooling="cls")
    with pytest.raises(ValueError, match="layer"):
        embed(model, tok, ["sort the list"], layer=3)
    with pytest.raises(ValueError, match="no tokens"):
        embed(model, tok, ["sort the list", ""])
    with pytest.raises(TypeError, match="list of strings"):
        embed(model, tok, "sort the list")


# ---------------------------------------------------------------- the initial loss of every cut

@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
def test_cut_losses_equal_the_truncated_models(tok, family):
    model = deep(family, 4)
    calls = []
    handle = model.base_model.register_forward_hook(lambda *args: calls.append(1))
    losses = cut_losses(model, tok, PAIRS[:10], batch_size=4)           # batches 4, 4 (the 2 left over dropped)
    handle.remove()
    assert len(calls) == 2                                               # one pass per batch, not one per cut
    assert sorted(losses) == [1, 2, 3, 4]
    for k in range(1, 5):
        cut = copy.deepcopy(model)
        prune_encoder_(cut, k)
        assert cut.config.num_hidden_layers == k
        expected = []
        for start in (0, 4):
            batch = PAIRS[start:start + 4]
            q = embed(cut, tok, [p[0] for p in batch])
            d = embed(cut, tok, [p[1] for p in batch])
            expected.append(float(contrastive_loss(q, d)))
        assert losses[k] == pytest.approx(sum(expected) / 2, abs=1e-4)
        # embed at a block boundary is the truncated model's embedding
        torch.testing.assert_close(embed(model, tok, SENTENCES[:3], layer=k), embed(cut, tok, SENTENCES[:3]),
                                   atol=1e-5, rtol=1e-4)
    assert len({round(v, 6) for v in losses.values()}) > 1              # the cuts differ


def test_cut_losses_bad_input(tok):
    model = llama()
    with pytest.raises(ValueError, match="at least 2"):
        cut_losses(model, tok, PAIRS[:1])
    with pytest.raises(ValueError, match="batch_size"):
        cut_losses(model, tok, PAIRS[:4], batch_size=1)


# ---------------------------------------------------------------- L3Prune on hand-built curves

def test_l3prune_hand_built_curves():
    curve = [5.0, 3.0, 4.0, 6.0, 7.0, 2.0, 2.5, 1.0]                     # L = 8, halves 1..4 and 5..8
    assert l3prune(curve) == {"small": 2, "large": 8}
    assert l3prune({k + 1: v for k, v in enumerate(curve)}) == {"small": 2, "large": 8}
    dip = [4.0, 1.0, 3.0, 2.0, 0.5, 0.9, 1.5]                              # L = 7: halves 1..3 and 4..7
    assert l3prune(dip) == {"small": 2, "large": 5}
    assert l3prune([1.0, 1.0, 2.0, 2.0]) == {"small": 1, "large": 3}      # ties go to the smaller cut
    assert l3prune([0.3, 0.2]) == {"small": 1, "large": 2}                # L = 2: one cut per half


@pytest.mark.parametrize("losses, match", [
    ([1.0], "at least 2 blocks"),
    ([], "at least 2 blocks"),
    ([1.0, float("nan"), 2.0], "not finite"),
    ({1: 1.0, 3: 2.0}, "every cut"),
])
def test_l3prune_bad_input(losses, match):
    with pytest.raises(ValueError, match=match):
        l3prune(losses)


# ---------------------------------------------------------------- last-k and pruning

def test_last_k():
    assert last_k(30, 0.3) == 21
    assert last_k(24, 0.3) == 17              # 7.2 blocks rounds to 7
    assert last_k(2, 0.5) == 1
    assert last_k(10, 0.25) == 7              # 2.5 rounds half up to 3


@pytest.mark.parametrize("n, fraction, match", [
    (30, 0.0, r"\(0, 1\)"), (30, 1.0, r"\(0, 1\)"), (30, 1.5, r"\(0, 1\)"), (30, True, r"\(0, 1\)"),
    (1, 0.3, "at least 2 blocks"), (2, 0.1, "rounds to 0"), (2, 0.9, "at least one must stay"),
])
def test_last_k_bad_input(n, fraction, match):
    with pytest.raises(ValueError, match=match):
        last_k(n, fraction)


def test_prune_encoder_reloads_with_stock_transformers(tok, tmp_path):
    from prunekit.io.export import save_pretrained_atomic
    model = deep("qwen2", 4)
    assert prune_encoder_(model, 3) == [3]
    before = embed(model, tok, SENTENCES[:4])
    out = save_pretrained_atomic(model, tok, tmp_path / "enc", metadata={})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(embed(reloaded, tok, SENTENCES[:4]), before, atol=1e-5, rtol=1e-4)
    assert prune_encoder_(model, 3) == []                                  # keeping every block removes none
    for bad in (0, 4, 1.5):
        with pytest.raises(ValueError, match="keep_blocks"):
            prune_encoder_(model, bad)


# ---------------------------------------------------------------- the fine-tune

def test_finetune_lowers_the_loss_and_is_deterministic(tok):
    runs = []
    for _ in range(2):
        model = llama(seed=1)
        before = cut_losses(model, tok, PAIRS, batch_size=6)[2]
        history = finetune_encoder_(model, tok, PAIRS, steps=12, lr=3e-3, batch_size=6, seed=5)
        after = cut_losses(model, tok, PAIRS, batch_size=6)[2]
        assert after < before - 0.1, (before, after)
        assert all(p.requires_grad for p in model.parameters())           # restored
        assert not model.training
        runs.append(history)
    assert runs[0] == runs[1]


def test_finetune_last_blocks_only_changes_those(tok):
    model = llama(seed=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    finetune_encoder_(model, tok, PAIRS, steps=2, lr=1e-2, batch_size=4, train_blocks=1)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm.")) for n in changed), changed


def test_finetune_bad_input(tok):
    model = llama()
    with pytest.raises(ValueError, match="steps"):
        finetune_encoder_(model, tok, PAIRS, steps=0)
    with pytest.raises(ValueError, match="train_blocks"):
        finetune_encoder_(model, tok, PAIRS, steps=1, train_blocks=3)
    with pytest.raises(ValueError, match="at least 2"):
        finetune_encoder_(model, tok, PAIRS[:1], steps=1)


# ---------------------------------------------------------------- the CLI, end to end

def _cli(argv):
    from prunekit.cli import main
    return main(argv)


FAST = ["--eval-pairs", "12", "--loss-pairs", "8", "--batch-size", "4", "--max-length", "24"]


def test_cli_last_k_with_finetune_reloads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    code = _cli(["encoder", str(tiny_model_dir), "--cut", "last-k", "--fraction", "0.5", "--finetune-steps", "2",
                 "--train-pairs", "16", *FAST, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "encoder_report.json").read_text())
    assert report["blocks_before"] == 2 and report["blocks_after"] == 1 and report["removed_blocks"] == [1]
    for stage in ("recall_dense", "recall_pruned", "recall_finetuned"):
        assert 0 <= report[stage]["recall@1"] <= report[stage]["recall@10"] <= 1
        assert report[stage]["protocol"]["queries"] == 12
    assert report["finetune"]["steps"] == 2
    assert json.loads((out / "prunekit.json").read_text())["encoder"]["blocks_after"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 1
    assert "recall@1/@10" in capsys.readouterr().out


def test_cli_l3prune_small(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    assert _cli(["encoder", str(tiny_model_dir), "--cut", "l3prune-small", *FAST, "--out", str(out)]) == 0
    report = json.loads((out / "encoder_report.json").read_text())
    assert report["l3prune"]["cuts"]["small"] == 1 and report["blocks_after"] == 1     # L = 2: the lower half is k=1
    assert set(report["l3prune"]["losses"]) == {"1", "2"}
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize("extra, match", [
    (["--cut", "l3prune-large", "--fraction", "0.3"], "--fraction applies to --cut last-k only"),
    (["--cut", "last-k", "--fraction", "1.5"], r"\(0, 1\)"),
    (["--cut", "last-k", "--fraction", "0.1"], "rounds to 0"),
    (["--cut", "last-k", "--eval-pairs", "5"], "at least 10"),
])
def test_cli_bad_input(tiny_model_dir, tmp_path, capsys, extra, match):
    assert _cli(["encoder", str(tiny_model_dir), *extra, "--out", str(tmp_path / "x")]) == 2
    assert match.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_a_one_block_model(tmp_path, capsys, tok):
    path = tmp_path / "one"
    llama(num_hidden_layers=1).save_pretrained(path)
    tok.save_pretrained(path)
    assert _cli(["encoder", str(path), "--cut", "last-k", "--out", str(tmp_path / "x")]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_bench_tiny_mode(tiny_model_dir, tmp_path, capsys):
    from conftest import load_bench
    bench = load_bench("encoder_smollm2")
    assert bench.main(["--tiny", "--model", str(tiny_model_dir), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| last-k | 1 |" in out and "Protocol: 12 held-out queries" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["unpruned", "last-k", "l3prune-large", "l3prune-small"]
    assert rows[3]["blocks"] == 1 and rows[1]["finetuned"] is not None and rows[0]["finetuned"] is not None
