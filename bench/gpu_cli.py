"""The CLI's CUDA paths on a tiny model: every scope (unstructured, N:M, width, depth), the low-memory
and out-of-core modes, a bfloat16 run and, with 2+ GPUs, NCCL with 2 processes; each CUDA result is
compared with the same run on the CPU (fraction of equal zero/non-zero states, largest difference).

    python bench/gpu_cli.py                  # on a CUDA machine (part of bench/gpu_check.sh)
    python bench/gpu_cli.py --device cpu     # the same commands on the CPU (a dry run of the script)

Protocol: a 4-layer Llama (hidden 64) with a word-level tokenizer trained on the offline default
corpus, 16 windows x 64 tokens of it, float32 unless the case says otherwise, no evaluation. Each
case runs `prunekit.cli.main` in this process (the 2-process NCCL case runs under torchrun). What it
checks is that each path runs and agrees with the CPU; the seconds are there to size the step.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CASES = {   # name -> extra `prunekit prune` arguments
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--nm", "2:4"],
    "wanda-owl": ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"],
    "wanda-lowmem": ["--method", "wanda", "--sparsity", "0.5", "--cache-device", "cpu"],
    "wanda-disk": ["--method", "wanda", "--sparsity", "0.5", "--offload", "disk"],
    "sparsegpt-bf16": ["--method", "sparsegpt", "--sparsity", "0.5", "--dtype", "bfloat16"],
    "flap": ["--method", "flap", "--sparsity", "0.2"],
    "sleb": ["--method", "sleb", "--layers", "1"],
}


def make_model(folder: Path) -> None:
    """A 4-layer Llama and a word-level tokenizer trained on the offline default corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from prunekit.data import load_text
    text, _ = load_text("default", "calibration")
    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(text[:200_000].splitlines(),
                              trainers.WordLevelTrainer(vocab_size=256, special_tokens=["<unk>", "<pad>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=4, vocab_size=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def prune(model: Path, out: Path, args: list[str], device: str, nproc: int = 1) -> tuple[int, float, str]:
    """`prunekit prune ...` in this process (`cli.main`, the CLI's own code path, without paying the
    interpreter and CUDA start-up per case: 22 s a command on the H200 machine), or under torchrun
    in child processes for --nproc > 1."""
    argv = ["prune", str(model), *args, "--samples", "16", "--seqlen", "64", "--device", device, "--out", str(out),
            "--overwrite", "--no-eval"]
    started = time.perf_counter()
    if nproc > 1:
        done = subprocess.run([sys.executable, "-m", "prunekit", *argv, "--nproc", str(nproc)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        return done.returncode, time.perf_counter() - started, (done.stdout + done.stderr)[-1500:]
    from prunekit.cli import main
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            rc = main(argv)
    except Exception as err:      # reported as this case's failure; the next case runs
        rc, log = 1, io.StringIO(f"{type(err).__name__}: {err}")
    return rc, time.perf_counter() - started, log.getvalue()[-1500:]


def compare(a: Path, b: Path) -> dict:
    """Zero/non-zero agreement and the largest absolute difference over every tensor of two outputs."""
    from safetensors.torch import load_file
    left = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    right = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    if left.keys() != right.keys() or any(left[k].shape != right[k].shape for k in left):
        return {"same_shapes": False}
    agree = sum(int(((left[k] == 0) == (right[k] == 0)).sum()) for k in left)
    total = sum(left[k].numel() for k in left)
    diff = max(float((left[k].float() - right[k].float()).abs().max()) for k in left)
    return {"same_shapes": True, "mask_agreement": round(agree / total, 6), "max_abs_diff": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu_cli.json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    work = Path(tempfile.mkdtemp(prefix="prunekit-gpu-cli-"))
    model = work / "tiny"
    make_model(model)
    rows, failed = [], 0
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    runs = [(name, CASES[name], 1) for name in args.cases.split(",") if name]
    if gpus >= 2:
        runs.append(("wanda-nccl-2", CASES["wanda"], 2))
    for name, extra, nproc in runs:
        rc, seconds, tail = prune(model, work / f"{name}-{args.device}", extra, args.device, nproc)
        row = {"case": name, "device": args.device, "nproc": nproc, "rc": rc, "seconds": round(seconds, 1)}
        if rc == 0:
            ref_rc, _, ref_tail = prune(model, work / f"{name}-cpu", extra, "cpu")
            row.update(compare(work / f"{name}-{args.device}", work / f"{name}-cpu") if ref_rc == 0
                       else {"cpu_rc": ref_rc, "cpu_tail": ref_tail})
        else:
            row["tail"] = tail
            failed += 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    if gpus < 2:
        print(f"NCCL with 2 processes skipped: {gpus} CUDA device(s) visible", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if gpus else "cpu",
                                    "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
