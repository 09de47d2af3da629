"""Command line: `prunekit prune`, `prunekit eval`, `prunekit run`, `prunekit recover`, `prunekit bench`,
`prunekit list`.

`prune` builds a one-step recipe from its flags and takes the same path as `run`, so a command
line and a recipe file can never disagree. Errors in the user's input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError, TypeError, RuntimeError, FloatingPointError) as err:
        # OSError covers a missing file, an existing --out and a full disk (export.DiskFullError);
        # FloatingPointError is NaN/Inf in the activations (engine.NonFiniteError)
        if args.verbose:
            raise
        print(f"prunekit: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune Hugging Face causal LMs one block at a time.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every block; show tracebacks")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    prune = sub.add_parser("prune", help="prune a model one-shot with calibration data")
    prune.add_argument("model", help='hub id, local directory, .gguf file, or "default" (embedded SmolLM2-135M)')
    prune.add_argument("--method", required=True,
                       help="unstructured/N:M: magnitude, wanda, sparsegpt, ria, gblm, pruner-zero; width: magnitude-sp, wanda-sp, flap, taylor; "
                            "depth: block-influence, angular, sleb, last-k, laco (see `prunekit list`)")
    prune.add_argument("--sparsity", type=float,
                       help="in [0, 1): fraction of weights zeroed per layer (unstructured), of the decoder blocks' "
                            "parameters removed (width), or of the blocks removed (depth)")
    prune.add_argument("--layers", type=int, help="depth: remove exactly this many decoder blocks")
    prune.add_argument("--round-to", type=int, help="width: kept FFN channels are a multiple of this (default 8)")
    prune.add_argument("--uniform", dest="uniform", action="store_const", const=True, default=None,
                       help="width: every block loses the same share (default except flap)")
    prune.add_argument("--non-uniform", dest="uniform", action="store_const", const=False,
                       help="width: one global ranking decides each block's widths (flap's default)")
    prune.add_argument("--heads", choices=["auto", "query", "kv"],
                       help="width: remove query heads evenly inside KV groups, or whole KV groups")
    prune.add_argument("--nm", help="N:M pattern, e.g. 2:4 (N zeros in every M consecutive weights)")
    prune.add_argument("--allocation", choices=["uniform", "owl", "sensitivity"],
                       help="unstructured/N:M: per-block sparsity under the global budget (default uniform)")
    prune.add_argument("--update", choices=["none", "obs", "admm"],
                       help="unstructured/N:M: re-fit the kept weights to the mask (sparsegpt: obs built in)")
    prune.add_argument("--eora-rank", type=int, metavar="R",
                       help="add EoRA low-rank compensation of rank R, exported as a PEFT adapter next to the model")
    prune.add_argument("--per", choices=["row", "layer"], help="comparison group for unstructured sparsity")
    prune.add_argument("--ignore", action="append", default=None, metavar="REGEX", help="leave matching layers dense")
    prune.add_argument("--calib", default="default", help="calibration text: default, a .txt/.jsonl file or dir, wikitext2, c4, ptb")
    prune.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seqlen", type=int, default=512, help="tokens per calibration/evaluation window (default 512)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    prune.add_argument("--eval-data", default=None, help="evaluation text (default: the held-out split of --calib)")
    prune.add_argument("--out", help="output directory (safetensors + tokenizer + prunekit.json)")
    _common(prune)
    prune.set_defaults(handler=_prune)

    evaluate = sub.add_parser("eval", help="perplexity (with its protocol) and the sparsity of a model")
    evaluate.add_argument("model")
    evaluate.add_argument("--data", default="default", help="evaluation text source (its held-out split)")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--stride", type=int, default=None)
    evaluate.add_argument("--max-tokens", type=int, default=None)
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--allow-pickle", action="store_true")
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.add_argument("--json", type=Path, help="also write the results as JSON")
    evaluate.set_defaults(handler=_eval)

    run = sub.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. steps.0.sparsity=0.6")
    run.add_argument("--json", type=Path, help="also write the results as JSON")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, do nothing")
    run.set_defaults(handler=_run)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .recovery.cli import add_parser as add_recover_parser
    add_recover_parser(sub)

    listing = sub.add_parser("list", help="methods and supported model types")
    listing.set_defaults(handler=_list)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N, auto")
    p.add_argument("--sequential", default="true", choices=["true", "block"],
                   help="true: one pass, later layers see pruned inputs (default); block: the reference order")
    p.add_argument("--cache-device", default=None, help="where cached activations live (cpu = low GPU memory)")
    p.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="cpu: model and cached activations on the CPU, one block on the device; disk: stream one "
                        "block at a time from the checkpoint and write it pruned into --out (host memory ~ one block)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="record finished blocks here so that an interrupted run can continue (--resume)")
    p.add_argument("--resume", action="store_true", help="continue the run recorded in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (they can run code)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. steps.0.damp=0.05")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, do nothing")


def prune_args_to_dict(args) -> dict:
    """The one-step recipe a `prunekit prune` command line stands for."""
    step = {"method": args.method}
    if args.sparsity is not None:
        step["sparsity"] = args.sparsity
    if args.nm:
        step["nm"] = _parse_nm(args.nm)
    if args.per:
        step["per"] = args.per
    for key in ("layers", "round_to", "uniform", "heads", "allocation", "update"):
        if getattr(args, key) is not None:
            step[key] = getattr(args, key)
    if args.ignore:
        step["ignore"] = list(args.ignore)
    raw = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "sequential": args.sequential,
        "cache_device": args.cache_device, "trust_remote_code": args.trust_remote_code, "offload": args.offload,
        "allow_pickle": args.allow_pickle,
        "calibration": {"source": args.calib, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed},
        "steps": [step] + ([{"method": "eora", "rank": args.eora_rank}] if args.eora_rank is not None else []),
    }
    if not args.no_eval:
        raw["eval"] = {"data": args.eval_data or args.calib, "seqlen": args.seqlen}
    if args.out:
        raw["export"] = {"path": args.out, "overwrite": args.overwrite}
    return raw


def _parse_nm(text: str) -> list[int]:
    parts = text.replace("/", ":").split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--nm expects N:M such as 2:4, got {text!r}")
    return [int(p) for p in parts]


def _prune(args) -> int:
    from .recipe import apply_override, recipe_from_dict
    if args.sparsity is None and not args.nm and args.layers is None:
        raise ValueError("give --sparsity (e.g. 0.5), --nm (e.g. 2:4) or, for depth methods, --layers N")
    raw = prune_args_to_dict(args)
    for override in args.set:
        apply_override(raw, override)
    return _execute(recipe_from_dict(raw), args)


def _run(args) -> int:
    from .recipe import load_recipe
    if not args.recipe.is_file():
        raise FileNotFoundError(f"recipe file not found: {args.recipe}")
    return _execute(load_recipe(args.recipe, args.set), args)


def _execute(recipe, args) -> int:
    from .api import run_recipe
    from .recipe import dump_recipe
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    run_dir, resume = getattr(args, "run_dir", None), getattr(args, "resume", False)
    if resume and run_dir is None:
        raise ValueError("--resume continues a recorded run: give its --run-dir")
    result = run_recipe(recipe, run_dir=run_dir, resume=resume)
    if args.json:
        _write_json(args.json, result)
    return 0


def _eval(args) -> int:
    from .data import evaluation_data
    from .eval.perplexity import perplexity
    from .loading import load, resolve_device
    from .report import sparsity_report
    device = resolve_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code)
    text = evaluation_data(tokenizer, args.data, max_tokens=args.max_tokens)
    result = perplexity(model, text, seqlen=args.seqlen, stride=args.stride, device=device)
    sparsity = sparsity_report(model)
    print(result)
    print(f"sparsity: {sparsity['block_linear_sparsity']:.2%} of decoder-block linear weights, "
          f"{sparsity['model_sparsity']:.2%} of all {sparsity['parameters'] / 1e6:.1f}M parameters")
    if args.json:
        _write_json(args.json, {"model": args.model, "perplexity": result.to_dict(), "sparsity": sparsity})
    return 0


def _list(args) -> int:
    from .models import supported_model_types
    from .registry import available_methods, get_method
    kinds = {"linear": "unstructured/N:M", "width": "width", "depth": "depth", "compensate": "compensation",
             "recover": "recovery"}
    for scope, label in kinds.items():
        names = [name for name in available_methods() if get_method(name).scope == scope]
        print(f"{label + ':':<18}" + ", ".join(names))
    print(f"{'model types:':<18}" + ", ".join(supported_model_types()))
    return 0


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)              # a full disk leaves no half-written .tmp behind


if __name__ == "__main__":
    sys.exit(main())
