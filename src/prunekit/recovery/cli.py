"""`prunekit recover DIR --data SOURCE --method {lora,perp,kd,...,distill,partial} --steps N --out DIR2`.

Loads a pruned checkpoint, draws training windows from --data (the same sources as calibration:
"default", a .txt/.jsonl file or folder, a `datasets` name), fine-tunes with a mask-preserving
method (`train.py`) and exports a stock checkpoint with the same zeros. DIR is never written: the
output folder and the checkpoint folder are checked against it before any work. The output's
prunekit.json keeps DIR's record (source, pruning steps, structure) and adds a `recovery` section.

kd, router-kd, expert-kd and distill need the model before pruning as their teacher: --teacher,
else the `source` DIR's prunekit.json records (a local path, a hub id, a .gguf file or "default").
router-kd (Router KD, arXiv 2603.02217) and expert-kd (MoE-Pruner's expert-wise distillation,
arXiv 2410.12013) apply to Mixture-of-Experts models only. distill (Minitron, arXiv 2407.14679)
trains every parameter of a width- or depth-pruned model on the teacher's logits; its budget may
be given in tokens (--tokens N instead of --steps), its memory floor is printed before training
(and a run that cannot fit is refused), --hidden-weight adds a hidden-state loss (after depth
pruning the block pairs come from the removed_blocks DIR/prunekit.json records) and
--gradient-checkpointing trades compute for activation memory.

--data-select METHOD --budget B trains only on what a data selector (prunekit data select's methods,
scored with the model being recovered) keeps of --data: the kept samples are packed into windows; with
qtuning (arXiv 2509.23873) the tokens it prunes are left out of the loss (never out of the input); paser
(arXiv 2502.12594) also loads the dense model (--teacher, else the source DIR's prunekit.json records, as
kd does) and spends the budget where the pruned model lost most against it. --split-tokens N cuts
--data's samples into passages of at most N tokens before the selection (a corpus of long documents
otherwise leaves a budget a handful of whole documents to choose from). The
selection (method, budget, tokens kept) goes into the report and prunekit.json. --light-peft (lora, kd)
prunes whole adapter modules and ranks after --light-peft-steps early steps (Light-PEFT, arXiv 2406.03792;
see light_peft.py) and reports the trainable parameters before and after.

Checkpoints go to --run-dir (default: OUT.checkpoints next to OUT) every --checkpoint-every
steps; --resume continues from there. After a successful export the checkpoint is deleted unless
--keep-checkpoints.
"""
from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

METADATA_FILE = "prunekit.json"
# flag dest -> config field; a flag left out keeps the config's default (one source of truth)
CONFIG_FLAGS = ("steps", "lr", "batch_size", "samples", "seqlen", "seed", "weight_decay", "max_grad_norm",
                "checkpoint_every", "rank", "alpha", "rslora", "dropout", "temperature", "kd_weight",
                "expert_weight", "tokens", "hidden_weight", "gradient_checkpointing", "blocks", "head")
