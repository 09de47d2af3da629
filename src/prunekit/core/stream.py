"""The block stream: run calibration windows through a model one decoder block at a time.

Every pass that needs the activations at each block uses this module: the linear engine
(`engine.py`), width pruning (`structured.py`), depth scores and searches (`depth.py` and the
depth methods), the allocation pre-pass (`allocation.py`). It imports no driver and no method.

    capture       run the windows through the embeddings once; record the input of block 0 and
                  the arguments every block receives (masks, rotary tables: sliding-window
                  families use different ones per layer)
    block_stream  yield one `BlockStep` per block, with only that block on the compute device;
                  its outputs become the next block's inputs

Blocks come and go through the current residency (`core/residency.py`): moved to the device and
back, or read from and written to disk. Cached activations live on `cache_device`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import distributed
from ..models import spec_for
from ..models.spec import get_module
from .residency import current


class NonFiniteError(FloatingPointError):
    """NaN or Inf in activations, statistics or pruned weights; the message names the block and
    module. Raised before the affected weights are written, and before anything is exported."""


def check_finite_outputs(hidden: list[Tensor], block_index: int, block_name: str) -> None:
    """A block's propagated outputs must be finite, or every later block calibrates on NaN."""
    for chunk, outputs in enumerate(hidden):
        if not bool(torch.isfinite(outputs).all()):
            raise NonFiniteError(f"block {block_index} ({block_name}) produced NaN/Inf outputs on calibration "
                                 f"chunk {chunk}; stopping before the next block. Check the model dtype "
                                 "(float16 overflows: use float32 or bfloat16) and the weights of this block")


def keep_output(old: Tensor, new: Tensor, cache_device) -> Tensor:
    """The chunk's output becomes the next block's input. A memory-mapped (spilled, see
    core.residency.spill) cache is overwritten in place so that it stays in the page cache, not in
    anonymous memory; otherwise the output simply replaces the input."""
    if getattr(old, "spilled", False) and old.shape == new.shape:
        old.copy_(new)
        return old
    return new.to(cache_device)


class BlockStep:
    """One decoder block during `block_stream`: on the compute device, with its cached inputs."""

    def __init__(self, index, block, inputs, kwargs, device, cache_device, first_chunk: int = 0):
        self.index, self.block, self.inputs = index, block, inputs
        self.kwargs, self.device, self.cache_device = kwargs, device, cache_device
        # global number of chunk 0: under distributed calibration this process holds chunks
        # first_chunk, first_chunk + 1, ... of the whole set (seeds per chunk use the global number)
        self.first_chunk = first_chunk
        self.outputs: list[Tensor] | None = None
        self.changed = False      # set it when the caller changed the block: out of core it is written back

    def run_chunk(self, i: int, hidden: Tensor | None = None, block: nn.Module | None = None) -> Tensor:
        """Block output for calibration chunk i (its cached input, or `hidden`), on the compute
        device. Grad mode is the caller's; `block` runs another block with this one's arguments."""
        args, kw = to_device(self.kwargs[i], self.device)
        x = (self.inputs[i] if hidden is None else hidden).to(self.device)
        out = (block or self.block)(x, *args, **kw)
        return out[0] if isinstance(out, tuple) else out

    def forward(self) -> list[Tensor]:
        """Run every chunk; the outputs (on the cache device) become the next block's inputs."""
        with torch.no_grad():
            self.outputs = [self.run_chunk(i).to(self.cache_device) for i in range(len(self.inputs))]
        return self.outputs


