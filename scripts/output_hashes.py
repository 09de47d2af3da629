"""Hashes of the pruned weights of a fixed set of tiny-model runs: the check that a refactoring
changed no output. Every registered pruning method (with its allocation, update, permutation,
gradient and EoRA variants) runs on 2-layer models built from Hugging Face configs (the test
suite's `TINY_CONFIGS`), in memory, in the reference order and out of core; each case prints
the SHA-256 of its state dict (names, dtypes, shapes and bytes, in name order).

    python scripts/output_hashes.py > before.json     # before the change
    python scripts/output_hashes.py --compare before.json    # after it: exit 1 on any difference

Runs in about a minute on 2 CPU cores. float32, 8 random windows of 16 tokens (seed 1), torch
seeded per case, one thread (so float32 reductions keep one order).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# name -> (family, step as in a recipe, prune_ keyword arguments)
CASES = {
    "magnitude-50": ("llama", {"method": "magnitude", "sparsity": 0.5}, {}),
    "wanda-50": ("llama", {"method": "wanda", "sparsity": 0.5}, {}),
    "wanda-50-block": ("llama", {"method": "wanda", "sparsity": 0.5}, {"sequential": "block"}),
    "wanda-2of4-gpt2": ("gpt2", {"method": "wanda", "nm": [2, 4]}, {}),
    "wanda-owl": ("llama", {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}, {}),
    "wanda-sensitivity": ("qwen2", {"method": "wanda", "sparsity": 0.5, "allocation": "sensitivity"}, {}),
    "wanda-admm": ("llama", {"method": "wanda", "sparsity": 0.5, "update": "admm"}, {}),
    "magnitude-obs-opt": ("opt", {"method": "magnitude", "sparsity": 0.5, "update": "obs"}, {}),
    "sparsegpt-50": ("llama", {"method": "sparsegpt", "sparsity": 0.5}, {}),
    "sparsegpt-2of4-gemma3": ("gemma3_text", {"method": "sparsegpt", "nm": [2, 4]}, {}),
    "sparsegpt-50-phi3": ("phi3", {"method": "sparsegpt", "sparsity": 0.5}, {}),
    "ria-2of4-permute": ("llama", {"method": "ria", "nm": [2, 4], "permute": True}, {}),
    "gblm-50": ("llama", {"method": "gblm", "sparsity": 0.5}, {}),
    "pruner-zero-50": ("mistral", {"method": "pruner-zero", "sparsity": 0.5}, {}),
    "sparsegpt-eora": ("llama", {"method": "sparsegpt", "sparsity": 0.5}, {"eora": {"rank": 4}}),
    "magnitude-sp": ("llama", {"method": "magnitude-sp", "sparsity": 0.25}, {}),
    "wanda-sp": ("qwen3", {"method": "wanda-sp", "sparsity": 0.25}, {}),
    "flap": ("llama", {"method": "flap", "sparsity": 0.2}, {}),
    "taylor": ("llama", {"method": "taylor", "sparsity": 0.2}, {}),
    "flap-gpt2": ("gpt2", {"method": "flap", "sparsity": 0.2}, {}),
    "block-influence": ("llama", {"method": "block-influence", "layers": 1}, {}),
    "angular": ("llama", {"method": "angular", "layers": 1}, {}),
    "sleb": ("llama", {"method": "sleb", "layers": 1}, {}),
    "last-k": ("llama", {"method": "last-k", "layers": 1}, {}),
    "laco": ("llama-4", {"method": "laco", "layers": 1, "merge": 2, "interval": 1}, {}),
}
OUT_OF_CORE = {   # name -> (family, step): pruned from a saved checkpoint with --offload disk
    "disk-wanda-50": ("llama", {"method": "wanda", "sparsity": 0.5}),
    "disk-sparsegpt-owl": ("llama", {"method": "sparsegpt", "sparsity": 0.5, "allocation": "owl"}),
    "disk-flap": ("llama", {"method": "flap", "sparsity": 0.2}),
    "disk-sleb": ("llama", {"method": "sleb", "layers": 1}),
}


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def run_all() -> dict:
    from distributed_cases import model_for as tiny_model     # the conftest families, and "llama-4"
    from prunekit import prune_
    from prunekit.recipe import step_from_dict

    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
    hashes = {}
    for name, (family, step, kwargs) in CASES.items():
        model = tiny_model(family)
        kwargs = dict(kwargs)
        eora = kwargs.pop("eora", None)
        if eora is not None:
            kwargs["compensate"] = step_from_dict({"method": "eora", **eora})
        torch.manual_seed(0)
        report = prune_(model, step_from_dict(step), calib, progress=False, **kwargs)
        state = dict(model.state_dict())
        for layer, (B, A) in sorted(getattr(report, "adapters", {}).items()):
            state[f"adapter.{layer}.B"], state[f"adapter.{layer}.A"] = B, A
        hashes[name] = digest(state)
    from prunekit.io.offload import prune_out_of_core
    from safetensors.torch import load_file
    with tempfile.TemporaryDirectory() as work:
        for name, (family, step) in OUT_OF_CORE.items():
            source = Path(work) / f"{name}-in"
            tiny_model(family).save_pretrained(source)
            torch.manual_seed(0)
            _, out, _ = prune_out_of_core(source, step_from_dict(step), calib, Path(work) / f"{name}-out",
                                          progress=False)
            hashes[name] = digest({k: v for f in sorted(Path(out).glob("*.safetensors"))
                                   for k, v in load_file(f).items()})
    return hashes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, help="a JSON file of earlier hashes: exit 1 on any difference")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hashes = run_all()
    if args.compare is None:
        print(json.dumps(hashes, indent=1))
        return 0
    before = json.loads(args.compare.read_text())
    changed = sorted(k for k in before.keys() | hashes.keys() if before.get(k) != hashes.get(k))
    for key in changed:
        print(f"changed: {key}")
    print(f"{len(hashes) - len(changed)} of {len(hashes)} cases identical")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
