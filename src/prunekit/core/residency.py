"""Residencies: where a model's blocks live between their turns in a pass.

Every pass asks the current residency where a block (or any module) comes from and goes back to,
where it would otherwise call `block.to(device)` / `block.to(home)`:

  InMemory   the module moves to the compute device and back (the default)
  OnDisk     parameters are read tensor by tensor from the input safetensors (`ShardReader`), or
             from the block's staging file once it was changed; a changed block is written to
             its staging file and every module goes back to meta, so peak host memory is about
             one block plus the cached calibration activations, independent of model size

The linear engine's block loop takes the residency as an argument (`onload` / `offload`); passes
that run inside a method (`core.stream.block_stream`: width pruning, depth scores, allocation
pre-passes; `depth.onloaded`: SLEB's and LaCo's searches) ask `current()`, which `prune.prune_`
sets for the duration of a run. So every unstructured/N:M, width and depth method streams from
disk with no code of its own. Depth pruning removes blocks from the skeleton only at the end;
`OnDisk` remembers each block's index in the input and `block_shards` writes the kept blocks
under their new positions. The out-of-core driver that builds an `OnDisk` run is `io/offload.py`.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models import spec_for
from ..models.spec import get_module
from .memory import return_freed_memory

INDEX_FILE = "model.safetensors.index.json"


def empty_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM for `config` with every parameter on the meta device (no storage), buffers real,
    in eval mode; tied input/output embeddings stay one parameter.

    Built under `torch.device("meta")` (a thread-local mode: nothing process-wide is patched). The
    buffers (rotary tables, embedding scales) are computed in `__init__` and are not in a checkpoint,
    so they are then materialised on the CPU and filled by the model's own `_init_weights`, which is
    what `from_pretrained` does for the non-persistent buffers it cannot load."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, buffer in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = torch.empty_like(buffer, device="cpu")
    for module in model.modules():
        if next(module.buffers(recurse=False), None) is not None:
            model._init_weights(module)
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


def _params(module: nn.Module):
    """(owner module, leaf name, parameter) of every parameter under `module`."""
    for _, owner in module.named_modules(remove_duplicate=False):
        for leaf, param in list(owner._parameters.items()):
            if param is not None:
                yield owner, leaf, param


def _release(module: nn.Module) -> None:
    """Put `module`'s parameters back on meta (frees their memory)."""
    for owner, leaf, param in _params(module):
        owner._parameters[leaf] = nn.Parameter(param.detach().to("meta"), requires_grad=False)


# ----------------------------------------------------------------------------- residencies

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("prunekit_residency", default=None)


def current():
    """The residency of the run in progress (`using`), else a fresh `InMemory`. Passes that the
    engine does not drive itself (`core.stream.block_stream`, `depth.onloaded`, width pruning) ask
    it where blocks come from and go back to."""
    residency = _ACTIVE.get()
    return residency if residency is not None else InMemory()


@contextlib.contextmanager
def using(residency):
    """Make `residency` the one `current()` returns for the duration (`prune.prune_` sets it)."""
    token = _ACTIVE.set(residency)
    try:
        yield residency
    finally:
        _ACTIVE.reset(token)


class InMemory:
    """Today's residency: modules move to the compute device and back to where they were.

    Two views of the same thing: `load(module, device)` / `unload(module, changed)` for any
    module (block-stream passes, depth search), `onload(index, block, device)` /
    `offload(index, block)` for the engine's block loop (what `runs.Recorded` wraps)."""

    def __init__(self):
        self.home = {}

    def capturing(self, model, blocks):
        return contextlib.nullcontext()

    def resume(self, blocks, hidden):
        return 0, hidden                 # nothing finished before: start at block 0

    def done(self, index, records, hidden) -> None:
        pass                             # `runs.Recorded` saves the finished block here

    def keep(self, hidden):
        return hidden                    # cached activations stay where they are

    def load(self, module: nn.Module, device) -> None:
        param = next(module.parameters(), None)
        if param is not None:
            self.home[id(module)] = param.device
            module.to(device)

    def unload(self, module: nn.Module, changed: bool = False) -> None:
        home = self.home.pop(id(module), None)
        if home is not None:
            module.to(home)

    def onload(self, index: int, block: nn.Module, device) -> None:
        self.load(block, device)

    def offload(self, index: int, block: nn.Module) -> None:
        self.unload(block, changed=True)


