"""Recipes: YAML -> frozen dataclasses -> function arguments, and back.

    model: default                       # hub id, local dir, .gguf file, or "default"
    calibration: {source: default, samples: 128, seqlen: 512, seed: 0}
    steps:
      - {method: wanda, sparsity: 0.5, nm: [2, 4]}
    eval: {data: default, seqlen: 512}
    export: {path: out/smollm2-wanda-2of4}

`load_recipe` validates every key (an unknown key names the nearest valid one), `--set a.b=v`
overrides are applied to the raw mapping before validation, and `dump_recipe` writes only the
sections in full and steps without their default values, so load -> dump reproduces a
canonical file exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .catalog import get_method
from .registry import method_for_config
from .selection import CALIBRATION


CALIBRATION_SELECTORS = CALIBRATION        # the prunekit.selection methods that choose calibration windows


@dataclass(frozen=True)
class Calibration:
    source: str = "default"       # "default" (offline), a .txt/.jsonl file or dir, or wikitext2 / c4 / ptb
    samples: int = 128            # number of random windows
    seqlen: int = 512             # tokens per window (capped; never max_position_embeddings)
    seed: int = 0
    batch_size: int = 8           # windows per forward pass
    select: str | None = None     # choose the `samples` windows from `pool` random ones (prunekit.selection)
    pool: int | None = None       # candidate windows for `select` (default 16 x samples)
    scores: str | None = None     # directory keeping `select`'s scores of the pool for later runs (windows.py)

    def __post_init__(self):
        for name in ("samples", "seqlen", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"calibration.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.seqlen < 2:
            raise ValueError("calibration.seqlen must be at least 2")
        if self.select is not None and self.select not in CALIBRATION_SELECTORS:
            raise ValueError(f"calibration.select must be one of {', '.join(CALIBRATION_SELECTORS)}, got "
                             f"{self.select!r}")
        if self.scores is not None and self.select is None:
            raise ValueError("calibration.scores keeps the scores of calibration.select: set select too")
        if self.pool is not None:
            if self.select is None:
                raise ValueError("calibration.pool is the candidate windows of calibration.select: set select too")
            if not isinstance(self.pool, int) or self.pool <= self.samples:
                raise ValueError(f"calibration.pool must be an integer larger than samples ({self.samples}), "
                                 f"got {self.pool!r}")

    @property
    def pool_size(self) -> int:
        return self.pool if self.pool is not None else 16 * self.samples


@dataclass(frozen=True)
class Evaluation:
    data: str = "default"         # evaluation text source (its held-out split)
    seqlen: int = 512
    stride: int | None = None     # None: non-overlapping windows
    max_tokens: int | None = None
    dense: bool = True            # also measure the model before pruning

    def __post_init__(self):
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"eval.seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.stride is not None and not 0 < self.stride <= self.seqlen:
            raise ValueError(f"eval.stride must be in [1, seqlen], got {self.stride!r}")


@dataclass(frozen=True)
class Export:
    path: str
    overwrite: bool = False
    format: str = "safetensors"     # gguf: also write model.gguf (llama.cpp) into the export folder
    outtype: str = "f16"            # GGUF weight type: f32, f16, bf16, q8_0

    def __post_init__(self):
        if self.format not in ("safetensors", "gguf"):
            raise ValueError(f"export.format must be safetensors or gguf, got {self.format!r}")
        if self.outtype not in ("f32", "f16", "bf16", "q8_0"):
            raise ValueError(f"export.outtype must be f32, f16, bf16 or q8_0, got {self.outtype!r}")


@dataclass(frozen=True)
class Recipe:
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"                   # compute device: cpu, cuda, cuda:1, auto
    sequential: str = "true"              # "true": one pass, later groups see pruned inputs; "block": reference order
    cache_device: str | None = None       # where cached activations live; "cpu" = low-memory mode on a GPU
    offload: str = "none"                 # none | cpu (model+activations on CPU) | disk (stream blocks from checkpoint)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    calibration: Calibration = field(default_factory=Calibration)
    steps: tuple = ()
    eval: Evaluation | None = None
    export: Export | None = None

    def __post_init__(self):
        if not self.steps:
            raise ValueError("a recipe needs at least one step, e.g. steps: [{method: wanda, sparsity: 0.5}]")
        if self.sequential not in ("true", "block"):
            raise ValueError(f"sequential must be 'true' or 'block', got {self.sequential!r}")
        if self.offload not in ("none", "cpu", "disk"):
            raise ValueError(f"offload must be none, cpu or disk, got {self.offload!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        # the form only (no torch, no CUDA here); whether the device exists is checked when the run starts
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.cache_device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.cache_device)):
            raise ValueError(f"cache_device must be cpu, cuda or cuda:N, got {self.cache_device!r}")
        scopes = [method_for_config(step).scope for step in self.steps]
        for index, scope in enumerate(scopes):
            if scope == "search" and self.offload == "disk":
                raise ValueError(f"steps.{index}: the structure search keeps the model in memory (it evaluates many "
                                 "candidates); offload: disk is not supported for it (use offload: cpu or none)")
            if scope == "compensate" and (index == 0 or scopes[index - 1] != "linear"):
                raise ValueError(f"steps.{index}: {method_for_config(self.steps[index]).name} compensates the "
                                 "unstructured/N:M step right before it (e.g. [{method: sparsegpt, sparsity: 0.6}, "
                                 "{method: eora, rank: 16}])")


_SECTIONS = {"calibration": Calibration, "eval": Evaluation, "export": Export}


def recipe_from_dict(raw: dict) -> Recipe:
    if not isinstance(raw, dict):
        raise ValueError(f"a recipe is a mapping (model:, steps:, ...), got {type(raw).__name__}")
    _check_keys("recipe", raw, Recipe)
    values = dict(raw)
    _check_types("", values, Recipe)
    for key, cls in _SECTIONS.items():
        if values.get(key) is not None:
            if not isinstance(values[key], dict):
                raise ValueError(f"{key} must be a mapping, got {values[key]!r}")
            _check_keys(key, values[key], cls)
            section = dict(values[key])
            _check_types(f"{key}.", section, cls)
            if key == "export" and "path" not in section:
                raise ValueError("export needs a path, the output folder: export: {path: out/pruned-model}")
            values[key] = cls(**section)
    steps = values.get("steps") or []
    if not isinstance(steps, list):
        raise ValueError("steps must be a list of {method: ..., ...} mappings")
    values["steps"] = tuple(step_from_dict(step, f"steps.{i}") for i, step in enumerate(steps))
    return Recipe(**values)


def step_from_dict(raw: dict, where: str = "step"):
    if not isinstance(raw, dict) or "method" not in raw:
        raise ValueError(f"{where} must be a mapping with a 'method' key, got {raw!r}")
    values = dict(raw)
    name = values.pop("method")
    if not isinstance(name, str):
        raise ValueError(f"{where}.method must be a method name such as wanda (see `prunekit list`), got {name!r}")
    method = get_method(name)
    _check_keys(where, values, method.config_cls)
    _check_types(f"{where}.", values, method.config_cls)
    for key in ("nm", "targets", "ignore"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    _check_nm_agrees(where, values.get("sparsity"), values.get("nm"))
    return method.config_cls(**values)


def _check_nm_agrees(where: str, sparsity, nm) -> None:
    """An N:M pattern zeroes exactly N/M of the weights; a different sparsity given beside it would be
    silently ignored (the config derives sparsity from nm), so the two together must agree."""
    if sparsity is None or not isinstance(nm, tuple) or len(nm) != 2:
        return
    n, m = nm
    if isinstance(n, int) and isinstance(m, int) and m > 0 and isinstance(sparsity, (int, float)) \
            and abs(sparsity - n / m) > 1e-9:
        raise ValueError(f"{where}: sparsity {sparsity:g} and nm {n}:{m} disagree: N:M zeroes exactly N/M = "
                         f"{n / m:g} of the weights; give only --nm (or only --sparsity for unstructured)")


def load_recipe(path_or_text: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe from a YAML file (or YAML text), apply `a.b.c=value` overrides, validate."""
    is_file = _is_file(path_or_text)
    try:
        text = Path(path_or_text).read_text(encoding="utf-8") if is_file else str(path_or_text)
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {path_or_text} is not UTF-8 text (byte {err.start}: {err.reason}); a recipe is a "
                         "YAML file") from None
    raw = safe_yaml(text, f"recipe {path_or_text}" if is_file else "recipe")
    for override in overrides:
        apply_override(raw, override)
    return recipe_from_dict(raw)


