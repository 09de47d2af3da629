"""Resumable runs (`--run-dir RUN [--resume]`): a crash or Ctrl-C costs at most one block.

The run directory holds

  manifest.json              the recipe, a fingerprint of the inputs, and per step the finished
                             blocks (with their per-layer records); rewritten atomically
  blocks/step<S>-block<I>.safetensors   the block's pruned tensors (with --offload disk these
                             are also the output shards: they are linked into the export)
  activations-step<S>-block<I>-rank<R>.safetensors   the calibration activations after the
                             last finished block (of process R's windows); the one of the previous
                             block is deleted only once the manifest names the new one, so a crash
                             between the two writes resumes from a consistent pair
  step<K>/                   the whole model after step K of a multi-step recipe (a standard
                             checkpoint, written atomically; only the latest is kept)

Resuming checks the recipe and the fingerprint (so a changed sparsity or changed weights are
refused, not silently mixed), applies the finished blocks' weights, reloads the activations,
re-runs the cheap capture pass for the per-block arguments (masks, rotary tables) and continues
with the next block. Every step of the engine is deterministic, so the result is bit-identical
to an uninterrupted run. Writing follows the usual rule: temp file, fsync, rename.

Granularity: unstructured/N:M steps resume block by block; a recipe of several steps resumes after
its last finished step (`step<K>/`), so a width, depth or recovery step that was interrupted
restarts from its own beginning, never from the dense model.

Distributed calibration (`--nproc N` / torchrun): every process keeps its own activations (of its
share of the windows, hence `rank<R>` in the name); process 0 writes the manifest, the block files
and the step checkpoints, which hold the same weights on every process. A block is recorded only
once every process has written its activations after it (a barrier before the manifest), and the
older activations go only after the manifest names the block (a barrier after it). The number of
processes is part of the fingerprint: a run resumes with as many processes as it started with.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from .. import distributed
from .atomic import write_atomic

log = logging.getLogger("prunekit")

MANIFEST = "manifest.json"
MIB = 1 << 20


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_fingerprint(path: Path) -> str:
    """size + sha256 of the safetensors header and of the first and last MiB: cheap on a
    100 GB checkpoint, and any rewrite of the weights changes it."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if path.suffix == ".safetensors" and size >= 8:
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(header_len, size - 8)))
        fh.seek(0)
        digest.update(fh.read(MIB))
        fh.seek(max(0, size - MIB))
        digest.update(fh.read(MIB))
    return digest.hexdigest()


