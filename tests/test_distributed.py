"""Distributed calibration (prunekit.distributed): 2 gloo processes give the 1-process result.

The 2-process runs go through the real launch paths, in subprocesses: `torch.distributed.run`
on tests/distributed_cases.py (every case in one launch, to keep the suite fast) and
`prunekit prune --nproc 2` end to end.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_cases
from prunekit import distributed
from prunekit.cli import main

HERE = Path(__file__).parent
SRC = HERE.parent / "src"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), env.get("PYTHONPATH", "")])
    env.pop("WORLD_SIZE", None)
    return env


# ----------------------------------------------------------------------------- pure helpers

def test_shard_gives_every_chunk_to_exactly_one_process():
    calib = torch.arange(10).unsqueeze(1)                          # 10 windows, chunks of 4: [0-3] [4-7] [8-9]
    parts = [distributed.shard(calib, 4, rank_=r, world=2).flatten().tolist() for r in range(2)]
    assert parts == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    parts = [distributed.shard(calib, 2, rank_=r, world=3).flatten().tolist() for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert distributed.shard(calib, 4, rank_=0, world=1) is calib
    with pytest.raises(ValueError, match="calibration.batch_size=3"):
        distributed.shard(calib, 8, rank_=0, world=3)


def test_hessian_is_the_same_however_chunks_are_grouped():
    """Two observers (chunks 0-3 and 4-7) added together give bit for bit the H of one observer that
    saw all eight chunks in order; a float32 running sum of the same chunk products does not."""
    from prunekit.stats import Hessian, InputNorm
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(64, 48, generator=g) * torch.logspace(-2, 2, 48) for _ in range(8)]
    for cls, view in ((Hessian, "H"), (InputNorm, "sq_norm")):
        whole, first, second = (cls(48, torch.device("cpu")) for _ in range(3))
        for i, chunk in enumerate(chunks):
            whole.update(chunk)
            (first if i < 4 else second).update(chunk)
        for name in cls.SUMS:                       # what reduce_stats_ does across processes
            getattr(first, name).add_(getattr(second, name))
        first.tokens += second.tokens
        first.sums_changed()
        assert first.tokens == whole.tokens == 512
        assert torch.equal(getattr(first, view), getattr(whole, view)), cls.__name__
    products = [c.T @ c for c in chunks]
    running = sum(products[1:], products[0].clone())                        # ((c0 + c1) + c2) + ...
    grouped = sum(products[1:4], products[0].clone()) + sum(products[5:], products[4].clone())
    assert not torch.equal(running, grouped)        # the float32 order effect this guards against


def test_strip_nproc():
    assert distributed.strip_nproc(["prune", "m", "--nproc", "2", "--no-eval"]) == (["prune", "m", "--no-eval"], 2)
    assert distributed.strip_nproc(["run", "r.yaml", "--nproc=3"]) == (["run", "r.yaml"], 3)
    assert distributed.strip_nproc(["prune", "m"]) == (["prune", "m"], None)
    with pytest.raises(ValueError, match="positive integer"):
        distributed.strip_nproc(["prune", "m", "--nproc", "two"])


def test_single_process_helpers_are_no_ops():
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [1.5, 2.0]
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    distributed.refuse("anything")                                 # only refuses when distributed
    assert distributed.offset(5) == 0 and distributed.all_sum(1, 2.5) == [1.0, 2.5]
    assert distributed.global_mean(3.0, 4) == 0.75


def test_nproc_only_for_prune_and_run(capsys):
    assert main(["eval", "m", "--nproc", "2"]) == 2
    assert "--nproc applies to `prunekit prune` and `prunekit run`" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2 gloo processes

@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(HERE / "distributed_cases.py"), str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_observers_reduce_to_the_observer_of_all_windows(two_process_results):
    result = json.loads((two_process_results / "observers.json").read_text())
    for name in ("InputNorm", "Hessian", "MeanVar"):
        assert result[name]["tokens"] == result[name]["full_tokens"] == 30
        for diff in result[name]["rel_diff"].values():
            assert diff < 1e-12, (name, result[name])         # float64 sums added in another order
        assert all(result[name]["float32_equal"].values()), (name, result[name])


@pytest.mark.parametrize("case", list(distributed_cases.cases()))
def test_two_processes_equal_one(two_process_results, case):
    # the same BLAS thread count as each torchrun worker (OMP_NUM_THREADS=1): float32 kernels round
    # differently with another thread split, which SparseGPT's updates would amplify
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, summary = distributed_cases.run_case(case)
    finally:
        torch.set_num_threads(threads)
    double = torch.load(two_process_results / f"{case}.pt")
    # the numbers behind the decisions (depth scores, search losses and similarities, allocation
    # scores, reconstruction errors) add both processes' windows: the single-process values, up to
    # the order of float64 additions
    _assert_close(json.loads(json.dumps(summary)), json.loads((two_process_results / f"{case}.json").read_text()), case)
    assert single.keys() == double.keys()
    # Every case is bit-identical, SparseGPT's OBS updates included: the observers sum in float64
    # and the float32 Hessian is that sum rounded once, the same however the chunks were grouped.
    for key, W in single.items():
        assert W.shape == double[key].shape, key                # width: the same heads/channels removed
        assert torch.equal(W == 0, double[key] == 0), f"{case}: mask of {key} differs"
        assert torch.equal(W, double[key]), key


def test_offset_is_the_count_of_the_processes_before(two_process_results):
    assert json.loads((two_process_results / "offsets.json").read_text()) == [[0], [3]]


def _assert_close(expected, got, where: str, rel: float = 1e-9) -> None:
    """Equal structure and values; floats within `rel` (reconstruction errors within 1e-5: their
    float32 sums of squares are grouped by process)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and expected.keys() == got.keys(), where
        for key in expected:
            _assert_close(expected[key], got[key], f"{where}.{key}", 1e-5 if key == "errors" else rel)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(expected) == len(got), where
        for index, (a, b) in enumerate(zip(expected, got)):
            _assert_close(a, b, f"{where}[{index}]", rel)
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert got == pytest.approx(expected, rel=rel, abs=1e-12), where
    else:
        assert got == expected, where


