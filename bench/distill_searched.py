"""Distillation of the searched 25% SmolLM2-135M (issue 17): perplexity after 0, 50k and 200k tokens of
distillation from the dense model. Target: searched + 200k tokens <= 1.25x the dense perplexity.

    python bench/distill_searched.py                         # search, distil to 50k (two learning rates), eval,
                                                             # continue the better one to 200k, eval
    python bench/distill_searched.py --reuse                 # reuse what WORK already holds (a finished search, ...)
    python bench/distill_searched.py --lr 2e-5               # one learning rate only
    python bench/distill_searched.py --reuse --continue-lr 2e-5   # 2e-5 to 200k first, then 1e-4 to 50k
    python bench/distill_searched.py --tiny --model DIR      # tiny (tests): a few windows, a few hundred tokens

Protocol: float32 on CPU, every step its own `prunekit` process.

1. Search: `prunekit search MODEL --target params=0.75 --generations 16 --budget-minutes 600 --samples 16
   --seqlen 256 --context 1024` (space width,depth,sublayer, score flap, LIAR after it: the settings of
   bench/search_smollm2.py) with the generation count fixed at 16 and a time budget far above what 16
   generations take, so that the searched structure does not depend on the machine's load.
2. Distillation: `prunekit recover SEARCHED --method distill --teacher MODEL --tokens N --samples S --lr LR
   --temperature 1 --seqlen 512 --batch-size 4` (Minitron: every parameter, loss T^2 KL(teacher || student) on
   the logits, AdamW at a constant learning rate, gradient clipping 1). N tokens are ceil(N / (4 x 512))
   whole optimizer steps. Every run draws the same S = ceil(max N / 2048) x 4 windows of 512 tokens
   (seed 0, uniform random starts) from the calibration split of the offline default corpus (323k tokens
   with SmolLM2's tokenizer; every 10th document is held out for evaluation, so no training window reads
   evaluation text); each window is seen once (no epochs), in a seeded order that is a pure function of
   the step. The run to the first budget keeps its checkpoint (--keep-checkpoints) and the next budget
   continues it (--resume with a larger --tokens, same windows and settings, as the checkpoint identity
   requires): k steps then a resume to n steps is n steps, bit for bit. Every run is started with --resume
   and checkpoints every --checkpoint-every steps, so one that is interrupted continues where it stopped when
   the script is run again with --reuse. With several --lr and --continue-lr auto, each is run to the first
   budget and the one with the lowest distillation loss on the first 32 training windows after it (the
   recover report's loss_after; a training-set number, so the evaluation split plays no part in the choice)
   is continued; a given --continue-lr is continued first, and the other learning rates are run to the first
   budget after it, for comparison.
3. Perplexity: `prunekit eval DIR --suite perplexity --seqlen 512 --max-tokens 8192`: the held-out split of
   the default corpus, non-overlapping 512-token windows over its first 8,192 tokens (the BENCHMARKS
   protocol, the one bench/search_smollm2.py asks the search for), for the dense model, the searched
   model (0 tokens) and every distilled model.

Results: JSON (--json) and a markdown table (--out). Wall times are of the whole `prunekit recover` process
(loading, the loss probes before and after, the export); throughput is trained tokens over the report's
seconds (training and the two probes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TARGET_RATIO = 1.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the dense model (search input and teacher)")
    p.add_argument("--target", default="params=0.75")
    p.add_argument("--samples", type=int, default=16, help="search: calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="search: tokens per window")
    p.add_argument("--generations", type=int, default=16)
    p.add_argument("--budget-minutes", type=float, default=600.0,
                   help="search: an upper bound only; the generation count decides")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tokens", type=int, action="append",
                   help="distillation budgets, in increasing order (default 50000 and 200000)")
    p.add_argument("--lr", type=float, action="append", help="learning rates run to the first budget "
                                                              "(default 2e-5 and 1e-4)")
    p.add_argument("--continue-lr", default="auto",
                   help="the learning rate continued past the first budget; auto: the lowest loss_after")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--train-seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="steps between checkpoints: every run is started with --resume, so an interrupted one "
                        "continues from its last checkpoint when the script is run again with --reuse")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--work", type=Path, default=Path("/tmp/prunekit-distill"))
    p.add_argument("--reuse", action="store_true", help="reuse the outputs WORK already holds (each is checked)")
    p.add_argument("--tiny", action="store_true",
                   help="test-sized settings (needs --model DIR): 4 x 16-token search windows, 1 generation, "
                        "budgets of 64 and 128 tokens (2 x 16-token windows per step), eval 256 tokens x 32")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the results from what WORK holds (implies --reuse); a missing run is "
                        "listed as not finished")
    p.add_argument("--note", action="append", default=[], help="a line for the notes of the results (repeatable)")
    p.add_argument("--json", type=Path, default=Path("bench/results/distill_searched.json"))
    p.add_argument("--out", type=Path, default=Path("bench/results/distill_searched.md"))
    args = p.parse_args(argv)
    if args.tiny:
        if args.model == "default":
            p.error("--tiny needs --model DIR (a tiny checkpoint with a tokenizer)")
        args.samples, args.seqlen, args.generations, args.budget_minutes, args.context = 4, 16, 1, 5.0, 32
        args.tokens = args.tokens or [64, 128]
        args.train_seqlen, args.batch_size, args.eval_seqlen, args.max_eval_tokens = 16, 2, 32, 256
    args.tokens = sorted(set(args.tokens or [50_000, 200_000]))
    args.reuse = args.reuse or args.report_only
    args.lr = list(dict.fromkeys(args.lr or [2e-5, 1e-4]))
    if args.continue_lr != "auto":
        args.continue_lr = float(args.continue_lr)
        if args.continue_lr not in args.lr:
            p.error(f"--continue-lr {args.continue_lr:g} is not one of --lr {args.lr}")
    return args


def prunekit(*arguments) -> list[str]:
    return [sys.executable, "-m", "prunekit", *map(str, arguments)]


def run(command: list[str], log: list[dict], record: Path | None = None) -> float:
    """Run one prunekit process (its output goes to ours); returns its wall seconds and logs the command
    (also to `record`, so that a later --reuse still knows how long it took)."""
    from prunekit.bench_host import OtherCpu, load_average
    shown = " ".join(shlex.quote(c) for c in ["prunekit", *command[3:]])
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    with OtherCpu() as others:
        subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    entry = {"command": shown, "seconds": round(seconds, 1), "other_cores_busy": others.cores,
             "load_average_after": load_average(), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    log.append(entry)
    if record is not None:
        record.write_text(json.dumps(entry) + "\n")
    print(f"[{seconds:.0f} s; other processes kept {others.cores} cores busy]", flush=True)
    return seconds


def reused(record: Path, log: list[dict], what: str) -> float | None:
    """The wall seconds a step that is reused took when it ran (None if unknown); logs it as reused."""
    print(f"reusing {what}", flush=True)
    entry = json.loads(record.read_text()) if record.is_file() else {"command": what, "seconds": None,
                                                                      "other_cores_busy": None}
    log.append({**entry, "reused": True})
    return entry["seconds"]


def steps_for(tokens: int, args) -> int:
    return math.ceil(tokens / (args.batch_size * args.train_seqlen))


def search(args, log) -> dict:
    out, record, state = args.work / "searched", args.work / "searched.json", args.work / "searched.run"
    if args.reuse and record.is_file() and (out / "search.json").is_file():
        result, body = json.loads(record.read_text()), json.loads((out / "search.json").read_text())
        calibration = result.get("calibration") or {}
        found = (body["config"]["target"], body["generation"], calibration.get("samples"), calibration.get("seqlen"))
        wanted = (args.target, args.generations, args.samples, args.seqlen)
        if found != wanted:
            raise SystemExit(f"{out} holds a search of (target, generations, samples, seqlen) = {found}, not "
                             f"{wanted}: remove it or drop --reuse")
        seconds = reused(args.work / "searched.run.json", log, f"the search in {out}")
        if seconds is None:                 # run outside this script: the search's own clock
            seconds, log[-1]["seconds"] = result.get("seconds"), result.get("seconds")
        was_reused = True
    else:
        was_reused = False
        seconds = run(prunekit("search", args.model, "--target", args.target, "--generations", args.generations,
                               "--budget-minutes", args.budget_minutes, "--samples", args.samples, "--seqlen",
                               args.seqlen, "--context", args.context, "--run-dir", state, "--out", out,
                               "--overwrite", "--json", record, "--set", f"eval.seqlen={args.eval_seqlen}",
                               "--set", f"eval.max_tokens={args.max_eval_tokens}"), log,
                      args.work / "searched.run.json")
        result, body = json.loads(record.read_text()), json.loads((out / "search.json").read_text())
    return {"dir": str(out), "seconds": seconds, "reused": was_reused, "generations": body["generation"],
            "candidates": len(body["candidates"]),
            "kl": body["best"]["fitness_kl"], "params": result["parameters_after"],
            "dense_params": result["parameters"],
            "removed_block_params": 1 - body["best"]["block_params"] / body["dense"]["block_params"],
            "kept": body["best"]["kept"], "config": body["config"],
            "saved_at": json.loads((out / "prunekit.json").read_text()).get("saved_at"),
            "search_ppl": (result.get("pruned_perplexity") or {}).get("ppl"),
            "search_dense_ppl": (result.get("dense_perplexity") or {}).get("ppl")}


def evaluate(args, model, name: str, log) -> dict:
    record = args.work / f"eval-{name}.json"
    if args.reuse and record.is_file():
        reused(record.with_suffix(".run.json"), log, str(record))
    else:
        run(prunekit("eval", model, "--suite", "perplexity", "--seqlen", args.eval_seqlen, "--max-tokens",
                     args.max_eval_tokens, "--json", record), log, record.with_suffix(".run.json"))
    ppl = json.loads(record.read_text())["perplexity"]
    return {"ppl": ppl["ppl"], "protocol": ppl["protocol"], "eval_seconds": ppl.get("seconds")}


def distill(args, lr: float, index: int, windows: int, log) -> dict:
    """Distil the searched model with `lr` to budget args.tokens[index], continuing the run to the budget
    before it (its checkpoint in the run folder) when index > 0."""
    tokens = args.tokens[index]
    name = f"lr{lr:g}-{tokens}"
    out, record, run_dir = args.work / f"distill-{name}", args.work / f"distill-{name}.json", \
        args.work / f"distill-lr{lr:g}.checkpoints"
    last = index == len(args.tokens) - 1
    if args.reuse and record.is_file() and (out / "prunekit.json").is_file():
        seconds = reused(record.with_suffix(".run.json"), log, str(out))
        was_reused = True
    else:
        was_reused = False
        checkpoint = run_dir / "recover-checkpoint.pt"
        if index > 0 and not checkpoint.is_file():
            print(f"warning: no checkpoint at {checkpoint}: the run to {tokens} tokens starts from step 0 (the "
                  "same result, the steps are a pure function of the step number; only slower)", flush=True)
        command = prunekit("recover", args.work / "searched", "--method", "distill", "--teacher", args.model,
                           "--tokens", tokens, "--samples", windows, "--lr", lr, "--temperature", args.temperature,
                           "--seqlen", args.train_seqlen, "--batch-size", args.batch_size, "--run-dir", run_dir,
                           "--checkpoint-every", args.checkpoint_every, "--resume", "--out", out, "--overwrite",
                           "--json", record, "--no-progress")
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        if not last:
            command.append("--keep-checkpoints")
        seconds = run(command, log, record.with_suffix(".run.json"))
    report = json.loads(record.read_text())
    trained = (report["steps"] - (report["resumed_from"] or 0)) * report["batch_size"] * report["seqlen"]
    return {"name": name, "dir": str(out), "lr": lr, "budget": tokens, "tokens": report["tokens"],
            "steps": report["steps"], "resumed_from": report["resumed_from"], "trained_here": trained,
            "wall_seconds": seconds, "report_seconds": report["seconds"],
            "tokens_per_second": trained / report["seconds"] if report["seconds"] else None,
            "loss_before": report["loss_before"], "loss_after": report["loss_after"],
            "loss_first_step": report["loss_first_step"], "loss_last_step": report["loss_last_step"],
            "windows": report["windows"], "seqlen": report["seqlen"], "batch_size": report["batch_size"],
            "temperature": report["config"]["temperature"], "weight_decay": report["config"]["weight_decay"],
            "max_grad_norm": report["config"]["max_grad_norm"], "reused": was_reused}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    started = datetime.now(timezone.utc)
    searched = search(args, log)
    dense = evaluate(args, args.model, "dense", log)
    rows = [{"name": "searched", "lr": None, "budget": 0, "tokens": 0, "wall_seconds": 0.0, "cumulative_seconds": 0.0,
             **evaluate(args, args.work / "searched", "searched", log)}]
    windows = steps_for(args.tokens[-1], args) * args.batch_size

    missing = []

    def done(lr, index) -> bool:         # --report-only: is this run's output there?
        name = f"lr{lr:g}-{args.tokens[index]}"
        there = all(f.is_file() for f in (args.work / f"distill-{name}.json", args.work / f"eval-{name}.json"))
        if not there and args.report_only:
            missing.append({"lr": lr, "tokens": args.tokens[index]})
        return there or not args.report_only

    def first_budget(lr):
        if not done(lr, 0):
            return None
        row = distill(args, lr, 0, windows, log)
        row.update(evaluate(args, row["dir"], row["name"], log), cumulative_seconds=row["wall_seconds"])
        return row

    # auto: every learning rate to the first budget, then the best one continued; a given --continue-lr is
    # continued first and the other learning rates follow (the continued run's numbers come first)
    first = {lr: first_budget(lr) for lr in (args.lr if args.continue_lr == "auto" else [args.continue_lr])}
    chosen = (min((r for r in first.values() if r), key=lambda r: r["loss_after"])["lr"] if args.continue_lr == "auto"
              else args.continue_lr)
    chain = [first[chosen]]
    for index in range(1, len(args.tokens)):
        if chain[-1] is None or not done(chosen, index):
            break
        row = distill(args, chosen, index, windows, log)
        row.update(evaluate(args, row["dir"], row["name"], log))
        row["cumulative_seconds"] = (None if row["wall_seconds"] is None or chain[-1]["cumulative_seconds"] is None
                                     else chain[-1]["cumulative_seconds"] + row["wall_seconds"])
        chain.append(row)
    for lr in args.lr:
        if lr not in first:
            first[lr] = first_budget(lr)
    rows += [first[lr] for lr in args.lr if first[lr] is not None] + chain[1:]
    final = chain[-1] if len(chain) == len(args.tokens) else None
    for row in rows:
        row["ratio"] = row["ppl"] / dense["ppl"]
    result = {"date": started.isoformat(timespec="minutes"), "commit": _commit(), "host": _host(),
              "argv": sys.argv[1:] if argv is None else list(argv), "settings": _settings(args, windows),
              "notes": args.note,
              "chosen_lr": chosen, "dense": dense, "searched": searched, "rows": rows, "commands": log,
              "not_finished": missing,
              "target": {"ratio": TARGET_RATIO, "tokens": args.tokens[-1],
                         "ratio_reached": final["ratio"] if final else None,
                         "met": final["ratio"] <= TARGET_RATIO if final else None}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    _write(args, result)
    return 0


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1]).stdout.strip()


def _host() -> dict:
    from prunekit.bench_host import cpu_model, load_average
    import torch
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average_end": load_average()}


def _settings(args, windows: int) -> dict:
    return {"model": args.model, "target": args.target, "search": {
                "samples": args.samples, "seqlen": args.seqlen, "generations": args.generations,
                "budget_minutes": args.budget_minutes, "context": args.context},
            "distill": {"tokens": args.tokens, "steps": [steps_for(t, args) for t in args.tokens], "lr": args.lr,
                        "continue_lr": args.continue_lr, "temperature": args.temperature,
                        "seqlen": args.train_seqlen, "batch_size": args.batch_size, "windows": windows,
                        "gradient_checkpointing": args.gradient_checkpointing, "dtype": "float32",
                        "optimizer": "AdamW, constant lr, weight decay 0, gradient clipping 1",
                        "loss": f"T^2 KL(teacher || student), T={args.temperature:g}, logits only"},
            "eval": {"seqlen": args.eval_seqlen, "max_tokens": args.max_eval_tokens}}


def _fmt_seconds(s) -> str:
    return "-" if s is None else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s")


def _write(args, result: dict) -> None:
    s, rows, dense, searched = result["settings"], result["rows"], result["dense"], result["searched"]
    d = s["distill"]
    target = result["target"]
    argv, shown = result["argv"], []
    for i, a in enumerate(argv):              # the notes are listed below, not in the command
        if a != "--note" and (i == 0 or argv[i - 1] != "--note"):
            shown.append(a)
    why = "lowest training distillation loss after the first budget" if d["continue_lr"] == "auto" else "given"
    lines = ["# Distillation of the searched 25% SmolLM2-135M", "",
             f"- date: {result['date']}; commit {result['commit']}",
             f"- command: `python bench/distill_searched.py {' '.join(shown)}`",
             f"- machine: {result['host']['cpu']}, {result['host']['cores']} cores, torch threads "
             f"{result['host']['torch_threads']}; Python {result['host']['python']}, torch {result['host']['torch']}; "
             "shared with other work (wall times and throughput depend on it: see the commands below)",
             f"- searched model: {s['target']}, {searched['generations']} generations / {searched['candidates']} "
             f"candidates, {searched['removed_block_params']:.1%} of the block parameters removed, "
             f"{searched['params'] / 1e6:.1f}M of {searched['dense_params'] / 1e6:.1f}M parameters, KL "
             f"{searched['kl']:.4f}; search {_fmt_seconds(searched['seconds'])}"
             f"{' (reused: saved ' + str(searched['saved_at']) + ')' if searched['reused'] else ''}, budget "
             f"{searched['config']['budget_minutes']:g} min, --generations {searched['config']['generations']}",
             f"- distillation: every parameter, {d['loss']}; {d['optimizer']}; {d['batch_size']} windows x "
             f"{d['seqlen']} tokens per step; budgets {', '.join(f'{t:,}' for t in d['tokens'])} tokens = "
             f"{', '.join(map(str, d['steps']))} steps; {d['windows']} windows drawn once from the calibration "
             f"split (seed 0), each seen once; learning rates {', '.join(f'{lr:g}' for lr in d['lr'])} to the "
             f"first budget, lr {result['chosen_lr']:g} continued (--resume) "
             f"({why});"
             f" gradient checkpointing {'on' if d['gradient_checkpointing'] else 'off'}; {d['dtype']}",
             f"- perplexity protocol: {dense['protocol']}", "",
             "| model | lr | tokens (budget / used) | steps | perplexity | x dense | distill KL (probe) after | "
             "wall (this run) | wall (cumulative) | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| dense | - | - | - | {dense['ppl']:.2f} | 1.000 | - | - | - | - |"]
    for r in rows:
        if r["lr"] is None:
            lines.append(f"| searched 25% | - | 0 | 0 | {r['ppl']:.2f} | {r['ratio']:.3f} | - | - | - | - |")
            continue
        rate = f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else "-"
        resumed = f" (from step {r['resumed_from']})" if r["resumed_from"] else ""
        lines.append(f"| searched + distill | {r['lr']:g} | {r['budget']:,} / {r['tokens']:,} | {r['steps']}{resumed} "
                     f"| {r['ppl']:.2f} | {r['ratio']:.3f} | {r['loss_after']:.4f} | {_fmt_seconds(r['wall_seconds'])} "
                     f"| {_fmt_seconds(r['cumulative_seconds'])} | {rate} |")
    verdict = (f"{target['ratio_reached']:.3f}x, {'met' if target['met'] else 'not met'}" if target["met"] is not None
               else "not measured (the run did not finish)")
    lines += ["", f"Target: searched + {target['tokens']:,} tokens <= {target['ratio']}x dense perplexity: {verdict}.",
              f"The search's own evaluation (same protocol): dense {searched['search_dense_ppl']:.2f}, searched "
              f"{searched['search_ppl']:.2f}.", "",
              "Commands (wall time; cores other processes kept busy meanwhile):", ""]
    lines += [f"- `{c['command']}` ({_fmt_seconds(c['seconds'])}; others {c['other_cores_busy']}"
              f"{'; reused from an earlier run' if c.get('reused') else ''})" for c in result["commands"]]
    lines += [f"- not finished: lr {m['lr']:g} to {m['tokens']:,} tokens" for m in result["not_finished"]]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    lines += ["", f"Kept (heads, FFN channels) per block: {[tuple(k) for k in searched['kept']]}"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
