"""GPU speed of structured pruning (issue: "structured width and depth pruning"): a randomly
initialised Llama-2-7B-shaped model in float16, dense vs 25% of the block parameters removed by
width (magnitude-sp, uniform: heads and FFN channels) and by depth (last-k: 8 of 32 blocks).
Speed only: random weights, no download, no calibration data needed (both criteria are data-free,
and the speed of a pruned shape does not depend on which units were removed).

    python bench/gpu_structured.py                  # on an H100-class GPU (needs ~30 GB)
    python bench/gpu_structured.py --tiny           # a tiny model on the CPU (what the tests run)

Protocol: `prunekit.bench.measure` on the in-memory model (warm-up 1, median of `repeats`),
random prompts of `prompt-len` tokens, `new-tokens` greedy decode steps with the KV cache, for
every batch size; the model is rebuilt from the same seed before each pruning.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
            num_hidden_layers=4, vocab_size=128, max_position_embeddings=256)


def build(shape: dict, dtype, device):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (for tests)")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_structured.json"))
    args = parser.parse_args(argv)

    from prunekit import prune_
    from prunekit.bench import measure, parse_batches
    from prunekit.methods.last_k import LastKConfig
    from prunekit.methods.magnitude_sp import MagnitudeSPConfig

    if args.tiny:
        shape, dtype, device = TINY, torch.float32, "cpu"
        args.prompt_len, args.new_tokens, args.repeats = min(args.prompt_len, 16), min(args.new_tokens, 4), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny on a CPU")
        shape, dtype, device = LLAMA2_7B, torch.float16, "cuda"
    batches = parse_batches(args.batch)
    runs = {"dense": None, "width-25": MagnitudeSPConfig(sparsity=0.25), "depth-25": LastKConfig(sparsity=0.25)}
    rows = []
    for name, config in runs.items():
        model = build(shape, dtype, device)
        if config is not None:
            prune_(model, config, None, device=device, progress=False)
        result = measure(model, batches=batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         device=device, repeats=args.repeats, warmup=1)
        for row in result["rows"]:
            rows.append({"name": name, **row})
        print(f"{name}: measured", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    dense = {r["batch"]: r for r in rows if r["name"] == "dense"}
    for row in rows:
        base = dense[row["batch"]]
        row["prefill_speedup"] = base["prefill_ms"]["median"] / row["prefill_ms"]["median"]
        row["decode_speedup"] = row["decode_tok_s_per_seq"]["median"] / base["decode_tok_s_per_seq"]["median"]
        print(f"{row['name']:<9} batch {row['batch']:<3} params {row['params'] / 1e9:6.3f}B  prefill "
              f"{row['prefill_ms']['median']:8.1f} ms ({row['prefill_speedup']:.2f}x)  decode "
              f"{row['decode_tok_s_per_seq']['median']:7.1f} tok/s/seq ({row['decode_speedup']:.2f}x)", flush=True)
    out = {"date": date.today().isoformat(), "device": result["protocol"]["device"], "shape": shape,
           "dtype": str(dtype), "protocol": result["protocol"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
