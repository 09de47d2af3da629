"""`prunekit encoder MODEL --cut {l3prune-large,l3prune-small,last-k} --out DIR`: a causal LM as a
text encoder, depth-pruned (arXiv 2410.14578; the method is in `prunekit.encoders`, the task in
`prunekit.eval.retrieval`).

Steps: load; recall@1/@10 of the unpruned model on the held-out retrieval pairs; choose the cut
(last-k: drop the last --fraction of the blocks; l3prune-*: the initial contrastive loss of every
cut on training pairs, then L3Prune's rule); keep the first k blocks; recall again; optionally a
short contrastive fine-tune on training pairs and recall once more; write the model (a stock
checkpoint, `io.export.save_pretrained_atomic`) with `encoder_report.json` beside it, and the same
report under "encoder" in its prunekit.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

CUTS = ("l3prune-large", "l3prune-small", "last-k")
REPORT_FILE = "encoder_report.json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``encoder`` sub-command (handler: `run_encoder_cli`)."""
    p = subparsers.add_parser(
        "encoder", help="prune a causal LM used as a text encoder by depth (last-k or L3Prune), optionally "
                        "fine-tune it contrastively, and measure retrieval recall before and after",
        description="Depth pruning of an LLM text encoder (arXiv 2410.14578): keep the first k decoder blocks, "
                    "chosen by --cut, and report recall@1/@10 on an offline code-retrieval task built from the "
                    "Python standard library (docstring first sentence -> function body).")
    p.add_argument("model", help='hub id, local directory, .gguf file, or "default" (embedded SmolLM2-135M)')
    p.add_argument("--cut", required=True, choices=CUTS,
                   help="last-k: drop the last --fraction of the blocks; l3prune-large / l3prune-small: the cut of "
                        "least initial contrastive loss in the upper / lower half of the depth")
    p.add_argument("--fraction", type=float, default=None, help="last-k: the share of blocks to drop (default 0.3)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"])
    p.add_argument("--finetune-steps", type=int, default=0, help="contrastive fine-tuning steps after pruning")
    p.add_argument("--lr", type=float, default=2e-5, help="fine-tuning learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per fine-tuning / loss batch")
    p.add_argument("--loss-pairs", type=int, default=64, help="training pairs for L3Prune's initial losses")
    p.add_argument("--train-pairs", type=int, default=512, help="training pairs the fine-tune draws from")
    p.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs for recall@k")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:N, auto")
    p.add_argument("--out", type=Path, required=True, help="where the pruned model and its report are written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(handler=run_encoder_cli)
    return p


def _check_args(args) -> None:
    if args.fraction is not None and args.cut != "last-k":
        raise ValueError(f"--fraction applies to --cut last-k only; {args.cut} chooses its own cut (drop --fraction)")
    for name in ("loss_pairs", "train_pairs", "eval_pairs", "batch_size", "max_length"):
        if getattr(args, name) < (2 if name in ("batch_size", "loss_pairs", "max_length") else 1):
            raise ValueError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be 0 (no fine-tune) or more, got {args.finetune_steps}")
    if args.eval_pairs < 10:
        raise ValueError(f"--eval-pairs must be at least 10 for recall@10, got {args.eval_pairs}")


def run_encoder_cli(args) -> int:
    import torch

    from .depth import decoder_blocks
    from .encoders import cut_losses, finetune_encoder_, l3prune, last_k, prune_encoder_
    from .eval.retrieval import recall_at_k, retrieval_pairs
    from .io.export import check_output_dir, save_pretrained_atomic
    from .io.loading import describe_source, load, resolve_device

    _check_args(args)
    protect = [args.model] if Path(args.model).exists() else []
    check_output_dir(args.out, overwrite=args.overwrite, protect=protect)   # a bad --out fails before any work
    fraction = 0.3 if args.fraction is None and args.cut == "last-k" else args.fraction
    started = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; an encoder needs one to turn text into tokens")
    model.to(resolve_device(args.device))
    num_blocks = len(decoder_blocks(model))
    if num_blocks < 2:
        raise ValueError(f"{args.model} has {num_blocks} decoder block; pruning by depth needs at least 2")
    if fraction is not None:
        last_k(num_blocks, fraction)                              # a bad fraction fails before the evaluations
    torch.manual_seed(args.seed)
    settings = dict(pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length)

    def recall() -> dict:
        return recall_at_k(model, tokenizer, (1, 10), limit=args.eval_pairs, seed=args.seed, **settings)

    report: dict = {"paper": "arXiv 2410.14578", "model": describe_source(args.model), "cut": args.cut,
                    "blocks_before": num_blocks, "pooling": args.pooling}
    report["recall_dense"] = recall()
    if args.cut == "last-k":
        keep = last_k(num_blocks, fraction)
        report["fraction"] = fraction
    else:
        loss_pairs = retrieval_pairs("training", args.loss_pairs, args.seed)
        losses = cut_losses(model, tokenizer, loss_pairs, **settings)
        chosen = l3prune(losses)
        keep = chosen[args.cut.removeprefix("l3prune-")]
        report["l3prune"] = {"losses": {str(k): v for k, v in losses.items()}, "cuts": chosen,
                             "pairs": len(loss_pairs), "batch_size": args.batch_size,
                             "rule": "small: least loss over cuts 1..L//2; large: over L//2+1..L (blocks kept)"}
    report["removed_blocks"] = prune_encoder_(model, keep)
    report["blocks_after"] = keep
    if keep == num_blocks:
        report["note"] = "the chosen cut keeps every block: nothing was removed"
    report["recall_pruned"] = recall()
    if args.finetune_steps:
        train = retrieval_pairs("training", args.train_pairs, args.seed)
        history = finetune_encoder_(model, tokenizer, train, args.finetune_steps, lr=args.lr, seed=args.seed,
                                    **settings)
        report["finetune"] = {"steps": args.finetune_steps, "lr": args.lr, "pairs": len(train),
                              "batch_size": args.batch_size, "loss_first": history[0], "loss_last": history[-1],
                              "trained": "every parameter", "optimizer": "AdamW"}
        report["recall_finetuned"] = recall()
    report["seconds"] = time.perf_counter() - started
    final = report.get("recall_finetuned", report["recall_pruned"])

    def write_report(folder: Path) -> None:
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    model.to("cpu")
    out = save_pretrained_atomic(model, tokenizer, args.out, metadata={"encoder": report}, overwrite=args.overwrite,
                                 protect=protect, extra=write_report)
    dense = report["recall_dense"]
    print(f"{args.cut}: kept {keep} of {num_blocks} blocks; recall@1/@10 dense {dense['recall@1']:.3f}/"
          f"{dense['recall@10']:.3f} -> pruned {report['recall_pruned']['recall@1']:.3f}/"
          f"{report['recall_pruned']['recall@10']:.3f}"
          + (f" -> fine-tuned {final['recall@1']:.3f}/{final['recall@10']:.3f}" if args.finetune_steps else ""))
    print(f"protocol: {dense['protocol']['queries']} held-out queries vs as many documents, {args.pooling} pooling, "
          f"{args.max_length} tokens per text; {dense['protocol'].get('source', '')}")
    print(f"wrote {out} and {out / REPORT_FILE}")
    return 0
