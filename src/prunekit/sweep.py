"""`prunekit sweep`: one recipe, a grid of overrides, one results row per point, resumable.

    prunekit sweep recipe.yaml --grid steps.0.method=wanda,sparsegpt steps.0.sparsity=0.3,0.5,0.7 --out DIR

Each ``--grid`` is the cartesian product of its axes (``KEY=V1,V2,...``; values are YAML
scalars or flow lists, split on commas outside brackets, so ``steps.0.nm=null,[2,4]`` is two
values); several ``--grid`` flags are the union of their products; duplicate points run once.
Every point is validated as a recipe before any work, so a typo fails in a second.

What is shared between points, because it does not depend on them: the dense model is loaded
once and each point prunes a deep copy of it; calibration windows are tokenized once per
distinct calibration section; the dense evaluation reference (prunekit.eval.suites) is computed
once and saved in DIR/reference/. Each point prunes through `api.apply_steps`, the same path as
`prunekit run`.

Bookkeeping, so an interrupted sweep resumes where it stopped:

* DIR/sweep.json -- base recipe, grid, suites and protocol. Re-running the same command skips
  finished points; a command whose recipe/grid/suites/protocol differ is refused (naming which),
  because its rows would not be comparable with the ones already written.
* DIR/results.jsonl -- one JSON row per finished point, flushed and fsynced; a partial last line
  (the process was killed mid-write) is dropped on resume.
* DIR/results.csv -- the same rows as flat columns, rewritten atomically after every point.
* DIR/models/<id>/ -- with ``--save-models``, each point's export (atomic, with its model card).

No paper: this is experiment bookkeeping around the pruning methods.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import re
import time
from pathlib import Path

from .io.atomic import write_atomic

SWEEP_FILE = "sweep.json"
RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
REFERENCE_DIR = "reference"
# The flat metric columns of a row: (column, suite, key in that suite's result).
METRICS = (("ppl", "perplexity", "ppl"), ("kl_mean", "fidelity", "kl_mean"),
           ("top1_agreement", "fidelity", "top1_agreement"), ("fdt", "fidelity", "first_divergent_token_mean"),
           ("sdt", "fidelity", "share_divergent_tokens"), ("exact_match", "knowledge", "exact_match"),
           ("mc_accuracy", "knowledge", "mc_accuracy"), ("retention_exact", "knowledge", "retention_exact"),
           ("retention_mc", "knowledge", "retention_mc"))
# Recipe keys a point may not change: the dense model and its reference are shared by all points.
SHARED = ("model", "dtype", "trust_remote_code", "allow_pickle", "eval")


# ---------------------------------------------------------------------------------------------- grid

def split_values(text: str) -> list[str]:
    """'0.3,[2,4],null' -> ['0.3', '[2,4]', 'null']: commas inside [] or {} belong to a value."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    if depth != 0 or any(not v.strip() for v in values):
        raise ValueError(f"cannot split {text!r} into values: unbalanced brackets or an empty value "
                         "(write e.g. steps.0.nm=null,[2,4])")
    return [v.strip() for v in values]


