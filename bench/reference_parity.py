"""Run locuslab/wanda's own `prune_wanda` / `prune_sparsegpt` on prunekit's calibration windows.

Issue: "prunekit: perplexity equal to the reference's within 1% on identical calibration windows".
This script runs the REFERENCE implementation (github.com/locuslab/wanda, lib/prune.py,
lib/sparsegpt.py, lib/layerwrapper.py), imported at run time from a checkout given with
--reference -- nothing of it is copied into this repository -- on exactly the (samples, seqlen)
token windows that prunekit calibrates on, and saves the pruned model as safetensors so that
`bench/parity_compare.py` (main venv) can evaluate it with prunekit's perplexity protocol and
compare it with a prunekit-pruned model.

It must run in a SEPARATE virtualenv with transformers 4.x: the reference's calibration
`Catcher` reads `attention_mask` / `position_ids` keyword arguments of the 4.x Llama decoder
layer, and its per-layer calls `layer(x, attention_mask=..., position_ids=...)` pass no
`position_embeddings`, which only works while the attention module can still compute RoPE from
`position_ids` itself (transformers <= 4.47; 4.48 removed that fallback). Used here:
transformers 4.47.1 with torch 2.13.0+cpu.

    # reference venv (see bench/results/reference_parity.md for how it was built)
    /work/venv-ref/bin/python bench/reference_parity.py --method wanda --sparsity 0.5 \\
        --reference /work/.mirror/locuslab+wanda/repo --model CHECKPOINT_DIR \\
        --windows /tmp/parity/windows.safetensors --out /tmp/parity/ref-wanda50

    --reference  a locuslab/wanda checkout (a directory holding lib/prune.py) or a bare git
                 directory (then `git archive HEAD lib` is extracted to a temporary directory
                 and the commit is recorded)
    --model      a Llama checkpoint directory (config.json + *.safetensors); a transformers-5
                 config (`rope_parameters`, `dtype`) is rewritten to its 4.x spelling
                 (`rope_theta`, `rope_scaling`, `torch_dtype`) in a temporary copy whose weight
                 files are symlinks -- without that, 4.x would silently use rope_theta=10000
    --windows    a safetensors file with one int64 tensor "ids" of shape (samples, seqlen),
                 written from `prunekit.calibration_data(tok, "default", 128, 512, seed=0)`
    --method     wanda | sparsegpt | dense (dense: prune nothing, only load and save -- checks
                 that the 4.x -> safetensors -> transformers 5 round trip is lossless). The
                 reference's prune_magnitude is not offered: it calls `.cuda()` unconditionally.

What is patched, and why (the reference's source files are not edited):
  1. `lib.prune.get_loaders` is replaced with a function returning our windows in the format
     of lib/data.py's loaders: a list of (inp, tar) with inp of shape (1, seqlen) and tar a copy
     with every position but the last set to -100 (the reference only reads inp). It asserts
     that the reference asks for exactly `samples` windows of `seqlen` tokens. Nothing is
     downloaded; `datasets` only has to be importable because lib/data.py imports it.
  2. `torch.cuda.synchronize` is replaced with a no-op: `SparseGPT.fasterprune` calls it
     unconditionally and it raises on a CPU-only torch build. (`torch.cuda.empty_cache()` is
     already a no-op when CUDA was never initialised, so it is left alone.)
  3. `model.hf_device_map = {}` is set on the model: the reference reads it (main.py loads with
     `device_map="auto"`, which sets it); an empty map means "everything on `device`", which is
     what the reference does when the map has no per-layer entries.
  4. `model.seqlen = seqlen` (main.py sets it to max_position_embeddings; we use the windows'
     length) and `device = torch.device("cpu")` (main.py uses cuda:0).
The model is float32 (main.py loads float16 on GPU; prunekit's CPU protocol is float32).

Output directory: model.safetensors + config.json (4.x spelling, readable by transformers 5),
the tokenizer files copied from --model, and reference_parity.json (wall time of the prune call
alone, not loading or saving; the reference's own `check_sparsity`; versions; commit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def reference_checkout(path: Path) -> tuple[Path, str | None]:
    """(directory to put on sys.path, commit or None) for a checkout or a bare git directory."""
    if (path / "lib" / "prune.py").is_file():
        commit = None
        if (path / ".git").exists():
            commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None
        return path, commit
    if (path / "HEAD").is_file() and (path / "objects").is_dir():  # bare repository (the fetch tool's mirror)
        commit = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        target = Path(tempfile.mkdtemp(prefix=f"wanda-ref-{commit[:8]}-"))
        archive = subprocess.run(["git", "--git-dir", str(path), "archive", commit, "lib"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        return target, commit
    raise SystemExit(f"--reference {path}: neither a locuslab/wanda checkout (lib/prune.py) nor a bare git dir")


def checkpoint_for_4x(model_dir: Path) -> Path:
    """`model_dir`, or a temporary copy whose config.json is spelled the transformers-4.x way."""
    config = json.loads((model_dir / "config.json").read_text())
    if "rope_parameters" not in config and "dtype" not in config:
        return model_dir
    rope = dict(config.pop("rope_parameters", None) or {})
    if rope:
        config["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type", "default")
        config["rope_scaling"] = None if kind == "default" and not rope else {"rope_type": kind, **rope}
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    target = Path(tempfile.mkdtemp(prefix="parity-ckpt-4x-"))
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (target / item.name).symlink_to(item.resolve())
    (target / "config.json").write_text(json.dumps(config, indent=2))
    print(f"config rewritten for transformers 4.x in {target}: rope_theta={config.get('rope_theta')}, "
          f"rope_scaling={config.get('rope_scaling')}", flush=True)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, choices=["wanda", "sparsegpt", "dense"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", default=None, help="N:M, e.g. 2:4 (the reference requires --sparsity 0.5)")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="passed to the reference (its loaders' seed; unused)")
    args = parser.parse_args(argv)

    root, commit = reference_checkout(args.reference.resolve())
    sys.path.insert(0, str(root))

    # Patch 2: fasterprune's unconditional torch.cuda.synchronize() fails on a CPU-only build.
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda device=None: None

    import transformers
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    import lib.prune as ref

    ids = load_file(str(args.windows))["ids"]
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise SystemExit(f"--windows must hold 'ids' as a 2-D int64 tensor, got {tuple(ids.shape)} {ids.dtype}")
    samples, seqlen = ids.shape

    # Patch 1: the reference's calibration loader, fed with our windows.
    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        if nsamples != samples or seqlen != ids.shape[1]:
            raise RuntimeError(f"reference asked for {nsamples} x {seqlen}; the windows are {samples} x {ids.shape[1]}")
        loader = []
        for row in ids:
            inp = row[None, :].clone()
            tar = inp.clone()
            tar[:, :-1] = -100
            loader.append((inp, tar))
        print(f"get_loaders({name!r}) -> {len(loader)} windows of {seqlen} tokens from {args.windows}", flush=True)
        return loader, None
    ref.get_loaders = get_loaders

    prune_n = prune_m = 0
    if args.nm:
        prune_n, prune_m = map(int, args.nm.split(":"))
        if args.sparsity != 0.5:
            raise SystemExit("the reference requires --sparsity 0.5 with --nm (main.py asserts it)")

    model_dir = checkpoint_for_4x(args.model.resolve())
    torch.manual_seed(args.seed)  # main.py seeds numpy and torch; nothing here draws random numbers
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    model.eval()
    model.seqlen = seqlen          # patch 4
    model.hf_device_map = {}       # patch 3
    device = torch.device("cpu")   # patch 4
    print(f"model: {type(model).__name__}, attn={model.config._attn_implementation}, "
          f"rope_theta={model.config.rope_theta}, layers={model.config.num_hidden_layers}, "
          f"torch threads={torch.get_num_threads()}", flush=True)

    # The attributes of `args` that lib/prune.py reads (main.py's argparse names).
    ref_args = argparse.Namespace(nsamples=samples, seed=args.seed, sparsity_ratio=args.sparsity, use_variant=False,
                                  prune_method=args.method, sparsity_type=args.nm or "unstructured")
    prune = {"wanda": ref.prune_wanda, "sparsegpt": ref.prune_sparsegpt}
    started = time.perf_counter()
    if args.method != "dense":
        prune[args.method](ref_args, model, None, device, prune_n=prune_n, prune_m=prune_m)
    seconds = time.perf_counter() - started
    sparsity = ref.check_sparsity(model)
    print(f"reference {args.method}: {seconds:.1f} s, sparsity sanity check {sparsity:.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    del model.hf_device_map  # else 4.47's save_pretrained takes its accelerate (offload) path
    model.save_pretrained(str(args.out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (args.model / name).is_file():
            shutil.copyfile(args.model / name, args.out / name)
    summary = {
        "method": args.method, "sparsity": args.sparsity, "nm": args.nm, "samples": samples, "seqlen": seqlen,
        "prune_seconds": round(seconds, 2), "reference_check_sparsity": sparsity,
        "reference_commit": commit, "reference_root": str(root),
        "model": str(args.model), "windows": str(args.windows),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "patches": ["lib.prune.get_loaders -> our windows", "torch.cuda.synchronize -> no-op (CPU build)",
                    "model.hf_device_map = {}", f"model.seqlen = {seqlen}", "device = cpu", "float32"],
    }
    (args.out / "reference_parity.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
