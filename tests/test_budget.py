"""Issue 21, part 4: the calibration run says how much distinct text its windows read and what it will hold
in memory, and refuses before it starts when that cannot fit (core/budget.py). Failed before the fix."""
import pytest

from prunekit.cli import main
from prunekit.core.budget import GIB, Coverage, check_fits, coverage, estimate


def test_coverage_counts_distinct_positions():
    assert coverage(100, [0, 5, 50], 10) == Coverage(100, 30, 25)          # [0,10) U [5,15) U [50,60)
    assert coverage(100, [3, 3, 3], 10).distinct_tokens == 10
    many = coverage(14_000, list(range(0, 13_936, 7)) * 50, 64)
    assert many.reuse > 4 and "each token is read" in many.line(64) and "--samples 219" in many.line(64)
    assert "each token is read" not in coverage(1000, [0, 100], 64).line(64)


def test_estimate_adds_weights_activations_and_statistics():
    need = estimate(parameters=1000, block_parameters=100, hidden=64, widest_input=256, windows=10, seqlen=32,
                    element_bytes=4, hessian=True, out_of_core=False)
    assert (need.weights, need.activations, need.statistics) == (4000, 2 * 10 * 32 * 64 * 4, 2 * 256 * 256 * 4)
    assert estimate(1000, 100, 64, 256, 10, 32, 4, False, True).weights == 400
    assert estimate(1000, 100, 64, 256, 10, 32, 4, False, True).statistics == 2 * 256 * 4


def test_true_sequential_counts_the_group_inputs_its_waiting_windows_hold():
    """SmolLM2-135M's shapes, 128 x 512 windows in float32: 704 MB held at the down projection (widest input
    1536, plus the residual and the normalised input, 2 x 576), the 44 MB per 8 x 512 chunk measured at
    that meeting point (bench/lockstep_memory.py); block order holds none."""
    block = estimate(0, 0, 576, 1536, 128, 512, 4, False, False)
    true = estimate(0, 0, 576, 1536, 128, 512, 4, False, False, lockstep=True)
    assert block.held == 0 and true.held == 128 * 512 * (1536 + 2 * 576) * 4 == 704_643_072
    assert true.total - block.total == true.held
    assert "held by true-sequential 0.66" in true.line() and "--sequential block holds none" in true.line()
    assert "held" not in block.line()
    check_fits(block, GIB // 2, 128, 512, "this machine", [])                 # 302 MB of block inputs/outputs
    with pytest.raises(ValueError, match=r"--samples 68 .*--sequential block"):  # 0.5 GiB / 7.86 MB per window
        check_fits(true, GIB // 2, 128, 512, "this machine", ["--sequential block"])


def test_check_fits_names_the_windows_that_would_fit():
    need = estimate(0, 0, 1024, 1024, 1000, 1024, 4, False, False)        # 8 GiB of activations
    check_fits(need, 9 * GIB, 1000, 1024, "this machine", [])
    with pytest.raises(ValueError, match=r"needs at least 7\.81 GiB.*--samples 511 .*--offload disk"):
        check_fits(need, 4 * GIB, 1000, 1024, "this machine", ["--offload disk"])


def test_cli_warns_on_reread_text_and_refuses_what_cannot_fit(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import psutil
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(f"document {i} has a few words about pruning models" for i in range(40)))
    code = main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "256",
                 "--seqlen", "8", "--calib", str(text), "--no-eval"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert code == 0 and "each token is read" in out and "memory: at least" in out

    class Tight:
        available = 1024
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    code = main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "64",
                 "--seqlen", "8", "--calib", str(text), "--no-eval", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "do not fit" in err and not (tmp_path / "o").exists()
    assert "--sequential block (the reference order" in err          # the lockstep's held inputs are counted
    code = main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--samples", "64",
                 "--seqlen", "8", "--calib", str(text), "--no-eval", "--sequential", "block"])
    assert code == 2 and "--sequential block" not in capsys.readouterr().err     # nothing to gain from it
