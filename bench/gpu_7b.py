"""GPU benchmark of the core: a randomly initialised Llama-2-7B-shaped model in float16 (no
download), 128 calibration windows of 2048 random tokens (the papers' protocol), 50% unstructured
Wanda and SparseGPT; wall time and peak GPU memory, in the standard mode (activations on the GPU)
and the low-memory mode (activations on the CPU).

    python bench/gpu_7b.py                                  # the real thing, needs a CUDA GPU
    python bench/gpu_7b.py --tiny                           # same code path, tiny shapes, runs on CPU (tests)

Random weights say nothing about quality; they measure time and memory for the exact shapes.
Targets (issue "prunekit core"): Wanda < 15 s and SparseGPT < 150 s with peak < 8 GiB; low-memory
mode peak < 2.5 GiB, Wanda < 30 s, SparseGPT < 170 s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from prunekit import SparseGPTConfig, WandaConfig, prune_

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)


def build(shape: dict, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """Random model on the CPU, built without the slow default initialisation. The random numbers are
    drawn on `device` (a CUDA generator draws 7B normals in a second, the CPU's in about a minute)."""
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, device=device, dtype=dtype) * 0.02)
    model.model.rotary_emb.to_empty(device="cpu")
    model.model.rotary_emb.__init__(config)          # recompute the rotary buffer the meta build skipped
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (what the tests run)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--modes", default="gpu,lowmem", help="gpu: activations on the GPU; lowmem: on the CPU")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_7b.json"))
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        print("no CUDA device: run with --tiny for the CPU smoke version", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else LLAMA2_7B
    samples = args.samples or (4 if args.tiny else 128)
    seqlen = args.seqlen or (32 if args.tiny else 2048)
    dtype = torch.float32 if args.tiny else torch.float16
    calib = torch.randint(0, shape["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(0))
    configs = {"wanda": WandaConfig(sparsity=0.5), "sparsegpt": SparseGPTConfig(sparsity=0.5)}

    model = build(shape, dtype, device=device.type)
    dense = {name: tensor.clone() for name, tensor in model.state_dict().items()}   # restored before each run
    rows = []
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            model.load_state_dict(dense)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            report = prune_(model, configs[method], calib, device=device,
                            cache_device="cpu" if mode == "lowmem" else device, progress=False)
            seconds = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
            rows.append({"method": method, "mode": mode, "seconds": round(seconds, 2),
                         "peak_gib": None if peak is None else round(peak, 2), "sparsity": report.sparsity})
            print(rows[-1], flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "shape": shape,
              "samples": samples, "seqlen": seqlen, "dtype": str(dtype), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
