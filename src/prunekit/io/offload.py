"""Out-of-core pruning (`--offload disk`): never hold more than one decoder block's weights.

`prune_out_of_core` builds the model as a skeleton whose parameters live on the meta device (no
memory; `core.residency.empty_model`), prunes it with an `OnDisk` residency (`core/residency.py`:
blocks streamed from the input's safetensors shards, written pruned into staging shards), and
turns the staging directory into a standard sharded checkpoint (`model-0000i-of-0000N.safetensors`
+ `model.safetensors.index.json`), swapped into place atomically (`export.swap_into_place`).
Non-block tensors (embeddings, final norm, an untied head) are read only when a pass needs them
and copied tensor by tensor into their own shard at the end.

The layer-wise procedure is the one of SparseGPT (Frantar & Alistarh, 2023) and Wanda (Sun et al.,
2023): each block only needs its own weights and its inputs, which is what makes streaming the
weights possible.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .atomic import staging_dir
from ..core.residency import INDEX_FILE, OnDisk, ShardReader, empty_model
from .export import METADATA_FILE, check_output_dir, library_versions, normalize_permissions, swap_into_place, \
    to_jsonable
from .loading import recorded_widths
from ..prune import prune_
from ..registry import method_for_config
from ..models import spec_for
from ..surgery import resize_to_, structure_record, uneven_experts
from .moe_checkpoint import FusedReader, to_saved


def finish_checkpoint(staging: Path, reader: ShardReader, block_files: list[Path], prefix: str,
                      dtype: torch.dtype) -> None:
    """Turn `staging` into a standard sharded checkpoint: the non-block tensors of the input go
    into one more shard (copied one at a time), every shard is renamed
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json` maps every tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    others = {name: reader.get(name).to(dtype=dtype).contiguous() for name in reader.names()
              if not name.startswith(prefix + ".")}
    shards = [staging / "non-block.safetensors"] if others else []
    if others:
        save_file(others, str(shards[0]), metadata={"format": "pt"})
    del others
    shards += list(block_files)
    total, weight_map = len(shards), {}
    size = 0
    for i, path in enumerate(shards, start=1):
        final = staging / f"model-{i:05d}-of-{total:05d}.safetensors"
        if path.parent == staging:
            os.replace(path, final)
        else:                      # a run directory's block file: link it, do not write it twice
            try:
                os.link(path, final)
            except OSError:        # another file system
                shutil.copyfile(path, final)
        with safe_open(str(final), framework="pt") as fh:
            for name in fh.keys():
                weight_map[name] = final.name
                sl = fh.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                size += numel * torch.empty((), dtype=dtype).element_size()
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for leftover in staging.glob("block-*.safetensors"):
        leftover.unlink()          # staging files of blocks that were written again under a new position


def saved_layout(model: nn.Module, path: Path, staging: Path) -> Path:
    """A block shard rewritten with the keys `save_pretrained` writes (MoE: one key per expert)."""
    from safetensors.torch import load_file, save_file
    tensors = to_saved(model, load_file(str(path)))
    final = staging / f"saved-{path.name}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(final), metadata={"format": "pt"})
    return final


def load_buffers(model: nn.Module, reader) -> None:
    """Persistent buffers the checkpoint stores (DeepSeek-V3's `e_score_correction_bias`) replace the
    skeleton's initial values; they stay in memory (small), and a changed block writes them back."""
    for name, buffer in model.named_buffers():
        if name in reader:
            value = reader.get(name)
            if tuple(value.shape) != tuple(buffer.shape):
                raise ValueError(f"{name} has shape {tuple(value.shape)} in the checkpoint, the config builds "
                                 f"{tuple(buffer.shape)}")
            buffer.copy_(value)


def skeleton_for(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The meta skeleton of the checkpoint in `model_dir`; a non-uniform width-pruned export
    (per-block widths in its prunekit.json) is re-sliced to them, as `loading.load_pruned` does."""
    from transformers import AutoConfig
    model = empty_model(AutoConfig.from_pretrained(model_dir), dtype)
    widths = recorded_widths(model_dir)
    if widths is not None:
        resize_to_(model, widths)
    return model


def prune_out_of_core(model_dir: str | os.PathLike, step, calib, out_dir, *, dtype: torch.dtype = torch.float32,
                      device="cpu", sequential: str = "true", batch_size: int = 8, progress: bool = True,
                      tokenizer=None, metadata=None, card=None, overwrite: bool = False, protect=(),
                      spill_activations: bool = True, residency_hook=None, write: bool = True):
    """Prune the safetensors checkpoint in `model_dir` with `step` one block at a time, writing the
    result to `out_dir` atomically; returns (report, resolved out_dir, skeleton model).

    Every unstructured/N:M, width and depth method runs this way, allocation pre-passes
    included; what needs the whole model at once is refused (`check_step`). Width pruning writes
    the new widths into the config (or, for non-uniform widths, into prunekit.json's
    "structure", which `load_pruned` reads); depth pruning writes the kept blocks renumbered.
    `write=False` prunes without producing the output (the other processes of a distributed run:
    rank 0 writes it)."""
    from transformers import GenerationConfig
    check_step(step)
    model_dir = Path(model_dir)
    out = check_output_dir(out_dir, overwrite=overwrite, protect=[model_dir, *protect])
    model = skeleton_for(model_dir, dtype)
    reader = ShardReader(model_dir)
    moe = spec_for(model).experts is not None
    if moe:                                   # per-expert keys on disk, fused tensors in memory
        reader = FusedReader(reader, model, spec_for(model).blocks)
    load_buffers(model, reader)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)        # marked as ours: a killed run leaves it for the next one to remove
    try:
        residency = OnDisk(model, reader, staging, dtype, spill_activations=spill_activations)
        if residency_hook is not None:                      # a resumable run wraps it (runs.Recorded)
            residency = residency_hook(residency) or residency
        report = prune_(model, step, calib, device=device, sequential=sequential, batch_size=batch_size,
                        cache_device="cpu", progress=progress, residency=residency)
        if not write:
            return report, out, model
        disk = getattr(residency, "inner", residency)
        shards = disk.block_shards()
        if moe and not uneven_experts(model):     # as save_pretrained writes it (uneven counts stay fused)
            shards = [saved_layout(model, path, staging) for path in shards]
        finish_checkpoint(staging, reader, shards, disk.prefix, dtype)
        model.config.save_pretrained(staging)              # with new widths / block count, if any
        try:
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        except OSError:
            pass                                           # no generation_config.json in the input
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # metadata may be a function of the finished report (run_recipe records the step in it)
        record = to_jsonable(metadata(report) if callable(metadata) else dict(metadata or {}))
        record.setdefault("structure", structure_record(model))
        record["versions"] = library_versions()
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if card is not None:                               # the model card, in the same atomic step
            (staging / "README.md").write_text(card(record))
        normalize_permissions(staging)
        check_output_dir(out, overwrite=overwrite, protect=[model_dir, *protect])
        swap_into_place(staging, out)
    finally:                          # also on Ctrl-C / SIGTERM: no half-written checkpoint stays behind
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report, out, model


def check_step(step) -> None:
    """Refuse, with the reason, what cannot stream one block at a time from disk."""
    method = method_for_config(step)
    if method.scope in ("recover", "compensate"):
        raise ValueError(f"--offload disk prunes one block at a time; {method.name} "
                         f"({'fine-tuning' if method.scope == 'recover' else 'EoRA adapters'}) needs the whole model: "
                         "run it on the out-of-core output with --offload cpu or none")
    if method.scope == "state":
        raise ValueError(f"--offload disk is not built for {method.name} (it rewrites every mixer's shapes and the "
                         "config): run it with --offload cpu or none")
    if getattr(step, "uses_gradient", False) and getattr(step, "gradient", None) == "model":
        raise ValueError("--offload disk cannot run the full-model gradient pre-pass (gradient: model); "
                         "use gradient: block or --offload cpu")
