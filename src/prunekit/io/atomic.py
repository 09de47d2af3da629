"""One atomic writer: a file is replaced by its new content whole, or not at all.

The content goes to a temporary file in the same folder (same file system, so the rename is
atomic), is flushed and fsynced, then renamed over the target. A crash, a full disk or Ctrl-C
leaves the old file or the new one, never half of one, and no temporary file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | os.PathLike, content: str | bytes | Callable[[Path], Any]) -> None:
    """Replace `path` with `content`: text, bytes, or a function that writes the file at the path
    it is given (e.g. `lambda tmp: save_file(tensors, str(tmp))`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps) -> None:
    """`data` as indented JSON (2 spaces, a final newline); `dumps`: more `json.dumps` options."""
    write_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")
