"""Out-of-core pruning (`--offload disk`): never hold more than one decoder block's weights.

Issue 6, part 1. The model is built as a skeleton whose parameters live on the meta device
(no memory); buffers stay real because non-persistent ones (rotary `inv_freq`) are computed in
`__init__` and are not in the checkpoint. The engine asks a *residency* object to bring a block
in and to put it back (`onload` / `offload`) where it used to call `block.to(device)` /
`block.to(home)`:

  InMemory   today's behaviour: the block moves to the compute device and back
  OnDisk     the block's parameters are read tensor by tensor from the input safetensors
             (`ShardReader`), pruned, written as one output shard into a staging directory and
             put back on meta, so peak host memory is about one block plus the cached
             calibration activations, independent of model size

Non-block tensors (embeddings, final norm, an untied head) are read only for the capture pass
and copied tensor by tensor into their own shard at the end. The staging directory becomes a
standard sharded checkpoint (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`)
and is swapped into place atomically (`export.swap_into_place`). The layer-wise procedure is
the one of SparseGPT (Frantar & Alistarh, 2023) and Wanda (Sun et al., 2023): each block only
needs its own weights and its inputs, which is what makes streaming the weights possible.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is replaced by a meta tensor of the same
    shape and dtype (no storage). Buffers are untouched, so rotary tables stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM for `config` with every parameter on the meta device (buffers real), in
    eval mode; tied input/output embeddings stay one parameter."""
    from transformers import AutoModelForCausalLM
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


class ShardReader:
    """The tensors of a safetensors checkpoint directory by name, read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / file for name, file in weight_map.items()}
        else:
            single = self.path / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{self.path} has neither {INDEX_FILE} nor model.safetensors; "
                                        "out-of-core pruning reads a safetensors checkpoint directory")
            from safetensors import safe_open
            with safe_open(str(single), framework="pt") as fh:
                self.files = {name: single for name in fh.keys()}

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        if name not in self.files:
            raise KeyError(f"{name} is not in the checkpoint {self.path}; is it the model the config describes?")
        with safe_open(str(self.files[name]), framework="pt") as fh:
            return fh.get_tensor(name)


def _materialize(module: nn.Module, prefix: str, reader: ShardReader, device, dtype) -> None:
    """Replace `module`'s meta parameters with the checkpoint's tensors (cast to dtype)."""
    for name, param in list(module.named_parameters(recurse=True)):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if not param.is_meta:
            continue
        tensor = reader.get(f"{prefix}{name}").to(device=device, dtype=dtype)
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _release(module: nn.Module) -> None:
    """Put `module`'s parameters back on meta (frees their memory)."""
    for name, param in list(module.named_parameters(recurse=True)):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(param.detach().to("meta"), requires_grad=False)


class InMemory:
    """Today's residency: the block moves to the compute device and back to where it was."""

    def __init__(self):
        self.home = {}

    def capturing(self, model, blocks):
        return contextlib.nullcontext()

    def resume(self, blocks, hidden):
        return 0, hidden                 # nothing finished before: start at block 0

    def done(self, index, records, hidden) -> None:
        pass                             # `runs.Recorded` saves the finished block here

    def onload(self, index: int, block: nn.Module, device) -> None:
        self.home[index] = next(block.parameters()).device
        block.to(device)

    def offload(self, index: int, block: nn.Module) -> None:
        block.to(self.home.pop(index))


def spill(hidden: list[torch.Tensor], folder: Path) -> list[torch.Tensor]:
    """The cached activations as memory-mapped files in `folder` (one per calibration chunk):
    the kernel may page them out, and they count as page cache rather than anonymous memory.
    The engine writes each block's outputs into them in place (`engine._keep`)."""
    spilled = []
    for i, tensor in enumerate(hidden):
        path = Path(folder) / f"chunk{i}.activations"
        with open(path, "wb") as fh:
            fh.truncate(tensor.numel() * tensor.element_size())
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        mapped = mapped.view(tensor.shape)
        mapped.copy_(tensor)
        mapped.spilled = True
        spilled.append(mapped)
    return spilled


