"""Save a pruned model atomically, as safetensors, with a `prunekit.json` provenance record.

`save_pretrained_atomic(model, tokenizer, out_dir, metadata)` writes everything into a temp
folder next to `out_dir` (same filesystem) and renames it into place, so `out_dir` is either
the complete new export or untouched -- never half-written after a crash, a full disk or
Ctrl-C after an hour of pruning. The result loads with plain
``AutoModelForCausalLM.from_pretrained(out_dir)``.

Safety rules (checked up front by `check_output_dir`, which `run_recipe` also calls before
any work so a bad path fails in a second):

* an existing `out_dir` is refused unless ``overwrite=True`` (CLI ``--overwrite``);
* with overwrite, the old folder is moved aside, the new one renamed in, then the old one
  deleted: a crash in between leaves one of them, never neither;
* paths in `protect` (the input model's directory or file) are never written into or
  replaced, nor is any folder containing one or inside one -- even with overwrite;
* overwrite only replaces a folder that is empty or looks like a model export
  (``prunekit.json`` or ``config.json``), and never the working directory, the home
  directory, a filesystem root or one of their ancestors: ``--out . --overwrite`` must not
  delete a project.

A full disk (ENOSPC / EDQUOT) while writing raises `DiskFullError` (an OSError) saying that
nothing was written and how much space there is; the staging folder is removed first.

Weights are written only as safetensors (never pickles) and `prunekit.json` is plain JSON:
dataclasses become dicts, tuples lists, paths/dtypes/devices strings, and non-finite floats
the strings "nan"/"inf"/"-inf".
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import errno
import inspect
import json
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable

from .atomic import check_writable, clean_stale_staging, staging_dir, unmark

METADATA_FILE = "prunekit.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_EXPORT_MARKERS = (METADATA_FILE, "config.json")


def _version(dist: str, fallback: str | None = None) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return fallback


def library_versions() -> dict[str, str | None]:
    """Versions recorded in every `prunekit.json`."""
    import torch
    import transformers
    return {
        "prunekit": _version("prunekit", "0.1.0+src"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": _version("safetensors"),
        "python": platform.python_version(),
    }


def to_jsonable(value: Any) -> Any:
    """Plain-JSON form of metadata (dataclasses, tuples, paths, dtypes, numpy/torch scalars)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=repr)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)   # "nan", "inf", "-inf"
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    try:
        import torch
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return to_jsonable(value.item())
        if isinstance(value, torch.Tensor):
            return to_jsonable(value.tolist())
    except ImportError:  # pragma: no cover
        pass
    if hasattr(value, "tolist"):                               # numpy arrays and scalars
        return to_jsonable(value.tolist())
    return str(value)                                          # dtypes, devices, anything else


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _related(a: Path, b: Path) -> bool:
    """a == b, a inside b, or b inside a."""
    return a == b or a in b.parents or b in a.parents


