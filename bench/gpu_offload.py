"""GPU benchmark of out-of-core pruning (issue 6): a randomly initialised model with Llama-70B-shaped
blocks, larger than the GPU memory the run may use, pruned with `--offload disk` (one block resident
on the GPU, weights streamed from safetensors shards, written pruned into the output shards).

    python bench/gpu_offload.py                       # needs a CUDA GPU and about 2 x the weights of free disk
    python bench/gpu_offload.py --tiny                # same code path, tiny shapes, on CPU (tests)

The synthetic checkpoint is written block by block (never whole in memory). The GPU memory the run
may use is capped with `torch.cuda.set_per_process_memory_fraction` (`--gpu-cap-gib`), so the model
is larger than the memory available to it without needing more disk than the device machine has
(a real 70B model is 140 GB in bfloat16; 12 of its blocks are 21 GB). Reported per method: peak GPU
memory of any block (`torch.cuda.max_memory_allocated`, reset per block), seconds per block
(median, min, max), total seconds, and the cap. Random weights say nothing about quality.

SparseGPT's largest Hessian (down_proj, 28672 inputs) takes 28672^2 x 12 bytes = 9.9 GB (float64 sums
for exact distributed reduction + the float32 copy the solver reads), which sets the smallest cap
SparseGPT fits in at these shapes (about 13 GiB); Wanda needs about one block (1.7 GB) plus activations.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

LLAMA_70B_BLOCKS = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128)


def write_synthetic(folder: Path, shape: dict, layers: int, dtype: torch.dtype, seed: int = 0,
                    device: str = "cpu") -> int:
    """A random Llama checkpoint written one block per shard (+ index and config); returns its bytes.
    The random numbers are drawn on `device` (on CUDA, 16 GB of normals take seconds, not minutes)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=False)
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    groups: dict[str, dict] = {}
    for name, param in skeleton.state_dict().items():
        key = f"block-{int(name.split('.')[2]):05d}" if name.startswith("model.layers.") else "other"
        groups.setdefault(key, {})[name] = param
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for number, (_key, params) in enumerate(sorted(groups.items()), start=1):
        tensors = {}
        for name, meta in params.items():
            if "norm" in name:
                tensors[name] = torch.ones(meta.shape, dtype=dtype)
            else:
                tensors[name] = (torch.randn(meta.shape, generator=generator, device=device) * 0.02).to("cpu", dtype)
            total += tensors[name].numel() * tensors[name].element_size()
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    parser.add_argument("--layers", type=int, default=12, help="70B-shaped blocks (12: 21 GB in bfloat16)")
    parser.add_argument("--gpu-cap-gib", type=float, default=14.0, help="GPU memory the run may use")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for the checkpoints")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_offload.json"))
    args = parser.parse_args(argv)
    from prunekit.io.offload import prune_out_of_core
    from prunekit.recipe import step_from_dict

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench/gpu_offload.py needs a CUDA GPU at 70B shapes; --tiny runs the same code on CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA_70B_BLOCKS, torch.bfloat16)
    layers = 3 if args.tiny else args.layers
    samples, seqlen = (2, 16) if args.tiny else (args.samples, args.seqlen)
    work = Path(args.work or tempfile.mkdtemp(prefix="prunekit-gpu-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "synthetic"
    if not (model_dir / "config.json").exists():
        h, kv = shape["hidden_size"], shape["num_key_value_heads"] / shape["num_attention_heads"]
        per_block = h * (2 * h + 2 * h * kv + 3 * shape["intermediate_size"])          # parameters
        need = 2 * layers * per_block * torch.empty((), dtype=dtype).element_size()   # input + one output
        free = shutil.disk_usage(work).free
        if need > free:
            raise SystemExit(f"the input and output checkpoints need about {need / 2**30:.0f} GiB, {work} has "
                             f"{free / 2**30:.0f} GiB free: lower --layers or point --work at a larger disk")
        write_synthetic(model_dir, shape, layers, dtype, device=device.type)
    weights = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    cap = None
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(args.gpu_cap_gib * 2**30, total)
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    calib = torch.randint(0, shape["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        out = work / f"out-{method}"
        started = time.perf_counter()
        report, _, _ = prune_out_of_core(model_dir, step_from_dict({"method": method, "sparsity": 0.5}), calib, out,
                                         dtype=dtype, device=device, batch_size=4, progress=not args.tiny,
                                         overwrite=True)
        seconds = [b["seconds"] for b in report.blocks]
        peak = max(b.get("peak_mb", b.get("peak_rss_mb", 0.0)) for b in report.blocks)
        rows.append({"method": method, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                     "blocks": layers, "weights_gib": round(weights / 2**30, 2),
                     "gpu_cap_gib": round(cap / 2**30, 2) if cap else None,
                     "weights_over_cap": round(weights / cap, 2) if cap else None,
                     "peak_block_mb": peak, "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
                     "seconds_per_block": {"median": round(statistics.median(seconds), 2),
                                           "min": round(min(seconds), 2), "max": round(max(seconds), 2)},
                     "seconds_total": round(time.perf_counter() - started, 1),
                     "calibration": f"{samples} x {seqlen} random tokens", "dtype": str(dtype)})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)                   # the disk holds one output at a time
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny, "rows": rows,
              "command": "python bench/gpu_offload.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
