"""bench/domains_smollm2.py end to end on the tiny model: every method x domain x sparsity row is pruned,
scored on both domains, and compared with its baseline in the markdown."""
import json

from conftest import load_bench


def test_domains_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    bench = load_bench("domains_smollm2")
    out = tmp_path / "domains.md"
    assert bench.main(["--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32", "--max-eval-tokens",
                       "256", "--sparsities", "0.2", "--seap-protect", "0,0", "--only", "d-pruner", "--only", "wanda",
                       "--only", "seap", "--only", "wanda-sp", "--work", str(tmp_path / "work"),
                       "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["name"] for r in rows] == [f"{m}-{d}-0.2" for m in ("d-pruner", "wanda", "seap", "wanda-sp")
                                         for d in ("code", "prose")]
    assert all(set(r["ppl"]) == {"code", "prose"} and min(r["ppl"].values()) > 1 for r in rows)
    width = [r for r in rows if r["kind"] == "width"]
    dense_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        tiny_model_dir).parameters())
    assert all(r["parameters"] < dense_params for r in width)          # width methods cut the model
    text = out.read_text()
    assert "| d-pruner | unstructured | code | 20% |" in text and "x |" in text      # compared with wanda
    assert "perplexity protocol (code)" in text and "perplexity protocol (prose)" in text