def _never_replace() -> list[Path]:
    homes = [Path.cwd().resolve(), Path.home().resolve()]
    return homes + [Path(p.anchor) for p in homes]


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate an export destination before any work; returns the resolved path.

    Raises ValueError if `out_dir` is, contains, or lies inside a protected path (even with
    overwrite) or, with overwrite, is not a replaceable export folder; FileExistsError if it
    exists and `overwrite` is False; NotADirectoryError if it exists as a file.
    """
    raw = Path(os.path.abspath(Path(out_dir).expanduser()))
    out = raw.resolve()
    for item in protect or ():
        if item is None or str(item) == "":
            continue
        guarded = _resolved(item)
        if _related(out, guarded):
            raise ValueError(f"refusing to write {out}: it is, contains, or lies inside the input model "
                             f"{guarded}, which is never overwritten (choose another --out)")
    clean_stale_staging(out)        # what a killed run (SIGKILL during its save) left beside `out`
    check_writable(out, folder=True)        # a read-only parent fails now, not after the pruning
    if raw.is_symlink():  # replacing would swap the link, not its target: let the user decide
        raise FileExistsError(f"{out_dir} is a symlink (to {os.readlink(raw)}); remove it or choose another --out")
    if not out.exists():
        return out
    if not out.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a directory; choose another --out")
    if not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass --overwrite "
                              "(overwrite=True) to replace it, or choose another --out")
    for special in _never_replace():
        if out == special or out in special.parents:
            raise ValueError(f"refusing to overwrite {out}: it is the working directory, the home directory "
                             "or one of their parents")
    entries = [p.name for p in out.iterdir()]
    if entries and not any(name in entries for name in _EXPORT_MARKERS):
        raise ValueError(f"refusing to overwrite {out}: it does not look like a model export (no "
                         f"{' or '.join(_EXPORT_MARKERS)}) and is not empty; remove it yourself if it is disposable")
    if entries and not is_prunekit_export(out):
        raise ValueError(f"refusing to overwrite {out}: it was not written by prunekit (no {METADATA_FILE} of ours), "
                         "so it may be a model you need; --overwrite only replaces prunekit's own exports. "
                         "Choose another --out, or remove it yourself if it is disposable")
    return out


def is_prunekit_export(folder: Path) -> bool:
    """`folder` holds a prunekit.json that prunekit wrote: a JSON object whose "versions" names prunekit
    (every export records it, `library_versions`). Only such folders may be replaced by --overwrite."""
    try:
        record = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("versions"), dict) and "prunekit" in record["versions"]


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in _DISK_FULL
    return any(f"(os error {code})" in str(err) for code in _DISK_FULL)


class DiskFullError(OSError):
    """The disk (or quota) filled up while exporting; the message says what was left as it was."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def _disk_full(err: OSError, out: Path, existed: bool, model) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    try:
        need = (f"; the weights alone need about "
                f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20:.0f} MB")
    except Exception:
        need = ""
    kept = f"the previous export in {out} is unchanged" if existed else f"{out} was not created"
    return DiskFullError(f"disk full while writing the export to {out} ({getattr(err, 'strerror', None) or err}); "
                         "nothing was "
                         f"written: {kept} and the temporary folder was removed. Free space in {out.parent} "
                         f"({free}{need}) or choose another --out, then run again")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(folder: Path) -> None:
    """Give a freshly written folder the modes the umask would: mkdtemp makes 0700 and
    safetensors >= 0.8 writes its files 0600, which would lock other users out of an export."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _save_model(model, path: Path) -> None:
    """safetensors always. transformers 5 writes fused MoE experts back as the original per-expert
    keys, sized from the config; an MoE whose blocks keep different expert counts has no config
    that sizes them, so it is written with the in-memory (fused) names, which `load_pruned` reads."""
    params = inspect.signature(model.save_pretrained).parameters
    kwargs = {"safe_serialization": True} if "safe_serialization" in params else {}  # 4.x; 5.x always safetensors
    if "save_original_format" in params and _uneven_experts(model):
        kwargs["save_original_format"] = False
    model.save_pretrained(path, **kwargs)


def _uneven_experts(model) -> bool:
    """`surgery.uneven_experts`, False for a model no spec describes (export saves any model)."""
    from ..surgery import uneven_experts
    try:
        return uneven_experts(model)
    except ValueError:
        return False


def save_pretrained_atomic(model, tokenizer, out_dir: str | os.PathLike, metadata: dict | None = None,
                           overwrite: bool = False, protect: Iterable[str | os.PathLike] = (),
                           extra=None) -> Path:
    """Write `model` (safetensors), `tokenizer` and `prunekit.json` to `out_dir` atomically.

    `metadata` is merged into `prunekit.json` with ``versions`` (prunekit, torch, transformers,
    safetensors, python) and ``saved_at`` (UTC). See the module docstring for the rules on
    existing folders, `overwrite` and `protect`. `extra(staging_dir)` writes more files (an EoRA
    adapter) before the swap, so they appear together with the model or not at all. Returns the
    resolved `out_dir`. `extra` may add entries to `metadata`; they are recorded.
    """
    protect = list(protect or ())
    out = check_output_dir(out_dir, overwrite=overwrite, protect=protect)
    saved_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def record_text() -> str:
        record = to_jsonable(dict(metadata or {}))
        record["versions"] = {**library_versions(), **(record.get("versions") or {})}
        record.setdefault("saved_at", saved_at)
        return json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    record_text()                   # fail before writing

    out.parent.mkdir(parents=True, exist_ok=True)
    existed = out.exists()
    tmp = None
    try:
        tmp = staging_dir(out)      # marked as ours: a run killed while saving leaves it for the next to remove
        _save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        pickles = sorted(p.name for p in tmp.rglob("*") if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise RuntimeError(f"save_pretrained wrote pickle files {pickles}; refusing to export them")
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no *.safetensors into {tmp}")
        (tmp / METADATA_FILE).write_text(record_text())     # with what `extra` added to `metadata`
        normalize_permissions(tmp)

        check_output_dir(out, overwrite=overwrite, protect=protect)  # the world may have moved meanwhile
        swap_into_place(tmp, out)
    except Exception as err:        # safetensors reports a full disk as its own error, not an OSError
        if not _is_disk_full(err):
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)      # frees the space before the message is read
        raise _disk_full(err, out, existed, model) from err
    finally:                        # also on Ctrl-C / SIGTERM: no half-written folder stays behind
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; an old `out` is moved aside first and deleted last, so a crash
    leaves the old directory or the new one, never neither (and never half of one). A marker that
    `staging_dir` put into `staging` is removed first: it must not end up in the output."""
    unmark(staging)
    aside = None
    if out.exists():
        aside = staging_dir(out, "old")
        os.rename(out, aside / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        if aside is not None and not out.exists():
            os.rename(aside / out.name, out)  # put the old one back
            unmark(aside)
            aside.rmdir()
            aside = None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