def block_stream(model: nn.Module, calib: Tensor, *, device=None, batch_size: int = 8, cache_device=None,
                 progress: bool = True, desc: str = "blocks"):
    """Yield a `BlockStep` per decoder block, in order, with only that block on `device`.

    The caller observes (hooks, `run_chunk`) and may change the block (then it sets
    `step.changed`); whatever `step.outputs` holds when the caller moves on (`step.forward()` is
    called if it did not) feeds the next block. Blocks come and go through the current residency
    (`core.residency.current()`): moved to `device` and back, or read from and written to disk.
    Structured, depth and scoring passes share this loop instead of copying it.
    """
    residency = current()          # where blocks come from and go back to (core/residency.py)
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    device = torch.device(device) if device is not None else model_device(model)
    cache_device = torch.device(cache_device) if cache_device is not None else device
    with torch.no_grad(), residency.capturing(model, blocks):
        hidden, kwargs = capture(model, blocks, calib, batch_size, device, cache_device)
    hidden = residency.keep(hidden)         # out of core: memory-mapped files
    first_chunk = distributed.offset(len(hidden))
    bar = progress_bar(len(blocks), desc, enabled=progress)
    try:
        for index, block in enumerate(blocks):
            residency.load(block, device)
            step = BlockStep(index, block, hidden, [kw[index] for kw in kwargs], device, cache_device, first_chunk)
            yield step
            if step.outputs is None:
                step.forward()
            check_finite_outputs(step.outputs, index, f"{spec.blocks}.{index}")
            hidden = step.outputs = residency.keep(step.outputs)
            residency.unload(block, changed=step.changed)
            bar.update(1)
    finally:
        bar.close()


class _StopForward(Exception):
    """Raised by the capture stubs to end the embedding pass before the LM head."""


def capture(model, blocks, calib: Tensor, batch_size: int, device, cache_device):
    """Inputs of block 0 and every block's other arguments, as (args, kwargs), per calibration chunk.

    Each block's forward is replaced by a stub that records its kwargs and returns its input
    unchanged, so one cheap pass (embeddings, masks, rotary tables) yields the per-block kwargs.
    The stub mimics the block's return type, learned by running block 0 once on the first chunk
    (on the compute device, where one block forward is cheap).
    """
    chunks = list(calib.split(batch_size))
    inputs: list[Tensor] = []
    kwargs: list[list[tuple[tuple, dict]]] = []
    embed_device = model_device(model)
    returns_tuple = None
    current: list[tuple[tuple, dict]] = []

    def stub_for(index: int):
        def stub(hidden_states, *args, **kw):
            current.append((args, kw))
            if index == 0:
                inputs.append(hidden_states.to(cache_device))
                if returns_tuple is None:
                    raise _StopForward
            if index == len(blocks) - 1:
                raise _StopForward
            return (hidden_states,) if returns_tuple else hidden_states
        return stub

    replaced = {index: block.__dict__["forward"] for index, block in enumerate(blocks) if "forward" in block.__dict__}
    try:
        for index, block in enumerate(blocks):
            block.forward = stub_for(index)
        for _chunk_index, chunk in enumerate(chunks):
            if returns_tuple is None:        # learn the blocks' return type from the real block 0
                try:
                    model(input_ids=chunk.to(embed_device), use_cache=False)
                except _StopForward:
                    pass
                del blocks[0].forward
                if 0 in replaced:                # an instance-level forward (a wrapper) runs as before
                    blocks[0].forward = replaced[0]
                args, kw = to_device(current[0], device)
                home = module_device(blocks[0])
                probe = blocks[0].to(device)(inputs[0].to(device), *args, **kw)
                blocks[0].to(home)
                returns_tuple = isinstance(probe, tuple)
                del probe
                blocks[0].forward = stub_for(0)
                inputs.clear()
                current.clear()
            try:
                model(input_ids=chunk.to(embed_device), use_cache=False)
            except _StopForward:
                pass
            if len(current) != len(blocks):
                raise RuntimeError(f"the model called {len(current)} of its {len(blocks)} blocks during capture")
            kwargs.append(current)
            current = []
    finally:
        for index, block in enumerate(blocks):           # restore what the stubs replaced
            block.__dict__.pop("forward", None)
            if index in replaced:
                block.forward = replaced[index]
    return inputs, kwargs


def to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="block", disable=not enabled)