def spill(hidden: list[torch.Tensor], folder: Path) -> list[torch.Tensor]:
    """The cached activations as memory-mapped files in `folder` (one per calibration chunk):
    the kernel may page them out, and they count as page cache rather than anonymous memory.
    Each file is unlinked as soon as it is mapped, so its disk space is given back when the
    tensor is freed (and nothing is left behind by a crash). The engine writes each block's
    outputs into them in place (`core.stream.keep_output`)."""
    spilled = []
    for tensor in hidden:
        fd, path = tempfile.mkstemp(suffix=".activations", dir=folder)
        try:
            os.ftruncate(fd, tensor.numel() * tensor.element_size())
            mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.close(fd)
            os.unlink(path)
        mapped = mapped.view(tensor.shape)
        mapped.copy_(tensor)
        mapped.spilled = True
        spilled.append(mapped)
    return spilled


class OnDisk:
    """The weights of `model` (a skeleton on meta, `empty_model`) live on disk.

    `load` reads a module's parameters: a block from its staging file once it was changed
    (`staging/block-<index>.safetensors`), otherwise, like every other module, from the input
    checkpoint (`reader`). `unload(module, changed=True)` writes a changed block to its staging
    file; either way the parameters go back to meta. Blocks keep the index they had in the input
    (`origin`) while the run lasts; `finish` writes the final shards in the model's current block
    order, so depth pruning only renames. A module with real parameters that is not part of the
    skeleton (LaCo's merged candidate) just moves like `InMemory`.

    Biases that width pruning adds (FLAP's compensation turns on `attention_bias`/`mlp_bias` in
    every block) are not in the input checkpoint: they load as zeros, which is what was added.
    With `spill_activations` the cached activations (of the engine's block loop and of every
    `block_stream` pass, `keep`) live in memory-mapped files that are unlinked at once."""

    def __init__(self, model: nn.Module, reader: ShardReader, staging: Path, dtype: torch.dtype,
                 spill_activations: bool = True):
        self.model, self.reader, self.staging, self.dtype = model, reader, Path(staging), dtype
        self.spill_activations = spill_activations
        self.prefix = spec_for(model).blocks
        blocks = get_module(model, self.prefix)
        self.origin = {id(block): i for i, block in enumerate(blocks)}   # block -> its index in the input
        self.inside = {}        # id(module inside a block) -> (block index in the input, name in the block)
        for i, block in enumerate(blocks):
            for name, module in block.named_modules(remove_duplicate=False):
                self.inside[id(module)] = (i, name)
        self.source = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        names_of: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(param), []).append(name)
        self.alias = {}         # a tied parameter's other names -> the one the checkpoint stores
        for names in names_of.values():
            stored = next((n for n in names if n in reader), None)
            self.alias.update({n: stored for n in names if stored is not None and n != stored})
        self.built = {(id(owner), leaf) for owner, leaf, _ in _params(model)}   # what the config declares
        self.current: dict[int, Path] = {}    # block index in the input -> file with its current weights
        self.home = {}                        # modules with real weights that `load` only moved
        self.after_block = None               # callback(index, shard path): resumable runs record it

    # -- where a tensor comes from -------------------------------------------------------------
    def block_file(self, index: int) -> Path:
        return self.staging / f"block-{index:05d}.safetensors"

    def _read(self, owner: nn.Module, leaf: str, like: torch.Tensor) -> torch.Tensor:
        from safetensors import safe_open
        added = (id(owner), leaf) not in self.built      # a parameter pruning added (FLAP's biases)
        where = self.inside.get(id(owner))
        if where is not None:
            index, inner = where
            name = f"{self.prefix}.{index}.{inner + '.' if inner else ''}{leaf}"
            if index in self.current:
                with safe_open(str(self.current[index]), framework="pt") as fh:
                    tensor = fh.get_tensor(name) if name in fh.keys() else None
                if tensor is None and not added:
                    raise KeyError(f"{name} is missing from {self.current[index]}")
                if tensor is None:       # added after this block was written: zeros, as it was made
                    return torch.zeros(like.shape, dtype=self.dtype)
                return self._check(name, tensor, like)
        else:
            name = f"{self.source[id(owner)]}.{leaf}".lstrip(".")
            name = self.alias.get(name, name)
        if added and name not in self.reader:   # not in the input either: zeros, as it was made
            return torch.zeros(like.shape, dtype=self.dtype)
        return self._check(name, self.reader.get(name), like)

    @staticmethod
    def _check(name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} in the checkpoint but the model built from "
                             f"its config expects {tuple(like.shape)}; is config.json the checkpoint's own?")
        return tensor

    # -- the residency interface ----------------------------------------------------------------
    def load(self, module: nn.Module, device) -> None:
        """Make `module`'s parameters real on `device` (read from disk where they are on meta)."""
        params = list(_params(module))
        if not any(p.is_meta for _, _, p in params):
            if params:                          # real weights that are not the skeleton's: move them
                self.home[id(module)] = params[0][2].device
                module.to(device)
            return
        for owner, leaf, param in params:
            if param.is_meta:
                tensor = self._read(owner, leaf, param).to(device=device, dtype=self.dtype)
                owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    def unload(self, module: nn.Module, changed: bool = False) -> None:
        """Back to meta; a changed block is written to its staging file first."""
        if id(module) in self.home:
            module.to(self.home.pop(id(module)))
            return
        if changed:
            if id(module) not in self.origin:
                raise ValueError("out of core, only whole decoder blocks can be changed and written back")
            self._write(module)
        _release(module)
        return_freed_memory()

    def _write(self, block: nn.Module) -> Path:
        from safetensors.torch import save_file
        index = self.origin[id(block)]
        tensors = {f"{self.prefix}.{index}.{k}": v.detach().to("cpu").contiguous()
                   for k, v in block.state_dict().items()}
        path = self.block_file(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self.current[index] = path
        return path

    def onload(self, index: int, block: nn.Module, device) -> None:
        self.load(block, device)

    def offload(self, index: int, block: nn.Module) -> None:
        self.unload(block, changed=True)
        if self.after_block is not None:
            self.after_block(index, self.current[self.origin[id(block)]])

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
        self.load(blocks[0], "cpu")
        try:
            yield
        finally:
            self.unload(blocks[0])
            for name, _ in outside:
                _set_parameter(model, name, None)
            model.tie_weights()

    def keep(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cached activations (block inputs/outputs on the CPU) go to memory-mapped files."""
        if hidden and self.spill_activations and hidden[0].device.type == "cpu" \
                and not getattr(hidden[0], "spilled", False):
            return spill(hidden, self.staging)
        return hidden

    def resume(self, blocks, hidden):
        return 0, (None if hidden is None else self.keep(hidden))   # nothing finished before: block 0

    def done(self, index, records, hidden) -> None:
        pass                             # `runs.Recorded` saves the finished block here

    def block_shards(self) -> list[Path]:
        """One shard per block of the model as it is now, named by its current position.

        A block whose staging file already has exactly its current names is used as it is;
        any other (never changed, renumbered by depth pruning, or given new biases after it was
        written) is loaded, one at a time, and written under its position."""
        from safetensors import safe_open
        from safetensors.torch import save_file
        shards = []
        for position, block in enumerate(get_module(self.model, self.prefix)):
            index = self.origin[id(block)]
            path = self.current.get(index)
            expected = {f"{self.prefix}.{position}.{k}" for k in block.state_dict()}
            if path is not None:
                with safe_open(str(path), framework="pt") as fh:
                    if set(fh.keys()) == expected:
                        shards.append(path)
                        continue
            self.load(block, "cpu")
            tensors = {f"{self.prefix}.{position}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
            final = self.staging / f"final-{position:05d}.safetensors"
            save_file(tensors, str(final), metadata={"format": "pt"})
            del tensors
            self.unload(block)
            shards.append(final)
        return shards


def _set_parameter(model: nn.Module, name: str, tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[leaf]
    value = tensor if tensor is not None else old.detach().to("meta")
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