class OnDisk:
    """Blocks come from `reader` and go, pruned, to `staging/block-<index>.safetensors`.
    With `spill_activations` the cached activations live in memory-mapped files in `staging`."""

    def __init__(self, reader: ShardReader, staging: Path, prefix: str, dtype: torch.dtype,
                 spill_activations: bool = True):
        self.reader, self.staging, self.prefix, self.dtype = reader, Path(staging), prefix, dtype
        self.spill_activations = spill_activations
        self.written: list[Path] = []
        self.after_block = None          # callback(index, shard path): resumable runs record it

    def block_file(self, index: int) -> Path:
        return self.staging / f"block-{index:05d}.safetensors"

    @contextlib.contextmanager
    def capturing(self, model, blocks):
        """The capture pass needs the embeddings (and block 0, to learn its return type)."""
        block_names = {f"{self.prefix}.{i}." for i in range(len(blocks))}
        outside = [(n, p) for n, p in model.named_parameters()
                   if p.is_meta and not any(n.startswith(b) for b in block_names)]
        for name, _ in outside:
            if name in self.reader:
                _set_parameter(model, name, self.reader.get(name).to(dtype=self.dtype))
        model.tie_weights()
        _materialize(blocks[0], f"{self.prefix}.0.", self.reader, "cpu", self.dtype)
        try:
            yield
        finally:
            _release(blocks[0])
            for name, _ in outside:
                _set_parameter(model, name, None)
            model.tie_weights()

    def resume(self, blocks, hidden):
        if hidden is not None and self.spill_activations and hidden[0].device.type == "cpu":
            hidden = spill(hidden, self.staging)
        return 0, hidden
                # nothing finished before: start at block 0

    def done(self, index, records, hidden) -> None:
        pass                             # `runs.Recorded` saves the finished block here

    def onload(self, index: int, block: nn.Module, device) -> None:
        _materialize(block, f"{self.prefix}.{index}.", self.reader, device, self.dtype)

    def offload(self, index: int, block: nn.Module) -> None:
        from safetensors.torch import save_file
        tensors = {f"{self.prefix}.{index}.{k}": v.detach().to("cpu").contiguous()
                   for k, v in block.state_dict().items()}
        path = self.block_file(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self.written.append(path)
        _release(block)
        _return_freed_memory()
        if self.after_block is not None:
            self.after_block(index, path)


def _return_freed_memory() -> None:
    """Hand the freed block back to the OS. glibc keeps freed heap memory (one arena, see
    engine._one_malloc_arena) and RSS grew by about one block per block without this (measured:
    +10 MB per 10 MB block on a synthetic llama); the in-memory engine skips it for speed."""
    from .engine import _libc
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _set_parameter(model: nn.Module, name: str, tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[leaf]
    value = tensor if tensor is not None else old.detach().to("meta")
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


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


def prune_out_of_core(model_dir: str | os.PathLike, step, calib, out_dir, *, dtype: torch.dtype = torch.float32,
                      device="cpu", sequential: str = "true", batch_size: int = 8, progress: bool = True,
                      tokenizer=None, metadata=None, card=None, overwrite: bool = False, protect=(),
                      spill_activations: bool = True, residency_hook=None):
    """Prune the safetensors checkpoint in `model_dir` with `step` one block at a time, writing the
    result to `out_dir` atomically; returns (report, resolved out_dir, skeleton model).

    Only unstructured/N:M methods with uniform allocation and without a full-model gradient
    pre-pass run out of core (see `check_step`)."""
    from transformers import AutoConfig, GenerationConfig
    from .engine import prune_
    from .export import METADATA_FILE, check_output_dir, library_versions, normalize_permissions, \
        swap_into_place, to_jsonable
    from .models import spec_for
    check_step(step)
    model_dir = Path(model_dir)
    out = check_output_dir(out_dir, overwrite=overwrite, protect=[model_dir, *protect])
    config = AutoConfig.from_pretrained(model_dir)
    model = empty_model(config, dtype)
    reader = ShardReader(model_dir)
    prefix = spec_for(model).blocks
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        residency = OnDisk(reader, staging, prefix, dtype, spill_activations=spill_activations)
        if residency_hook is not None:                      # a resumable run wraps it (runs.Recorded)
            residency = residency_hook(residency) or residency
        report = prune_(model, step, calib, device=device, sequential=sequential, batch_size=batch_size,
                        cache_device="cpu", progress=progress, residency=residency)
        finish_checkpoint(staging, reader, getattr(residency, "inner", residency).written, prefix, dtype)
        config.save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(model_dir).save_pretrained(staging)
        except OSError:
            pass                                           # no generation_config.json in the input
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # metadata may be a function of the finished report (run_recipe records the step in it)
        record = to_jsonable(metadata(report) if callable(metadata) else dict(metadata or {}))
        record["versions"] = library_versions()
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if card is not None:                               # the model card, in the same atomic step
            (staging / "README.md").write_text(card(record))
        for leftover in staging.glob("*.activations*"):
            leftover.unlink()
        normalize_permissions(staging)
        check_output_dir(out, overwrite=overwrite, protect=[model_dir, *protect])
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return report, out, model


def check_step(step) -> None:
    """Refuse, with the reason, what cannot stream one block at a time from disk."""
    from .registry import method_for_config
    method = method_for_config(step)
    if method.scope != "linear":
        raise ValueError(f"--offload disk supports unstructured/N:M methods (magnitude, wanda, sparsegpt, ...); "
                         f"{method.name} is a {method.scope} method: run it with --offload cpu or none")
    if getattr(step, "allocation", "uniform") != "uniform":
        raise ValueError(f"--offload disk needs a uniform allocation: allocation={step.allocation} scores the "
                         "whole model first; use --offload cpu, or drop --allocation")
    if getattr(step, "uses_gradient", False) and getattr(step, "gradient", None) == "model":
        raise ValueError("--offload disk cannot run the full-model gradient pre-pass (gradient: model); "
                         "use gradient: block or --offload cpu")
