"""Compressed storage of unstructured and N:M sparse models: a bitmap of nonzeros plus the nonzero values.

A model pruned to 50 % unstructured (or 2:4) sparsity is saved by `save_pretrained_atomic` as dense
safetensors full of zeros: the same size as the dense model. Endor (Kang et al., "Endor: Hardware-
Friendly Sparse Format for Offloaded LLM Inference", arXiv 2406.11674) stores such a weight as a
bitmap of its nonzeros (1 bit per weight) plus the nonzero values, so a weight of density d costs
``1/8 + d x dtype_bytes`` bytes instead of ``dtype_bytes`` (float32 at 50 %: 2.125 B instead of 4;
bfloat16 at 50 %: 1.125 B instead of 2), and decompression is a bit unpack and a scatter, cheap
enough to do on the compute device just before a block runs (`offloaded_sparse_model`).

Format ``prunekit-sparse-bitmap``, version 2 (written by `export_sparse`; version 1, without the
exponent coding below, is still read):

* every ``<name>.safetensors`` file of the source becomes ``<name>.sparse.safetensors``; there is
  no ``model.safetensors``, so stock ``AutoModelForCausalLM.from_pretrained`` fails loudly ("no file
  named model.safetensors") instead of loading random weights; `load_sparse` (and
  `prunekit.load` once it dispatches here) reads it;
* a floating weight with two or more dimensions inside a decoder block whose bitmap + values are
  smaller than the dense tensor is stored as two tensors: ``<tensor>.bitmap`` (uint8, 1-D,
  ceil(numel / 8) bytes; the weight flattened row-major, bit k (least significant first) of byte j
  set when element 8j + k is nonzero, padding bits zero) and ``<tensor>.values`` (1-D, the nonzeros
  in row-major order, in the weight's own dtype). Its shape is in the file's safetensors metadata
  (``prunekit_sparse_shapes``, JSON). Every other tensor is stored as it was;
* exponent coding (version 2, on by default; `entropy=False` writes without it): a weight's exponent
  carries few bits of information (trained weights sit within a few binades), which a bitmap leaves in
  full. As ZipNN does (Hershcovitch et al., "ZipNN: Lossless Compression for AI Models", arXiv 2411.05239),
  every floating tensor of at least 4,096 elements that is stored (the ``.values`` of a compressed weight,
  and the tensors kept dense: embeddings, head) is split into byte planes: its most significant byte
  (sign and the high exponent bits in float32, float16 and bfloat16) is deflated (zlib level 1) into
  ``<tensor>.exponent`` (uint8), the other bytes go raw into ``<tensor>.mantissa`` (uint8, element-major),
  when that is smaller; the file's metadata ``prunekit_planes`` (JSON) gives each such tensor's dtype and
  shape. Lossless: the bytes come back as they were (tested bit for bit). SmolLM2-135M float32: the high
  byte deflates to about 0.45 of its size, so each stored float costs about 0.86 of its bytes;
* ``prunekit.json`` is the source's record plus a ``storage`` entry (format, version, layout, which
  tensors are compressed, bytes per weight, totals).

Zeros and negative zeros: a weight counts as zero when it compares equal to 0, so -0.0 is a zero,
is not stored, and comes back as +0.0. Everything else (every nonzero, NaN and inf included) comes
back with its exact bits; `torch.equal` holds for every tensor (it treats -0.0 == 0.0) and a model's
outputs are unchanged (adding -0.0 or +0.0 to a sum gives the same value). The number of negative
zeros normalised is recorded (``storage.negative_zeros``); treating them as values instead would
make a model pruned by ``W * mask`` (whose pruned negatives are -0.0) incompressible.

Why not the compressed-tensors ``sparse-bitmask`` format, which vLLM and llm-compressor used: with
transformers 5.25 it does not load. transformers requires compressed-tensors >= 0.15, whose
releases (0.15 to 0.20.1) removed the sparse compressors ("sparsity is removed for now"); a
checkpoint in that format loads with every compressed weight reported UNEXPECTED/MISSING and left
randomly initialised, without an error. compressed-tensors 0.14 still decompresses it, but
transformers 5.25 refuses it ("compressed-tensors>=0.15.0 is required").
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from .atomic import staging_dir
from .export import METADATA_FILE, DiskFullError, check_output_dir, library_versions, normalize_permissions, \
    swap_into_place, to_jsonable

log = logging.getLogger("prunekit")

FORMAT = "prunekit-sparse-bitmap"
VERSION = 2
SUFFIX = ".sparse.safetensors"
BITMAP, VALUES = ".bitmap", ".values"
SHAPES_KEY = "prunekit_sparse_shapes"             # safetensors metadata: {tensor name: shape} (JSON)
PLANES_KEY = "prunekit_planes"                    # safetensors metadata: {tensor name: {dtype, shape}} (JSON)
EXPONENT, MANTISSA = ".exponent", ".mantissa"
PLANES_MIN_NUMEL = 4096                           # smaller tensors are stored as they are
ZLIB_LEVEL = 1                                    # level 6 saves ~2% more of the high byte at ~8x the time
BYTES_PER_WEIGHT = "1/8 + density x dtype_bytes"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# --------------------------------------------------------------------------- the math: pure functions

_TABLES: dict[str, tuple[Tensor, Tensor]] = {}


def _tables(device) -> tuple[Tensor, Tensor]:
    """Per device: byte -> its 8 bits as 8 bytes read as one int64 (256,), and byte -> popcount (256,)."""
    key = str(device)
    if key not in _TABLES:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1                    # (256, 8), bit k of byte
        _TABLES[key] = (bits.to(torch.uint8).view(torch.int64).reshape(256).to(device), bits.sum(1).to(device))
    return _TABLES[key]


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor, flattened row-major, as ceil(numel / 8) bytes: bit k of byte j is element
    8j + k (least significant bit first); the padding bits of the last byte are zero."""
    flat = mask.reshape(-1)
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[:flat.numel()] = flat
    bits = padded.view(-1, 8)                                        # (bytes, 8)
    packed = torch.zeros(bits.shape[0], dtype=torch.uint8, device=flat.device)
    for k in range(8):                                               # 8 passes over n/8 bytes, no int64 temporaries
        packed |= bits[:, k] << k
    return packed


