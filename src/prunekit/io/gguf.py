"""GGUF files as models: convert one to a cached float safetensors checkpoint, once.

GGUF is slow to convert (parsing + dequantizing every tensor), so the first load writes the float
model as safetensors into a cache (`cache_dir`, else `$PRUNEKIT_CACHE`, else `~/.cache/prunekit`)
in a folder keyed by the file's name and sha256; later loads read the cache like any local
checkpoint. A GGUF-loaded model carries a `quantization_config` that `save_pretrained` refuses, so
the cache is written from a fresh model built from the config without it. The cache folder
appears atomically (temp folder + rename): a crash or a corrupt file never leaves a half-written
cache that a later run would trust. A GGUF's tensor table is checked against its size before
conversion, and a damaged conversion cache is rebuilt.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .atomic import clean_stale_staging, staging_dir, unmark
from .checkpoint import CorruptCheckpointError, check_checkpoint, file_sha256, is_tied_alias

log = logging.getLogger("prunekit")


GGUF_MAGIC = b"GGUF"


_CACHE_SOURCE_FILE = "prunekit-source.json"


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
    missing = [k for k in missing if not is_tied_alias(plain, k)]
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


def _build_gguf_cache(path: Path, target: Path, trust_remote_code: bool) -> None:
    """Convert `path` and publish it as `target` atomically (temp folder + rename)."""
    import transformers

    started = time.perf_counter()
    model, tokenizer = _convert_gguf(path, trust_remote_code)  # fails before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    tmp = staging_dir(target)           # marked: what a killed conversion leaves is removed by the next one
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
            stale = staging_dir(target, "old")
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        unmark(tmp)
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