def parse_axis(text: str) -> tuple[str, list]:
    """'steps.0.sparsity=0.3,0.5' -> ('steps.0.sparsity', [0.3, 0.5]) (values parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"--grid expects KEY=V1,V2,... (e.g. steps.0.sparsity=0.3,0.5), got {text!r}")
    key, values = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--grid {text!r}: empty key")
    from .recipe import safe_yaml
    return key, [safe_yaml(v, f"--grid {key}={v}") for v in split_values(values)]


def expand_grid(grids: list[list[str]]) -> list[tuple[tuple[str, object], ...]]:
    """The points of several grids: each grid the product of its axes, the union of the grids,
    duplicates (the same key=value set in any order) kept once, in first-seen order."""
    points, seen = [], set()
    for grid in grids:
        axes = [parse_axis(text) for text in grid]
        keys = [key for key, _ in axes]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--grid {' '.join(grid)}: an axis appears twice")
        for values in itertools.product(*(vals for _, vals in axes)):
            point = tuple(sorted(zip(keys, values), key=lambda kv: kv[0]))
            pid = point_id(point)
            if pid not in seen:
                seen.add(pid)
                points.append(point)
    if not points:
        raise ValueError("give at least one --grid KEY=V1,V2,...")
    return points


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def point_id(point) -> str:
    """Canonical name of a point: its overrides sorted by key, e.g. 'steps.0.method=wanda steps.0.sparsity=0.5'."""
    return " ".join(f"{key}={_value_text(value)}" for key, value in point)


def folder_name(pid: str) -> str:
    """A file-system-safe folder name for a point id: no separator, and never "." or ".." (DIR/models/.. is
    the sweep folder itself)."""
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", pid.replace(" ", "__")).strip("_")
    return name if name.strip(".") else "point"


# ---------------------------------------------------------------------------------------------- planning

def plan(raw: dict, grids: list[list[str]]):
    """Validate every point before any work: [(point, id, recipe)], refusing points that change
    what all points share (the model or the evaluation)."""
    from .recipe import apply_override, recipe_from_dict, recipe_to_dict
    base = recipe_from_dict(copy.deepcopy(raw))
    if base.offload == "disk":
        raise ValueError("prunekit sweep keeps the dense model in memory and prunes a copy per point; "
                         "offload: disk is for single runs (`prunekit run RECIPE --offload disk` per point), "
                         "use --set offload=cpu to keep the sweep's activations on the CPU")
    shared = {key: recipe_to_dict(base).get(key) for key in SHARED}
    planned = []
    for point in expand_grid(grids):
        pid = point_id(point)
        point_raw = copy.deepcopy(raw)
        point_raw.pop("export", None)                 # a sweep exports under DIR/models/ or not at all
        try:
            for key, value in point:
                apply_override(point_raw, f"{key}={_value_text(value)}")
            recipe = recipe_from_dict(point_raw)
        except (ValueError, TypeError) as err:
            raise ValueError(f"grid point {pid!r}: {err}") from None
        as_dict = recipe_to_dict(recipe)
        for key in SHARED:
            if as_dict.get(key) != shared[key]:
                raise ValueError(f"grid point {pid!r} changes {key!r}, which every point shares (one dense model "
                                 "and one evaluation reference per sweep); run one sweep per value")
        planned.append((point, pid, recipe))
    return base, planned


def eval_protocol(base, settings: list[str] = ()):
    """The suites' protocol: the recipe's eval section (data, seqlen, stride, max_tokens), then
    `--protocol key=value` settings."""
    from .eval.suites import EvalProtocol
    from .recipe import safe_yaml
    values = {}
    if base.eval is not None:
        values = {"data": base.eval.data, "seqlen": base.eval.seqlen, "stride": base.eval.stride,
                  "max_tokens": base.eval.max_tokens}
    for setting in settings:
        if "=" not in setting:
            raise ValueError(f"--protocol expects key=value (e.g. fidelity_tokens=1024), got {setting!r}")
        key, value = setting.split("=", 1)
        values[key.strip()] = safe_yaml(value, f"--protocol {setting}")
    return EvalProtocol.from_dict(values)


# ---------------------------------------------------------------------------------------------- files

def read_rows(out: Path) -> list[dict]:
    """Finished rows; a partial last line (killed mid-write) is cut off so appends stay valid."""
    path = out / RESULTS_JSONL
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        data = data[:data.rfind(b"\n") + 1]
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def append_row(out: Path, row: dict) -> None:
    with open(out / RESULTS_JSONL, "a") as fh:
        fh.write(json.dumps(row, sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def flat_row(row: dict) -> dict:
    """The CSV form of a row: scalars only."""
    flat = {"id": row["id"], "method": row["method"], "sparsity": row.get("sparsity"),
            "nm": ":".join(map(str, row["nm"])) if row.get("nm") else "",
            "achieved_sparsity": row.get("achieved_sparsity"), "zero_fraction": row.get("zero_fraction"),
            "removed_fraction": row.get("removed_fraction"), "parameters_after": row.get("parameters_after"),
            "prune_seconds": row.get("prune_seconds"), "eval_seconds": row.get("eval_seconds")}
    flat.update({column: row.get("metrics", {}).get(column) for column, _, _ in METRICS})
    flat["warnings"] = " | ".join(row.get("warnings") or [])
    return flat


def write_csv(out: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    flats = [flat_row(row) for row in rows]
    writer = csv.DictWriter(buffer, fieldnames=list(flats[0]) if flats else ["id"])
    writer.writeheader()
    writer.writerows(flats)
    write_atomic(out / RESULTS_CSV, buffer.getvalue())


def check_or_write_manifest(out: Path, manifest: dict) -> None:
    path = out / SWEEP_FILE
    if path.exists():
        old = json.loads(path.read_text())
        differ = [key for key in ("recipe", "grid", "suites", "protocol") if old.get(key) != manifest[key]]
        if differ:
            raise ValueError(f"{out} holds a sweep with another {', '.join(differ)} (see {path}); its rows would "
                             "not be comparable: use another --out, or re-run the original command to resume")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- running

def run_sweep(recipe, grids: list[list[str]], out, *, suites=("perplexity",), overrides: list[str] = (),
              protocol: list[str] = (), save_models: bool = False, progress: bool = False, echo=print) -> list[dict]:
    """Run every grid point of `recipe` (a path or YAML text) not yet in `out`; return all rows."""
    from .api import check_seqlen
    from .card import without_export
    from .eval.suites import parse_suites
    from .io.export import to_jsonable
    from .io.loading import describe_source, load, resolve_device
    from .recipe import apply_override, recipe_to_dict, safe_yaml

    if str(recipe).endswith((".yaml", ".yml")) and not Path(str(recipe)).is_file():
        raise FileNotFoundError(f"recipe file not found: {recipe}")
    text = Path(recipe).read_text() if Path(str(recipe)).is_file() else str(recipe)
    raw = safe_yaml(text, f"recipe {recipe}")      # plain data only: a Python tag is refused, nothing runs
    if not isinstance(raw, dict):
        raise ValueError(f"{recipe}: a recipe is a mapping (model:, steps:, ...)")
    for override in overrides:
        apply_override(raw, override)
    base, planned = plan(raw, grids)
    if base.export is not None:
        echo(f"note: the recipe's export ({base.export.path}) is not used by a sweep; --save-models writes "
             "each point to DIR/models/<point>/")
    suites = parse_suites(suites)
    proto = eval_protocol(base, protocol)
    out = Path(out)
    source = describe_source(base.model)
    if source.get("path") and _inside(out, Path(source["path"])):
        raise ValueError(f"refusing to write the sweep into the input model {source['path']}; choose another --out")
    manifest = {"recipe": to_jsonable(recipe_to_dict(without_export(base))), "grid": [list(g) for g in grids],
                "suites": list(suites), "protocol": proto.to_dict(), "points": [pid for _, pid, _ in planned]}
    check_or_write_manifest(out, manifest)
    rows = read_rows(out)
    done = {row["id"] for row in rows}
    todo = [entry for entry in planned if entry[1] not in done]
    for _, pid, _ in planned:
        if pid in done:
            echo(f"skip {pid}: done")
    if not todo:
        write_csv(out, rows)
        return rows

    device = resolve_device(base.device)
    dense, tokenizer = load(base.model, dtype=base.dtype, trust_remote_code=base.trust_remote_code,
                            allow_pickle=base.allow_pickle)
    check_seqlen(dense.config, base)
    reference = _reference(dense, tokenizer, suites, proto, device, out / REFERENCE_DIR, echo,
                           trust_remote_code=base.trust_remote_code)
    windows: dict = {}
    for index, (point, pid, point_recipe) in enumerate(todo):
        echo(f"[{index + 1}/{len(todo)}] {pid}")
        row = run_point(dense, tokenizer, point, pid, point_recipe, windows, suites=suites, protocol=proto,
                        reference=reference, device=device, progress=progress, echo=echo,
                        save_to=out / "models" / folder_name(pid) if save_models else None,
                        protect=[source["path"]] if source.get("path") else [])
        append_row(out, row)
        rows.append(row)
        write_csv(out, rows)
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if isinstance(v, (int, float)))
        echo(f"  achieved sparsity {row['achieved_sparsity']:.2%}; {metrics}")
    return rows


def run_point(dense, tokenizer, point, pid, recipe, windows: dict, *, suites, protocol, reference, device,
              progress=False, echo=print, save_to=None, protect=()) -> dict:
    """Prune a copy of `dense` by `recipe`, evaluate it, return the results row (and export it to
    `save_to` when given). `windows` caches calibration windows by calibration section."""
    from .api import apply_steps, needs_calibration
    from .eval.suites import evaluate
    from .registry import method_for_config
    from .report import parameter_counts, sparsity_report

    calib = None
    if any(needs_calibration(step) for step in recipe.steps):
        c = recipe.calibration
        key = (c.source, c.samples, c.seqlen, c.seed)
        if key not in windows:
            from .data import calibration_data
            windows[key] = calibration_data(tokenizer, c.source, samples=c.samples, seqlen=c.seqlen, seed=c.seed)
        calib = windows[key]
    model = copy.deepcopy(dense)
    started = time.perf_counter()
    reports, adapters = apply_steps(model, tokenizer, recipe, calib, device=device, progress=progress,
                                    echo=lambda *_: None)
    prune_seconds = time.perf_counter() - started
    handles = []
    if adapters:                          # evaluate what a user runs: sparse weights plus the adapter
        from .eora import attach_adapters
        handles = attach_adapters(model, adapters)
    started = time.perf_counter()
    try:
        result = evaluate(model, tokenizer, suites, protocol, reference=reference, device=device,
                          trust_remote_code=recipe.trust_remote_code)
    finally:
        for handle in handles:
            handle.remove()
    eval_seconds = time.perf_counter() - started
    first = recipe.steps[0]
    metrics = {column: result["suites"].get(suite, {}).get(key) for column, suite, key in METRICS
               if suite in result["suites"]}
    sparsity = sparsity_report(model)
    # One x axis for every kind of point: the share of the dense decoder-block weights that is gone,
    # zeroed (unstructured, N:M) or removed (width, depth), or both for chained recipes.
    removed = 1 - parameter_counts(model)[0] / parameter_counts(dense)[0]
    achieved = 1 - (1 - removed) * (1 - sparsity["block_linear_sparsity"])
    row = {"id": pid, "overrides": {key: value for key, value in point},
           "method": "+".join(method_for_config(step).name for step in recipe.steps),
           "scope": method_for_config(first).scope,
           "sparsity": getattr(first, "sparsity", None), "nm": list(first.nm) if getattr(first, "nm", None) else None,
           "achieved_sparsity": achieved, "zero_fraction": sparsity["block_linear_sparsity"],
           "removed_fraction": removed,
           "parameters": parameter_counts(dense)[1], "parameters_after": parameter_counts(model)[1],
           "prune_seconds": round(prune_seconds, 3), "eval_seconds": round(eval_seconds, 3),
           "metrics": metrics,
           "protocol": {suite: values.get("protocol") for suite, values in result["suites"].items()
                        if isinstance(values, dict) and isinstance(values.get("protocol"), str)},
           "warnings": list(result.get("warnings") or []),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if save_to is not None:
        _export(model, tokenizer, recipe, reports, adapters, row, result, save_to, protect)
        row["model_dir"] = str(save_to)
    return row


def _export(model, tokenizer, recipe, reports, adapters, row, result, save_to, protect) -> None:
    """Save a sweep point as `prunekit run` would, with the sweep's evaluation in its prunekit.json."""
    from .api import export_model
    from .io.loading import describe_source
    from .recipe import recipe_to_dict
    from .report import sparsity_report
    from .surgery import structure_record
    record = {"recipe": recipe_to_dict(recipe), "source": describe_source(recipe.model), "steps": reports,
              "parameters": row["parameters"], "parameters_after": row["parameters_after"],
              "sparsity": sparsity_report(model), "eval": result, "structure": structure_record(model)}
    if result["suites"].get("perplexity"):
        record["pruned_perplexity"] = result["suites"]["perplexity"]
    export_model(model, tokenizer, recipe, record, adapters, save_to, overwrite=True, protect=protect)