def unpack_bits(bitmap: Tensor, count: int) -> Tensor:
    """The first `count` bits of `bitmap` (as written by `pack_bits`), as a flat boolean tensor. One table
    lookup per byte yields its 8 bits as 8 bytes (an int64), which is read back as 8 booleans."""
    eight, _ = _tables(bitmap.device)
    return eight[bitmap.reshape(-1).long()].view(torch.bool)[:count]


def compress(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(bitmap, values)`` of `weight`: the packed bitmap of its nonzeros (`pack_bits`, row-major) and
    its nonzeros in row-major order, same dtype, bits unchanged. -0.0 counts as zero (module docstring)."""
    flat = weight.detach().reshape(-1)
    keep = flat != 0
    return pack_bits(keep), flat[keep]


def check_packed(bitmap: Tensor, values: Tensor, shape) -> None:
    """Raise ValueError unless ``(bitmap, values)`` can be a compressed tensor of `shape`: a 1-D uint8
    bitmap of ceil(numel / 8) bytes with zero padding bits, marking exactly ``len(values)`` weights."""
    shape = tuple(int(d) for d in shape)
    count = math.prod(shape)
    if bitmap.dtype != torch.uint8 or bitmap.dim() != 1 or values.dim() != 1:
        raise ValueError(f"expected a 1-D uint8 bitmap and 1-D values, got {bitmap.dtype} {tuple(bitmap.shape)} "
                         f"and {tuple(values.shape)}")
    if bitmap.numel() != math.ceil(count / 8):
        raise ValueError(f"a bitmap for shape {shape} has {math.ceil(count / 8)} bytes, this one {bitmap.numel()}")
    if count % 8 and int(bitmap[-1]) >> (count % 8):
        raise ValueError(f"the bitmap for shape {shape} has padding bits set")
    _, popcount = _tables(bitmap.device)
    marked = int((torch.bincount(bitmap.int(), minlength=256) * popcount).sum())   # n/8 bytes, nothing unpacked
    if marked != values.numel():
        raise ValueError(f"the bitmap marks {marked} nonzeros but there are {values.numel()} values")


def decompress(bitmap: Tensor, values: Tensor, shape, check: bool = True) -> Tensor:
    """The dense tensor of `shape` that `compress` turned into ``(bitmap, values)``, on `values`' device
    and in its dtype. `check` runs `check_packed` first (a ValueError names the mismatch); the
    offloaded forward, whose inputs were checked when read, skips it."""
    shape = tuple(int(d) for d in shape)
    bitmap = bitmap.to(values.device)
    if check:
        check_packed(bitmap, values, shape)
    mask = unpack_bits(bitmap, math.prod(shape))
    dense = torch.zeros(mask.numel(), dtype=values.dtype, device=values.device)
    dense.masked_scatter_(mask, values)
    return dense.view(shape)


def split_planes(tensor: Tensor) -> tuple[Tensor, Tensor]:
    """``(exponent, mantissa)`` of a floating tensor: its most significant byte per element (little-endian:
    the last), deflated, as uint8; and its other bytes, element-major, as uint8 (numel x (itemsize - 1))."""
    import zlib
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).reshape(-1, tensor.element_size())
    high = raw[:, -1].contiguous().numpy().tobytes()
    exponent = torch.frombuffer(bytearray(zlib.compress(high, ZLIB_LEVEL)), dtype=torch.uint8)
    return exponent, raw[:, :-1].reshape(-1).clone()


def join_planes(exponent: Tensor, mantissa: Tensor, dtype: torch.dtype, shape) -> Tensor:
    """The tensor `split_planes` split (bit for bit). ValueError when the planes do not fit dtype and shape."""
    import zlib
    shape = tuple(int(d) for d in shape)
    count, size = math.prod(shape), torch.empty((), dtype=dtype).element_size()
    try:
        high = zlib.decompress(exponent.contiguous().numpy().tobytes())
    except zlib.error as err:
        raise ValueError(f"the exponent plane does not inflate ({err})") from None
    if len(high) != count or mantissa.numel() != count * (size - 1):
        raise ValueError(f"planes of {len(high)} + {mantissa.numel()} bytes do not make {count} x {dtype}")
    raw = torch.empty(count, size, dtype=torch.uint8)
    raw[:, :-1] = mantissa.reshape(count, size - 1)
    raw[:, -1] = torch.frombuffer(bytearray(high), dtype=torch.uint8)
    return raw.reshape(-1).view(dtype).reshape(shape)


def _store(out: dict, planes: dict, key: str, tensor: Tensor, entropy: bool) -> int:
    """Put `tensor` into `out` under `key`, as byte planes when `entropy` and that is smaller; returns the bytes."""
    size = tensor.numel() * tensor.element_size()
    if entropy and tensor.dtype in _FLOATS and tensor.numel() >= PLANES_MIN_NUMEL:
        exponent, mantissa = split_planes(tensor)
        if exponent.numel() + mantissa.numel() < size:
            for suffix in (EXPONENT, MANTISSA):
                if key + suffix in out:
                    raise ValueError(f"a tensor named {key + suffix} is already stored: cannot split {key}")
            out[key + EXPONENT], out[key + MANTISSA] = exponent, mantissa
            planes[key] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
            return exponent.numel() + mantissa.numel()
    out[key] = tensor.contiguous()
    return size


def _join_all(tensors: dict, metadata: dict, file: Path) -> dict:
    """`tensors` with every byte-planed tensor (metadata PLANES_KEY) joined back, in place."""
    for key, info in json.loads(metadata.get(PLANES_KEY, "{}")).items():
        if key + EXPONENT not in tensors or key + MANTISSA not in tensors:
            raise ValueError(f"{file}: {key} is listed as byte planes but lacks {EXPONENT} or {MANTISSA}")
        dtype = getattr(torch, str(info.get("dtype")), None)
        if dtype not in _FLOATS:
            raise ValueError(f"{file}: {key} has byte planes of an unknown dtype {info.get('dtype')!r}")
        try:
            tensors[key] = join_planes(tensors.pop(key + EXPONENT), tensors.pop(key + MANTISSA), dtype,
                                       info["shape"])
        except ValueError as err:
            raise ValueError(f"{file}: {key} is corrupt ({err}); re-export it") from None
    return tensors


def compressed_bytes(numel: int, nonzeros: int, element_size: int) -> int:
    """Bytes `compress` stores for a weight: the bitmap (ceil(numel / 8)) plus the values."""
    return math.ceil(numel / 8) + nonzeros * element_size


# --------------------------------------------------------------------------- reading safetensors without mmap

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def _read_safetensors(file: Path) -> tuple[dict, dict]:
    """``(metadata, {name: tensor})`` of one safetensors file, read with plain reads into fresh tensors.

    Not `safe_open`: it memory-maps the file, and the mapped pages that are read count in this process's
    resident set, on top of what is kept, as long as the mapping lives; `offloaded_sparse_model` exists to
    keep that set small (SmolLM2-135M at 50 %: peak RSS 933 MB with `safe_open`, 769 MB with this). The
    header is checked first (`checkpoint.safetensors_header`: offsets, sizes, no gaps)."""
    from .checkpoint import safetensors_header
    header = safetensors_header(file)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    with open(file, "rb") as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            fh.seek(start + begin)
            if end > begin and fh.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{file}: short read of {name}")
            tensors[name] = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return metadata, tensors


# --------------------------------------------------------------------------- which tensors

def _block_pattern(config: dict) -> re.Pattern:
    """Checkpoint names inside a decoder block: ``<blocks>.<index>.<rest>``. `<blocks>` is the family's
    `ModelSpec.blocks` when prunekit knows the family, else a generic ``...layers`` / ``...h`` /
    ``...blocks`` path, so an unknown family still gets its blocks compressed."""
    from types import SimpleNamespace

    from ..models import spec_for
    try:
        prefix = re.escape(spec_for(SimpleNamespace(**config)).blocks)
    except ValueError:
        prefix = r"(?:[A-Za-z_]\w*\.)*?(?:layers|h|blocks)"
    return re.compile(rf"^(?P<blocks>{prefix})\.(?P<index>\d+)\.(?P<rest>.+)$")


def _candidate(name: str, tensor_dtype: torch.dtype, shape, blocks: re.Pattern) -> bool:
    return (tensor_dtype in _FLOATS and len(shape) >= 2 and math.prod(shape) > 0
            and blocks.match(name) is not None)


# --------------------------------------------------------------------------- export

def _write_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """`save_file`, with a full disk raised as OSError(ENOSPC): safetensors reports it as a
    SafetensorError whose message ends in "(os error 28)"."""
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:
        text = str(err)
        for code in _DISK_FULL:
            if f"os error {code})" in text or os.strerror(code) in text:
                raise OSError(code, f"{os.strerror(code)} (writing {path.name}: {text})") from err
        raise


def _source_files(src: Path) -> list[Path]:
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a model folder (config.json + *.safetensors)")
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} has no config.json: export_sparse reads a saved model folder")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLES)
        raise ValueError(f"{src} has no *.safetensors" + (f" (only pickles: {pickles[:3]}); re-save it as "
                                                           "safetensors first" if pickles else ""))
    if any(f.name.endswith(SUFFIX) for f in files) or is_sparse_export(src):
        raise ValueError(f"{src} is already a {FORMAT} export")
    return files


def _copy_other_files(src: Path, dest: Path) -> list[str]:
    """Everything beside the weights (config, generation config, tokenizer, chat template, model card,
    adapters), except the shard index (it names files that no longer exist), pickles, hidden files
    and prunekit.json (rewritten)."""
    copied = []
    for entry in sorted(src.iterdir()):
        name = entry.name
        if (name.startswith(".") or name == METADATA_FILE or name.endswith((".safetensors", ".safetensors.index.json"))
                or entry.suffix in _PICKLES):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / name, symlinks=False)
        elif entry.is_file():
            shutil.copy2(entry, dest / name)
        else:
            continue
        copied.append(name)
    return copied


def _compress_file(source: Path, target: Path, blocks: re.Pattern, tensors: dict, totals: dict,
                   entropy: bool = True) -> None:
    """One source shard -> one sparse shard; fills `tensors` (per-tensor record) and `totals`."""
    out, shapes, planes = {}, {}, {}
    _, stored_tensors = _read_safetensors(source)
    names = set(stored_tensors)
    for name in sorted(names):
        tensor = stored_tensors.pop(name)     # dropped as it is processed
        dense_bytes = tensor.numel() * tensor.element_size()
        totals["bytes_dense"] += dense_bytes
        if not _candidate(name, tensor.dtype, tuple(tensor.shape), blocks):
            totals["bytes_compressed"] += _store(out, planes, name, tensor, entropy)
            continue
        flat = tensor.reshape(-1)
        zero = flat == 0
        nonzeros = flat.numel() - int(zero.sum())
        totals["negative_zeros"] += int((zero & torch.signbit(flat)).sum())
        stored = compressed_bytes(flat.numel(), nonzeros, tensor.element_size())
        density = nonzeros / flat.numel()
        record = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                  "density": round(density, 6), "bytes_dense": dense_bytes, "file": target.name}
        if stored < dense_bytes:
            for suffix in (BITMAP, VALUES):
                if name + suffix in names:
                    raise ValueError(f"{source.name} already holds a tensor {name + suffix}: cannot store "
                                     f"{name} compressed next to it")
            bitmap, values = compress(tensor)
            out[name + BITMAP] = bitmap
            stored = bitmap.numel() + _store(out, planes, name + VALUES, values, entropy)
            shapes[name] = list(tensor.shape)
            record.update(compressed=True, bytes_stored=stored,
                          bytes_per_weight=round(stored / flat.numel(), 6))
            totals["tensors_compressed"] += 1
            totals["bytes_compressed"] += stored
        else:                                   # too dense: bitmap + values would be larger
            stored = _store(out, planes, name, tensor, entropy)
            record.update(compressed=False, bytes_stored=stored,
                          bytes_per_weight=round(stored / flat.numel(), 6))
            totals["tensors_kept_dense"] += 1
            totals["bytes_compressed"] += stored
        tensors[name] = record
    metadata = {"format": "pt", "prunekit_format": FORMAT, "prunekit_format_version": str(VERSION),
                SHAPES_KEY: json.dumps(shapes, sort_keys=True), PLANES_KEY: json.dumps(planes, sort_keys=True)}
    _write_safetensors(out, target, metadata)


def _disk_full(err: OSError, out: Path, existed: bool, need: int) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous export in {out} is unchanged" if existed else f"{out} was not created"
    return DiskFullError(f"disk full while writing the sparse export to {out} ({err.strerror or err}); nothing was "
                         f"written: {kept} and the temporary folder was removed. Free space in {out.parent} ({free}; "
                         f"the source's weights take {need / 2**20:.0f} MB dense) or choose another out, then run "
                         "again")


def export_sparse(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                  protect: Iterable[str | os.PathLike] = (), entropy: bool = True) -> dict:
    """Write the saved model folder `src` to `out` in the ``prunekit-sparse-bitmap`` format (module docstring).

    Block weights whose bitmap + values are smaller than the dense tensor are stored compressed; the
    rest (embeddings, norms, head, dense weights) as they are. Config, generation config, tokenizer
    and other files are copied; prunekit.json is the source's record plus a ``storage`` entry. `out`
    appears whole or not at all (staging folder + rename, as `save_pretrained_atomic`): an existing
    `out` is refused unless `overwrite`; `src` and `protect` are never written into; a full disk
    raises `DiskFullError` and leaves neither `out` nor a staging folder. `entropy`: store floating
    tensors as byte planes with the high byte deflated (module docstring; lossless). Returns statistics:
    bytes_dense, bytes_compressed (tensor data), ratio, tensors_compressed, tensors_kept_dense,
    negative_zeros, files (source -> sparse file) and out.
    """
    src = Path(src).expanduser().resolve()
    files = _source_files(src)
    protect = [src, *(protect or ())]
    out = check_output_dir(out, overwrite=overwrite, protect=protect)
    config = json.loads((src / "config.json").read_text())
    blocks = _block_pattern(config)
    record = {}
    if (src / METADATA_FILE).is_file():
        record = json.loads((src / METADATA_FILE).read_text())
        if not isinstance(record, dict):
            raise ValueError(f"{src / METADATA_FILE} is not a JSON object")
    record["versions"] = {**library_versions(), **(record.get("versions") or {})}
    record["versions"].setdefault("prunekit", library_versions()["prunekit"])

    out.parent.mkdir(parents=True, exist_ok=True)
    existed = out.exists()
    need = sum(f.stat().st_size for f in files)
    tensors: dict[str, dict] = {}
    totals = dict(bytes_dense=0, bytes_compressed=0, tensors_compressed=0, tensors_kept_dense=0, negative_zeros=0)
    mapping = {f.name: f.name.removesuffix(".safetensors") + SUFFIX for f in files}
    tmp = None
    try:
        tmp = staging_dir(out)
        for source in files:
            _compress_file(source, tmp / mapping[source.name], blocks, tensors, totals, entropy)
        copied = _copy_other_files(src, tmp)
        ratio = totals["bytes_compressed"] / max(totals["bytes_dense"], 1)
        record["storage"] = to_jsonable({
            "format": FORMAT, "version": VERSION,
            "layout": ("per compressed tensor T: T.bitmap (uint8, ceil(numel/8) bytes; bit k, least significant "
                       "first, of byte j is element 8j+k of T flattened row-major, 1 = nonzero) and T.values "
                       "(the nonzeros in row-major order, T's dtype); shapes in each file's safetensors metadata "
                       f"'{SHAPES_KEY}'; -0.0 counts as zero and is restored as +0.0"
                       + (f"; floating tensors of >= {PLANES_MIN_NUMEL} elements (values and dense tensors) as "
                          f"byte planes when smaller: T{EXPONENT} = zlib(the most significant byte of each "
                          f"element), T{MANTISSA} = the other bytes, element-major; dtype and shape in "
                          f"'{PLANES_KEY}'" if entropy else "")),
            "bytes_per_weight": BYTES_PER_WEIGHT + (" (before exponent coding)" if entropy else ""),
            "exponent_coding": bool(entropy),
            "rule": "a floating weight of >= 2 dims inside a decoder block is compressed when "
                    "ceil(numel/8) + nonzeros x dtype_bytes < numel x dtype_bytes",
            "source": str(src), "files": mapping, "copied": copied, **totals, "ratio": round(ratio, 6),
            "tensors": tensors,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
        normalize_permissions(tmp)
        check_output_dir(out, overwrite=overwrite, protect=protect)  # the world may have moved meanwhile
        swap_into_place(tmp, out)
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full(err, out, existed, need) from err
    finally:                        # also on Ctrl-C: no half-written folder stays behind
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("sparse export %s: %.1f MB -> %.1f MB of tensors (%.3fx), %d tensors compressed", out,
             totals["bytes_dense"] / 2**20, totals["bytes_compressed"] / 2**20, ratio, totals["tensors_compressed"])
    return {**totals, "ratio": ratio, "files": mapping, "out": str(out)}


# --------------------------------------------------------------------------- reading

def is_sparse_export(path: str | os.PathLike) -> bool:
    """`path` is a folder whose prunekit.json says it is in this module's format."""
    meta = Path(path) / METADATA_FILE
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    storage = record.get("storage") if isinstance(record, dict) else None
    return isinstance(storage, dict) and storage.get("format") == FORMAT


@dataclass
class Packed:
    """A compressed weight as read from disk: `compress`'s output and the dense shape."""
    bitmap: Tensor
    values: Tensor
    shape: tuple[int, ...]

    def dense(self, check: bool = True) -> Tensor:
        return decompress(self.bitmap, self.values, self.shape, check=check)

    @property
    def nbytes(self) -> int:
        return self.bitmap.numel() + self.values.numel() * self.values.element_size()


def read_sparse(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Packed]]:
    """``(dense, packed)``: the tensors of a sparse export stored as they are, and the compressed ones
    (checked: sizes, padding, counts), by checkpoint name. Nothing is decompressed."""
    path = Path(path)
    if not is_sparse_export(path):
        raise ValueError(f"{path} is not a {FORMAT} export (no prunekit.json with storage.format = {FORMAT!r})")
    record = json.loads((path / METADATA_FILE).read_text())["storage"]
    if int(record.get("version", 0)) > VERSION:
        raise ValueError(f"{path} is {FORMAT} version {record['version']}; this prunekit reads up to {VERSION}")
    files = sorted(path.glob("*" + SUFFIX))
    if not files or sorted(f.name for f in files) != sorted(record.get("files", {}).values()):
        raise ValueError(f"{path}: the sparse shards {sorted(f.name for f in files)} are not the ones prunekit.json "
                         f"lists ({sorted(record.get('files', {}).values())})")
    dense, packed = {}, {}
    for file in files:
        metadata, tensors = _read_safetensors(file)
        tensors = _join_all(tensors, metadata, file)
        for name, shape in json.loads(metadata.get(SHAPES_KEY, "{}")).items():
            if name + BITMAP not in tensors or name + VALUES not in tensors:
                raise ValueError(f"{file}: {name} is listed as compressed but lacks {BITMAP} or {VALUES}")
            item = Packed(tensors.pop(name + BITMAP), tensors.pop(name + VALUES), tuple(shape))
            try:
                check_packed(item.bitmap, item.values, item.shape)
            except ValueError as err:
                raise ValueError(f"{file}: {name} is corrupt ({err}); re-export it") from None
            packed[name] = item
        dense.update(tensors)
    return dense, packed


