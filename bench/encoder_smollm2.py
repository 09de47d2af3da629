"""SmolLM2-135M as a text encoder, depth-pruned (arXiv 2410.14578): recall@1/@10 on prunekit's
offline code-retrieval task before and after dropping blocks, with and without a short fine-tune.

    python bench/encoder_smollm2.py                         # "default" model (embedded SmolLM2-135M)
    python bench/encoder_smollm2.py --eval-pairs 100 --finetune-steps 20
    python bench/encoder_smollm2.py --tiny --model DIR      # a few pairs, a few steps (tests)

Rows: the unpruned model; last-k (drop the last --fraction of the blocks, 30% by default); L3Prune
large and small (the cut of least initial contrastive loss in the upper / lower half of the
depth, from --loss-pairs training pairs). Each row is measured right after the cut and after
--finetune-steps steps of contrastive fine-tuning (AdamW, every parameter, in-batch negatives,
seed 0); the unpruned row is fine-tuned the same way, the paper's reference point (a pruned and
fine-tuned encoder against the full one fine-tuned alike). The protocol (task, split, counts, pooling,
tokens per text) is printed under the table. Rows print as soon as they are measured, so a run
cut short by a time limit keeps the rows it finished.

Cost: everything runs on the CPU. On the shared 2-core development host (load ~11) SmolLM2-135M
embedded about 25 tokens/s: recall on 30 pairs at 64 tokens took 127 s, and the full table at
--eval-pairs 20 --max-length 32 --finetune-steps 3 did not finish in 10 minutes. Size the run
to the machine (--only, --eval-pairs, --finetune-steps).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--fraction", type=float, default=0.3, help="last-k: the share of blocks dropped")
    parser.add_argument("--pooling", default="mean", choices=["mean", "last"])
    parser.add_argument("--eval-pairs", type=int, default=100)
    parser.add_argument("--loss-pairs", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=256)
    parser.add_argument("--finetune-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text")
    parser.add_argument("--only", action="append", choices=["last-k", "l3prune-large", "l3prune-small"],
                        help="pruned rows to run (default: all three)")
    parser.add_argument("--tiny", action="store_true", help="a smoke run for tests: few pairs, 2 steps")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and protocol here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.eval_pairs, args.loss_pairs, args.train_pairs = 12, 8, 16
        args.finetune_steps, args.batch_size, args.max_length = 2, 4, 24

    import torch

    from prunekit.encoders import cut_losses, finetune_encoder_, l3prune, last_k, prune_encoder_
    from prunekit.eval.retrieval import recall_at_k, retrieval_pairs
    from prunekit.io.loading import load

    torch.manual_seed(0)
    started = time.perf_counter()
    dense, tokenizer = load(args.model)
    num_blocks = dense.config.num_hidden_layers
    settings = dict(pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length)

    def recall(model) -> dict:
        return recall_at_k(model, tokenizer, (1, 10), limit=args.eval_pairs, seed=0, **settings)

    def cell(result):
        return "-" if result is None else f"{result['recall@1']:.3f} / {result['recall@10']:.3f}"

    def show(row) -> None:            # each row as soon as it is measured: a run cut short keeps its rows
        rows.append(row)
        print(f"| {row['row']} | {row['blocks']} | {cell(row['pruned'])} | {cell(row['finetuned'])} |", flush=True)

    print(f"| encoder | blocks kept (of {num_blocks}) | recall@1 / @10 after the cut | "
          f"after {args.finetune_steps} fine-tune steps |")
    print("|---|---|---|---|", flush=True)
    rows: list[dict] = []
    base = recall(dense)
    train = retrieval_pairs("training", args.train_pairs, 0)

    def finetuned(model, row) -> dict:
        if args.finetune_steps:
            history = finetune_encoder_(model, tokenizer, train, args.finetune_steps, lr=args.lr, seed=0, **settings)
            row["finetuned"] = recall(model)
            row["loss_first_last"] = [history[0], history[-1]]
        return row

    # the paper's reference point: the full model fine-tuned the same way
    show(finetuned(copy.deepcopy(dense), {"row": "unpruned", "blocks": num_blocks, "pruned": base, "finetuned": None}))
    cuts = {"last-k": last_k(num_blocks, args.fraction)}
    wanted = args.only or ["last-k", "l3prune-large", "l3prune-small"]
    losses = None
    if any(w.startswith("l3prune") for w in wanted):
        losses = cut_losses(dense, tokenizer, retrieval_pairs("training", args.loss_pairs, 0), **settings)
        chosen = l3prune(losses)
        cuts["l3prune-large"], cuts["l3prune-small"] = chosen["large"], chosen["small"]
        print(f"L3Prune keeps {chosen} blocks; initial losses " + ", ".join(f"{k}:{v:.3f}" for k, v in losses.items()),
              file=sys.stderr, flush=True)
    for name in wanted:
        model = copy.deepcopy(dense)
        prune_encoder_(model, cuts[name])
        show(finetuned(model, {"row": name, "blocks": cuts[name], "pruned": recall(model), "finetuned": None}))
        del model

    protocol = base["protocol"]
    print(f"\nProtocol: {protocol['queries']} held-out queries vs {protocol['documents']} documents "
          f"({protocol['sample']}); {protocol['source']}; query = {protocol['query']}, document = "
          f"{protocol['document']}; split: {protocol['split_rule']}. {args.pooling} pooling, cosine, "
          f"{args.max_length} tokens per text; ties count against the query.")
    if losses is not None:
        print(f"L3Prune initial losses ({args.loss_pairs} training pairs, batches of {args.batch_size}, InfoNCE "
              f"t=0.05, in-batch negatives): " + ", ".join(f"{k}:{v:.3f}" for k, v in losses.items()))
    print(f"Fine-tune: {args.finetune_steps} steps, AdamW lr {args.lr}, every parameter, batches of "
          f"{args.batch_size} pairs from {len(train)} training pairs, seed 0. Model: {args.model}; "
          f"{time.perf_counter() - started:.0f} s on the CPU.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "losses": losses, "settings": vars(args) | {"json": None}},
                                        indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
