"""`prunekit data select` and `prunekit data report`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import NAMES


def add_parser(subparsers) -> None:
    data = subparsers.add_parser("data", help="choose the text a model is calibrated or recovered on")
    commands = data.add_subparsers(dest="data_command", required=True)
    select = commands.add_parser("select", help="select samples of a source within a budget")
    select.add_argument("source", help="default, code, a .jsonl/.txt file or a directory of them, or a hub "
                                       "dataset name (its calibration side; see prunekit.selection.pool)")
    select.add_argument("--method", required=True, choices=NAMES,
                        help="random (seeded), perplexity (a band of the reference model's perplexity), "
                             "clusters (k-means of the model's embeddings, each concept kept in proportion to "
                             "its complexity, duplicates first to go), entropy (a greedy cover of embedding "
                             "neighbourhoods), donod (TOPSIS over the output layer's delta of norm and norm of "
                             "delta under a one-step probe) or paser (for recovering --pruned: clusters get the "
                             "budget in proportion to the pruned model's loss on them) or qtuning (Q-Tuning's "
                             "error-uncertainty quadrants: noise and redundant samples dropped, the highest-"
                             "perplexity tokens of misconception samples taken out of the loss) or statistic "
                             "(greedily, the samples whose linear-layer input moments keep the selection's mean "
                             "closest to the pool's: what Wanda and SparseGPT calibrate on)")
    select.add_argument("--budget", required=True, help="a fraction (0.2), N samples or N tokens")
    select.add_argument("--model", default=None, help="the reference model (perplexity, clusters, entropy, "
                                                     "statistic; token budgets count with its tokenizer)")
    select.add_argument("--band", default="middle", choices=["middle", "low", "high"],
                        help="perplexity: which part of the distribution to keep first (default middle)")
    select.add_argument("--max-tokens", type=int, default=512, help="perplexity, clusters, entropy, statistic: "
                                                                   "tokens read per sample")
    select.add_argument("--clusters", type=int, default=None, help="clusters, paser: k of k-means (default sqrt of the "
                                                                  "pool's size, at most 64)")
    select.add_argument("--radius-quantile", type=float, default=0.5,
                        help="entropy: the neighbourhood radius as this quantile of nearest-neighbour distances "
                             "(default 0.5)")
    select.add_argument("--probe-lr", type=float, default=1e-5,
                        help="donod: the learning rate of the one-step SGD probe (default 1e-5)")
    select.add_argument("--token-keep", type=float, default=0.7,
                        help="qtuning: share of a misconception (Q2) sample's tokens kept in the loss (default 0.7)")
    select.add_argument("--neighbour-weight", type=float, default=0.5,
                        help="qtuning: lambda, the neighbours' weight in the context-aware token score (default 0.5)")
    select.add_argument("--pruned", type=Path, default=None,
                        help="paser: the pruned model to recover (a prunekit export of --model), compared with "
                             "the dense --model")
    select.add_argument("--split-tokens", type=int, default=None, metavar="N",
                        help="cut every sample longer than N tokens into consecutive pieces of at most N tokens "
                             "before selecting (needs --model), so that a budget chooses among passages, not whole "
                             "documents; default: samples as the source gives them")
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
    if args.method == "paser" and (args.pruned is None or args.model is None):
        raise ValueError("--method paser compares the dense model with the pruned one: pass --model (dense) and "
                         "--pruned DIR")
    if args.pruned is not None and args.method != "paser":
        raise ValueError(f"--pruned is for --method paser only, not {args.method}")
    if not 0 < args.token_keep <= 1:
        raise ValueError(f"--token-keep must be in (0, 1], got {args.token_keep}")
    if not 0 <= args.neighbour_weight <= 1:
        raise ValueError(f"--neighbour-weight must be in [0, 1], got {args.neighbour_weight}")
    if args.split_tokens is not None and args.split_tokens < 1:
        raise ValueError(f"--split-tokens must be at least 1, got {args.split_tokens}")
    if not args.probe_lr > 0:
        raise ValueError(f"--probe-lr must be positive, got {args.probe_lr}")
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
               "entropy": {"max_tokens": args.max_tokens, "radius_quantile": args.radius_quantile},
               "donod": {"max_tokens": args.max_tokens, "probe_lr": args.probe_lr},
               "paser": {"max_tokens": args.max_tokens, "clusters": args.clusters},
               "qtuning": {"max_tokens": args.max_tokens, "token_keep": args.token_keep,
                           "neighbour_weight": args.neighbour_weight}}.get(args.method, {})
    if args.method == "paser":
        from ..io.loading import load
        pruned, _ = load(args.pruned, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        pruned.eval()
        from .paser import check_models
        check_models(model, pruned)
        options = {**options, "pruned": pruned}
    report = select(args.source, args.method, args.budget, args.out, model=model, tokenizer=tokenizer, seed=args.seed,
                    text_field=args.text_field, run_dir=args.run_dir, options=options, split_tokens=args.split_tokens)
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
