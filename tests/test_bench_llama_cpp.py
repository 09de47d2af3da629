"""`prunekit bench --runtime llama.cpp` (bench_llama_cpp.py) on tiny Llamas run by a real llama.cpp
(llama-cpp-python): a 3-layer dense model saved as a checkpoint folder (converted to GGUF by the
benchmark) against a 1-layer, narrower one written to GGUF here; the result's structure, the ratios,
the protocol, and the errors for bad input."""
import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from conftest import llama_config

from prunekit.bench import add_parser
from prunekit.bench_llama_cpp import OtherCpu, _add_speedups, benchmark, cpu_model, format_table
from prunekit.io.gguf_writer import write_gguf


SHAPES = {"prompt_len": 16, "new_tokens": 4, "repeats": 1, "warmup": 1}
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (what llama.cpp's "gpt2" vocabulary holds), trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.data import load_text
    text, _ = load_text("default", "calibration")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(text[:30_000].splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def tiny_llama(vocab: int, layers: int, ffn: int, seed: int):
    torch.manual_seed(seed)
    config = llama_config(hidden_size=64, intermediate_size=ffn, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """(dense checkpoint folder, pruned .gguf, dense parameter count, pruned parameter count)."""
    root = tmp_path_factory.mktemp("llama-bench")
    dense = tiny_llama(len(tokenizer), layers=3, ffn=96, seed=0)
    pruned = tiny_llama(len(tokenizer), layers=1, ffn=48, seed=1)
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    gguf = write_gguf(pruned, tokenizer, root / "pruned.gguf", outtype="f16").path
    return (root / "dense", gguf, *(sum(p.numel() for p in m.parameters()) for m in (dense, pruned)))


def _cli(argv):
    """`prunekit bench ARGV` through a parser built as cli.py builds it."""
    parser = argparse.ArgumentParser(prog="prunekit")
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


@pytest.fixture(scope="module")
def cli_run(models, tmp_path_factory):
    """One real run through the command line, temporary files under a folder of its own:
    (exit code, stdout, --json path, that temporary folder)."""
    dense, gguf, _, _ = models
    out = tmp_path_factory.mktemp("out") / "bench.json"
    scratch = tmp_path_factory.mktemp("scratch")
    argv = [str(gguf), "--baseline", str(dense), "--runtime", "llama.cpp", "--threads", "1", "--json", str(out),
            *(f"--{key.replace('_', '-')}={value}" for key, value in SHAPES.items())]
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr("tempfile.tempdir", str(scratch))
        code = _cli(argv)
    return code, printed.getvalue(), out, scratch


@pytest.fixture(scope="module")
def result(cli_run):
    return json.loads(cli_run[2].read_text())


def test_cli_prints_the_table_and_writes_json(cli_run, result):
    code, printed, out, scratch = cli_run
    assert code == 0
    assert format_table(result) in printed
    assert f"wrote {out}" in printed
    assert list(scratch.iterdir()) == []          # the converted GGUF and the workers' files are gone


def test_rows_describe_both_models(result, models):
    dense, gguf, dense_params, pruned_params = models
    base, model = result["rows"]
    assert (base["role"], model["role"]) == ("baseline", "model")
    assert base["model"] == str(dense) and model["model"] == str(gguf)
    # the folder was converted (f16, the default outtype), the .gguf file measured as it is
    assert base["gguf"] is None and base["converted"]["outtype"] == "f16" and base["converted"]["seconds"] > 0
    assert base["converted"]["arch"] == "llama"
    assert model["gguf"] == str(gguf) and model["converted"] is None
    assert model["file_bytes"] == os.path.getsize(gguf)
    assert (base["params"], model["params"]) == (dense_params, pruned_params)   # llama.cpp counts every tensor
    assert (base["layers"], model["layers"]) == (3, 1)
    assert "F16" in base["description"] and base["arch"] == model["arch"] == "llama"
    for row in (base, model):
        assert row["batch"] == 1
        for key in ("pp_tok_s", "tg_tok_s"):
            stat = row[key]
            assert len(stat["samples"]) == SHAPES["repeats"]
            assert all(math.isfinite(s) and s > 0 for s in stat["samples"])
            assert stat["min"] <= stat["median"] <= stat["max"]
        assert row["pp_tok_s"]["median"] == pytest.approx(SHAPES["prompt_len"] * 1e3 / row["pp_ms"]["median"])
        assert row["tg_tok_s"]["median"] == pytest.approx(1e3 / row["tg_ms_per_token"]["median"])
        assert row["file_bytes"] < row["peak_rss_bytes"] < 64 * 2**30


def test_speedups_are_model_over_baseline_medians(result):
    base, model = result["rows"]
    assert base["speedup_pp"] is None and base["speedup_tg"] is None
    assert model["speedup_pp"] == pytest.approx(model["pp_tok_s"]["median"] / base["pp_tok_s"]["median"])
    assert model["speedup_tg"] == pytest.approx(model["tg_tok_s"]["median"] / base["tg_tok_s"]["median"])


def test_speedups_use_the_median_not_the_mean():
    def row(role, pp, tg):
        return {"role": role, "pp_tok_s": {"median": sorted(pp)[1]}, "tg_tok_s": {"median": sorted(tg)[1]}}
    rows = [row("baseline", [100, 200, 300], [10, 20, 30]), row("model", [150, 300, 900], [25, 30, 100])]
    _add_speedups(rows)
    assert rows[1]["speedup_pp"] == 1.5 and rows[1]["speedup_tg"] == 1.5     # the means would give 2.25 and 2.58
    assert "speedup_tg" not in rows[0]


def test_protocol_records_the_setup(result, models):
    proto = result["protocol"]
    assert proto["runtime"] == "llama.cpp" and proto["llama_cpp_python"] == metadata.version("llama-cpp-python")
    assert proto["threads"] == 1 and proto["batch"] == 1                       # --threads reached the workers
    assert {k: proto[k] for k in SHAPES} == SHAPES
    assert proto["kv_cache"].startswith("f16") and proto["flash_attn"].startswith("off")
    assert proto["device_name"] == cpu_model() and proto["cpu_count"] == os.cpu_count()
    assert set(proto["load_average_1min"]) == {"before", "after"}
    assert proto["other_cpu_cores"] >= 0                                   # Linux: /proc/stat
    assert proto["outtype"] == "f16" and "export_gguf" in proto["conversion"]
    assert proto["models"]["baseline"] == {"name": str(models[0]), "kind": "local"}
    assert proto["models"]["model"]["kind"] == "gguf"
    assert "no torch" in proto["isolation"] and "AVX" in proto["llama_cpp_system_info"]
    for needle in (f"llama-cpp-python {proto['llama_cpp_python']}", "threads 1", "pp: 16 random token ids",
                   "last-position logits only", "tg: 4 single-token steps", "pseudo-random", "KV cache f16",
                   "1 warm-up discarded, 1 repeats", "median [min-max]", "converted to f16 GGUF", "load average",
                   "other processes kept"):
        assert needle in proto["text"], needle


def test_format_table_puts_models_side_by_side(result):
    text = format_table(result)
    header = next(line for line in text.splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "metric", "baseline", "model", "speedup"]
    decode = next(line for line in text.splitlines() if "| decode tok/s" in line)
    assert decode.rstrip(" |").endswith(f"{result['rows'][1]['speedup_tg']:.2f}x")
    for needle in ("llama-cpp-python", "threads 1", "1 warm-up", "1 repeats", "prompt processing tok/s",
                   "converted to a temporary f16 GGUF", "peak RSS", "load average", "conversion s"):
        assert needle in text, needle


def test_format_table_without_baseline(result):
    alone = {"protocol": result["protocol"], "rows": [r for r in result["rows"] if r["role"] == "model"]}
    header = next(line for line in format_table(alone).splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "metric", "model"]


@pytest.mark.parametrize("load, others, warned", [(0.1, None, False), (3.0, None, True),   # load average alone
                                                  (3.0, 0.05, False), (0.1, 1.0, True)])  # others' cores decide
def test_format_table_warns_on_a_busy_host(result, load, others, warned):
    proto = result["protocol"] | {"cpu_count": 2, "threads": 2, "load_average_1min": {"before": load, "after": 0.0},
                                  "other_cpu_cores": others}
    assert ("WARNING: the host was busy" in format_table({"protocol": proto, "rows": result["rows"]})) is warned


def test_other_cpu_is_host_busy_time_minus_our_own_over_wall_time(monkeypatch):
    readings = iter([(0.0, 100.0, 10.0), (2.0, 103.0, 11.0)])      # (wall, host busy, own CPU) seconds
    current = {}

    def clock():
        current["now"] = next(readings)
        return current["now"][0]
    from prunekit import bench_host
    monkeypatch.setattr(bench_host.time, "perf_counter", clock)
    monkeypatch.setattr(bench_host, "_host_busy_seconds", lambda: current["now"][1])
    monkeypatch.setattr(bench_host, "_own_cpu_seconds", lambda: current["now"][2])
    with OtherCpu() as others:
        pass
    assert others.cores == 1.0                     # (3 - 1) CPU seconds of others over 2 s of wall time


def test_missing_file_is_a_clear_error(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="not found"):
        benchmark(tmp_path / "no-such-model.gguf", baseline=models[1])


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        benchmark(fake)


def test_without_llama_cpp_the_error_names_the_extra(models, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)            # `import llama_cpp` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'prunekit\[llama\]'"):
        _cli([str(models[1]), "--baseline", str(models[0]), "--runtime", "llama.cpp"])
    from prunekit.cli import main
    assert main(["bench", str(models[1]), "--runtime", "llama.cpp"]) == 2
    assert "pip install 'prunekit[llama]'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["--runtime", "llama.cpp", "--batch", "1,4"], "--batch"),
                                        (["--runtime", "llama.cpp", "--device", "cuda"], "--device"),
                                        (["--runtime", "llama.cpp", "--dtype", "bfloat16"], "--dtype"),
                                        (["--outtype", "q8_0"], "--outtype"),
                                        (["--runtime", "llama.cpp", "--prompt-len", "0"], "--prompt-len"),
                                        (["--runtime", "llama.cpp", "--threads", "0"], "--threads")])
def test_flags_llama_cpp_cannot_honour_are_refused(models, argv, flag):
    with pytest.raises(ValueError, match=flag):
        _cli([str(models[1]), *argv])


def test_worker_errors_reach_the_caller(models):
    """A prompt past the model's 256 positions fails inside the worker, as a ValueError here."""
    with pytest.raises(ValueError, match=r"--prompt-len 250 \+ --new-tokens 10 exceeds the 256 positions"):
        benchmark(models[1], prompt_len=250, new_tokens=10, repeats=1, warmup=0, threads=1)


def test_the_worker_and_the_bench_command_import_no_torch():
    """The worker's peak RSS must not hold torch, and `prunekit bench` loads it only when it measures."""
    code = ("import sys, prunekit.bench_llama_cpp, prunekit.bench; "
            "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
