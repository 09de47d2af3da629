"""Command line: `prunekit prune`, `prunekit eval`, `prunekit run`, `prunekit export`, `prunekit recover`,
`prunekit bench`, `prunekit sweep`, `prunekit report`, `prunekit list`.

`prune` builds a one-step recipe from its flags and takes the same path as `run`, so a command
line and a recipe file can never disagree. Errors in the user's input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .interrupts import Terminated, close_progress_bars, interrupted_line, output_states, signals
from .io.atomic import write_json_atomic
from .selection import CALIBRATION as CALIBRATION_SELECTORS


def main(argv: list[str] | None = None) -> int:
    """The command line. Ctrl-C (exit 130) and SIGTERM (exit 143) stop any command cleanly: the
    workers are joined, temporary folders removed by the `finally` blocks that own them, and one
    line says what was interrupted and what was (not) written, instead of a traceback."""
    state: dict = {"program": argv is None}       # None: the `prunekit` program itself (not a caller in Python)
    argv = list(sys.argv[1:] if argv is None else argv)
    with signals(state) as received:
        try:
            code = _main(argv, state)
            if received and state.get("forward"):
                raise KeyboardInterrupt        # --nproc: torchrun and its workers were stopped by the signal
            state["finished"] = True
            return code
        except BaseException as err:
            # a library may turn the KeyboardInterrupt into its own error (a Rust panic from safetensors):
            # whatever ends the command after a signal arrived is the interrupt
            state["reporting"] = True
            if not received and not isinstance(err, (KeyboardInterrupt, Terminated)):
                state["finished"] = True
                raise
            signum = received[0] if received else (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
        # out of the except block: the traceback and its frames are gone, so progress bars they held closed
        close_progress_bars()
        if os.environ.get("RANK", "0") == "0":         # under torchrun, one voice: rank 0's
            print(interrupted_line(signum, state), file=sys.stderr, flush=True)
        state["finished"] = True
        return 128 + int(signum)


def _main(argv: list[str], state: dict) -> int:
    state["command"] = next((a for a in argv if not a.startswith("-")), "")
    try:
        launched = _launch_distributed(argv, state)
    except ValueError as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return 2
    if launched is not None:
        return launched
    parser = _parser()
    args = parser.parse_args(argv)
    state["args"] = args
    state["outputs"] = output_states(state)
    if isinstance(getattr(args, "json", None), Path):       # --json: a path that cannot be written fails now
        from .io.atomic import check_writable
        try:
            check_writable(args.json)
        except OSError as err:
            print(f"prunekit: error: --json {err}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.handler(args)
    except (ValueError, OSError, ImportError, TypeError, RuntimeError, FloatingPointError) as err:
        # OSError covers a missing file, an existing --out and a full disk (export.DiskFullError);
        # FloatingPointError is NaN/Inf in the activations (engine.NonFiniteError)
        if args.verbose or state.get("received"):
            raise                      # after a signal: the interrupt, reported by `main`
        close_progress_bars(collect=False)     # a bar the error cut short ends its line; the message starts its own
        print(f"prunekit: error: {_one_line(err, args)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException, args) -> str:
    """The error as one line, in the command line's words: transformers' refusal of custom code (several
    lines ending in "pass the argument `trust_remote_code=True`") names the CLI flag instead."""
    text = str(err)
    if "trust_remote_code=True" in text and "--trust-remote-code" not in text:
        model = getattr(args, "model", None) or getattr(args, "recipe", None) or "the model"
        return (f"{model} contains custom code (its config's auto_map) that must run to load it; prunekit runs no "
                "code from a checkpoint unless asked: read its .py files, then pass --trust-remote-code if you "
                "trust them")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _launch_distributed(argv: list[str], state: dict | None = None) -> int | None:
    """`--nproc N` (prune and run): re-run this very command in N processes under torchrun and
    return its exit status; None when this process should do the work itself. Inside torchrun
    (WORLD_SIZE set) --nproc is dropped, after checking it agrees with the launched world size."""
    import os
    if not any(a == "--nproc" or a.startswith("--nproc=") for a in argv):
        return None
    from .distributed import launch, strip_nproc
    rest, nproc = strip_nproc(argv)
    command = next((a for a in rest if not a.startswith("-")), None)
    if command not in ("prune", "run"):
        raise ValueError(f"--nproc applies to `prunekit prune` and `prunekit run`, not {command!r}")
    world = os.environ.get("WORLD_SIZE")
    if world is not None:
        if int(world) != nproc:
            raise ValueError(f"--nproc {nproc} but torchrun started {world} processes; drop --nproc under torchrun")
        argv[:] = rest
        return None
    argv[:] = rest
    if nproc == 1:
        return None
    if "--dry-run" in rest:
        return None
    if state is not None:
        state["forward"] = True        # a signal now goes on to torchrun (`_signals`)
    return launch(rest, nproc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune Hugging Face causal LMs one block at a time.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every block; show tracebacks")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    prune = sub.add_parser("prune", help="prune a model one-shot with calibration data")
    prune.add_argument("model", help='hub id, local directory, .gguf file, or "default" (embedded SmolLM2-135M)')
    prune.add_argument("--method", required=True,
                       help="unstructured/N:M: magnitude, wanda, sparsegpt, ria, gblm, pruner-zero; "
                            "width: magnitude-sp, wanda-sp, flap, taylor, amp, bonsai; "
                            "depth: block-influence, angular, sleb, last-k, laco, sublayer-drop, reverse-order, mka, "
                            "streamline; "
                            "MoE experts: reap, expert-frequency, expert-output, expert-loo, easy-ep, naee, "
                            "expert-merge, expert-random (see `prunekit list`)")
    prune.add_argument("--sparsity", type=float,
                       help="in [0, 1): fraction of weights zeroed per layer (unstructured), of the decoder blocks' "
                            "parameters removed (width), of the blocks removed (depth), or of each MoE block's "
                            "routed experts removed (experts)")
    prune.add_argument("--layers", type=int, help="depth: remove exactly this many decoder blocks (sublayer-drop: "
                                                  "this many sublayers)")
    prune.add_argument("--sublayers", choices=["attention", "mlp", "both"],
                       help="sublayer-drop: which sublayers are candidates (default attention)")
    prune.add_argument("--experts", type=int, metavar="N", help="experts: keep N routed experts in every MoE block")
    prune.add_argument("--round-to", type=int, help="width: kept FFN channels are a multiple of this (default 8)")
    prune.add_argument("--uniform", dest="uniform", action="store_const", const=True, default=None,
                       help="width/experts: every block loses the same share (default except flap)")
    prune.add_argument("--non-uniform", dest="uniform", action="store_const", const=False,
                       help="width: one global ranking decides each block's widths (flap's default); experts: one "
                            "global expert budget spread over the MoE blocks by score (loads with load_pruned)")
    prune.add_argument("--heads", choices=["auto", "query", "kv"],
                       help="width: remove query heads evenly inside KV groups, or whole KV groups")
    prune.add_argument("--nm", help="N:M pattern, e.g. 2:4 (N zeros in every M consecutive weights)")
    prune.add_argument("--allocation", choices=["uniform", "owl", "sensitivity", "fdtm"],
                       help="unstructured/N:M: per-block sparsity under the global budget (default uniform; fdtm: "
                            "from the first divergent token of the dense greedy continuation, arXiv 2311.01544)")
    prune.add_argument("--update", choices=["none", "obs", "admm"],
                       help="unstructured/N:M: re-fit the kept weights to the mask (sparsegpt: obs built in)")
    prune.add_argument("--compensate", choices=["none", "bias", "liar"],
                       help="width: after removing heads/channels, fold the removed inputs' mean into the bias "
                            "(bias, FLAP's default) or re-fit the kept columns by least squares (liar)")
    prune.add_argument("--eora-rank", type=int, metavar="R",
                       help="add EoRA low-rank compensation of rank R, exported as a PEFT adapter next to the model")
    prune.add_argument("--per", choices=["row", "layer"], help="comparison group for unstructured sparsity")
    prune.add_argument("--block-size", type=int, metavar="B",
                       help="armor: block size of the block-diagonal wrappers (default 128, capped at each dimension)")
    prune.add_argument("--shots", type=int, metavar="K",
                       help="llm-surgeon, llm-surgeon-sp: rounds on the linear sparsity schedule (default 5)")
    prune.add_argument("--curvature", choices=["gradient", "kfac", "identity"],
                       help="llm-surgeon(-sp): the output-gradient factor G: its diagonal (gradient, llm-surgeon's "
                            "default), the full matrix (kfac, llm-surgeon-sp's default) or G = I (identity)")
    prune.add_argument("--ignore", action="append", default=None, metavar="REGEX", help="leave matching layers dense")
    prune.add_argument("--calib", default="default",
                       help="calibration text: default (= prose), code (stdlib Python source), a .txt/.jsonl file or "
                            "dir, wikitext2, c4, ptb")
    prune.add_argument("--domain", metavar="SOURCE",
                       help="prune for this text domain (code, prose, or any --calib source): calibrate and evaluate "
                            "on it, and give it to methods that take a domain (d-pruner: regularised by the other one)")
    prune.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--calib-select", default=None,
                       choices=CALIBRATION_SELECTORS,
                       help="choose the --samples windows from --calib-pool random ones with a data selector "
                            "(prunekit data select's methods, scored with the model being pruned)")
    prune.add_argument("--calib-pool", type=int, default=None,
                       help="candidate windows for --calib-select (default 16 x --samples)")
    prune.add_argument("--calib-scores", metavar="DIR", default=None,
                       help="keep --calib-select's scores of the pool in DIR: a later pruning of the same model from "
                            "the same pool reuses them (and an interrupted scoring resumes)")
    prune.add_argument("--seqlen", type=int, default=512, help="tokens per calibration/evaluation window (default 512)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    prune.add_argument("--eval-data", default=None, help="evaluation text (default: the held-out split of --calib)")
    prune.add_argument("--out", help="output directory (safetensors + tokenizer + prunekit.json)")
    prune.add_argument("--export-format", choices=["safetensors", "gguf"], default=None,
                       help="gguf: also write --out/model.gguf for llama.cpp, in the same atomic export")
    prune.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                       help="GGUF weight type with --export-format gguf (default f16)")
    _common(prune)
    prune.set_defaults(handler=_prune)

    search = sub.add_parser("search", help="search the widths, sublayers and blocks that best meet a parameter, "
                                           "memory or latency target (KL to the dense model as fitness)")
    search.add_argument("model", help='hub id, local directory, .gguf file, or "default" (embedded SmolLM2-135M)')
    search.add_argument("--target", required=True,
                        help="params=0.75 (the decoder blocks keep 75%% of their parameters), params=100M (whole "
                             "model), memory=300MB (weights + KV cache at --context tokens), latency=0.8 (0.8x the "
                             "dense decode-step latency measured on this machine)")
    search.add_argument("--space", default="width,depth,sublayer",
                        help="what may change: width (heads, FFN channels), depth (whole blocks), sublayer (one "
                             "attention or FFN of a block; llama, mistral, qwen2, qwen3, phi3), experts (routed "
                             "experts per MoE block), sparsity (unstructured density per sublayer, Wanda masks; "
                             "params targets, not with width); default width,depth,sublayer")
    search.add_argument("--budget-minutes", type=float, default=10.0,
                        help="wall time of the whole search, library and seed scores included; the evolution "
                             "runs while time is left (default 10)")
    search.add_argument("--generations", type=int, default=None, help="stop after N generations instead")
    search.add_argument("--score", default="flap", help="width score that orders heads and channels (default flap)")
    search.add_argument("--expert-score", default="reap",
                        help="experts space: the expert score that orders each block's experts (default reap)")
    search.add_argument("--runtime", default="transformers", choices=["transformers", "llama.cpp"],
                        help="latency targets: time decode steps in transformers or in llama.cpp (probe models "
                             "written as f16 GGUF files); default transformers")
    search.add_argument("--context", type=int, default=1024,
                        help="KV-cache length for the memory and latency costs (default 1024)")
    search.add_argument("--fitness-windows", type=int, default=None,
                        help="windows of the whole-model fitness (default: all --samples)")
    search.add_argument("--select-windows", type=int, default=2, help="windows of the first selection stage")
    search.add_argument("--calib", default="default", help="calibration text (as for prune)")
    search.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    search.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--no-eval", action="store_true", help="skip the dense and searched perplexity")
    search.add_argument("--eval-data", default=None, help="evaluation text (default: the held-out split of --calib)")
    search.add_argument("--out", required=True, help="output directory: the model, prunekit.json and search.json")
    _common(search)
    search.set_defaults(handler=_search)

    evaluate = sub.add_parser("eval", help="perplexity, fidelity to the dense model, knowledge, zero-shot tasks, "
                                           "long-context retrieval")
    evaluate.add_argument("model")
    evaluate.add_argument("--baseline", metavar="DENSE", help="the dense model to compare against (needed by fidelity; "
                          "adds dense numbers and retention to the other suites)")
    evaluate.add_argument("--suite", default="perplexity",
                          help="comma-separated: perplexity, fidelity, knowledge, lm-eval, long-context; all = "
                               "perplexity,fidelity,knowledge (lm-eval needs the network and long-context takes "
                               "long: ask for them by name)")
    evaluate.add_argument("--data", default=None,
                          help="evaluation text source, its held-out split: default (= prose, stdlib docs), code "
                               "(stdlib source), a .txt/.jsonl file or dir, wikitext2, c4, ptb (default: default)")
    evaluate.add_argument("--domains", action="store_true",
                          help="perplexity on each offline domain, code (stdlib source) and prose (stdlib docs), "
                               "each with its protocol, instead of on --data: what a pruning calibrated on one "
                               "domain costs on the other")
    evaluate.add_argument("--seqlen", type=int, default=512)
    evaluate.add_argument("--stride", type=int, default=None)
    evaluate.add_argument("--max-tokens", type=int, default=None)
    evaluate.add_argument("--fidelity-tokens", type=int, default=4096,
                          help="fidelity: KL/top-1 positions "
                               "(dense log-probs kept in memory: tokens x vocab x 4 bytes)")
    evaluate.add_argument("--knowledge-data", default=None,
                          help="knowledge questions .jsonl (default: the bundled set)")
    evaluate.add_argument("--lm-eval-tasks", default=None,
                          help="comma-separated lm-eval tasks (default arc_easy,hellaswag,piqa,winogrande,boolq,mmlu)")
    evaluate.add_argument("--lm-eval-limit", type=int, default=None, help="lm-eval: at most N examples per task")
    evaluate.add_argument("--lm-eval-include", default=None, metavar="DIR",
                          help="lm-eval: directory of local task configs")
    evaluate.add_argument("--context", default=None, metavar="N[,N...]",
                          help="long-context: prompt lengths in tokens, each at most the model's limit "
                               "(default 2048,4096,8192)")
    evaluate.add_argument("--long-context-samples", type=int, default=None, metavar="N",
                          help="long-context: prompts per task and context; depths 10,30,50,70,90%% cycle "
                               "(default 10)")
    evaluate.add_argument("--batch-size", type=int, default=8,
                          help="sequences per forward in fidelity/knowledge/lm-eval")
    evaluate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--allow-pickle", action="store_true")
    evaluate.add_argument("--trust-remote-code", action="store_true")
    evaluate.add_argument("--json", type=Path, help="also write the results as JSON")
    from .inference.cli import add_arguments as add_inference_pruning
    add_inference_pruning(evaluate)                                   # the long-context suite's prompts and generations
    evaluate.set_defaults(handler=_eval)

    run = sub.add_parser("run", help="run a YAML recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override, e.g. steps.0.sparsity=0.6")
    run.add_argument("--json", type=Path, help="also write the results as JSON")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, do nothing")
    run.add_argument("--offload", default=None, choices=["none", "cpu", "disk"],
                     help="override the recipe's offload (disk: every step streams block by block from a checkpoint)")
    run.add_argument("--run-dir", type=Path, default=None,
                     help="record finished blocks and steps here so that an interrupted run can continue (--resume)")
    run.add_argument("--resume", action="store_true", help="continue the run recorded in --run-dir")
    run.add_argument("--export-format", choices=["safetensors", "gguf"], default=None,
                     help="override the recipe's export format (gguf: also write model.gguf into the export)")
    _nproc(run)
    run.set_defaults(handler=_run)

    export = sub.add_parser("export", help="write a saved (pruned) model as GGUF for llama.cpp, or as compressed "
                                           "sparse storage")
    export.add_argument("model", help="a prunekit export folder, a local checkpoint, a .gguf file or \"default\"")
    export.add_argument("--format", required=True, choices=["gguf", "sparse"],
                        help="gguf: one file for llama.cpp; sparse: a folder whose sparse weights are stored as a "
                             "bitmap of nonzeros plus the nonzero values (loads with prunekit.load)")
    export.add_argument("--out", required=True, help="the output file (FILE.gguf) or folder (sparse)")
    export.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="weight type of 2-D tensors (norms and biases stay f32); default f16")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.add_argument("--no-exponent-coding", dest="exponent_coding", action="store_false",
                        help="sparse: store values and dense tensors as they are (no deflated exponent byte plane)")
    export.add_argument("--trust-remote-code", action="store_true")
    export.set_defaults(handler=_export)

    generate = sub.add_parser("generate", help="greedy generation with a (pruned) model, timed")
    generate.add_argument("model", help="hub id, local directory, .gguf file, or \"default\"")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="a UTF-8 file holding the prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--offload", action="store_true",
                          help="a sparse export (prunekit export --format sparse): keep its compressed weights in "
                               "host memory and decompress one block at a time on --device (Endor)")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate.add_argument("--trust-remote-code", action="store_true")
    from .inference.cli import add_arguments as add_inference_pruning
    add_inference_pruning(generate)
    generate.set_defaults(handler=_generate)

    from .bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    from .selection.cli import add_parser as add_data_parser
    add_data_parser(sub)
    from .recovery.cli import add_parser as add_recover_parser
    add_recover_parser(sub)
    from .sweep import add_parser as add_sweep_parser
    add_sweep_parser(sub)
    from .render import add_parser as add_report_parser
    add_report_parser(sub)
    from .encoder_cli import add_parser as add_encoder_parser
    add_encoder_parser(sub)

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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. steps.0.damp=0.05")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, do nothing")
    _nproc(p)


def _nproc(p: argparse.ArgumentParser) -> None:
    # read (and removed) by `_launch_distributed` before parsing; declared here for --help
    p.add_argument("--nproc", type=int, metavar="N",
                   help="shard the calibration windows across N processes on this machine (torchrun, gloo on CPU, "
                        "nccl on CUDA); the 1-process result (bit for bit with equal OMP_NUM_THREADS). "
                        "Several machines: docs/distributed.md")


def prune_args_to_dict(args) -> dict:
    """The one-step recipe a `prunekit prune` command line stands for."""
    step = {"method": args.method}
    if args.sparsity is not None:
        step["sparsity"] = args.sparsity
    if args.nm:
        step["nm"] = _parse_nm(args.nm)
    if args.per:
        step["per"] = args.per
    for key in ("layers", "sublayers", "experts", "round_to", "uniform", "heads", "allocation", "update",
                "compensate", "block_size", "shots", "curvature"):
        if getattr(args, key) is not None:
            step[key] = getattr(args, key)
    if args.ignore:
        step["ignore"] = list(args.ignore)
    calib = _domain_calibration(args, step)
    raw = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "sequential": args.sequential,
        "cache_device": args.cache_device, "trust_remote_code": args.trust_remote_code, "offload": args.offload,
        "allow_pickle": args.allow_pickle,
        "calibration": {"source": calib, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed,
                        **({"select": args.calib_select} if args.calib_select else {}),
                        **({"pool": args.calib_pool} if args.calib_pool else {}),
                        **({"scores": args.calib_scores} if args.calib_scores else {})},
        "steps": [step] + ([{"method": "eora", "rank": args.eora_rank}] if args.eora_rank is not None else []),
    }
    if not args.no_eval:
        raw["eval"] = {"data": args.eval_data or calib, "seqlen": args.seqlen}
    if args.out:
        raw["export"] = {"path": args.out, "overwrite": args.overwrite}
        if args.export_format:
            raw["export"]["format"] = args.export_format
        if args.outtype:
            raw["export"]["outtype"] = args.outtype
    elif args.export_format or args.outtype:
        raise ValueError("--export-format / --outtype say how --out is written: give --out DIR")
    return raw


def _domain_calibration(args, step: dict) -> str:
    """The calibration source: --domain when given (then also the step's `domain` key, for methods that have
    one), else --calib."""
    domain = getattr(args, "domain", None)
    if not domain:
        return args.calib
    if args.calib not in ("default", domain):
        raise ValueError(f"--domain {domain} calibrates on {domain}, --calib {args.calib} on another text; give one "
                         "of them")
    import dataclasses
    from .catalog import get_method
    if "domain" in {f.name for f in dataclasses.fields(get_method(args.method).config_cls)}:
        step["domain"] = domain
    return domain


def _parse_nm(text: str) -> list[int]:
    """"2:4" (or "2/4") -> [2, 4]; the config validates N < M and the layer widths later."""
    parts = text.replace("/", ":").split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--nm expects N:M such as 2:4, got {text!r}")
    return [int(p) for p in parts]


def _prune(args) -> int:
    """`prunekit prune`: the flags become a one-step recipe and take `prunekit run`'s path, so a command
    line and a recipe file cannot disagree. Imports are local: `prunekit --help` must not load torch."""
    from .recipe import apply_override, recipe_from_dict
    if args.sparsity is None and not args.nm and args.layers is None and args.experts is None:
        raise ValueError("give --sparsity (e.g. 0.5), --nm (e.g. 2:4), for depth methods --layers N, or for expert "
                         "methods --experts N")
    raw = prune_args_to_dict(args)
    for override in args.set:
        apply_override(raw, override)
    return _execute(recipe_from_dict(raw), args)


def _search(args) -> int:
    """`prunekit search`: a one-step recipe with the `search` step, on `prunekit run`'s path (load,
    calibration, perplexity before and after, atomic export with search.json)."""
    from .recipe import apply_override, recipe_from_dict
    step = {"method": "search", "target": args.target, "space": [s.strip() for s in args.space.split(",")],
            "budget_minutes": args.budget_minutes, "generations": args.generations, "score": args.score,
            "expert_score": args.expert_score, "runtime": args.runtime,
            "context": args.context, "windows": args.fitness_windows, "select_windows": args.select_windows,
            "seed": args.seed}
    raw = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "sequential": args.sequential,
        "cache_device": args.cache_device, "trust_remote_code": args.trust_remote_code, "offload": args.offload,
        "allow_pickle": args.allow_pickle,
        "calibration": {"source": args.calib, "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed},
        "steps": [step], "export": {"path": args.out, "overwrite": args.overwrite},
    }
    if not args.no_eval:
        raw["eval"] = {"data": args.eval_data or args.calib, "seqlen": args.seqlen}
    for override in args.set:
        apply_override(raw, override)
    return _execute(recipe_from_dict(raw), args)


def _run(args) -> int:
    """`prunekit run RECIPE`: --set overrides apply to the raw YAML before validation (recipe.py)."""
    from .recipe import load_recipe
    if not args.recipe.is_file():
        raise FileNotFoundError(f"recipe file not found: {args.recipe}")
    overrides = list(args.set) + ([f"offload={args.offload}"] if args.offload else [])
    overrides += [f"export.format={args.export_format}"] if args.export_format else []
    return _execute(load_recipe(args.recipe, overrides), args)


def _generate(args) -> int:
    """`prunekit generate MODEL --prompt TEXT`: greedy continuation, printed with its speed and protocol."""
    import time

    import torch

    from .io.loading import load, resolve_device
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text(encoding="utf-8")
    device = resolve_device(args.device)
    if args.offload:
        from .io.sparse import is_sparse_export, offloaded_sparse_model
        if not is_sparse_export(args.model):
            raise ValueError(f"--offload decompresses a sparse export block by block; {args.model} is not one "
                             "(write it with `prunekit export DIR --format sparse --out DIR2`)")
        model, tokenizer = offloaded_sparse_model(args.model, device=device, dtype=args.dtype,
                                                  trust_remote_code=args.trust_remote_code)
    else:
        model, tokenizer = load(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        model.to(device)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to turn the prompt into tokens")
    from .inference.cli import configs_from_args, describe
    token, kv, prompt_pruning = configs_from_args(args)
    if token is not None or kv is not None or prompt_pruning is not None:
        if args.offload:
            raise ValueError("inference-time pruning runs on a loaded model; drop --offload")
        from .inference import generate
        out = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, token_pruning=token,
                       kv_pruning=kv, prompt_pruning=prompt_pruning)
        if out.prompt_account:
            print(out.prompt_account, file=sys.stderr)
        print(out.text)
        new = len(out.new_ids)
        print(f"[{new} new tokens in {out.seconds:.2f} s, {new / out.seconds:.2f} tokens/s including the prompt's "
              f"{len(out.prompt_ids)} tokens; first token {out.first_token_seconds:.2f} s (a separate prefill + "
              f"1 step); greedy, batch 1, {args.dtype} on {device}; inference-time pruning: "
              f"{describe(token, kv, prompt_pruning)}]" + "".join(f"\n[{note}]" for note in out.notes),
              file=sys.stderr)
        return 0
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} new tokens in {seconds:.2f} s, {len(new) / seconds:.2f} tokens/s including the prompt's "
          f"{ids.shape[1]} tokens; greedy, batch 1, {args.dtype} on {device}"
          f"{', compressed blocks decompressed one at a time' if args.offload else ''}]", file=sys.stderr)
    return 0


def _export(args) -> int:
    """`prunekit export DIR --format gguf --out FILE.gguf`: the saved model as one llama.cpp file;
    `--format sparse --out DIR2`: its sparse weights as bitmap + nonzeros (io/sparse.py)."""
    if args.format == "sparse":
        from .io.sparse import export_sparse
        if not Path(args.model).is_dir():
            raise ValueError(f"--format sparse compresses a saved model folder; {args.model} is not one")
        stats = export_sparse(args.model, args.out, overwrite=args.overwrite, entropy=args.exponent_coding)
        print(f"wrote {args.out}: {stats['tensors_compressed']} weights compressed, tensor data "
              f"{stats['bytes_compressed'] / 2**20:.1f} MiB instead of {stats['bytes_dense'] / 2**20:.1f} MiB "
              f"({stats['ratio']:.3f}x); loads with prunekit.load({str(args.out)!r})")
        return 0
    from .io.gguf_writer import export_gguf
    from .methods.armor import is_armor_export
    if is_armor_export(args.model):
        raise ValueError(f"{args.model} holds ARMOR's block-diagonal wrappers around 2:4 cores, which no llama.cpp "
                         "graph computes: a GGUF of the cores alone would be a different model")
    result = export_gguf(args.model, args.out, outtype=args.outtype, overwrite=args.overwrite,
                         trust_remote_code=args.trust_remote_code)
    print(f"wrote {result.path}: llama.cpp architecture {result.arch!r}, {result.tensors} tensors, {result.outtype}, "
          f"{result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s")
    for note in result.notes:
        print(f"note: {note}")
    print(f"run it: llama-cli -m {result.path}  (or llama_cpp.Llama({str(result.path)!r}))")
    return 0


def _execute(recipe, args) -> int:
    """Run a validated recipe (or print it, --dry-run); --json gets the result written atomically."""
    from .api import run_recipe
    from .recipe import dump_recipe
    if args.dry_run:
        print(dump_recipe(recipe), end="")
        return 0
    run_dir, resume = getattr(args, "run_dir", None), getattr(args, "resume", False)
    if resume and run_dir is None:
        raise ValueError("--resume continues a recorded run: give its --run-dir")
    result = run_recipe(recipe, run_dir=run_dir, resume=resume)
    if args.json and result.get("distributed", {}).get("rank", 0) == 0:     # rank 0 writes it
        write_json_atomic(args.json, result, default=str)
    return 0


def _eval(args) -> int:
    """`prunekit eval`: perplexity alone takes the short path below; any other suite, or a --baseline
    to compare against, goes through the suites (eval/suites.py), which need the dense reference.
    With --domains the perplexity is measured on each offline domain (code, prose) instead of --data."""
    from .eval.suites import parse_suites
    suites = parse_suites(args.suite)
    if (args.context is not None or args.long_context_samples is not None) and "long-context" not in suites:
        raise ValueError("--context and --long-context-samples set up the long-context suite: add --suite "
                         "long-context")
    from .inference.cli import configs_from_args
    token, kv, prompt_pruning = configs_from_args(args)
    if any(c is not None for c in (token, kv, prompt_pruning)) and "long-context" not in suites:
        raise ValueError("--token-pruning/--kv-pruning/--prompt-pruning prune the prompts and generations of the "
                         "long-context suite: add --suite long-context")
    domains = _eval_domains(args, suites)
    if suites != ("perplexity",) or args.baseline:
        return _eval_suites(args, suites, domains)
    from .data import evaluation_data
    from .eval.perplexity import perplexity
    from .io.loading import load, resolve_device
    from .report import sparsity_report
    device = resolve_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code)
    results = {}
    for source in domains or (args.data,):
        text = evaluation_data(tokenizer, source, max_tokens=args.max_tokens)
        results[source] = perplexity(model, text, seqlen=args.seqlen, stride=args.stride, device=device)
    sparsity = sparsity_report(model)
    if domains:
        for line in domain_lines({name: result.to_dict() for name, result in results.items()}):
            print(line)
    else:
        print(results[args.data])
    print(f"sparsity: {sparsity['block_linear_sparsity']:.2%} of decoder-block linear weights, "
          f"{sparsity['model_sparsity']:.2%} of all {sparsity['parameters'] / 1e6:.1f}M parameters")
    if args.json:
        data = {"model": args.model}
        if domains:
            data["domains"] = {name: result.to_dict() for name, result in results.items()}
        else:
            data["perplexity"] = results[args.data].to_dict()
        write_json_atomic(args.json, {**data, "sparsity": sparsity}, default=str)
    return 0


def _eval_domains(args, suites) -> tuple[str, ...]:
    """The domains --domains asks for (empty without it); also settles --data (default: "default")."""
    from .data import DOMAINS
    domains = DOMAINS if getattr(args, "domains", False) else ()
    if domains and "perplexity" not in suites:
        raise ValueError("--domains reports the perplexity on each domain: add perplexity to --suite "
                         f"(e.g. --suite perplexity,{','.join(suites)})")
    if domains and args.data is not None and "fidelity" not in suites:
        raise ValueError(f"--domains measures the perplexity on {' and '.join(DOMAINS)}, so --data {args.data} "
                         "would not be used; drop --data (or --domains)")
    if args.data is None:
        args.data = "default"
    return domains


def domain_lines(results: dict) -> list[str]:
    """One line per domain (and its dense baseline, if measured), each with its protocol.

    results: domain name -> `PerplexityResult.to_dict()`, optionally with a "baseline" entry.
    """
    from .eval.perplexity import format_ppl
    lines = []
    for name, ppl in results.items():
        line = f"perplexity on {name}: {format_ppl(ppl['ppl'])}"
        if ppl.get("ratio_to_baseline") is not None:
            line += f" ({ppl['ratio_to_baseline']:.3f}x dense)"
        lines.append(f"{line} [{ppl['protocol']}]")
        if "baseline" in ppl:
            lines.append(f"perplexity on {name} (dense baseline): {format_ppl(ppl['baseline']['ppl'])} "
                         f"[{ppl['baseline']['protocol']}]")
    return lines


def _recorded_dense_perplexity(model: str) -> dict | None:
    """The dense perplexity recorded at pruning time in MODEL/prunekit.json, if any."""
    from .io.export import METADATA_FILE
    path = Path(model) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("dense_perplexity")
    except (json.JSONDecodeError, AttributeError):
        return None


def _check_same_vocabulary(tokenizer, dense_tokenizer, model: str, baseline: str) -> None:
    if tokenizer is None or dense_tokenizer is None:
        raise ValueError("both the model and --baseline need a tokenizer saved next to them")
    if tokenizer.get_vocab() != dense_tokenizer.get_vocab():
        raise ValueError(f"{model} and --baseline {baseline} have different tokenizer vocabularies "
                         f"({len(tokenizer)} vs {len(dense_tokenizer)} tokens); the baseline must be the dense "
                         "model this one was pruned from")


def suite_lines(out: dict) -> list[str]:
    """One line per metric, each with its protocol."""
    lines = domain_lines(out.get("domains") or {})
    results = out["suites"]
    if "perplexity" in results:
        from .eval.perplexity import format_ppl
        ppl = results["perplexity"]
        lines.append(f"perplexity {format_ppl(ppl['ppl'])} [{ppl['protocol']}]")
        if "baseline" in ppl:
            lines.append(f"perplexity (dense baseline) {format_ppl(ppl['baseline']['ppl'])} "
                         f"[{ppl['baseline']['protocol']}]")
    if "fidelity" in results:
        f = results["fidelity"]
        lines.append(f"fidelity: KL(dense || model) {f['kl_mean']:.4f} nats/token, top-1 agreement "
                     f"{f['top1_agreement']:.2%} [{f['protocol'].split('; ')[0]}]")
        lines.append(f"fidelity: first divergent token {f['first_divergent_token_mean']:.2f} (median "
                     f"{f['first_divergent_token_median']:g}) of {f['new_tokens']}, share of divergent tokens "
                     f"{f['share_divergent_tokens']:.2%} [{f['protocol'].split('; ', 1)[-1]}]")
    if "knowledge" in results:
        k = results["knowledge"]
        line = (f"knowledge: exact match {k['exact_match']:.2%}, multiple choice {k['mc_accuracy']:.2%} "
                f"(mean rank {k['mc_mean_rank']:.2f}) on {k['questions']} questions")
        if "baseline" in k:
            b = k["baseline"]
            fmt = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
            line += (f"; dense {b['exact_match']:.2%} / {b['mc_accuracy']:.2%}; retention exact "
                     f"{fmt(k['retention_exact'])}, multiple choice {fmt(k['retention_mc'])}; kept correct "
                     f"{fmt(k['kept_correct'])}")
        lines.append(f"{line} [{k['protocol']}]")
    if "lm-eval" in results:
        z = results["lm-eval"]
        for name, metrics in z.items():
            if isinstance(metrics, dict) and name not in ("num_fewshot", "samples", "baseline"):
                shown = ", ".join(f"{m} {v:.4f}" for m, v in metrics.items() if not m.endswith("stderr"))
                lines.append(f"lm-eval {name}: {shown}")
        lines.append(f"lm-eval protocol: {z['protocol']}")
    if "long-context" in results:
        from .eval.long_context import summary_lines
        lines.extend(summary_lines(results["long-context"]))
    return lines


def _eval_suites(args, suites, domains: tuple[str, ...] = ()) -> int:
    """The suites (and a dense --baseline); with `domains`, the perplexity suite runs once per domain, with
    the dense baseline measured on the same domain, and the other suites run once on --data."""
    import dataclasses
    from .data import ALIASES
    from .eval.suites import EvalProtocol, evaluate, reference
    from .io.loading import load, resolve_device
    from .report import sparsity_report
    if "fidelity" in suites and not args.baseline:
        raise ValueError("the fidelity suite compares the model with its dense original: pass --baseline DENSE "
                         "(the model it was pruned from)")
    if "lm-eval" in suites:
        from .eval.zeroshot import check_include_trusted
        check_include_trusted(args.lm_eval_include, args.trust_remote_code)     # before any model is loaded
    device = resolve_device(args.device)
    values = {"data": args.data, "seqlen": args.seqlen, "stride": args.stride, "max_tokens": args.max_tokens,
              "fidelity_tokens": args.fidelity_tokens, "lm_eval_limit": args.lm_eval_limit,
              "batch_size": args.batch_size, "knowledge_data": args.knowledge_data,
              "lm_eval_include": args.lm_eval_include}
    if args.lm_eval_tasks:
        values["lm_eval_tasks"] = args.lm_eval_tasks
    if args.context is not None:
        values["contexts"] = args.context
    if args.long_context_samples is not None:
        values["long_context_samples"] = args.long_context_samples
    protocol = EvalProtocol(**values)
    per_domain = {name: dataclasses.replace(protocol, data=name) for name in domains}
    others = tuple(s for s in suites if s != "perplexity") if domains else suites
    model, tokenizer = load(args.model, dtype=args.dtype, allow_pickle=args.allow_pickle,
                            trust_remote_code=args.trust_remote_code)
    ref, domain_refs = None, {}
    if args.baseline:
        dense, dense_tokenizer = load(args.baseline, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                      trust_remote_code=args.trust_remote_code)
        _check_same_vocabulary(tokenizer, dense_tokenizer, args.model, args.baseline)
        if others:
            ref = reference(dense, dense_tokenizer, others, protocol, device=device,
                            trust_remote_code=args.trust_remote_code)
        for name, domain_protocol in per_domain.items():
            domain_refs[name] = reference(dense, dense_tokenizer, ("perplexity",), domain_protocol, device=device)
        del dense
    recorded = _recorded_dense_perplexity(args.model)
    if others:
        from .inference.cli import configs_from_args
        token, kv, prompt_pruning = configs_from_args(args)
        out = evaluate(model, tokenizer, others, protocol, reference=ref, device=device, recorded=recorded,
                       trust_remote_code=args.trust_remote_code, token_pruning=token, kv_pruning=kv,
                       prompt_pruning=prompt_pruning)
    else:
        out = {"suites": {}, "warnings": [], "protocol": protocol.to_dict()}
    if domains:
        out["domains"] = {}
    for name, domain_protocol in per_domain.items():
        # the dense perplexity recorded at pruning time is compared only on the domain it was measured on
        source = ((recorded or {}).get("source") or {}).get("source")
        measured = evaluate(model, tokenizer, ("perplexity",), domain_protocol, reference=domain_refs.get(name),
                            device=device, recorded=recorded if source == ALIASES.get(name, name) else None)
        out["domains"][name] = measured["suites"]["perplexity"]
        out["warnings"].extend(measured["warnings"])
    for line in suite_lines(out):
        print(line)
    sparsity = sparsity_report(model)
    print(f"sparsity: {sparsity['block_linear_sparsity']:.2%} of decoder-block linear weights, "
          f"{sparsity['model_sparsity']:.2%} of all {sparsity['parameters'] / 1e6:.1f}M parameters")
    for warning in out["warnings"]:
        print(f"prunekit: warning: {warning}", file=sys.stderr)
    if args.json:
        data = {"model": args.model, "baseline": args.baseline, **out, "sparsity": sparsity}
        if "perplexity" in out["suites"]:
            data["perplexity"] = out["suites"]["perplexity"]          # where `prunekit eval` always put it
        write_json_atomic(args.json, data, default=str)
    return 0


def _list(args) -> int:
    from .models import supported_model_types
    from .catalog import available_methods, get_method
    kinds = {"linear": "unstructured/N:M", "width": "width", "depth": "depth", "experts": "MoE experts",
             "search": "structure search", "state": "state-space", "compensate": "compensation",
             "recover": "recovery"}
    for scope, label in kinds.items():
        names = [name for name in available_methods() if get_method(name).scope == scope]
        print(f"{label + ':':<18}" + ", ".join(names))
    print(f"{'model types:':<18}" + ", ".join(supported_model_types()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