def load_sparse_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a sparse export, decompressed, by checkpoint name (what the source's safetensors held,
    -0.0 as +0.0)."""
    dense, packed = read_sparse(path)
    for name, item in packed.items():
        dense[name] = item.dense(check=False)                      # checked by read_sparse
    return dense


# --------------------------------------------------------------------------- loading a model
# `prunekit.io.loading` dispatches here (`is_sparse_export` -> `load_sparse`), so this module cannot import
# it back (the package has no import cycles): the dtype names, recorded widths and tokenizer rule below
# are the few lines of loading.py this needs, restated.

def _torch_dtype(dtype) -> torch.dtype | None:
    """float32 / bfloat16 / float16 (also fp32, bf16, fp16, half, float, a torch.dtype); None for "auto"
    (the checkpoint's own dtype)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        found = dtype
    else:
        text = str(dtype).strip().lower().removeprefix("torch.")
        if text == "auto":
            return None
        found = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(text, text), None)
    if found not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype!r}: use 'float32', 'bfloat16', 'float16' or 'auto'")
    return found


def _recorded_widths(path: Path) -> list[dict] | None:
    """Per-block widths of a non-uniform width-pruned export (prunekit.json "structure"), else None."""
    structure = json.loads((path / METADATA_FILE).read_text()).get("structure") or {}
    return None if structure.get("stock", True) else structure["widths"]


