"""Out-of-core benchmark (issue 6): peak RSS and wall time of Wanda and SparseGPT

  (a) on SmolLM2-135M, in memory (`--offload none`) vs out of core (`--offload disk`);
  (b) out of core on a randomly initialised llama-shaped model about 3x larger than a memory
      budget, showing the budget and the peak.

    python bench/cpu_offload.py                        # full: SmolLM2-135M + a ~1.5 GB synthetic model
    python bench/cpu_offload.py --tiny --model DIR     # seconds (tests): DIR = a tiny checkpoint with a tokenizer

Every measurement runs in its own subprocess; peak RSS is the child's VmHWM (/proc/self/status)
minus nothing: the import baseline (torch + transformers + prunekit + the modeling code) is
reported next to it, and for (b) the budget is baseline + weights / 3. Results go to
bench/results/cpu_offload.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Runs in a child: import, record the baseline, do one job, print one JSON line.
_CHILD = r"""
import json, sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
job = json.loads(sys.argv[1])
import torch, transformers
torch.set_num_threads(job.get("threads", 1))
if job["kind"] == "synthetic-build":
    torch.manual_seed(0)
    c = job["config"]
    config = transformers.LlamaConfig(**c)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(job["dir"], max_shard_size="200MB")
    print(json.dumps({"ok": True})); sys.exit()
from prunekit.cli import main
from prunekit.io.offload import prune_out_of_core
from prunekit.registry import method_for_config
from prunekit.recipe import step_from_dict
if job["kind"] == "synthetic":
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(job["dir"]))
baseline = hwm()
start = time.perf_counter()
if job["kind"] == "cli":
    code = main(job["argv"])
    assert code == 0, code
else:
    calib = torch.randint(0, job["vocab"], (job["samples"], job["seqlen"]), generator=torch.Generator().manual_seed(0))
    step = step_from_dict({"method": job["method"], "sparsity": job["sparsity"]})
    prune_out_of_core(job["dir"], step, calib, job["out"], progress=False)
print(json.dumps({"baseline_mb": round(baseline / 2**20, 1), "peak_mb": round(hwm() / 2**20, 1),
                  "seconds": round(time.perf_counter() - start, 2)}))
"""


# the amount each method removes: half of the weights (unstructured), a fifth of the block parameters
# (width), a quarter of the blocks (depth)
SPARSITY = {"wanda": 0.5, "sparsegpt": 0.5, "magnitude": 0.5, "flap": 0.2, "wanda-sp": 0.2,
            "block-influence": 0.25, "angular": 0.25}


def _same_tensors(a: Path, b: Path) -> dict:
    """Do two checkpoints hold the same tensors, bit for bit? (names, count, largest difference)"""
    from safetensors.torch import load_file
    ta, tb = {}, {}
    for folder, into in ((a, ta), (b, tb)):
        for file in sorted(folder.glob("*.safetensors")):
            into.update(load_file(str(file)))
    if sorted(ta) != sorted(tb):
        return {"identical": False, "tensors": len(tb), "names_differ": sorted(set(ta) ^ set(tb))[:5]}
    worst = max(float((ta[k].float() - tb[k].float()).abs().max()) if ta[k].shape == tb[k].shape else float("inf")
                for k in ta)
    return {"identical": worst == 0.0, "tensors": len(ta), "max_abs_diff": worst}


def _child(job: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 1))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({job['kind']}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="(a): the model (default: embedded SmolLM2-135M)")
    parser.add_argument("--methods", default="wanda,sparsegpt,flap,block-influence",
                        help=f"comma-separated; amounts removed: {SPARSITY}")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--synthetic-layers", type=int, default=48, help="(b): blocks of the synthetic model")
    parser.add_argument("--synthetic-hidden", type=int, default=1024)
    parser.add_argument("--skip", choices=["a", "b"], action="append", default=[])
    parser.add_argument("--tiny", action="store_true", help="a few seconds: tiny shapes (tests)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_offload.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples, args.seqlen, args.synthetic_layers, args.synthetic_hidden = 2, 32, 4, 64
    methods = [m for m in args.methods.split(",") if m]
    work = Path(args.work or tempfile.mkdtemp(prefix="prunekit-offload-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if "a" not in args.skip:
        for method in methods:
            for offload in ("none", "disk"):
                out = work / f"a-{method}-{offload}"
                argv_ = ["prune", args.model, "--method", method, "--sparsity", str(SPARSITY.get(method, 0.5)),
                         "--samples", str(args.samples),
                         "--seqlen", str(args.seqlen), "--no-eval", "--out", str(out), "--overwrite",
                         "--offload", offload]
                m = _child({"kind": "cli", "argv": argv_})
                rows.append({"part": "a", "model": args.model, "method": method, "offload": offload,
                             "sparsity": SPARSITY.get(method, 0.5), **m})
                if offload == "disk":                # the same weights as in memory?
                    rows[-1].update(_same_tensors(work / f"a-{method}-none", out))
                print(json.dumps(rows[-1]), flush=True)
    if "b" not in args.skip:
        h = args.synthetic_hidden
        config = {"hidden_size": h, "intermediate_size": 2 * h, "num_attention_heads": max(1, h // 64),
                  "num_key_value_heads": max(1, h // 64), "num_hidden_layers": args.synthetic_layers,
                  "vocab_size": 128}
        per_block = 4 * h * h + 3 * h * 2 * h + 2 * h
        weights = 4 * (args.synthetic_layers * per_block + 2 * 128 * h + h)
        synthetic = work / "synthetic"
        if not (synthetic / "config.json").exists():
            _child({"kind": "synthetic-build", "config": config, "dir": str(synthetic)})
        for method in methods:
            m = _child({"kind": "synthetic", "dir": str(synthetic), "out": str(work / f"b-{method}"), "method": method,
                        "sparsity": SPARSITY.get(method, 0.5), "vocab": 128, "samples": args.samples,
                        "seqlen": min(args.seqlen, 2048)})
            budget = m["baseline_mb"] + weights / 3 / 2**20
            rows.append({"part": "b", "model": f"synthetic llama {config}", "method": method, "offload": "disk",
                         "sparsity": SPARSITY.get(method, 0.5),
                         "weights_mb": round(weights / 2**20, 1), "budget_mb": round(budget, 1),
                         "under_budget": m["peak_mb"] < budget, **m})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny,
              "samples": args.samples, "seqlen": args.seqlen, "rows": rows}
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
