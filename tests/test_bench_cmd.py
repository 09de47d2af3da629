"""`prunekit bench` on tiny saved models: a 2-layer Llama as the dense baseline and a 1-layer,
narrower Llama as the "pruned" model (its own, smaller config)."""
import argparse
import contextlib
import io
import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from prunekit.bench import add_parser, benchmark, format_table, parse_batches

SHAPES = {"prompt_len": 16, "new_tokens": 4, "repeats": 2, "warmup": 1}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(dense dir, pruned dir, dense param count, pruned param count); `load` needs a tokenizer."""
    root = tmp_path_factory.mktemp("bench")
    tokenizer = tiny_tokenizer()
    dense = tiny_model("llama")
    config = dense.config.to_dict() | {"num_hidden_layers": 1, "intermediate_size": 48}
    torch.manual_seed(1)
    pruned = AutoModelForCausalLM.from_config(type(dense.config).from_dict(config))
    counts = []
    for name, model in (("dense", dense), ("pruned", pruned)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        counts.append(sum(p.numel() for p in model.parameters()))
    return root / "dense", root / "pruned", *counts


def _cli(argv):
    """`prunekit bench ARGV` through a parser built here, as cli.py builds it."""
    parser = argparse.ArgumentParser(prog="prunekit")
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["bench", *argv])
    return args.handler(args)


@pytest.fixture(scope="module")
def cli_run(model_dirs, tmp_path_factory):
    """One real run through the command line: (exit code, stdout, --json path)."""
    dense, pruned, _, _ = model_dirs
    out = tmp_path_factory.mktemp("out") / "sub" / "bench.json"
    argv = [str(pruned), "--baseline", str(dense), "--batch", "1,2", "--threads", "1", "--json", str(out),
            *(f"--{key.replace('_', '-')}={value}" for key, value in SHAPES.items())]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = _cli(argv)
    return code, printed.getvalue(), out


@pytest.fixture(scope="module")
def result(cli_run):
    """What `benchmark` returned, as the CLI wrote it to --json."""
    return json.loads(cli_run[2].read_text())


def test_cli_prints_the_table_and_writes_json_atomically(cli_run, result):
    code, printed, out = cli_run
    assert code == 0
    assert format_table(result) in printed  # the JSON holds exactly what was printed
    assert f"wrote {out}" in printed
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]  # no temp file left behind


def test_rows_hold_both_models_at_every_batch(result, model_dirs):
    _, _, dense_params, pruned_params = model_dirs
    rows = result["rows"]
    assert [(r["role"], r["batch"]) for r in rows] == [("baseline", 1), ("baseline", 2), ("model", 1), ("model", 2)]
    for row in rows:
        assert row["params"] == (dense_params if row["role"] == "baseline" else pruned_params)
        assert row["nonzero_params"] <= row["params"]
        assert row["weight_bytes"] == 4 * row["params"]  # float32
        assert row["layers"] == (2 if row["role"] == "baseline" else 1)
        assert row["dtype"] == "float32"
        for key in ("prefill_ms", "decode_ms_per_token"):
            stat = row[key]
            assert len(stat["samples"]) == SHAPES["repeats"]
            assert all(math.isfinite(s) and s > 0 for s in stat["samples"])
            assert stat["min"] <= stat["median"] <= stat["max"]
        per_seq, total = row["decode_tok_s_per_seq"], row["decode_tok_s_total"]
        assert per_seq["median"] == pytest.approx(1e3 / row["decode_ms_per_token"]["median"])
        assert per_seq["min"] <= per_seq["median"] <= per_seq["max"]
        assert total["median"] == pytest.approx(row["batch"] * per_seq["median"])
        # peak RSS of the worker: at least the weights, less than this machine could hold
        assert row["weight_bytes"] < row["peak_memory_bytes"] < 64 * 2**30
    assert pruned_params < dense_params


def test_speedups_are_baseline_over_model(result):
    rows = {(r["role"], r["batch"]): r for r in result["rows"]}
    for batch in (1, 2):
        base, model = rows[("baseline", batch)], rows[("model", batch)]
        assert base["speedup_prefill"] is None and base["speedup_decode"] is None
        assert model["speedup_prefill"] == pytest.approx(base["prefill_ms"]["median"] / model["prefill_ms"]["median"])
        assert model["speedup_decode"] == pytest.approx(
            model["decode_tok_s_per_seq"]["median"] / base["decode_tok_s_per_seq"]["median"])


def test_protocol_records_the_setup(result, model_dirs):
    proto = result["protocol"]
    assert proto["device"] == "cpu" and proto["device_name"]
    assert proto["torch_threads"] == 1  # --threads reached the workers
    assert proto["batches"] == [1, 2]
    assert {k: proto[k] for k in SHAPES} == SHAPES
    assert proto["dtype"] == "float32"
    assert proto["cpu_count"] >= 1 and set(proto["load_average_1min"]) == {"before", "after"}
    assert proto["torch"] == torch.__version__ and proto["transformers"]
    assert set(proto["attn_implementation"]) == {"baseline", "model"}
    assert all(proto["attn_implementation"].values())
    assert proto["models"]["baseline"]["name"] == str(model_dirs[0])
    assert "median" in proto["statistic"] and "min-max" in proto["statistic"]
    assert proto["date"][:4].isdigit()
    json.dumps(result)  # plain JSON-able data


def test_format_table_puts_models_side_by_side(result):
    text = format_table(result)
    header = next(line for line in text.splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "metric", "baseline", "model", "speedup"]
    speedup = result["rows"][2]["speedup_prefill"]
    prefill_1 = next(line for line in text.splitlines() if line.startswith("| 1 ") and "prefill ms" in line)
    assert prefill_1.rstrip(" |").endswith(f"{speedup:.2f}x")
    for needle in ("torch threads 1", "dtype float32", "1 warm-up", "2 repeats", "median [min-max]",
                   "prefill 16 tokens", "decode 4 greedy steps", "peak RSS", "transformers", "load average"):
        assert needle in text


def test_format_table_without_baseline_has_no_speedup(result):
    proto = result["protocol"]
    alone = {"protocol": proto | {"attn_implementation": {"model": proto["attn_implementation"]["model"]},
                                  "models": {"model": proto["models"]["model"]}},
             "rows": [r for r in result["rows"] if r["role"] == "model"]}
    text = format_table(alone)
    header = next(line for line in text.splitlines() if line.startswith("| batch"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["batch", "metric", "model"]
    assert "baseline" not in text and "x |" not in text


@pytest.mark.parametrize("load, warned", [(0.2, False), (3.0, True)])
def test_format_table_warns_on_a_busy_host(result, load, warned):
    proto = result["protocol"] | {"cpu_count": 2, "torch_threads": 1,
                                  "load_average_1min": {"before": load, "after": 0.0}}
    assert ("WARNING: the host was busy" in format_table({"protocol": proto, "rows": result["rows"]})) is warned


@pytest.mark.parametrize("batch", ["1,x", "0", "2,-1", ""])
def test_bad_batch_names_the_flag(batch, model_dirs):
    with pytest.raises(ValueError, match="--batch"):
        _cli([str(model_dirs[0]), "--batch", batch])


def test_bad_sizes_name_the_flag(model_dirs):
    with pytest.raises(ValueError, match="--batch"):
        benchmark(str(model_dirs[0]), batches=(0,))
    with pytest.raises(ValueError, match="--prompt-len"):
        benchmark(str(model_dirs[0]), prompt_len=0)
    with pytest.raises(ValueError, match="--repeats"):
        benchmark(str(model_dirs[0]), repeats=0)
    assert parse_batches("1, 8") == (1, 8)


def test_missing_model_path(tmp_path, model_dirs):
    with pytest.raises(FileNotFoundError, match="not found"):
        benchmark(str(tmp_path / "no-such-model"), baseline=str(model_dirs[0]))


def test_worker_errors_reach_the_caller(model_dirs):
    """A prompt past the model's position limit fails inside the worker, as a ValueError here."""
    with pytest.raises(ValueError, match="--prompt-len 4000 \\+ --new-tokens 200 exceeds"):
        benchmark(str(model_dirs[0]), prompt_len=4000, new_tokens=200, repeats=1, warmup=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_cuda_unavailable_is_a_clear_error(model_dirs):
    with pytest.raises(ValueError, match="--device cuda.*CUDA is not available"):
        benchmark(str(model_dirs[0]), device="cuda")


def test_a_text_prompt_is_the_default_corpus_held_out_text(model_dirs):
    """--prompt text: the model is fed the first prompt_len tokens of the held-out split, in every row of a batch."""
    from prunekit import bench
    from prunekit.data import evaluation_data
    from prunekit.io.loading import load

    lm, tokenizer = load(str(model_dirs[0]))
    ids = bench._text_prompt(tokenizer, 16, "dense")
    assert torch.equal(ids[0], evaluation_data(tokenizer, "default", max_tokens=16).ids)
    seen = []
    lm.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    bench._measure_batch(lm, 2, 16, 2, torch.device("cpu"), repeats=1, warmup=0, seed=0, ids=ids)
    assert seen[0].shape == (2, 16) and torch.equal(seen[0][0], ids[0]) and torch.equal(seen[0][1], ids[0])
    out = benchmark(str(model_dirs[0]), prompt="text", **(SHAPES | {"repeats": 1, "warmup": 0}))
    assert "held-out split of the offline default corpus" in out["protocol"]["prompt"]
    with pytest.raises(ValueError, match="--prompt must be one of random, text"):
        benchmark(str(model_dirs[0]), prompt="corpus")
    with pytest.raises(ValueError, match="fewer than --prompt-len"):
        bench._text_prompt(tokenizer, 10**7, "dense")


def test_llama_cpp_refuses_a_text_prompt(model_dirs):
    with pytest.raises(ValueError, match="--prompt text applies to --runtime transformers"):
        _cli([str(model_dirs[0]), "--runtime", "llama.cpp", "--prompt", "text"])