def inputs_fingerprint(model_location: Path, calib: torch.Tensor | None) -> dict:
    """What must not change between a run and its resumption."""
    from .export import library_versions
    files = {}
    location = Path(model_location)
    candidates = [location] if location.is_file() else sorted(
        p for p in location.iterdir() if p.is_file() and (p.name == "config.json" or p.suffix in
                                                          (".safetensors", ".gguf", ".bin")))
    for path in candidates:
        files[path.name] = file_fingerprint(path)
    calib_hash = None
    if calib is not None:
        calib_hash = hashlib.sha256(calib.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    return {"files": files, "calibration": calib_hash, "prunekit": library_versions().get("prunekit"),
            "processes": distributed.world_size()}


class Run:
    """One run directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, recipe_dict: dict, fingerprint: dict, resume: bool):
        self.path = Path(path)
        self.blocks_dir = self.path / "blocks"
        manifest = self.path / MANIFEST
        if manifest.exists() and not resume:
            raise ValueError(f"{self.path} already holds a run (manifest.json): pass --resume to continue it "
                             "or choose a new --run-dir")
        if resume and not manifest.exists():
            # nothing recorded yet (e.g. interrupted before its first block): there is nothing to continue, so start
            # from the beginning, as `recover --resume` does; the interrupted line told the user to --resume
            log.warning("--resume: %s holds no manifest.json (nothing was recorded there yet): starting the run from "
                        "the beginning", self.path)
            resume = False
        if resume:
            self.manifest = json.loads(manifest.read_text())
            old = self.manifest["recipe"]
            changed = sorted(k for k in set(recipe_dict) | set(old)   # where the result goes may change
                             if k not in ("export", "eval") and recipe_dict.get(k) != old.get(k))
            if changed:
                raise ValueError(f"cannot resume {self.path}: the recipe changed ({', '.join(changed)}); "
                                 "run it unchanged, or choose a new --run-dir")
            if self.manifest["inputs"] != fingerprint:
                old, new = self.manifest["inputs"], fingerprint
                changed = [k for k in ("calibration", "prunekit", "processes") if old.get(k) != new.get(k)]
                changed += [f for f in set(old["files"]) | set(new["files"])
                            if old["files"].get(f) != new["files"].get(f)]
                raise ValueError(f"cannot resume {self.path}: the inputs changed ({', '.join(sorted(changed))}); "
                                 "a resumed run must see the same model, calibration data and number of processes; "
                                 "choose a new --run-dir")
        else:
            self.manifest = {"recipe": recipe_dict, "inputs": fingerprint, "created": _now(), "steps": {}}
        distributed.barrier()            # every process has checked the old manifest before it is rewritten
        if distributed.is_main():
            self.blocks_dir.mkdir(parents=True, exist_ok=True)
        self._save()
        distributed.barrier()

    def _save(self) -> None:
        """Write the manifest (process 0 only: every process holds the same one)."""
        if not distributed.is_main():
            return
        self.manifest["updated"] = _now()
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        write_atomic(self.path / MANIFEST, text)

    def step_dir(self, step: int) -> Path:
        return self.path / f"step{step}"

    def last_step(self) -> int:
        """The last step whose whole-model checkpoint is complete, or -1."""
        done = [int(p.name[4:]) for p in self.path.glob("step[0-9]*")
                if p.name[4:].isdigit() and (p / "prunekit.json").is_file()]
        return max(done, default=-1)

    def forget_steps_before(self, step: int) -> None:
        """Remove the checkpoints of steps before `step` (only the latest is needed to resume);
        process 0 does it."""
        import shutil
        if not distributed.is_main():
            return
        for k in range(step):
            if self.step_dir(k).exists():
                shutil.rmtree(self.step_dir(k), ignore_errors=True)

    def finished(self, step: int) -> list[int]:
        return sorted(int(i) for i in self.manifest["steps"].get(str(step), {}))

    def block_file(self, step: int, index: int) -> Path:
        return self.blocks_dir / f"step{step}-block{index}.safetensors"

    def activations_file(self, step: int, index: int) -> Path:
        """This process's calibration activations after block `index` of `step`."""
        return self.path / f"activations-step{step}-block{index}-rank{distributed.rank()}.safetensors"

    def records(self, step: int) -> list[dict]:
        blocks = self.manifest["steps"].get(str(step), {})
        return [record for i in sorted(blocks, key=int) for record in blocks[i]]

    def layer_records(self, step: int) -> list:
        """Every finished block's LayerRecords of `step`, this session's and the earlier ones'."""
        from ..report import LayerRecord
        return [LayerRecord(**record) for record in self.records(step)]

    def recorder(self, step: int, inner):
        return Recorded(self, step, inner)


class Recorded:
    """A residency (`core.residency.InMemory` / `OnDisk`) that records each finished block in the
    run directory, and on resumption skips the blocks already done."""

    def __init__(self, run: Run, step: int, inner):
        self.run, self.step, self.inner = run, step, inner
        if hasattr(inner, "block_file") and distributed.is_main():   # disk: its shards are the run's block files
            inner.block_file = lambda index: run.block_file(step, index)

    def capturing(self, model, blocks):
        return self.inner.capturing(model, blocks)

    def resume(self, blocks, hidden):
        """(first block to prune, its inputs); applies the finished blocks' weights."""
        from safetensors.torch import load_file
        done = self.run.finished(self.step)
        if not done:
            return self.inner.resume(blocks, hidden)
        if done != list(range(len(done))):
            raise ValueError(f"{self.run.path}: finished blocks {done} of step {self.step} are not a prefix; "
                             "the run directory is damaged, choose a new --run-dir")
        for index in done:
            path = self.run.block_file(self.step, index)
            if hasattr(self.inner, "current"):
                self.inner.current[index] = path          # already an output shard
                continue
            state = load_file(str(path))
            prefix = next(iter(state)).split(f".{index}.")[0] + f".{index}."
            blocks[index].load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
        if hidden is not None:
            path = self.run.activations_file(self.step, done[-1])
            if not path.is_file():
                raise ValueError(f"{self.run.path}: {path.name} (the activations after the last finished block) is "
                                 "missing; the run directory is damaged, choose a new --run-dir")
            state = load_file(str(path))
            hidden = [state[f"chunk{i}"].to(device=hidden[i].device) for i in range(len(hidden))]
            _, hidden = self.inner.resume(blocks, hidden)          # spills them again under disk offload
        return done[-1] + 1, hidden

    def onload(self, index, block, device):
        self.inner.onload(index, block, device)

    def load(self, module, device):                       # passes outside the block loop (allocation)
        self.inner.load(module, device)

    def unload(self, module, changed=False):
        self.inner.unload(module, changed)

    def keep(self, hidden):
        return self.inner.keep(hidden)

    def offload(self, index, block):
        from safetensors.torch import save_file
        if hasattr(self.inner, "current"):
            self.inner.offload(index, block)              # writes run.block_file (atomic rename)
            return
        self.inner.offload(index, block)
        if not distributed.is_main():                     # the same weights as process 0's, which writes them
            return
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in _named_with_prefix(block, index)}
        write_atomic(self.run.block_file(self.step, index),
                      lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

    def done(self, index, records, hidden):
        from safetensors.torch import save_file
        path = None
        if hidden is not None:
            tensors = {f"chunk{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}
            path = self.run.activations_file(self.step, index)
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        distributed.barrier()      # every process's activations after block `index` are on disk
        step = self.run.manifest["steps"].setdefault(str(self.step), {})
        step[str(index)] = [_jsonable(r) for r in records]
        self.run._save()
        distributed.barrier()      # the manifest names block `index`: earlier activations are not needed
        if path is not None:
            for old in self.run.path.glob(f"activations-*-rank{distributed.rank()}.safetensors"):
                if old != path:
                    old.unlink()


def _named_with_prefix(block, index):
    """The block's state with keys named `blocks.<index>.<name>` (the prefix only matters for
    reading them back, which strips it)."""
    for name, tensor in block.state_dict().items():
        yield f"blocks.{index}.{name}", tensor


def _jsonable(record) -> dict:
    import dataclasses
    from .export import to_jsonable
    return to_jsonable(dataclasses.asdict(record) if dataclasses.is_dataclass(record) else dict(vars(record)))