def apply_override(raw: dict, override: str) -> None:
    """`steps.0.sparsity=0.6` sets raw["steps"][0]["sparsity"] = 0.6 (the value is parsed as YAML)."""
    if "=" not in override:
        raise ValueError(f"--set expects key=value (e.g. steps.0.sparsity=0.6), got {override!r}")
    path, value = override.split("=", 1)
    keys = path.strip().split(".")
    node = raw
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[:depth + 1]), create=True)
    last = keys[-1]
    parsed = safe_yaml(value, f"--set {override}")
    if isinstance(node, list):
        node[_index(node, last, path)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise ValueError(f"--set {path}: {path.rsplit('.', 1)[0]} is {node!r}, not a mapping with keys")


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping: PyYAML would silently keep the last
    one, so a recipe with two `steps:` sections would run only the second."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key.value!r} is given twice in one mapping (YAML would keep only "
                        "the last one); remove one of them", key.start_mark)
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def safe_yaml(text: str, where: str):
    """Plain YAML data only. The safe loader never constructs Python objects, so a tag such as
    `!!python/object/apply:os.system` cannot run anything; it is refused here with a message
    instead of a parser traceback. A key given twice is refused too (`_UniqueKeyLoader`)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)      # a SafeLoader: plain data only
    except yaml.YAMLError as err:
        if "python/" in str(err):
            raise ValueError(f"{where}: refused a YAML tag that would construct a Python object ({_first_line(err)}); "
                             "recipes are plain data (mappings, lists, numbers, strings) and are read with "
                             "YAML's safe loader, so nothing was executed. Remove the tag") from None
        raise ValueError(f"{where} is not valid YAML: {err}") from None


def _first_line(err) -> str:
    """'could not determine a constructor for the tag ... at line 3, column 8' from a YAMLError."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None, width=100)


