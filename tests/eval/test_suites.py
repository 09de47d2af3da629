"""The suites end to end on a tiny model: a model against itself is perfect, a different model is
not, the reference round-trips through disk and refuses another protocol, and drift is reported."""
import copy
from pathlib import Path
import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.eval.suites import EvalProtocol, Reference, drift_warnings, evaluate, parse_suites, reference

PROTOCOL = EvalProtocol(seqlen=32, max_tokens=640, fidelity_tokens=100, prompts=4, prompt_tokens=8, new_tokens=8,
                        batch_size=3)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def ref(dense, tokenizer):
    return reference(dense, tokenizer, "perplexity,fidelity", PROTOCOL)


def test_model_against_itself_is_perfect(dense, tokenizer, ref):
    out = evaluate(dense, tokenizer, ["perplexity", "fidelity"], PROTOCOL, reference=ref)
    fid = out["suites"]["fidelity"]
    assert fid["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert fid["top1_agreement"] == 1.0
    assert fid["first_divergent_token_mean"] == 8.0 and fid["first_divergent_token_median"] == 8.0
    assert fid["share_divergent_tokens"] == 0.0
    assert fid["positions"] == 100 and fid["prompts"] == 4
    assert "100 positions" in fid["protocol"] and "2311.01544" in fid["protocol"]
    ppl = out["suites"]["perplexity"]
    assert ppl["ppl"] == pytest.approx(ref.perplexity["ppl"], rel=1e-6)
    assert ppl["baseline"]["ppl"] == ref.perplexity["ppl"] and ppl["ratio_to_baseline"] == pytest.approx(1.0)
    assert out["warnings"] == [] and out["protocol"]["fidelity_tokens"] == 100
    json.dumps(out)                                               # JSON-ready


def test_a_different_model_is_not_perfect(tokenizer, ref):
    other = tiny_model("llama", seed=1)
    fid = evaluate(other, tokenizer, "fidelity", PROTOCOL, reference=ref)["suites"]["fidelity"]
    assert fid["kl_mean"] > 0.01
    assert fid["top1_agreement"] < 1.0
    assert fid["first_divergent_token_mean"] < 8.0 and fid["share_divergent_tokens"] > 0.0


def test_fidelity_needs_a_reference(dense, tokenizer):
    with pytest.raises(ValueError, match="--baseline"):
        evaluate(dense, tokenizer, "fidelity", PROTOCOL)


def test_reference_round_trip_and_refusals(dense, tokenizer, ref, tmp_path):
    ref.save(tmp_path / "ref")
    ref.save(tmp_path / "ref")                                    # replacing an existing reference works
    loaded = Reference.load(tmp_path / "ref", PROTOCOL, "fidelity")
    assert torch.equal(loaded.logprobs, ref.logprobs) and torch.equal(loaded.continuations, ref.continuations)
    assert loaded.perplexity == ref.perplexity and loaded.protocol == PROTOCOL
    assert not list(tmp_path.glob(".ref*"))                       # no staging left behind
    out = evaluate(dense, tokenizer, "fidelity", PROTOCOL, reference=loaded)
    assert out["suites"]["fidelity"]["top1_agreement"] == 1.0
    other = EvalProtocol(**{**PROTOCOL.to_dict(), "new_tokens": 4, "lm_eval_tasks": ("piqa",)})
    with pytest.raises(ValueError, match="new_tokens: reference 8 vs requested 4"):
        Reference.load(tmp_path / "ref", other)
    with pytest.raises(ValueError, match="not \\['knowledge'\\]"):
        Reference.load(tmp_path / "ref", PROTOCOL, "knowledge")
    (tmp_path / "notref").mkdir()
    with pytest.raises(FileExistsError):
        ref.save(tmp_path / "notref")
    with pytest.raises(FileNotFoundError):
        Reference.load(tmp_path / "notref")


def test_drift_warnings(ref):
    recorded = copy.deepcopy(ref.perplexity)
    assert drift_warnings(ref.perplexity, recorded) == []
    recorded["ppl"] = ref.perplexity["ppl"] * 1.0005                 # within 0.1%
    assert drift_warnings(ref.perplexity, recorded) == []
    recorded["ppl"] = ref.perplexity["ppl"] * 1.01
    [warning] = drift_warnings(ref.perplexity, recorded)
    assert warning.startswith("protocol drift:") and f"{recorded['ppl']:.4f}" in warning
    assert f"{ref.perplexity['ppl']:.4f}" in warning
    recorded["seqlen"] = 64
    [warning] = drift_warnings(ref.perplexity, recorded)
    assert "not comparable" in warning and "seqlen 64 at pruning time vs 32 now" in warning
    assert drift_warnings(ref.perplexity, None) == []


def test_evaluate_reports_drift(dense, tokenizer, ref):
    recorded = dict(ref.perplexity, ppl=ref.perplexity["ppl"] * 2)
    out = evaluate(dense, tokenizer, "perplexity", PROTOCOL, reference=ref, recorded=recorded)
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("protocol drift")


def test_vocabulary_mismatch_is_refused(tokenizer, ref):
    from conftest import llama
    other = llama(vocab_size=256)
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(other, tokenizer, "fidelity", PROTOCOL, reference=ref)


def test_protocol_and_suite_validation():
    with pytest.raises(ValueError, match="stride"):
        EvalProtocol(seqlen=32, stride=64)
    with pytest.raises(ValueError, match="new_tokens"):
        EvalProtocol(new_tokens=0)
    assert EvalProtocol(lm_eval_tasks="piqa, boolq").lm_eval_tasks == ("piqa", "boolq")
    assert EvalProtocol.from_dict(PROTOCOL.to_dict()) == PROTOCOL
    assert parse_suites("all") == ("perplexity", "fidelity", "knowledge")
    assert parse_suites(["lm-eval", "perplexity"]) == ("perplexity", "lm-eval")
    with pytest.raises(ValueError, match="unknown suite 'ppl'"):
        parse_suites("ppl")


def test_knowledge_suite_with_and_without_reference(dense, tokenizer):
    from pathlib import Path
    protocol = EvalProtocol(**{**PROTOCOL.to_dict(), "lm_eval_tasks": ("piqa",),
                               "knowledge_data": str(Path(__file__).with_name("knowledge_small.jsonl"))})
    alone = evaluate(dense, tokenizer, "knowledge", protocol)["suites"]["knowledge"]
    assert alone["questions"] == 6 and "retention_mc" not in alone and len(alone["questions_sha256"]) == 16
    ref = reference(dense, tokenizer, "knowledge", protocol)
    out = evaluate(dense, tokenizer, "knowledge", protocol, reference=ref)["suites"]["knowledge"]
    assert out["mc_accuracy"] == out["baseline"]["mc_accuracy"] == alone["mc_accuracy"]
    assert out["exact_match"] == out["baseline"]["exact_match"]
    with pytest.raises(ValueError, match="another evaluation protocol"):
        evaluate(dense, tokenizer, "knowledge", PROTOCOL, reference=ref)


def test_cli_eval_suites(tiny_model_dir, tmp_path, capsys):
    from prunekit.cli import main
    knowledge = str(Path(__file__).with_name("knowledge_small.jsonl"))
    fast = ["--seqlen", "32", "--max-tokens", "640", "--fidelity-tokens", "64", "--knowledge-data", knowledge]
    assert main(["eval", str(tiny_model_dir), "--suite", "fidelity", *fast]) == 2
    assert "--baseline" in capsys.readouterr().err
    report = tmp_path / "eval.json"
    assert main(["eval", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--suite", "all", *fast,
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in printed and "share of divergent tokens 0.00%" in printed
    assert "retention exact" in printed and "seqlen=32" in printed
    result = json.loads(report.read_text())
    assert result["perplexity"]["ppl"] == result["suites"]["perplexity"]["baseline"]["ppl"]
    assert result["suites"]["fidelity"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert set(result["suites"]) == {"perplexity", "fidelity", "knowledge"}


def test_cli_refuses_a_baseline_with_another_vocabulary(tiny_model_dir, tmp_path, capsys):
    from conftest import word_tokenizer
    from prunekit.cli import main
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    word_tokenizer(["completely different words here"] * 3).save_pretrained(other)
    assert main(["eval", str(tiny_model_dir), "--baseline", str(other), "--suite", "fidelity"]) == 2
    assert "different tokenizer vocabularies" in capsys.readouterr().err
