"""Depth pruning: remove whole decoder blocks, and what the depth methods share.

    DepthConfig     how many blocks to remove: a fraction (`sparsity`) or an exact count
                    (`layers`); every depth method's config subclasses it
    BlockChoice     what a depth method returns (see "Method functions" below)
    remove_blocks   delete blocks in place and keep the model consistent: `layer_idx` of every
                    submodule (the KV cache is indexed by it), `config.num_hidden_layers` and the
                    per-layer config lists such as `layer_types`
    prune_depth_    run a registered depth method and remove what it chose; `prune.prune_`
                    calls it for every method registered with scope="depth"
    BlockCache      the calibration hidden states at every block boundary, to score the model
                    with some blocks skipped or replaced without rerunning the blocks before them
    output_layers   per-family knowledge: the modules between the last block and the LM head

The methods live in `methods/`, one file each: block-influence (ShortGPT, arXiv 2403.03853),
angular (Gromov et al., arXiv 2403.17887), sleb (arXiv 2402.09025), laco (arXiv 2402.11187),
sublayer-drop (arXiv 2406.15786), the second generation reverse-order (arXiv 2411.15558), mka
(merging by manifold alignment, arXiv 2406.16330) and streamline (a run of blocks replaced by one
trained block, arXiv 2403.19135), and the data-free baseline last-k.

Method functions
----------------
    fn(model, calib, cfg, *, device, batch_size, cache_device, progress) -> BlockChoice

`calib` is (windows, seqlen) token ids (None for data-free methods). `BlockChoice.remove` holds
the indices of the blocks to delete, in the input model's numbering; `scores` the values that
drove the choice (they go into the report and `prunekit.json`); `notes` anything the user should
know. A method must not remove blocks itself (`prune_depth_` does, once, after checking the
count), but it may change the blocks it keeps (LaCo merges parameters into them).

Why removing blocks needs more than `del`
-----------------------------------------
* Every attention module keeps its position as `layer_idx` and uses it to index the KV cache; a
  block that moves from position 5 to 3 would read and write another layer's cache in
  `generate`, so every submodule's `layer_idx` is renumbered.
* The decoder loops run `self.layers[: config.num_hidden_layers]`, and `generate` sizes its cache
  from the config, so `config.num_hidden_layers` must shrink (GPT-2 stores it as `n_layer`
  through `attribute_map`; assigning the standard name updates it).
* Sliding-window families keep one attention type per block in `config.layer_types` (Gemma 2/3,
  Qwen2/3, and Mistral-derived configs that declare it); the mask a block receives is looked up
  there by position, so the removed blocks' entries are dropped and the kept blocks keep their
  own type. The fields below are the per-layer lists transformers 5 indexes by `layer_idx`; of
  the supported families only `layer_types` exists. A config list of the same length that is not
  known to be per-layer (e.g. a list of EOS ids) is left alone with a warning.
* Qwen2/Qwen3's `max_window_layers` is an int (blocks at or above it use the sliding window when
  `use_sliding_window`); it only seeds `layer_types` when a config is built without them, but it
  is renumbered too (to the number of kept blocks below it), so it keeps describing the model.
* GPT-2 with `scale_attn_by_inverse_layer_idx` scales attention by 1/(layer_idx + 1), fixed when
  the model is built: renumbering is exact in memory but a reloaded checkpoint would scale a moved
  block differently, so such removals are refused.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .distributed import global_mean
from .models import spec_for
from .models.spec import get_module
from .registry import method_for_config
from .report import StructureReport, parameter_counts

log = logging.getLogger("prunekit")

# Config fields with one entry per decoder block: transformers 5.23's decoder code reads them as
# `config.<field>[layer_idx]`. Only `layer_types` occurs in the supported families; the others
# occur in families that have no spec yet, listed so that adding a spec cannot silently leave
# them one entry per removed block too long.
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers")


@dataclass(frozen=True)
class DepthConfig:
    """How many decoder blocks to remove: exactly one of `sparsity` and `layers`."""
    sparsity: float | None = None   # fraction of the decoder blocks, rounded half up (0.25 of 30 -> 8)
    layers: int | None = None       # exact number of blocks

    def __post_init__(self):
        if (self.sparsity is None) == (self.layers is None):
            raise ValueError("give exactly one of sparsity (fraction of blocks, e.g. sparsity=0.25) and layers "
                             "(number of blocks, e.g. layers=8); "
                             f"got sparsity={self.sparsity!r}, layers={self.layers!r}")
        if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                          or not 0 < self.sparsity < 1):
            raise ValueError(f"sparsity must be a fraction of the blocks in (0, 1), got {self.sparsity!r} "
                             "(0.25 removes a quarter of the blocks; use layers=N for an exact count)")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                        or self.layers < 1):
            raise ValueError(f"layers must be a positive number of blocks to remove, got {self.layers!r}")

    def candidates(self, num_blocks: int) -> int:
        """How many units `sparsity` and `layers` count: blocks here; sublayers for sublayer-drop."""
        return num_blocks

    def unit(self) -> str:
        """What `candidates` counts, in messages."""
        return "blocks"

    def blocks_to_remove(self, num_blocks: int) -> int:
        """How many of `num_blocks` candidates (`unit`) to remove; at least one, and at least one must stay."""
        if self.layers is not None:
            count, asked = self.layers, f"layers={self.layers}"
        else:
            count, asked = math.floor(self.sparsity * num_blocks + 0.5), f"sparsity={self.sparsity}"
        if count == 0:
            raise ValueError(f"{asked} of {num_blocks} {self.unit()} rounds to 0 {self.unit()} to remove; "
                             f"use sparsity >= {0.5 / num_blocks:.3g} or layers=1")
        if count >= num_blocks:
            raise ValueError(f"{asked} would remove {count} of the model's {num_blocks} {self.unit()}; at least one "
                             f"must stay (at most layers={num_blocks - 1})")
        return count


@dataclass
class BlockChoice:
    """A depth method's answer: the blocks to remove (input-model numbering) and why; `sublayers`: single
    attention or FFN sublayers to remove, as (block, "attention" | "mlp"), for sublayer-drop."""
    remove: list[int]
    scores: dict = field(default_factory=dict)     # per block / per candidate values behind the choice
    notes: list[str] = field(default_factory=list)
    sublayers: list[tuple[int, str]] = field(default_factory=list)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (where the model spec says it is)."""
    return get_module(model, spec_for(model).blocks)


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The modules between the last decoder block and the LM head, in order.

    Per-family knowledge (a candidate for the model specs): they are attributes of the module
    that holds the blocks, named
        Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3   `model.norm`
        OPT    `model.decoder.final_layer_norm` (None without pre-norm), then `project_out`
               (None unless word_embed_proj_dim != hidden_size)
        GPT-2  `transformer.ln_f`
    """
    spec = spec_for(model)
    parent = get_module(model, spec.blocks.rpartition(".")[0]) if "." in spec.blocks else model
    names = ("norm", "final_layer_norm", "ln_f", "project_out")
    return [getattr(parent, name) for name in names if getattr(parent, name, None) is not None]


def remove_blocks(model: nn.Module, indices: Iterable[int]) -> None:
    """Delete the decoder blocks at `indices` in place and update the model to match.

    See the module docstring for what is updated and why. Everything is checked before anything
    changes, so a refused request leaves the model as it was.
    """
    blocks = decoder_blocks(model)
    config = model.config
    num_blocks = len(blocks)
    indices = list(indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise TypeError(f"block indices must be integers, got {bad}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"block indices {duplicates} are given more than once")
    outside = [i for i in indices if not 0 <= i < num_blocks]
    if outside:
        raise ValueError(f"block indices {outside} are out of range: the model has {num_blocks} blocks "
                         f"(0..{num_blocks - 1})")
    if not indices:
        return
    removed = set(indices)
    keep = [i for i in range(num_blocks) if i not in removed]
    if not keep:
        raise ValueError(f"cannot remove all {num_blocks} blocks: at least one must stay")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and any(new != old for new, old in enumerate(keep)):
        raise ValueError("this GPT-2 config has scale_attn_by_inverse_layer_idx=True: attention is scaled by "
                         "1/(layer position + 1), so moving a block changes what a reloaded checkpoint computes; "
                         "only the last blocks can be removed (e.g. method last-k with keep_last=0)")
    per_layer = {}
    for name in PER_LAYER_FIELDS:
        value = getattr(config, name, None)
        if value is None:
            continue
        if len(value) != num_blocks:
            raise ValueError(f"config.{name} has {len(value)} entries but the model has {num_blocks} blocks; "
                             "fix the config before pruning")
        per_layer[name] = [value[i] for i in keep]
    for name, value in vars(config).items():
        if name not in per_layer and isinstance(value, (list, tuple)) and len(value) == num_blocks:
            log.warning("config.%s has one entry per block (%d) but is not a known per-layer field; "
                        "left unchanged", name, num_blocks)

    for index in sorted(removed, reverse=True):
        del blocks[index]
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    for name, value in per_layer.items():
        setattr(config, name, value)
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)
    config.num_hidden_layers = len(keep)


def prune_depth_(model: nn.Module, config: DepthConfig, calib: Tensor | None, *, device=None, batch_size: int = 8,
                 cache_device=None, progress: bool = True) -> StructureReport:
    """Remove whole decoder blocks with the depth method of `config` (e.g. `SLEBConfig(layers=8)`).

    The method chooses (see the module docstring for its signature); the blocks are removed with
    `remove_blocks`. Returns a `StructureReport` with the removed blocks (input numbering), the
    method's scores and the parameter counts before and after.
    """
    method = method_for_config(config)
    if method.scope != "depth":
        raise TypeError(f"{method.name} is a {method.scope} method, not a depth method")
    num_blocks = len(decoder_blocks(model))
    count = config.blocks_to_remove(config.candidates(num_blocks))     # a bad request fails before any work
    block_params, model_params = parameter_counts(model)
    started = time.perf_counter()
    choice = method.fn(model, calib, config, device=device, batch_size=batch_size, cache_device=cache_device,
                       progress=progress)
    if choice.sublayers:
        return _drop_sublayers(model, method.name, config, choice, count, num_blocks, (block_params, model_params),
                               started)
    if len(set(choice.remove)) != count:
        raise RuntimeError(f"{method.name} chose {len(set(choice.remove))} blocks to remove, expected {count}")
    remove_blocks(model, choice.remove)
    block_after, model_after = parameter_counts(model)
    removed = sorted(choice.remove)
    notes = [f"removed {count} of {num_blocks} blocks: {removed}; {num_blocks - count} remain", *choice.notes]
    log.info("%s: %s", method.name, notes[0])
    return StructureReport(method=method.name, config=config, block_params_before=block_params,
                           block_params_after=block_after, model_params_before=model_params,
                           model_params_after=model_after, seconds=time.perf_counter() - started,
                           removed_blocks=removed, scores=choice.scores, notes=notes)


def _drop_sublayers(model, name: str, config, choice: BlockChoice, count: int, num_blocks: int, before, started):
    """Remove the chosen sublayers; a block that loses both its attention and its FFN is removed whole."""
    from .surgery import drop_sublayer_
    chosen = sorted(set(choice.sublayers))
    if len(chosen) != count:
        raise RuntimeError(f"{name} chose {len(chosen)} sublayers to remove, expected {count}")
    by_block: dict[int, set[str]] = {}
    for index, kind in chosen:
        by_block.setdefault(index, set()).add(kind)
    whole = sorted(i for i, kinds in by_block.items() if kinds == {"attention", "mlp"})
    for index, kind in chosen:
        if index not in whole:
            drop_sublayer_(model, index, kind)
    remove_blocks(model, whole)                                   # after: indices above are in input numbering
    block_after, model_after = parameter_counts(model)
    notes = []
    for kind, label in (("attention", "attention"), ("mlp", "FFN")):
        blocks = [i for i, k in chosen if k == kind and i not in whole]
        if blocks:
            notes.append(f"removed the {label} of blocks {blocks}")
    if whole:
        notes.append(f"removed blocks {whole} whole (both their sublayers were chosen)")
    notes = ["; ".join(notes) + f" ({count} of {config.candidates(num_blocks)} sublayers)", *choice.notes]
    log.info("%s: %s", name, notes[0])
    return StructureReport(method=name, config=config, block_params_before=before[0], block_params_after=block_after,
                           model_params_before=before[1], model_params_after=model_after,
                           seconds=time.perf_counter() - started, removed_blocks=whole, scores=choice.scores,
                           notes=notes)


def first_windows(calib: Tensor, samples: int | None) -> Tensor:
    """The first `samples` calibration windows (all of them when None), for searches that may
    use fewer windows than the pruning step was given (SLEB, LaCo).

    Under distributed calibration `calib` is this process's share (a contiguous run of the whole
    set, `distributed.shard`), and this returns the part of the global first `samples` that it
    holds, so the processes together search on exactly the windows of a single-process run.
    """
    if samples is None:
        return calib
    start = distributed.offset(calib.shape[0])
    mine = calib[:max(0, min(samples - start, calib.shape[0]))]
    if distributed.all_sum(mine.shape[0] == 0)[0]:          # every process raises together
        raise ValueError(f"samples={samples} keeps only the first {samples} calibration windows, which leaves "
                         f"some of the {distributed.world_size()} processes without a window; raise samples, "
                         "set it to null (all windows) or run fewer processes")
    return mine


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` smallest scores, ties to the lower index, sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count])


class BlockCache:
    """The calibration windows' hidden states at every block boundary of the current model.

    Built with one dense pass (`core.stream.block_stream`), which also records every block's forward
    arguments (masks, rotary tables). `inputs[i]` is block i's input (one tensor per calibration
    chunk, on the cache device) and `output` the last block's output, both for the current model,
    i.e. the input model without the blocks in `removed`.

    Queries restart from a cached boundary, so only the blocks after the first changed one run,
    one block on the compute device at a time:
        loss(skip)          mean next-token NLL with the blocks in `skip` removed as well
        run(start, hidden)  the last block's output from `hidden` entering block `start`, with
                            blocks skipped or replaced
        remove(j)           make the removal of block j permanent; refreshes the cache after j
    Memory: num_blocks + 1 sets of hidden states (windows x seqlen x hidden) on the cache device.
    """

    def __init__(self, model: nn.Module, calib: Tensor, *, device=None, batch_size: int = 8, cache_device=None,
                 progress: bool = True, desc: str = "cache", observe=None):
        """`observe(step)`, if given, runs each block instead of `step.forward()` (it must call it), so a
        caller can watch the dense pass (the structure search records its width statistics there)."""
        from .core.stream import block_stream

        self.model = model
        self.steps = []
        for step in block_stream(model, calib, device=device, batch_size=batch_size, cache_device=cache_device,
                                 progress=progress, desc=desc):
            if observe is None:
                step.forward()
            else:
                observe(step)
            self.steps.append(step)
        self.inputs: list[list[Tensor] | None] = [step.inputs for step in self.steps]
        self.output: list[Tensor] = self.steps[-1].outputs
        self.ids = list(calib.split(batch_size))     # the chunks block_stream ran, for the NLL labels
        self.removed: set[int] = set()
        self.device = self.steps[0].device
        self.cache_device = self.steps[0].cache_device
        self.head = output_layers(model)
        self.lm_head = model.get_output_embeddings()

    @property
    def num_blocks(self) -> int:
        return len(self.steps)

    def block(self, index: int, hidden: list[Tensor], module: nn.Module | None = None) -> list[Tensor]:
        """Block `index` (or `module` in its place, with block index's arguments) on every chunk."""
        step = self.steps[index]
        with torch.no_grad(), onloaded(self.device, module or step.block):
            return [step.run_chunk(i, hidden=h, block=module).to(self.cache_device) for i, h in enumerate(hidden)]

    def run(self, start: int, hidden: list[Tensor], skip: Iterable[int] = (),
            replace: dict[int, nn.Module] | None = None) -> list[Tensor]:
        """The last block's output when `hidden` enters block `start`: the blocks from `start` on
        run unless removed or in `skip`; `replace[i]` runs in place of block i."""
        skip = self.removed | set(skip)
        replace = replace or {}
        for index in range(start, self.num_blocks):
            if index not in skip:
                hidden = self.block(index, hidden, replace.get(index))
        return hidden

    def loss(self, skip: Iterable[int] = ()) -> float:
        """Mean next-token NLL of the calibration windows with the blocks in `skip` removed too."""
        skip = set(skip) - self.removed
        if not skip:
            return self.nll(self.output)
        start = min(skip)                   # the blocks before it are unchanged: start from its input
        return self.nll(self.run(start, self.inputs[start], skip))

    def remove(self, index: int) -> None:
        """Remove block `index` from the current model; recompute the boundaries after it."""
        if index in self.removed:
            raise ValueError(f"block {index} is already removed")
        self.removed.add(index)
        from .core.residency import current
        keep = current().keep              # out of core: the refreshed boundaries are memory-mapped too
        hidden, self.inputs[index] = self.inputs[index], None
        for later in range(index + 1, self.num_blocks):
            if later not in self.removed:
                self.inputs[later] = hidden
                hidden = keep(self.block(later, hidden))
        self.output = hidden

    def final_hidden(self, hidden: list[Tensor]) -> list[Tensor]:
        """The last block's output through the final norm (and OPT's project_out), per chunk."""
        with torch.no_grad(), onloaded(self.device, *self.head):
            return [_apply(self.head, h.to(self.device)).to(self.cache_device) for h in hidden]

    def nll(self, hidden: list[Tensor]) -> float:
        """Mean next-token NLL of the calibration windows (of every process, under distributed
        calibration) given the last block's output."""
        total, count = 0.0, 0
        softcap = getattr(self.model.config, "final_logit_softcapping", None)   # Gemma 2/3: the model's own logits
        with torch.no_grad(), onloaded(self.device, *self.head, self.lm_head):
            for h, ids in zip(hidden, self.ids):
                for row in range(h.shape[0]):       # one window at a time: logits are seqlen x vocab
                    logits = self.lm_head(_apply(self.head, h[row].to(self.device))).float()
                    if softcap is not None:
                        logits = torch.tanh(logits / softcap) * softcap
                    total += float(F.cross_entropy(logits[:-1], ids[row, 1:].to(self.device), reduction="sum"))
                    count += ids.shape[1] - 1
        return global_mean(total, count)


def _apply(modules: list[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


@contextmanager
def onloaded(device: torch.device, *modules: nn.Module, changed: bool = False):
    """Make `modules` resident on `device` for the duration, then put them back (through the
    current residency, `core.residency.current()`: moved back in memory, or released to disk);
    `changed=True` when the caller changed them (out of core, a changed block is written)."""
    from .core.residency import current
    residency = current()
    loaded = []
    try:
        for module in modules:
            residency.load(module, device)
            loaded.append(module)
        yield
    finally:
        for module in loaded:
            residency.unload(module, changed=changed)
