"""The benchmark commands run end to end with tiny shapes (the real runs are in BENCHMARKS.md)."""
import json

import pytest
from conftest import load_bench


def test_gpu_cli_check_runs_on_cpu(tmp_path):
    """bench/gpu_check.sh's CLI step, dry-run on the CPU: every case runs and equals itself."""
    out = tmp_path / "gpu_cli.json"
    bench = load_bench("gpu_cli")
    assert bench.main(["--device", "cpu", "--cases", "wanda,sparsegpt-2of4,flap", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["wanda", "sparsegpt-2of4", "flap"]
    assert all(r["rc"] == 0 and r["same_shapes"] and r["mask_agreement"] == 1.0 for r in rows)


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert load_bench("gpu_7b").main(["--tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {(m, d) for m in ("wanda", "sparsegpt")
                                                         for d in ("gpu", "lowmem")}
    assert all(r["sparsity"] == pytest.approx(0.5) for r in rows)


def test_cpu_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    out = tmp_path / "cpu.json"
    bench = load_bench("cpu_smollm2")
    assert bench.main(["--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32", "--max-eval-tokens", "640",
                       "--only", "dense", "--only", "sparsegpt-2:4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "sparsegpt-2:4"]
    assert rows[1]["sparsity"] == pytest.approx(0.5) and rows[1]["budget_mb"] > 0 and rows[1]["peak_rss_mb"] > 0
    assert "seqlen=32" in rows[0]["protocol"]


def test_gpu_structured_bench_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_structured.json"
    assert load_bench("gpu_structured").main(["--tiny", "--batch", "1", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "width-25", "depth-25"}
    assert rows["width-25"]["params"] < rows["dense"]["params"] and rows["depth-25"]["layers"] == 3
    assert all(r["decode_speedup"] > 0 for r in rows.values())


def test_cpu_structured_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    out = tmp_path / "structured.json"
    bench = load_bench("cpu_structured")
    assert bench.main(["--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32", "--max-eval-tokens", "640",
                       "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1", "--only", "flap-35",
                       "--only", "last-k-35", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "flap-35", "last-k-35"}
    assert rows["flap-35"]["parameters"] < rows["dense"]["parameters"]
    assert rows["last-k-35"]["removed_blocks"] == [0] and rows["dense"]["ppl"] > 0
    assert "seqlen=32" in rows["flap-35"]["protocol"]


def test_cpu_beyond_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    out = tmp_path / "beyond.json"
    bench = load_bench("cpu_beyond")
    args = ["--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32", "--max-eval-tokens", "256",
            "--eora-rank", "1", "--out", str(out)]
    names = ["sparsegpt-70", "owl-admm-gradual-70", "owl-admm-gradual-70-eora", "ria-permute-2:4", "armor-b16-2:4"]
    assert bench.main(args + [x for name in names for x in ("--only", name)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(names)
    eora = rows["owl-admm-gradual-70-eora"]
    plain = rows["sparsegpt-70"]
    assert eora["adapter_parameters"] > 0 and eora["sparsity"] > 0.7
    # equal total parameters: nonzero block weights + adapter within one row-rounding of the plain run's
    assert abs(eora["nonzero_block_weights"] + eora["adapter_parameters"] - plain["nonzero_block_weights"]) \
        < 0.01 * plain["nonzero_block_weights"]
    assert len(rows["owl-admm-gradual-70"]["block_sparsity"]) == 2
    # ARMOR's block-diagonal wrappers are counted beside its 2:4 core; a plain run adds nothing
    assert rows["armor-b16-2:4"]["wrapper_parameters"] > 0 and plain["wrapper_parameters"] == 0
    assert bench.added(rows["armor-b16-2:4"]) == rows["armor-b16-2:4"]["wrapper_parameters"]
    # resumable: a second call reads the JSON back instead of re-running
    assert bench.main(args + ["--only", "sparsegpt-70"]) == 0
    assert "process_seconds" not in json.loads(out.read_text())["rows"][0]


def test_cpu_recover_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    out = tmp_path / "recover.json"
    assert load_bench("cpu_recover").main(["--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32",
                                      "--train-seqlen", "16", "--steps", "2", "--batch-size", "2",
                                      "--max-eval-tokens", "256", "--only", "lora", "--work", str(tmp_path / "w"),
                                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["sparsity_after_eval"] == pytest.approx(0.5) and row["sparsity_after"] == row["sparsity_before"]
    assert row["tokens"] == 2 * 2 * 16 and result["pruned"]["ppl"] > 0


def test_cpu_offload_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    out = tmp_path / "offload.json"
    bench = load_bench("cpu_offload")
    assert bench.main(["--tiny", "--model", str(tiny_model_dir), "--methods", "wanda,block-influence",
                       "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["part"], r["method"], r["offload"]) for r in rows] == [
        ("a", "wanda", "none"), ("a", "wanda", "disk"), ("a", "block-influence", "none"),
        ("a", "block-influence", "disk"), ("b", "wanda", "disk"), ("b", "block-influence", "disk")]
    assert all(r["peak_mb"] >= r["baseline_mb"] > 0 for r in rows)
    assert all(r["identical"] for r in rows if r["part"] == "a" and r["offload"] == "disk")


def test_gpu_offload_bench_runs_tiny(tmp_path, src_on_path):
    out = tmp_path / "gpu_offload.json"
    assert load_bench("gpu_offload").main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["wanda", "sparsegpt"]
    assert all(r["blocks"] == 3 and r["peak_block_mb"] > 0 and r["seconds_per_block"]["median"] >= 0 for r in rows)


def test_moe_experts_bench_runs_tiny(tiny_moe_dir, tmp_path, src_on_path):
    out = tmp_path / "moe.json"
    bench = load_bench("moe_experts")
    assert bench.main(["--model", str(tiny_moe_dir), "--samples", "2", "--seqlen", "32", "--eval-tokens", "512",
                       "--kl-tokens", "128", "--only", "reap-50", "--only", "moe-pruner-2:4",
                       "--only", "reap-50-code-calibrated", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"unpruned MoE", "reap-50", "moe-pruner-2:4", "reap-50-code-calibrated"}
    assert rows["reap-50"]["parameters"] < rows["unpruned MoE"]["parameters"]
    assert rows["reap-50"]["checkpoint_mb"] < rows["unpruned MoE"]["checkpoint_mb"]
    assert rows["moe-pruner-2:4"]["kl"] > 0 and "ppl_code" in rows["reap-50-code-calibrated"]
    assert "PROXY" not in result["proxy"] and "not a trained MoE" in result["proxy"]
    assert out.with_suffix(".md").read_text().startswith("| run |")


def test_surgeon_layer_bench_runs_tiny(tiny_model_dir, tmp_path, src_on_path):
    """Every update of bench/surgeon_layer.py on one tiny layer: the pruned share is exact, and the full G (CG)
    ends lowest in the Kronecker quadratic the LLM Surgeon minimises."""
    import json
    out = tmp_path / "layer.json"
    assert load_bench("surgeon_layer").main(["--model", str(tiny_model_dir), "--windows", "2", "--seqlen", "16",
                                             "--layers", "1.mlp.down_proj", "--shots", "2", "--correlate", "cg,64",
                                             "--out", str(out)]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"sparsegpt", "llm-surgeon G=I", "llm-surgeon diag G", "llm-surgeon full G (CG)",
                         "llm-surgeon full G (chunks of 64)"}
    assert all(row["sparsity"] == 0.5 for row in rows.values())
    assert rows["llm-surgeon full G (CG)"]["fisher_error"] == min(row["fisher_error"] for row in rows.values())
