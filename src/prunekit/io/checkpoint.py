"""Checkpoint checks: a truncated or corrupt download fails first, with its file named.

`check_checkpoint` reads every safetensors header (and the shard index) of a local directory and
compares the declared byte ranges with the files' sizes, before transformers is asked to load
anything; `safetensors_header` parses one file's header by the format's own rules.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class CorruptCheckpointError(ValueError):
    """A weights file is truncated or corrupt; raised before any weight is loaded."""


_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                     "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                     "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


_MAX_HEADER = 100 * 2**20          # the safetensors format caps its JSON header at 100 MB


_REFETCH = "re-download it, or re-save / re-convert the checkpoint"


def safetensors_header(file: Path) -> dict:
    """The parsed JSON header of a .safetensors file, after checking that the file holds exactly
    the bytes it declares. Layout: 8-byte little-endian header length n, n bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data,
    whose offsets start at 0 and follow each other without gaps."""
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{file}: {what}; the file is truncated or corrupt: {_REFETCH}")

    size = file.stat().st_size
    with open(file, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise bad(f"only {size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER or 8 + length > size:
            raise bad(f"declares a {length}-byte header but the file has {size} bytes")
        text = fh.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"the header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) or begin > end:
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry {info!r}") from None
        bits = _SAFETENSORS_BITS.get(dtype)
        numel = 1
        for dim in shape:
            numel *= dim
        if bits is not None and end - begin != (numel * bits + 7) // 8:
            raise bad(f"tensor {name!r} ({dtype}, shape {shape}) needs {(numel * bits + 7) // 8} bytes but its "
                      f"offsets span {end - begin}")
        entries.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(entries):
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin} of the data, expected {position} (gap or overlap)")
        position = end
    data = size - 8 - length
    if position != data:
        raise bad(f"the header declares {position} bytes of tensor data but the file holds {data}"
                  + (" (truncated)" if data < position else " (trailing bytes)"))
    return header


def check_checkpoint(path: str | os.PathLike) -> None:
    """Check a local Hugging Face checkpoint's weights before loading anything: every
    *.safetensors header parses and matches the file's size, dtypes and shapes match the byte
    ranges, and `model.safetensors.index.json` (if present) names only existing shards, each of
    which holds the weights the index assigns to it. Reads headers only (milliseconds).
    Raises CorruptCheckpointError (a ValueError) naming the file and what is wrong."""
    path = Path(path)
    headers = {file.name: safetensors_header(file) for file in sorted(path.glob("*.safetensors"))}
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CorruptCheckpointError(f"{index}: not a valid shard index (no 'weight_map' mapping); "
                                         f"{_REFETCH}") from None
        for shard in sorted(set(weight_map.values())):
            if shard not in headers:
                raise CorruptCheckpointError(f"{index} lists shard {shard!r}, which is missing from {path}; "
                                             f"{_REFETCH}")
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CorruptCheckpointError(f"{path / shard}: holds no tensor {name!r}, which {index.name} "
                                             f"assigns to it; {_REFETCH}")


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (memoized per path, size and mtime within this process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def is_tied_alias(model, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    params = dict(model.named_parameters(remove_duplicate=False))
    return key in params and params[key] is inp.weight