def recipe_to_dict(recipe: Recipe) -> dict:
    """Model and sections in full (a recipe file documents its protocol), steps minimal."""
    out = {"model": recipe.model}
    out.update(_non_default(recipe, skip=("model", "steps", *_SECTIONS)))
    out["calibration"] = {k: v for k, v in dataclasses.asdict(recipe.calibration).items()
                          if v is not None or k not in ("select", "pool", "scores")}     # selection: when asked
    out["steps"] = [step_to_dict(step) for step in recipe.steps]
    if recipe.eval is not None:
        out["eval"] = dataclasses.asdict(recipe.eval)
    if recipe.export is not None:      # the format fields only when they say more than the default folder
        out["export"] = {"path": recipe.export.path, "overwrite": recipe.export.overwrite,
                         **_non_default(recipe.export, skip=("path", "overwrite"))}
    return out


def step_to_dict(step) -> dict:
    out = {"method": method_for_config(step).name}
    skip = ("sparsity",) if getattr(step, "nm", None) is not None else ()
    out.update(_non_default(step, skip=skip))
    return out


def _non_default(obj, skip=()) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _check_keys(where: str, raw: dict, cls) -> None:
    valid = [f.name for f in fields(cls)]
    if where.startswith("step"):
        valid = ["method", *valid]
    for key in raw:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r} in {where}{hint} (valid: {', '.join(valid)})")


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "tuple[int, int]": "a pair of integers such as [2, 4]",
               "tuple[str, ...]": "a string or a list of strings", "dict": "a mapping such as {'o_proj': 0.3}"}


def _check_types(prefix: str, values: dict, cls) -> None:
    """Every value has the type its field declares (`prefix` + name in the message): a real bool (YAML true/false)
    where a field says bool, a string where it says str, a number where it says float. The configs' own checks
    then compare values; without this a value of the wrong type failed deep inside the run in Python's words
    ("'<' not supported between 'int' and 'str'"), or was silently truthy (`trust_remote_code: 'no'`).
    Paths (os.PathLike) given from Python for a str field become strings."""
    declared = {f.name: str(f.type) for f in fields(cls)}
    for name, value in values.items():
        kind = declared.get(name, "")
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if value is None and optional or kind not in _TYPE_WORDS:
            continue
        if kind == "str" and isinstance(value, os.PathLike):
            values[name] = os.fspath(value)
        elif not _has_type(value, kind):
            hint = ""
            if isinstance(value, str) and kind in ("int", "float") and _is_number(value):
                hint = " (write the number without quotes; YAML reads 1e-4 as text, 1.0e-4 as a number)"
            elif isinstance(value, str) and kind == "bool":
                hint = " (write true or false, without quotes)"
            raise ValueError(f"{prefix}{name} must be {_TYPE_WORDS[kind]}{' or null' if optional else ''}, "
                             f"got {value!r}{hint}")


def _has_type(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "tuple[int, int]":
        return isinstance(value, (list, tuple)) and all(_has_type(v, "int") for v in value)
    if kind == "dict":
        return isinstance(value, dict)
    # tuple[str, ...]: one pattern, or a list of them
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _child(node, key: str, where: str, create: bool):
    if isinstance(node, list):
        return node[_index(node, key, where)]
    if not isinstance(node, dict):
        raise ValueError(f"--set {where}: {where.rsplit('.', 1)[0]} is not a mapping")
    if key not in node or node[key] is None:
        if not create:
            raise ValueError(f"--set {where}: no such key")
        node[key] = {}
    return node[key]


def _index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ValueError(f"--set {where}: {key!r} is not an index of a list of {len(node)} items")
    return int(key)


def _is_file(value) -> bool:
    if isinstance(value, Path):
        return True
    text = str(value)
    if "\n" in text or ":" in text and not text.endswith((".yaml", ".yml")):
        return False
    if text.endswith((".yaml", ".yml")) and not Path(text).exists():
        raise FileNotFoundError(f"recipe file not found: {text}")
    return Path(text).is_file()