def _tokenizer(path: Path, trust_remote_code: bool):
    """The export's tokenizer, None when it has no tokenizer files."""
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; returning tokenizer=None", path)
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def _model_class(config, path: Path, trust_remote_code: bool):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(path))
    raise ValueError(f"{path}: no causal-LM class for model_type {config.model_type!r}"
                     + (" (it needs remote code: pass trust_remote_code=True)" if auto_map else ""))


def _tied(model, name: str) -> bool:
    """`name` is the output embedding tied to the input embedding (saved once)."""
    from .checkpoint import is_tied_alias
    return is_tied_alias(model, name)


def _generation_config(model, path: Path) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(str(path))


def load_sparse(path: str | os.PathLike, dtype="float32", trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a ``prunekit-sparse-bitmap`` export, in eval mode, on the CPU.

    The weights are decompressed in memory and handed to the stock model class's `from_pretrained`
    (``state_dict=``), so dtype conversion, tied embeddings and MoE key conversions are transformers' own.
    A non-uniform width-pruned export (widths in prunekit.json) is built as `loading.load_pruned` builds
    it: the stock class from config.json, `surgery.resize_to_` to the recorded widths, then the weights.
    A weight the checkpoint lacks (other than a tied head) is an error, not a random initialisation.
    """
    from transformers import AutoConfig

    path = Path(path)
    state = load_sparse_state(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    torch_dtype = _torch_dtype(dtype)
    widths = _recorded_widths(path)
    if widths is None:
        cls = _model_class(config, path, trust_remote_code)
        model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True,
                                          dtype="auto" if torch_dtype is None else torch_dtype)
        missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    else:
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from ..surgery import resize_to_
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch_dtype)
        resize_to_(model, widths)
        missing, unexpected = map(set, model.load_state_dict(state, strict=False))
        model.tie_weights()                    # the tied output embedding is saved once
    missing = {k for k in missing if not _tied(model, k)}
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit the model built from config.json (missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    _generation_config(model, path)
    model.eval()
    return model, _tokenizer(path, trust_remote_code)


# --------------------------------------------------------------------------- offloaded inference

@dataclass
class SparseOffload:
    """What `offloaded_sparse_model` attached to the model (``model.prunekit_sparse_offload``)."""
    device: torch.device
    blocks: int                          # decoder blocks with compressed weights
    tensors: int                         # compressed weights, kept in host memory
    compressed_bytes: int                # their bitmaps + values
    largest_block_bytes: int             # the most dense bytes one block materialises at a time
    handles: list

    def remove(self) -> None:
        """Detach the hooks; the compressed weights then stay unmaterialised (meta) and the model cannot run."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _set_tensor(model: nn.Module, name: str, value: Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if parameter:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def offloaded_sparse_model(path: str | os.PathLike, device="cpu", dtype="float32", trust_remote_code: bool = False):
    """``(model, tokenizer)`` whose block weights stay compressed in host memory until their block runs.

    Endor-style offloaded inference (arXiv 2406.11674): each decoder block gets a forward pre-hook that
    decompresses its weights (`decompress`, bit unpack + scatter) onto `device` just before it runs and
    a forward hook (also on errors) that drops them after, so resident memory is about the compressed
    weights plus the dense non-block tensors plus one dense block; on an accelerator only the compressed
    bytes cross the bus and decompression runs there. Everything else (embeddings, norms, head, block
    weights too dense to compress) is loaded dense onto `device`. Outputs equal `load_sparse`'s model
    (same weights, same modules). The model is built as a meta skeleton (`core.residency.empty_model`;
    non-uniform widths re-sliced by `surgery.resize_to_`), so no dense copy of the whole model is ever
    made. Checkpoints must use the model's own parameter names (MoE per-expert keys are not supported:
    use `load_sparse`). `model.prunekit_sparse_offload` (`SparseOffload`) says what is held where.

    device: "cpu", "cuda", "cuda:N" (a torch.device works too).
    dtype:  "float32" (default), "bfloat16", "float16" or "auto" (the checkpoint's dtype).
    """
    from transformers import AutoConfig

    from ..core.memory import return_freed_memory
    from ..core.residency import empty_model
    from ..surgery import resize_to_

    path = Path(path)
    device = torch.device(device)
    dense, packed = read_sparse(path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is None:
        stored = [t.dtype for t in (*dense.values(), *(p.values for p in packed.values())) if t.dtype in _FLOATS]
        torch_dtype = max(set(stored), key=stored.count) if stored else torch.float32
    model = empty_model(config, torch_dtype)
    widths = _recorded_widths(path)
    if widths is not None:
        resize_to_(model, widths)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    for name, tensor in dense.items():
        if name in params:
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the config builds "
                                 f"{tuple(params[name].shape)}")
            value = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor
            _set_tensor(model, name, value.to(device), parameter=True)
        elif name in buffers:
            buffers[name].copy_(tensor)
        else:
            raise ValueError(f"{path}: tensor {name} is not a parameter of the model built from config.json; "
                             "offloaded_sparse_model needs the model's own names (use load_sparse)")
    del dense
    pattern = _block_pattern(config.to_dict())
    by_block: dict[str, list[tuple[str, Packed, nn.Parameter]]] = {}
    for name, item in packed.items():
        match = pattern.match(name)
        if name not in params or match is None or tuple(params[name].shape) != item.shape:
            raise ValueError(f"{path}: compressed tensor {name} {item.shape} is not a block parameter of the model "
                             "built from config.json (use load_sparse)")
        item.values = item.values.to(torch_dtype)      # the cast `from_pretrained` would make, once
        if device.type == "cuda":
            item.bitmap, item.values = item.bitmap.pin_memory(), item.values.pin_memory()
        placeholder = nn.Parameter(torch.empty(item.shape, dtype=torch_dtype, device="meta"), requires_grad=False)
        _set_tensor(model, name, placeholder.data, parameter=True)
        by_block.setdefault(f"{match['blocks']}.{match['index']}", []).append((name, item, placeholder))
    for name, buffer in model.named_buffers():
        _set_tensor(model, name, buffer.to(device), parameter=False)
    model.tie_weights()
    still_meta = sorted(n for n, p in model.named_parameters() if p.is_meta and n not in packed)
    if still_meta:
        raise ValueError(f"{path}: no weights for {still_meta[:5]} in the checkpoint")

    def onload(entries):
        def hook(module, args, kwargs=None):
            for name, item, _ in entries:
                weight = decompress(item.bitmap.to(device, non_blocking=True),
                                    item.values.to(device, non_blocking=True), item.shape, check=False)
                _set_tensor(model, name, weight, parameter=True)
        return hook

    def offload(entries):
        def hook(module, args, output):
            for name, _, placeholder in entries:
                _set_tensor(model, name, placeholder.data, parameter=True)
        return hook

    handles = []
    for block_name, entries in by_block.items():
        block = model.get_submodule(block_name)
        handles.append(block.register_forward_pre_hook(onload(entries)))
        handles.append(block.register_forward_hook(offload(entries), always_call=True))
    _generation_config(model, path)
    model.prunekit_sparse_offload = SparseOffload(
        device=device, blocks=len(by_block), tensors=len(packed),
        compressed_bytes=sum(item.nbytes for item in packed.values()),
        largest_block_bytes=max((sum(math.prod(i.shape) for _, i, _ in e) * torch_dtype.itemsize
                                 for e in by_block.values()), default=0),
        handles=handles)
    return_freed_memory()
    return model.eval(), _tokenizer(path, trust_remote_code)