def test_unsupported_features_refuse_clearly(two_process_results):
    messages = json.loads((two_process_results / "refused.json").read_text())
    assert set(messages) == {"recovery", "sleb-samples"}
    assert "recovery (fine-tuning) step is not supported with distributed calibration" in messages["recovery"]
    assert "single process" in messages["recovery"]
    assert "samples=2" in messages["sleb-samples"] and "without a window" in messages["sleb-samples"]


def test_cli_nproc_2_equals_one_process(tiny_model_dir, tmp_path):
    args = ["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "8",
            "--seqlen", "16", "--no-eval", "--set", "calibration.batch_size=2"]
    assert main([*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    command = [sys.executable, "-m", "prunekit", *args, "--out", str(tmp_path / "two"), "--nproc", "2",
               "--json", str(tmp_path / "two.json")]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("distributed calibration: 2 processes (gloo)") == 1   # rank 0 speaks alone
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["distributed"] == {"processes": 2, "rank": 0}
    assert report["steps"][0]["calibration_windows"] == 8           # the whole set, not rank 0's share
    # reconstruction errors over the probe rows of both processes: what one process measures on all windows
    single = json.loads((tmp_path / "one.json").read_text())["steps"][0]["layers"]
    assert [layer["name"] for layer in single] == [layer["name"] for layer in report["steps"][0]["layers"]]
    for a, b in zip(single, report["steps"][0]["layers"]):
        assert b["error"] == pytest.approx(a["error"], rel=1e-4), a["name"]


@pytest.mark.parametrize("steps", [
    [{"method": "flap", "sparsity": 0.2, "uniform": True}, {"method": "wanda", "sparsity": 0.5}],
    [{"method": "taylor", "sparsity": 0.2}, {"method": "wanda", "sparsity": 0.5, "allocation": "sensitivity"},
     {"method": "sleb", "layers": 1}],
], ids=["flap-wanda", "taylor-sensitivity-sleb"])
def test_out_of_core_recipe_with_2_processes_equals_one_in_memory(tiny_model_dir, tmp_path, steps):
    """`prunekit run --nproc 2` of a width + unstructured (+ depth) recipe with `offload: disk`:
    both processes stream the blocks, rank 0 writes each step's checkpoint, the result is the one
    of a single in-memory process with the same BLAS thread count."""
    import yaml
    recipe = {"model": str(tiny_model_dir), "calibration": {"samples": 8, "seqlen": 16, "batch_size": 2},
              "steps": steps}
    (tmp_path / "memory.yaml").write_text(yaml.safe_dump({**recipe, "export": {"path": str(tmp_path / "one")}}))
    (tmp_path / "disk.yaml").write_text(yaml.safe_dump({**recipe, "offload": "disk",
                                                        "export": {"path": str(tmp_path / "two")}}))
    one = subprocess.run([sys.executable, "-m", "prunekit", "run", str(tmp_path / "memory.yaml")], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "prunekit", "run", str(tmp_path / "disk.yaml"), "--nproc", "2"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("distributed calibration: 2 processes (gloo), out of core") == 1
    expected, got = {}, {}
    for folder, into in ((tmp_path / "one", expected), (tmp_path / "two", got)):
        for file in folder.glob("*.safetensors"):
            into.update(load_file(file))
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert not list(tmp_path.glob(".two.steps-*"))            # the intermediate checkpoint is gone


def test_bench_tiny_reports_equal_results(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(HERE.parent / "bench" / "cpu_distributed.py"), "--tiny", "--method", "wanda",
               "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["nproc"], r["batch_size"]) for r in rows] == [("wanda", 1, 2), ("wanda", 2, 2),
                                                                          ("wanda", 1, 1)]
    assert rows[2]["control"] and rows[2]["mask_agreement"] > 0.99
    assert rows[1]["identical"] and rows[1]["mask_agreement"] == 1.0 and rows[1]["max_abs_diff"] == 0.0
    assert all(r["prune_s"] > 0 and r["sparsity"] == pytest.approx(0.5) for r in rows)
