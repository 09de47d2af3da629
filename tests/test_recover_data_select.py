"""`prunekit recover --data-select METHOD --budget B` (recovery.train.selected_windows, the loss mask in the
training loss): the masked loss against a hand computation on a tiny model, masked-out targets that get no
gradient, windows packed from a qtuning selection with its spans, the CLI end to end with a stock reload of
the output, and bad input refused before any work."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import llama, recover_cli
from prunekit.data import tokenize
from prunekit.recovery import LoraRecoverConfig, recover_
from prunekit.recovery.train import masked_next_token_loss, objective, selected_windows

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCE = "the model of the river and the city of the north is in the first part of the year"


@torch.no_grad()
def test_masked_loss_equals_a_hand_computation():
    model = llama(0)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[False, True, False, True, True, False], [False, False, False, False, False, True]])
    logits = model(input_ids=ids).logits
    logp = F.log_softmax(logits.double(), -1)
    terms = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 6) if mask[b, t]]
    expected = torch.stack(terms).mean()
    assert float(masked_next_token_loss(logits, ids, mask)) == pytest.approx(float(expected), rel=1e-5)
    cfg = LoraRecoverConfig()
    assert float(objective(model, ids, cfg, None, loss_mask=mask)) == pytest.approx(float(expected), rel=1e-5)
    # an all-True mask (token 0 is never a target) is the ordinary next-token loss
    full = torch.ones_like(mask)
    assert float(objective(model, ids, cfg, None, loss_mask=full)) == pytest.approx(float(objective(model, ids, cfg,
                                                                                                   None)), rel=1e-6)


@torch.no_grad()
def test_a_masked_out_target_has_no_influence_but_its_input_does():
    model = llama(0)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False, True, True, False, True, True]])
    changed = ids.clone()
    changed[0, 3] = (ids[0, 3] + 1) % 64
    # token 3 is not a target: changing it moves the loss only through the positions that read it
    base = masked_next_token_loss(model(input_ids=ids).logits, ids, mask)
    logits_changed = model(input_ids=changed).logits
    target_only = masked_next_token_loss(model(input_ids=ids).logits, changed, mask)
    assert float(target_only) == pytest.approx(float(base), rel=1e-6)                 # not a target
    assert float(masked_next_token_loss(logits_changed, changed, mask)) != pytest.approx(float(base), rel=1e-6)


def _pool(path):
    words = SENTENCE.split()
    texts = [" ".join(words[i:] + words[:i]) for i in range(18)] + ["of of of of the the the"] * 4
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_selected_windows_pack_the_selection_with_its_loss_mask(tmp_path, tiny_model_dir):
    from prunekit.io.loading import load
    _pool(tmp_path / "pool.jsonl")
    model, tokenizer = load(tiny_model_dir)
    windows, mask, record = selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "qtuning", "8 samples",
                                             seqlen=16, progress=False)
    assert record["samples"]["kept"] == 8 and record["method"] == "qtuning"
    assert windows.shape == mask.shape == (record["windows"], 16)
    assert record["tokens_trained"] == windows.numel() <= record["tokens_selected"]
    assert record["loss_targets"]["counted"] == int(mask[:, 1:].sum()) < record["loss_targets"]["targets"]
    # the first window starts with the first kept sample, whose first token is never a target
    assert not bool(mask[0, 0])
    assert len(tokenize(tokenizer, SENTENCE)) > 16                  # samples span window boundaries
    again, mask_again, _ = selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "qtuning", "8 samples",
                                            seqlen=16, progress=False)
    assert torch.equal(again, windows) and torch.equal(mask_again, mask)                # deterministic
    random_windows, random_mask, random_record = selected_windows(model, tokenizer, tmp_path / "pool.jsonl",
                                                                  "random", "0.5", seqlen=16, progress=False)
    assert random_mask is None and random_record["samples"]["kept"] == 10


def test_recover_trains_only_on_counted_targets(tmp_path):
    windows = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, 2:5] = True
    model = llama(0)
    report = recover_(model, LoraRecoverConfig(steps=2, batch_size=2, rank=2, checkpoint_every=0), windows,
                      loss_mask=mask, progress=False)
    assert report["loss_mask"] == {"targets": 28, "counted": 12}
    assert "loss mask" in report["loss_protocol"]


def test_cli_data_select_qtuning_end_to_end(tmp_path, tiny_model_dir, capsys):
    _pool(tmp_path / "pool.jsonl")
    out, log = tmp_path / "out", tmp_path / "report.json"
    code = recover_cli([str(tiny_model_dir), "--data", str(tmp_path / "pool.jsonl"), "--method", "lora",
                        "--data-select", "qtuning", "--budget", "0.5", "--steps", "2", "--batch-size", "2",
                        "--seqlen", "16", "--rank", "2", "--out", str(out), "--no-progress", "--json", str(log)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(log.read_text())
    selection = report["data"]["selection"]
    assert selection["method"] == "qtuning" and selection["samples"]["kept"] == 10
    assert report["loss_mask"]["counted"] == selection["loss_targets"]["counted"]
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["recovery"]["data"]["selection"]["tokens_trained"] == selection["tokens_trained"]
    AutoModelForCausalLM.from_pretrained(out)                                       # stock reload


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0.5"], "--data-select METHOD"),
    (["--data-select", "qtuning"], "needs --budget"),
    (["--data-select", "qtunin", "--budget", "0.5"], "Did you mean 'qtuning'"),
    (["--data-select", "random", "--budget", "0"], "fraction of the pool"),
    (["--data-select", "random", "--budget", "0.5", "--samples", "4"], "drop --samples"),
    (["--data-select", "qtuning", "--budget", "0.5", "--method", "kd", "--teacher", "default"], "next-token loss"),
    (["--split-tokens", "8"], "give --data-select"),
    (["--data-select", "random", "--budget", "0.5", "--split-tokens", "0"], "at least 1"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys, extra, message):
    _pool(tmp_path / "pool.jsonl")
    argv = [str(tiny_model_dir), "--data", str(tmp_path / "pool.jsonl"), "--steps", "2", "--out",
            str(tmp_path / "o"), "--no-progress", *extra]
    if "--method" not in extra:
        argv += ["--method", "lora"]
    assert recover_cli(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_too_small_budget_and_paser_without_the_dense_model_are_refused(tmp_path, tiny_model_dir):
    from prunekit.io.loading import load
    _pool(tmp_path / "pool.jsonl")
    model, tokenizer = load(tiny_model_dir)
    with pytest.raises(ValueError, match="pass the dense model"):
        selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "paser", "0.5", seqlen=16, progress=False)
    with pytest.raises(ValueError, match="paser only, not random"):
        selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "random", "0.5", seqlen=16, dense=model,
                         progress=False)
    with pytest.raises(ValueError, match="fewer than one training window"):
        selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "random", "1 samples", seqlen=512,
                         progress=False)


def test_split_tokens_select_among_pieces_of_the_samples(tmp_path, tiny_model_dir):
    from prunekit.io.loading import load
    from prunekit.selection.select import select
    _pool(tmp_path / "pool.jsonl")
    model, tokenizer = load(tiny_model_dir)
    windows, _, record = selected_windows(model, tokenizer, tmp_path / "pool.jsonl", "perplexity", "0.5", seqlen=16,
                                          split_tokens=8, progress=False)
    report = select(tmp_path / "pool.jsonl", "perplexity", "0.5", tmp_path / "sel.jsonl", model=model,
                    tokenizer=tokenizer, split_tokens=8, progress=False)
    kept = [json.loads(line)["text"] for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert record["split_tokens"] == 8 and record["samples"] == report["samples"]
    assert report["samples"]["pool"] > 20 and all(len(tokenize(tokenizer, text)) <= 8 for text in kept)
    stream = torch.cat([tokenize(tokenizer, text) for text in kept])
    assert torch.equal(windows.flatten(), stream[:windows.numel()])


def test_paser_windows_are_what_data_select_paser_keeps(tmp_path, tiny_model_dir, tiny_pruned_dir):
    from prunekit.io.loading import load
    from prunekit.selection.select import select
    _pool(tmp_path / "pool.jsonl")
    dense, tokenizer = load(tiny_model_dir)
    pruned, _ = load(tiny_pruned_dir)
    windows, mask, record = selected_windows(pruned, tokenizer, tmp_path / "pool.jsonl", "paser", "0.5", seqlen=16,
                                             dense=dense, progress=False)
    assert mask is None and record["method"] == "paser" and record["samples"]["kept"] == 10
    # the same selection as `prunekit data select --method paser --model DENSE --pruned DIR`, packed in pool order
    select(tmp_path / "pool.jsonl", "paser", "0.5", tmp_path / "sel.jsonl", model=dense, tokenizer=tokenizer,
           options={"pruned": pruned}, progress=False)
    kept = [json.loads(line)["text"] for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    stream = torch.cat([tokenize(tokenizer, text) for text in kept])
    assert torch.equal(windows.flatten(), stream[:windows.numel()]) and len(stream) - windows.numel() < 16
    assert record["options"].get("pruned") is None                     # a model is not written into reports


def test_cli_data_select_paser_takes_the_recorded_source_as_the_dense_model(tmp_path, tiny_pruned_dir, tiny_model_dir,
                                                                           capsys):
    _pool(tmp_path / "pool.jsonl")
    common = [str(tiny_pruned_dir), "--data", str(tmp_path / "pool.jsonl"), "--method", "lora", "--data-select",
              "paser", "--budget", "0.5", "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--rank", "2",
              "--no-progress"]
    log = tmp_path / "report.json"
    assert recover_cli([*common, "--out", str(tmp_path / "out"), "--json", str(log)]) == 0, capsys.readouterr().err
    report = json.loads(log.read_text())
    source = json.loads((tiny_pruned_dir / "prunekit.json").read_text())["source"]["path"]
    assert report["data"]["selection"]["method"] == "paser" and report["data"]["selection"]["dense"] == source
    assert report["teacher"] is None                                    # lora: the dense model is not a teacher
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")                              # stock reload
    # --teacher names the dense model explicitly; the selection is the same
    log2 = tmp_path / "report2.json"
    assert recover_cli([*common, "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "out2"),
                        "--json", str(log2)]) == 0
    again = json.loads(log2.read_text())["data"]["selection"]
    assert again["tokens_trained"] == report["data"]["selection"]["tokens_trained"]
    # a DIR that records no source, with no --teacher: refused with the hint, nothing written
    assert recover_cli([str(tiny_model_dir), *common[1:], "--out", str(tmp_path / "out3")]) == 2
    assert "--data-select paser needs the dense model" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()
    # DIR itself as the dense model: refused
    assert recover_cli([*common, "--teacher", str(tiny_pruned_dir), "--out", str(tmp_path / "out5")]) == 2
    assert "needs the dense model DIR was pruned from, not" in capsys.readouterr().err
    # --teacher with a selector that does not compare two models is still refused
    assert recover_cli([str(tiny_pruned_dir), *common[1:6], "random", *common[7:], "--teacher", str(tiny_model_dir),
                        "--out", str(tmp_path / "out4")]) == 2
    assert "--data-select paser only" in capsys.readouterr().err