TEACHER_HINT = ("pass --teacher MODEL: the dense model DIR was pruned from (a local directory, a hub id, "
                "a .gguf file or 'default')")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``recover`` sub-command to an argparse ``subparsers`` object (handler: run_recover_cli)."""
    parser = subparsers.add_parser(
        "recover", help="fine-tune a pruned model without touching its zeros (masked LoRA, PERP, distillation)",
        description="Recovery fine-tuning that keeps the sparsity: masked LoRA (lora), norms and biases "
                    "only (perp), masked LoRA distilled from the dense model (kd); for Mixture-of-Experts "
                    "models the routers distilled from the unpruned model (router-kd) or the experts "
                    "distilled expert by expert (expert-kd); for width- and depth-pruned models every "
                    "parameter distilled from the dense model's logits (distill, Minitron).")
    _add_arguments(parser)
    parser.set_defaults(handler=run_recover_cli)
    return parser


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="DIR", help="the pruned checkpoint directory (e.g. the --out of prunekit prune)")
    p.add_argument("--data", default="default",
                   help="training text: default (offline), a .txt/.jsonl file or dir, wikitext2, c4, ptb")
    p.add_argument("--method", required=True, metavar="{lora,perp,kd,router-kd,expert-kd,distill,partial}",
                   help="lora: masked LoRA; perp: norms and biases only; kd: masked LoRA distilled from --teacher; "
                        "router-kd: only the MoE routers, distilled from --teacher (arXiv 2603.02217); "
                        "expert-kd: the MoE experts (zeros kept), cross-entropy + per-expert MSE to --teacher's "
                        "experts (MoE-Pruner, arXiv 2410.12013); distill: every parameter of a width- or "
                        "depth-pruned model, distilled from --teacher's logits (Minitron, arXiv 2407.14679); "
                        "partial: only the last --blocks decoder blocks, the final norm and the LM head "
                        "(arXiv 2411.15558; after depth pruning)")
    p.add_argument("--data-select", metavar="METHOD",
                   help="train only on what this data selector keeps of --data (random, perplexity, clusters, "
                        "entropy, donod, qtuning: scored with DIR's model; paser: DIR against the dense model, "
                        "--teacher or DIR's recorded source); needs --budget")
    p.add_argument("--budget", help="--data-select: how much it keeps, a fraction (0.2), N samples or N tokens")
    p.add_argument("--split-tokens", type=int, metavar="N",
                   help="--data-select: cut --data's samples into pieces of at most N tokens before selecting (a "
                        "budget then chooses among passages, not whole documents; --seqlen is a natural N)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 200)")
    p.add_argument("--tokens", type=int, metavar="N",
                   help="distill: the training budget in tokens instead of --steps: ceil(N / (batch size x seqlen)) "
                        "steps; the summary says how many tokens were used")
    p.add_argument("--out", required=True, help="output directory (safetensors + tokenizer + prunekit.json)")
    lora = p.add_argument_group("LoRA (lora, kd)")
    lora.add_argument("--rank", type=int, help="adapter rank (default 16)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    lora.add_argument("--rslora", action="store_const", const=True, default=None,
                      help="rank-stabilised scale alpha/sqrt(rank) instead of alpha/rank")
    lora.add_argument("--dropout", type=float, help="dropout on the adapters' input (default 0)")
    lora.add_argument("--light-peft", action="store_true",
                      help="Light-PEFT early pruning (arXiv 2406.03792): after --light-peft-steps steps, remove the "
                           "least important adapter modules and ranks and train the smaller adapters on")
    lora.add_argument("--light-peft-steps", type=int, help="Light-PEFT: early steps before pruning (default 20)")
    lora.add_argument("--light-peft-modules", type=float,
                      help="Light-PEFT: share of adapter modules removed whole (default 0.25)")
    lora.add_argument("--light-peft-ranks", type=float,
                      help="Light-PEFT: share of each kept module's ranks removed (default 0.5)")
    kd = p.add_argument_group("distillation (kd, router-kd, expert-kd, distill)")
    kd.add_argument("--teacher", help="the model before pruning (default: the source recorded in DIR/prunekit.json); "
                                      "also the dense model --data-select paser compares DIR with")
    kd.add_argument("--temperature", type=float, help="kd, router-kd, distill: softmax temperature (default 1)")
    kd.add_argument("--kd-weight", type=float,
                    help="kd, router-kd, distill: weight of the KL term; the rest is next-token loss (default 1)")
    kd.add_argument("--hidden-weight", type=float,
                    help="distill: weight of a normalised MSE between the student's and the teacher's block "
                         "outputs (same hidden size; after depth pruning the pairs come from DIR/prunekit.json); "
                         "default 0, logits only")
    kd.add_argument("--expert-weight", type=float,
                    help="expert-kd: lambda, the weight of the summed per-expert MSE (default: cross-entropy / "
                         "expert MSE before training, as MoE-Pruner initialises it)")
    partial = p.add_argument_group("partial-layer fine-tuning (partial)")
    partial.add_argument("--blocks", type=int, help="partial: train the last N decoder blocks (default 3)")
    partial.add_argument("--no-head", dest="head", action="store_const", const=False, default=None,
                         help="partial: keep the LM head frozen (a tied head is the input embedding)")
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=float,
                       help="AdamW learning rate (default 1e-4; perp 1e-3; expert-kd and distill 2e-5; partial 1e-5)")
    train.add_argument("--batch-size", type=int, help="windows per step (default 4)")
    train.add_argument("--seqlen", type=int, help="tokens per window (default 512, capped by the model's context)")
    train.add_argument("--samples", type=int, help="windows drawn from --data (default steps x batch size)")
    train.add_argument("--seed", type=int, help="window order and LoRA initialisation (default 0)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    train.add_argument("--max-grad-norm", type=float, help="gradient clipping; 0 disables (default 1)")
    train.add_argument("--gradient-checkpointing", action="store_const", const=True, default=None,
                       help="distill: recompute each decoder block's activations in the backward pass (less "
                            "memory, about a third more compute); a resume may turn it on or off")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints; 0: none (default 50)")
    train.add_argument("--run-dir", type=Path, help="checkpoint folder (default: OUT.checkpoints)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in the run folder")
    train.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoint after the export")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (the whole model trains there)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (they can run code)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", type=Path, help="also write the report as JSON")


def recover_methods() -> list[str]:
    from ..catalog import available_methods, get_method
    return [name for name in available_methods() if get_method(name).scope == "recover"]


def config_from_args(args):
    """The recovery config the flags describe; a flag the method does not have is an error."""
    import dataclasses

    from ..catalog import get_method

    names = recover_methods()
    if args.method not in names:
        close = difflib.get_close_matches(args.method, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown recovery method {args.method!r}.{hint} Use one of: {', '.join(names)}")
    if args.steps is not None and getattr(args, "tokens", None) is not None:
        raise ValueError("--steps and --tokens both set the training budget: give one of them (--tokens N trains "
                         "ceil(N / (batch size x seqlen)) steps)")
    config_cls = get_method(args.method).config_cls
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {}
    for name in CONFIG_FLAGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in fields:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method {args.method}")
        values[name] = value
    if values.get("max_grad_norm") == 0:
        values["max_grad_norm"] = None
    return config_cls(**values)


def default_teacher(model_dir: Path, method: str = "kd") -> str:
    """The dense source recorded in `model_dir`/prunekit.json, as something `load` accepts."""
    meta = model_dir / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"{method} needs the dense model and {model_dir} has no {METADATA_FILE} saying where it "
                         f"was pruned from; {TEACHER_HINT}")
    source = json.loads(meta.read_text()).get("source") or {}
    kind = source.get("kind")
    if kind == "default":
        return "default"
    if kind == "hub" and source.get("id"):
        return source["id"]
    if kind in ("local", "gguf") and source.get("path"):
        if not Path(source["path"]).exists():
            raise FileNotFoundError(f"{method}'s teacher, the source recorded in {meta}, no longer exists: "
                                    f"{source['path']}; {TEACHER_HINT}")
        return source["path"]
    raise ValueError(f"{meta} records no usable source model ({source!r}); {TEACHER_HINT}")


def _dense_model(args, model_dir: Path, who: str) -> str:
    """The dense model `who` needs (a distillation method's teacher, PASER's reference): --teacher, else the
    source DIR's prunekit.json records; never DIR itself."""
    name = args.teacher or default_teacher(model_dir, who)
    if Path(name).exists() and Path(name).resolve() == model_dir:
        raise ValueError(f"{who} needs the dense model DIR was pruned from, not {model_dir} itself; {TEACHER_HINT}")
    return name