def _reference(dense, tokenizer, suites, protocol, device, folder: Path, echo, trust_remote_code: bool = False):
    """The dense reference, loaded from `folder` when a previous run of this sweep saved it."""
    from .eval.suites import Reference, reference
    if folder.exists():
        echo(f"dense reference: {folder} (saved by an earlier run of this sweep)")
        return Reference.load(folder, protocol=protocol, suites=suites)
    echo("dense reference: measuring the dense model once for every point")
    ref = reference(dense, tokenizer, suites, protocol, device=device, trust_remote_code=trust_remote_code)
    ref.save(folder)                        # atomic: a killed run leaves no half-written reference
    return ref


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


# ---------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers):
    parser = subparsers.add_parser("sweep", help="run a recipe over a grid of overrides; one results row per point")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--grid", action="append", nargs="+", required=True, metavar="KEY=V1,V2",
                        help="axes of one grid (their product); repeat --grid for a union of grids, "
                             "e.g. --grid steps.0.method=wanda,sparsegpt steps.0.sparsity=0.3,0.5")
    parser.add_argument("--out", required=True, type=Path, help="sweep folder (results.jsonl/.csv, sweep.json)")
    parser.add_argument("--suite", default="perplexity", help="evaluation suites: perplexity,fidelity,knowledge")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the base recipe")
    parser.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluation protocol field, e.g. fidelity_tokens=1024 (default: the recipe's eval)")
    parser.add_argument("--save-models", action="store_true", help="export each point under DIR/models/<id>/")
    parser.set_defaults(handler=_cli)
    return parser


def _cli(args) -> int:
    if not args.recipe.is_file():
        raise FileNotFoundError(f"recipe file not found: {args.recipe}")
    rows = run_sweep(args.recipe, args.grid, args.out, suites=args.suite, overrides=args.set,
                     protocol=args.protocol, save_models=args.save_models)
    print(f"{len(rows)} points in {args.out / RESULTS_CSV}; `prunekit report {args.out}` renders them")
    return 0
