"""sublayer-drop (methods/sublayer_drop.py) and the surgery under it (surgery.drop_sublayer_): removing an
attention or FFN sublayer is exactly zeroing its output, generation with the KV cache still works, the
output reloads with load_pruned, and llama.cpp runs it as the `deci` architecture."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model
from test_gguf_export import IDS, assert_runs_the_same, build, calibration

from prunekit import prune_
from prunekit.io.gguf_writer import plan_gguf, write_gguf
from prunekit.methods.sublayer_drop import SublayerDropConfig
from prunekit.models.cache import cache_keyword, returned_cache
from prunekit.surgery import NoAttention, NoMLP, drop_sublayer_, structure_record


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dropping_a_sublayer_equals_zeroing_its_output(family):
    model = build(family)
    reference = build(family)
    with torch.no_grad():
        reference.model.layers[1].self_attn.o_proj.weight.zero_()
        reference.model.layers[2].mlp.down_proj.weight.zero_()
    drop_sublayer_(model, 1, "attention")
    drop_sublayer_(model, 2, "mlp")
    assert isinstance(model.model.layers[1].self_attn, NoAttention) and isinstance(model.model.layers[2].mlp, NoMLP)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    assert structure_record(model)["widths"][1] == {"heads": 0, "kv_heads": 0, "channels": 96}
    assert structure_record(model)["widths"][2]["channels"] == 0 and not structure_record(model)["stock"]
    with pytest.raises(ValueError, match="already removed"):
        drop_sublayer_(model, 1, "attention")


def test_generate_with_cache_when_block_0_has_no_attention():
    # generate reads the sequence length from layer 0's cache: the removed attention must still count positions
    model = build("llama")
    drop_sublayer_(model, 0, "attention")
    with torch.no_grad():
        cached = model.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False)
        uncached = model.generate(torch.tensor([IDS]), max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_decode_step_on_the_cache_matches_the_full_forward_when_block_0_has_no_attention():
    """A hand-written decode loop (the evaluators', the benchmarks') gives no positions: the model takes them
    from layer 0's cache length, so the removed attention must have counted the prefix into the cache."""
    model = build("llama")
    drop_sublayer_(model, 0, "attention")
    ids = torch.tensor([IDS])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        cache = returned_cache(model(input_ids=ids[:, :-1], use_cache=True))
        assert cache.get_seq_length(0) == ids.shape[1] - 1
        step = model(input_ids=ids[:, -1:], use_cache=True, **{cache_keyword(model): cache}).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_scores_rank_a_silent_sublayer_first():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()         # adds nothing: importance 0
    report = prune_(model, SublayerDropConfig(layers=1), calibration(), progress=False)
    assert report.scores["attention"][2] == pytest.approx(0, abs=1e-6)
    assert min(report.scores["attention"][:2]) > 1e-4
    assert isinstance(model.model.layers[2].self_attn, NoAttention)
    assert "removed the attention of blocks [2]" in report.notes[0]


def test_both_kinds_in_one_ranking_and_a_block_losing_both_goes_whole():
    model = build("llama", num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    report = prune_(model, SublayerDropConfig(layers=2, sublayers="both"), calibration(), progress=False)
    assert report.removed_blocks == [1] and len(model.model.layers) == 3
    assert "removed blocks [1] whole" in report.notes[0]


def test_counts_and_refusals():
    assert SublayerDropConfig(sparsity=0.5, sublayers="both").candidates(30) == 60
    with pytest.raises(ValueError, match="attention, mlp or both"):
        SublayerDropConfig(layers=1, sublayers="heads")
    with pytest.raises(ValueError, match="norm layout"):
        prune_(tiny_model("gemma2"), SublayerDropConfig(layers=1), torch.randint(0, 128, (4, 8)), progress=False)


def test_export_reloads_with_load_pruned_and_runs_in_llama_cpp_as_deci(bpe, tmp_path):
    from prunekit.io.export import save_pretrained_atomic
    from prunekit.io.loading import load_pruned
    model = build("llama")
    drop_sublayer_(model, 0, "attention")      # block 0: written as a zero one-head attention (llama.cpp's head size)
    drop_sublayer_(model, 1, "attention")      # elsewhere: a deci layer without attention
    drop_sublayer_(model, 2, "mlp")
    out = save_pretrained_atomic(model, bpe, tmp_path / "m", metadata={"structure": structure_record(model)})
    reloaded, _ = load_pruned(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert json.loads((out / "prunekit.json").read_text())["structure"]["stock"] is False
    plan = plan_gguf(model)
    assert plan.arch.name == "deci" and [b.heads for b in plan.blocks] == [0, 0, 4]
    assert_runs_the_same(model, write_gguf(model, bpe, tmp_path / "m.gguf", outtype="f32").path)


def test_cli_sublayer_drop(tmp_path):
    from conftest import tiny_tokenizer
    from prunekit.cli import main
    source = tmp_path / "dense"
    build("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--method", "sublayer-drop", "--layers", "2", "--sublayers", "attention",
                 "--samples", "4", "--seqlen", "16", "--no-eval", "--out", str(out)]) == 0
    widths = json.loads((out / "prunekit.json").read_text())["structure"]["widths"]
    assert sum(w["heads"] == 0 for w in widths) == 2 and all(w["channels"] == 96 for w in widths)


def test_out_of_core_equals_in_memory(tmp_path):
    from conftest import tiny_tokenizer
    from prunekit.cli import main
    from prunekit.io.loading import load
    source = tmp_path / "dense"
    build("llama", num_hidden_layers=4).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    outputs = {}
    for offload in ("disk", "none"):
        assert main(["prune", str(source), "--method", "sublayer-drop", "--layers", "2", "--sublayers", "both",
                     "--samples", "4", "--seqlen", "16", "--no-eval", "--out", str(tmp_path / offload),
                     "--offload", offload]) == 0
        outputs[offload], _ = load(tmp_path / offload)
    ids = [i % 128 for i in IDS]
    assert torch.equal(logits(outputs["disk"], ids), logits(outputs["none"], ids))