def run_recover_cli(args: argparse.Namespace) -> int:
    """Validate everything, load, train, export, print the summary. Returns 0."""
    from ..io.atomic import write_json_atomic
    from ..io.export import check_output_dir, save_pretrained_atomic
    from ..io.loading import load, load_pruned, recorded_widths, resolve_device
    from ..catalog import get_method
    from .train import CHECKPOINT, format_summary, recovery_windows

    cfg = config_from_args(args)
    light_peft = _light_peft_from_args(args, cfg)
    _check_data_select(args, cfg)
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {args.model} (recover takes a local checkpoint "
                                "directory, e.g. the --out of prunekit prune)")
    model_dir = model_dir.resolve()
    out = check_output_dir(args.out, overwrite=args.overwrite, protect=[model_dir])
    run_dir = _run_dir(args, cfg, out, model_dir)
    teacher_name = dense_name = None
    if cfg.needs_teacher:
        teacher_name = _dense_model(args, model_dir, args.method)
    if args.data_select == "paser":
        dense_name = _dense_model(args, model_dir, "--data-select paser")
    elif args.teacher and not cfg.needs_teacher:
        distilling = [n for n in recover_methods() if get_method(n).config_cls.objective != "lm"]
        raise ValueError(f"--teacher applies to the distillation methods ({', '.join(distilling)}) and to "
                         f"--data-select paser only, not {args.method}")
    device = resolve_device(args.device)

    if recorded_widths(model_dir) is not None:      # blocks of different widths: no stock config describes them
        model, tokenizer = load_pruned(model_dir, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    else:
        model, tokenizer = load(model_dir, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer, so --data text cannot become tokens; save the model's "
                         "tokenizer next to it (tokenizer.save_pretrained(DIR))")
    seqlen = _seqlen(model.config, cfg.seqlen)

    def load_dense(name):                           # the teacher, or the dense model PASER compares with
        return load(name, dtype=args.dtype, allow_pickle=args.allow_pickle,
                    trust_remote_code=args.trust_remote_code)[0]

    loss_mask = selection = dense = None
    if args.data_select:
        from .train import selected_windows
        if dense_name is not None:
            dense = load_dense(dense_name)
        windows, loss_mask, selection = selected_windows(model, tokenizer, args.data, args.data_select, args.budget,
                                                         seqlen=seqlen, seed=cfg.seed, dense=dense,
                                                         split_tokens=getattr(args, "split_tokens", None),
                                                         progress=not args.no_progress)
        if dense is not None:
            selection["dense"] = dense_name
    else:
        windows = recovery_windows(tokenizer, cfg, args.data, seqlen=seqlen, seed=cfg.seed)
    teacher = dense if teacher_name is not None and teacher_name == dense_name else None
    dense = None                                    # the teacher keeps it alive if it is one; else freed
    if teacher_name is not None and teacher is None:
        teacher = load_dense(teacher_name)
    if cfg.objective == "distill":
        cfg = _distill_setup(cfg, model_dir, model, teacher, int(windows.shape[1]), device)

    extra = {key: value for key, value in (("loss_mask", loss_mask), ("light_peft", light_peft)) if value is not None}
    report = get_method(args.method).fn(model, cfg, windows, teacher=teacher, run_dir=run_dir, resume=args.resume,
                                        device=device, progress=not args.no_progress, **extra)
    report["data"] = {"source": str(args.data), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                      "seed": cfg.seed}
    if selection is not None:
        report["data"]["selection"] = selection
    report["teacher"] = teacher_name
    report["input"] = str(model_dir)

    saved = save_pretrained_atomic(model, tokenizer, out, metadata=_metadata(model_dir, report),
                                   overwrite=args.overwrite, protect=[model_dir])
    print(format_summary(report))
    print(f"saved to {saved} (loads with AutoModelForCausalLM.from_pretrained"
          f"{'' if recorded_widths(saved) is None else '; blocks of different widths: prunekit.load_pruned'})")
    if run_dir is not None:
        checkpoint = run_dir / CHECKPOINT
        if args.keep_checkpoints:
            print(f"checkpoint kept at {checkpoint}")
        else:
            checkpoint.unlink(missing_ok=True)
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
    if args.json:
        write_json_atomic(args.json, report)
    return 0


LIGHT_PEFT_FLAGS = ("light_peft_steps", "light_peft_modules", "light_peft_ranks")


def _light_peft_from_args(args, cfg):
    """The `light_peft.LightPeftConfig` of --light-peft and its flags, or None."""
    values = {name.removeprefix("light_peft_"): getattr(args, name, None) for name in LIGHT_PEFT_FLAGS}
    values = {key: value for key, value in values.items() if value is not None}
    if not getattr(args, "light_peft", False):
        if values:
            raise ValueError(f"--light-peft-{next(iter(values))} needs --light-peft")
        return None
    if cfg.trains != "lora":
        raise ValueError(f"--light-peft prunes LoRA adapters; --method {args.method} trains none (use lora or kd)")
    from .light_peft import LightPeftConfig
    return LightPeftConfig(**values)


def _check_data_select(args, cfg) -> None:
    """--data-select / --budget: both or neither; what a selection cannot do is refused before any loading."""
    method, budget = getattr(args, "data_select", None), getattr(args, "budget", None)
    split = getattr(args, "split_tokens", None)
    if method is None:
        if budget is not None:
            raise ValueError("--budget sizes a data selection: give --data-select METHOD with it")
        if split is not None:
            raise ValueError("--split-tokens cuts the samples a data selection chooses from: give --data-select "
                             "METHOD --budget B with it (without a selection, training windows are drawn from the "
                             "whole text anyway)")
        return
    if split is not None and split < 1:
        raise ValueError(f"--split-tokens must be at least 1, got {split}")
    if budget is None:
        raise ValueError(f"--data-select {method} needs --budget (a fraction such as 0.2, N samples or N tokens)")
    from ..selection.pool import parse_budget
    from ..selection.select import SELECTORS
    if method not in SELECTORS:
        close = difflib.get_close_matches(method, list(SELECTORS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown --data-select method {method!r}.{hint} Use one of: {', '.join(SELECTORS)}")
    parse_budget(budget)            # a budget of 0 or a malformed one fails here
    if args.samples is not None:
        raise ValueError("--samples draws random windows; with --data-select the --budget decides the training data: "
                         "drop --samples")
    if method == "qtuning" and cfg.objective != "lm":
        raise ValueError(f"--data-select qtuning prunes tokens from the next-token loss; --method {args.method} trains "
                         "on the teacher's distributions: use --method lora or perp, or another selector")
    if cfg.objective == "distill" and getattr(cfg, "tokens", None) is not None:
        raise ValueError("--tokens sets distill's budget from random windows; with --data-select give --steps")


def _distill_setup(cfg, model_dir: Path, model, teacher, seqlen: int, device):
    """distill: the block pairs of a hidden-state loss from DIR/prunekit.json's removed_blocks, and the
    memory floor printed (and checked) before training."""
    import dataclasses

    from .distill import check_memory, decoder_blocks, teacher_blocks_from_record

    if cfg.hidden_weight and cfg.teacher_blocks is None and (model_dir / METADATA_FILE).is_file():
        record = json.loads((model_dir / METADATA_FILE).read_text())
        blocks = teacher_blocks_from_record(record, len(decoder_blocks(teacher)), len(decoder_blocks(model)))
        if blocks is not None:
            cfg = dataclasses.replace(cfg, teacher_blocks=blocks)
    print(check_memory(model, teacher, cfg, seqlen, device).line(device))
    return cfg


def _run_dir(args, cfg, out: Path, model_dir: Path) -> Path | None:
    if not cfg.checkpoint_every:
        if args.resume:
            raise ValueError("--resume needs checkpoints; --checkpoint-every 0 turns them off")
        return None
    run_dir = (args.run_dir or out.with_name(out.name + ".checkpoints")).expanduser().resolve()
    for guarded, what in ((model_dir, "the input model"), (out, "--out (it is replaced on export)")):
        if run_dir == guarded or guarded in run_dir.parents:
            raise ValueError(f"the checkpoint folder {run_dir} lies inside {what} {guarded}; choose another --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} exists and is not a directory")
    return run_dir


def _seqlen(config, asked: int | None) -> int:
    from ..data import default_seqlen
    context = default_seqlen(config, cap=1 << 30)
    if asked is None:
        return min(512, context)
    if asked > context:
        raise ValueError(f"--seqlen {asked} is longer than the model's context ({context} positions); "
                         f"use --seqlen {min(512, context)}")
    return asked


def _metadata(model_dir: Path, report: dict) -> dict:
    """DIR's prunekit.json (source, steps, structure, ...) plus a `recovery` section."""
    meta_path = model_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    # the export writes fresh versions/saved_at; the input's own go into the recovery section
    earlier = {key: meta.pop(key) for key in ("versions", "saved_at") if key in meta}
    # per-step losses go to --json; the checkpoint is deleted after the export
    recovery = {key: value for key, value in report.items() if key not in ("losses", "checkpoint")}
    recovery["input_record"] = earlier
    if "recovery" in meta:
        recovery["previous"] = meta["recovery"]
    meta["recovery"] = recovery
    return meta
