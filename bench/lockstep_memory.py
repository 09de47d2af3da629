"""Where the default (true-sequential) mode's memory goes: live tensors vs process RSS at every
lockstep meeting point of the first block(s) of SmolLM2-135M, Wanda 50%.

    python bench/lockstep_memory.py --blocks 2 --samples 64
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/lockstep_memory.py --blocks 2 --samples 64

Live tensors: every tensor reachable from Python (`gc.get_objects`), each storage counted once, taken
by the last thread to arrive at a meeting point (when every chunk is suspended there). RSS: psutil.
The model is cut to its first `--blocks` decoder blocks, so the run takes a minute; the meeting points
of block 0 are the ones to read (later blocks repeat them). Calibration: `--samples` windows of 512
tokens of the offline default corpus (seed 0), chunks of 8.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import sys

import psutil
import torch


def live_tensor_mb() -> float:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return total / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    import prunekit.lockstep as lockstep
    from prunekit import WandaConfig, calibration_data, load, prune_

    model, tokenizer = load("default")
    model.model.layers = model.model.layers[:args.blocks]
    model.config.num_hidden_layers = args.blocks
    calib = calibration_data(tokenizer, "default", samples=args.samples, seqlen=512, seed=0)
    rows, meet = [], lockstep.Lockstep.meet

    def measured_meet(self, point, action):
        if self.local.index == self.n - 1:                     # every chunk is suspended here now
            rows.append({"group": [layer.name for layer in point.layers], "live_mb": round(live_tensor_mb()),
                         "rss_mb": round(psutil.Process().memory_info().rss / 2**20)})
            print(json.dumps(rows[-1]), flush=True)
        return meet(self, point, action)

    lockstep.Lockstep.meet = measured_meet
    print(json.dumps({"before_prune": {"live_mb": round(live_tensor_mb()),
                                       "rss_mb": round(psutil.Process().memory_info().rss / 2**20)}}))
    prune_(model, WandaConfig(sparsity=0.5), calib, progress=False)
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
