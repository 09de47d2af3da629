"""`prunekit data select` and `prunekit data report`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="choose the text a model is calibrated or recovered on")
    commands = data.add_subparsers(dest="data_command", required=True)
    select = commands.add_parser("select", help="select samples of a source within a budget")
    select.add_argument("source", help="default, code, a .jsonl/.txt file or a directory of them, or a hub "
                                       "dataset name (its calibration side; see prunekit.selection.pool)")
    select.add_argument("--method", required=True, choices=["random", "perplexity", "clusters", "entropy"],
                        help="random (seeded), perplexity (a band of the reference model's perplexity), "
                             "clusters (k-means of the model's embeddings, each concept kept in proportion to "
                             "its complexity, duplicates first to go) or entropy (a greedy cover of embedding "
                             "neighbourhoods)")
    select.add_argument("--budget", required=True, help="a fraction (0.2), N samples or N tokens")
    select.add_argument("--model", default=None, help="the reference model (perplexity, clusters, entropy; token "
                                                     "budgets count with its tokenizer)")
    select.add_argument("--band", default="middle", choices=["middle", "low", "high"],
                        help="perplexity: which part of the distribution to keep first (default middle)")
    select.add_argument("--max-tokens", type=int, default=512, help="perplexity, clusters, entropy: tokens read "
                                                                   "per sample")
    select.add_argument("--clusters", type=int, default=None, help="clusters: k of k-means (default sqrt of the "
                                                                  "pool's size, at most 64)")
    select.add_argument("--radius-quantile", type=float, default=0.5,
                        help="entropy: the neighbourhood radius as this quantile of nearest-neighbour distances "
                             "(default 0.5)")
    select.add_argument("--text-field", default="text", help="the text field of .jsonl records (default text)")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--run-dir", type=Path, default=None, help="keep scores there; a rerun resumes them")
    select.add_argument("--out", required=True, type=Path, help="selected samples, JSON lines (*.jsonl)")
    select.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    select.add_argument("--trust-remote-code", action="store_true")
    select.set_defaults(handler=_select)
    report = commands.add_parser("report", help="what a selection kept and dropped")
    report.add_argument("selection", type=Path, help="a selected .jsonl written by `prunekit data select`")
    report.set_defaults(handler=_report)


def _select(args: argparse.Namespace) -> int:
    from .select import report_lines, select
    model = tokenizer = None
    if args.model is not None:
        from ..io.loading import load
        model, tokenizer = load(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        model.eval()
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.clusters is not None and args.clusters < 1:
        raise ValueError(f"--clusters must be at least 1, got {args.clusters}")
    options = {"perplexity": {"band": args.band, "max_tokens": args.max_tokens},
               "clusters": {"max_tokens": args.max_tokens, "clusters": args.clusters},
               "entropy": {"max_tokens": args.max_tokens, "radius_quantile": args.radius_quantile}}.get(args.method, {})
    report = select(args.source, args.method, args.budget, args.out, model=model, tokenizer=tokenizer, seed=args.seed,
                    text_field=args.text_field, run_dir=args.run_dir, options=options)
    print("\n".join(report_lines(report)))
    print(f"wrote {args.out} and {args.out.name}.report.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .select import report_lines, report_path
    path = report_path(args.selection)
    if not path.is_file():
        raise FileNotFoundError(f"no report beside {args.selection} ({path.name}); was it written by `prunekit data "
                                "select`?")
    print("\n".join(report_lines(json.loads(path.read_text()))))
    return 0
