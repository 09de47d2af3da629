"""One atomic writer: a file is replaced by its new content whole, or not at all.

The content goes to a temporary file in the same folder (same file system, so the rename is
atomic), is flushed and fsynced, then renamed over the target. A crash, a full disk or Ctrl-C
leaves the old file or the new one, never half of one, and no temporary file behind.

Folders are staged the same way (`staging_dir`: export.py, offload.py); a staging folder carries a
marker naming the process that made it, so that what a SIGKILL leaves behind is recognised and
removed by the next run for the same output (`clean_stale_staging`).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], Any]) -> None:
    """Replace `path` with `content`: text, bytes, or a function that writes the file at the path
    it is given (e.g. `lambda tmp: save_file(tensors, str(tmp))`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_files(path)
    # the pid in the name: a file left by a killed process is recognised (`clean_stale_files`)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content.encode() if isinstance(content, str) else content)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Fail now, before any work, if `path` (a file, or with `folder` a folder) cannot be written later: a
    file path that names a folder, or a place whose nearest existing folder refuses new files (read-only, no
    permission). Tried for real with a probe file, so it also holds for root and read-only mounts."""
    path = Path(path).expanduser()
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".prunekit-write-test-")
    except OSError as err:
        raise PermissionError(f"cannot write {path}: {existing} does not accept new files ({err.strerror or err}); "
                              "choose another location") from None
    os.close(fd)
    os.unlink(probe)


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps) -> None:
    """`data` as indented JSON (2 spaces, a final newline); `dumps`: more `json.dumps` options."""
    write_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


# ------------------------------------------------------------------ staging folders, and what a killed run leaves

STAGING_MARKER = "prunekit-staging.json"     # inside every staging folder prunekit makes: who made it
STAGING_KINDS = ("tmp", "old", "steps")      # .NAME.tmp-XXXX (the new output), .NAME.old-XXXX (the old one, aside),
#                                              .NAME.steps-XXXX (the intermediate steps of an out-of-core run)

log = logging.getLogger("prunekit")
_mentioned: set[str] = set()                 # folders already named in a warning by this process


def staging_dir(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A new hidden folder `.NAME.<kind>-XXXXXXXX` beside `target` (same file system, so it can be renamed
    into place), holding `prunekit-staging.json`: this process's pid, host and start time. A run killed
    with SIGKILL (or a power cut) cannot remove it; the next run for `target` recognises it by the
    marker and removes it once that process is gone (`clean_stale_staging`). Remove the marker
    (`unmark`) before renaming the folder into place."""
    target = Path(target)
    if kind not in STAGING_KINDS:
        raise ValueError(f"staging kind {kind!r}: one of {STAGING_KINDS}")
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    try:
        (folder / STAGING_MARKER).write_text(json.dumps({**_this_process(), "target": str(target),
                                                         "kind": kind}, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def clean_stale_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `.NAME.<pid>-XXXX.tmp` that `write_atomic` calls for `path` left behind
    when their process was killed (a GGUF export is as large as the model); files of live processes stay."""
    path = Path(path)
    removed = []
    try:
        candidates = sorted(path.parent.glob(f".{path.name}.*-*.tmp"))
    except OSError:
        return removed
    for file in candidates:
        pid = file.name[len(path.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not _alive({"pid": int(pid)}):
            file.unlink(missing_ok=True)
            log.warning("removed %s, a temporary file of an interrupted prunekit run (process %s)", file, pid)
            removed.append(file)
    return removed


def unmark(folder: Path) -> None:
    """Remove the staging marker: the folder is about to become the output itself."""
    (Path(folder) / STAGING_MARKER).unlink(missing_ok=True)


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "process_started": _started(os.getpid()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "program": "prunekit"}


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is no such process."""
    try:
        import psutil
        return round(psutil.Process(pid).create_time(), 2)
    except Exception:
        return None


def _alive(record: dict) -> bool:
    """Whether the process that wrote `record` (on this host) still runs: its pid exists and, where the
    record says when it started, started then (a pid reused by another process does not count)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # another user's process
        pass
    started, recorded = _started(pid), record.get("process_started")
    if started is None or not isinstance(recorded, (int, float)):
        return True
    return abs(started - recorded) < 2.0


def _staging_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / STAGING_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("program") == "prunekit" else None


def clean_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove what killed prunekit runs left beside `target`: the folders `.NAME.tmp-*` / `.NAME.old-*` that
    hold our marker and whose process is gone (same host). Each removal is logged (a warning, naming it).
    A folder of that name without our marker is left alone and named in one warning; so is an `.old-`
    folder holding the only copy of `target` (killed between the two renames of a swap), and one made
    on another host. Folders of live processes are left alone. Returns the folders removed."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    removed: list[Path] = []
    try:
        candidates = sorted(p for kind in STAGING_KINDS for p in target.parent.glob(f".{target.name}.{kind}-*"))
    except OSError:
        return removed
    host = socket.gethostname()
    for folder in candidates:
        if folder.is_symlink() or not folder.is_dir():
            continue
        record = _staging_record(folder)
        if record is None:
            _mention(folder, f"{folder} looks like a temporary folder of an interrupted export to {target}, but it "
                             f"has no {STAGING_MARKER} of prunekit's, so it was left alone; remove it yourself if "
                             "it is disposable")
            continue
        if record.get("host") != host:
            _mention(folder, f"{folder} is a temporary folder of a prunekit run on host {record.get('host')} "
                             f"(pid {record.get('pid')}, {record.get('created')}); left alone: remove it yourself "
                             "once that run is over")
            continue
        if _alive(record):
            if record.get("pid") != os.getpid():
                log.info("%s belongs to prunekit process %s, still running: left alone", folder, record.get("pid"))
            continue
        kept = folder / target.name
        if record.get("kind") == "old" and kept.is_dir() and not target.exists():
            _mention(folder, f"{folder} holds the previous {target.name} (moved aside by prunekit process "
                             f"{record.get('pid')}, killed before the new one was renamed in); left alone: "
                             f"move {kept} back to {target} if you want it")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():
            _mention(folder, f"could not remove {folder}, left by an interrupted prunekit run; remove it yourself")
            continue
        removed.append(folder)
        log.warning("prunekit: removed %s, a temporary folder left by an interrupted prunekit run (pid %s, made "
                    "%s)", folder, record.get("pid"), record.get("created"))
    return removed


def _mention(folder: Path, message: str) -> None:
    if str(folder) not in _mentioned:
        _mentioned.add(str(folder))
        log.warning("prunekit: warning: %s", message)
