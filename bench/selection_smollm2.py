"""Data selection on SmolLM2-135M (issue 19): which calibration windows and which recovery data a pruned
model is best served by, and what Light-PEFT saves.

    python bench/selection_smollm2.py                        # (a), (b) and (c) on the embedded SmolLM2-135M
    python bench/selection_smollm2.py --only a               # one part (repeatable: --only b --only c)
    python bench/selection_smollm2.py --reuse                # keep every finished step WORK already holds
    python bench/selection_smollm2.py --tiny --model DIR     # tiny (tests): a few windows, a handful of steps

Protocol: float32, every step its own `prunekit` process (--in-process runs them in this interpreter: for
tests only), outputs under --work (not the repository), seed 0 everywhere (but (b) --recover-seed). Evaluation
of every model: `prunekit eval DIR --suite perplexity,knowledge --seqlen 512 --max-tokens 8192`: perplexity on
the held-out split of the offline default corpus, non-overlapping 512-token windows over its first 8,192 tokens (the
BENCHMARKS protocol), and the bundled factual questions (exact match and multiple choice, LLM-KICK style,
arXiv 2310.01382); retention = the model's accuracy / the dense model's.

(a) Calibration. `prunekit prune MODEL --method {wanda,sparsegpt} {--sparsity 0.5 | --nm 2:4} --calib default
    --samples 128 --seqlen 512 --seed 0 --no-eval` with plain random windows (128 windows drawn at seeded
    random starts: the baseline) and with `--calib-select S --calib-pool 2048 --calib-scores WORK/a/scores`
    for every S that `prune --calib-select` accepts (random, perplexity, clusters, entropy, statistic): 2,048 random
    windows drawn, 128 of them chosen by S (scored with the model being pruned, the dense one). Both draw their
    windows from the same seeded generator, so the plain windows are the pool's first 128: every selector
    chooses from a pool that holds the baseline's windows. Cost: each scoring selector runs the dense model
    once over all 2,048 x 512 tokens; --calib-scores keeps those scores, so the 4 prunings share 3 passes
    over 1M tokens. SmolLM2-135M forwards about 570 tokens/s (with its LM head) on 2 quiet cores of the AMD
    EPYC this was written on, about 30 min a pass: on a CPU a smaller --calib-pool (512: 8 min a pass), or
    --device cuda.
(b) Recovery. From the plain-calibration Wanda 2:4 model of (a): a pool of --pool-tokens tokens of the
    default corpus's calibration side, its documents first cut into passages of at most --pool-split-tokens
    tokens (default: the training window, 256; 0 keeps whole documents, hundreds to thousands of tokens, which
    leaves a 20% budget a handful to choose from) (`prunekit data select default --method random --budget
    "N tokens" --split-tokens 256`, seed 0; kept under WORK/b-split256, or WORK/b for whole documents; recover
    reads its calibration side, every 10th sample held out, so the pool is the 90% recover
    trains on; its size is counted by a `data select` census with the model's tokenizer). Masked LoRA
    (`prunekit recover BASE --method lora --rank 16 --lr 1e-3 --seqlen 256 --batch-size 4 --data POOL`,
    the lr and rank of bench/cpu_recover.py) on (i) 100% of the pool (`--data-select random --budget "ALL
    samples"`) and (ii) a 20% token budget (`--data-select S --budget "0.2 x pool tokens"`) for every selector
    recover accepts (random, perplexity, clusters, entropy, donod, qtuning, and paser, which compares the
    base with the dense model it records as its source). Every run makes one pass over its data: ceil(windows / batch)
    steps, windows = budget tokens // 256 (a selection that packs fewer windows wraps around to its first
    ones for the last steps; each run's report says how many it packed). Share closed = (ppl_base -
    ppl_run) / (ppl_base - ppl_100%); the target is >= 90% for the best selector.
    --equal-steps gives every 20% run the 100% run's steps instead (its data repeated, about 5 passes): the
    budget is then the data a selector keeps, not the compute, as in data-pruning papers that train a
    selection for as long as the whole set.
    Default budget: --pool-tokens 102,400, so the 100% run is about the 100 steps x 4 x 256 tokens of
    BENCHMARKS' recovery row (about 1.5 h on 2 shared cores) and a 20% run about 20 steps.
(c) Light-PEFT (arXiv 2406.03792). The random-20% run of (b) again with `--light-peft --light-peft-steps K`
    (K = a tenth of its steps, at least 1: the default 20 of 200): trainable parameters before and after
    the early pruning and the perplexity, against plain masked LoRA on the same data and steps.

Results: JSON (--json) and markdown (--out); every number in the markdown has its protocol and commands
beside it, and the list of commands at the end gives each one's wall time and the cores other processes
kept busy meanwhile (the machine is shared: wall times are not benchmarks of speed).
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

PARTS = ("a", "b", "c")
METHODS = ("wanda", "sparsegpt")
PATTERNS = {"50": ["--sparsity", "0.5"], "2of4": ["--nm", "2:4"]}        # tag -> prune flags
PATTERN_NAMES = {"50": "50%", "2of4": "2:4"}
CALIB_SELECTORS = ("random", "perplexity", "clusters", "entropy", "statistic")   # `prune --calib-select`'s
RECOVER_SELECTORS = ("random", "perplexity", "clusters", "entropy", "donod", "qtuning", "paser",
                     "statistic")                                                   # recover's
BASE = ("wanda", "2of4", "plain")           # (b) and (c) recover this model of (a)
SHARE = 0.2                                  # (b): the selected runs' token budget, a share of the pool's tokens
TARGET = 0.9                                 # (b): the best selector closes >= 90% of the 100% run's improvement


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="the dense model (default: the embedded SmolLM2-135M)")
    p.add_argument("--only", action="append", choices=PARTS, help="run only these parts (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help="(a): pruning methods, comma-separated")
    p.add_argument("--patterns", default=",".join(PATTERNS), help=f"(a): {', '.join(PATTERNS)} (50%% or 2:4)")
    p.add_argument("--calib-selectors", default=",".join(CALIB_SELECTORS),
                   help="(a): calibration selectors compared with plain random windows")
    p.add_argument("--recover-selectors", default=",".join(RECOVER_SELECTORS),
                   help="(b): recovery selectors compared with random 20%% and 100%% of the pool")
    p.add_argument("--samples", type=int, default=128, help="(a): calibration windows")
    p.add_argument("--calib-pool", type=int, default=2048, help="(a): candidate windows a selector chooses from")
    p.add_argument("--seqlen", type=int, default=512, help="(a): calibration tokens per window")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--max-eval-tokens", type=int, default=8192)
    p.add_argument("--no-knowledge", action="store_true", help="perplexity only (no knowledge suite)")
    p.add_argument("--pool-tokens", type=int, default=102_400, help="(b), (c): tokens of the recovery pool file")
    p.add_argument("--pool-split-tokens", type=int, default=None, metavar="N",
                   help="(b), (c): the pool's documents cut into pieces of at most N tokens (`data select "
                        "--split-tokens`) so selectors choose among passages (default: --train-seqlen); 0: whole "
                        "documents (the tables of 2026-12-05/06)")
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--equal-steps", action="store_true",
                   help="(b): the 20%% runs take as many steps as the 100%% run (their data repeated, about 5 "
                        "passes): the budget is then the data, not the compute")
    p.add_argument("--recover-seed", type=int, default=0,
                   help="(b): the seed of the 20%% runs' recover (their selection and their training order; the "
                        "runs are named -seedN when it is not 0), to measure what a seed moves; the 100%% run keeps "
                        "seed 0")
    p.add_argument("--device", default="cpu", help="prune, eval and recover run here (cpu, cuda, ...)")
    p.add_argument("--work", type=Path, default=Path("/tmp/prunekit-selection-bench"))
    p.add_argument("--reuse", action="store_true",
                   help="keep the finished steps WORK holds (a step is reused only if its recorded command is the "
                        "same)")
    p.add_argument("--tiny", action="store_true",
                   help="test-sized settings (needs --model DIR): 4 of 16 calibration windows of 32 tokens, a "
                        "3,000-token recovery pool, windows of 32 tokens in batches of 4, eval 256 tokens x 32")
    p.add_argument("--in-process", action="store_true",
                   help="run the prunekit commands in this interpreter (tests: no process start per step)")
    p.add_argument("--note", action="append", default=[], help="a line for the notes of the results (repeatable)")
    p.add_argument("--json", type=Path, default=Path("bench/results/selection_smollm2.json"))
    p.add_argument("--out", type=Path, default=Path("bench/results/selection_smollm2.md"))
    args = p.parse_args(argv)
    if args.tiny:
        if args.model == "default":
            p.error("--tiny needs --model DIR (a tiny checkpoint with a tokenizer)")
        args.samples, args.calib_pool, args.seqlen, args.eval_seqlen, args.max_eval_tokens = 4, 16, 32, 32, 256
        args.pool_tokens, args.train_seqlen, args.batch_size = 3000, 32, 4
    if args.pool_split_tokens is None:
        args.pool_split_tokens = args.train_seqlen
    if args.pool_split_tokens < 0:
        p.error("--pool-split-tokens must be 0 (whole documents) or a number of tokens")
    # (b) and (c) keep their pool and runs in a folder of their own per pool: a step is reused by its command,
    # and the same command on another pool file of the same name would be reused wrongly
    args.b_dir = "b" if args.pool_split_tokens == 0 else f"b-split{args.pool_split_tokens}"
    args.parts = [part for part in PARTS if part in (args.only or PARTS)]
    args.methods = _names(p, "--methods", args.methods, METHODS)
    args.patterns = _names(p, "--patterns", args.patterns, PATTERNS)
    args.calib_selectors = _names(p, "--calib-selectors", args.calib_selectors, CALIB_SELECTORS)
    args.recover_selectors = _names(p, "--recover-selectors", args.recover_selectors, RECOVER_SELECTORS)
    if "random" not in args.recover_selectors and ("b" in args.parts or "c" in args.parts):
        p.error("--recover-selectors must include random: the random 20% run is (b)'s baseline and (c)'s plain LoRA")
    for name in ("samples", "calib_pool", "seqlen", "eval_seqlen", "max_eval_tokens", "pool_tokens", "train_seqlen",
                 "batch_size", "rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.calib_pool <= args.samples:
        p.error(f"--calib-pool ({args.calib_pool}) must be larger than --samples ({args.samples}): a selector "
                "chooses the samples from it")
    return args


def _names(p, flag: str, text: str, known) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        p.error(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------
# Running steps
# ------------------------------------------------------------------------------------------------

class Steps:
    """Runs prunekit commands, each with a record WORK/NAME.run.json (command, wall seconds, load), and
    reuses a finished one under --reuse when its outputs exist and its recorded command is this one."""

    def __init__(self, args):
        self.args, self.log, self.done = args, [], {}

    def __call__(self, name: str, arguments: list, outputs: list[Path]) -> dict:
        arguments = [str(a) for a in arguments]
        shown = " ".join(shlex.quote(a) for a in ["prunekit", *arguments])
        if self.done.get(name, {}).get("command") == shown:        # asked twice in this run ((b) and (c))
            return self.done[name]
        record = self.args.work / f"{name}.run.json"
        if self.args.reuse and record.is_file() and all(o.exists() for o in outputs):
            entry = json.loads(record.read_text())
            if entry.get("command") == shown:
                print(f"reusing {name}: {shown}", flush=True)
                self.log.append({**entry, "reused": True})
                self.done[name] = entry
                return entry
            print(f"not reusing {name}: it was run as `{entry.get('command')}`", flush=True)
        from prunekit.bench_host import OtherCpu, load_average
        print(f"$ {shown}", flush=True)
        started = time.perf_counter()
        with OtherCpu() as others:
            if self.args.in_process:
                from prunekit.cli import main as prunekit_main
                code = prunekit_main(arguments)
            else:
                code = subprocess.run([sys.executable, "-m", "prunekit", *arguments]).returncode
        if code != 0:
            raise SystemExit(f"step {name} failed (exit {code}): {shown}")
        entry = {"name": name, "command": shown, "seconds": round(time.perf_counter() - started, 1),
                 "other_cores_busy": others.cores, "load_average_after": load_average(),
                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(entry) + "\n")
        self.log.append(entry)
        self.done[name] = entry
        print(f"[{name}: {entry['seconds']:.0f} s; other processes kept {others.cores} cores busy]", flush=True)
        return entry


def _device(args) -> list[str]:
    return ["--device", args.device] if args.device != "cpu" else []


def evaluate(args, steps: Steps, name: str, model) -> dict:
    """Perplexity (and knowledge) of `model` under the stated protocol; WORK/eval-NAME.json."""
    out = args.work / f"eval-{name}.json"
    suites = "perplexity" if args.no_knowledge else "perplexity,knowledge"
    entry = steps(f"eval-{name}", ["eval", model, "--suite", suites, "--seqlen", args.eval_seqlen, "--max-tokens",
                                   args.max_eval_tokens, *_device(args), "--json", out], [out])
    result = json.loads(out.read_text())
    row = {"ppl": result["perplexity"]["ppl"], "ppl_protocol": result["perplexity"]["protocol"],
           "eval_command": entry["command"]}
    knowledge = result.get("suites", {}).get("knowledge")
    if knowledge:
        row.update(exact_match=knowledge["exact_match"], mc_accuracy=knowledge["mc_accuracy"],
                   knowledge_protocol=knowledge["protocol"])
    return row


# ------------------------------------------------------------------------------------------------
# (a) calibration
# ------------------------------------------------------------------------------------------------

def prune(args, steps: Steps, method: str, pattern: str, calib: str) -> dict:
    """One pruning of (a) and its evaluation; `calib` is "plain" (random windows) or a selector."""
    name = f"{method}-{pattern}-{calib}"
    out, record = args.work / "a" / name, args.work / "a" / f"{name}.json"
    command = ["prune", args.model, "--method", method, *PATTERNS[pattern], "--calib", "default", "--samples",
               args.samples, "--seqlen", args.seqlen, "--seed", 0]
    if calib != "plain":
        command += ["--calib-select", calib, "--calib-pool", args.calib_pool, "--calib-scores",
                    args.work / "a" / "scores"]
    command += ["--no-eval", *_device(args), "--out", out, "--overwrite", "--json", record]
    entry = steps(f"a/{name}", command, [out / "prunekit.json", record])
    result = json.loads(record.read_text())
    calibration = result["calibration"]
    drawn = f"{calibration['samples']} windows x {calibration['seqlen']} tokens of the default corpus's calibration " \
            f"split (seed {calibration['seed']})"
    protocol = (f"{drawn}, drawn at random" if calib == "plain" else
                f"{drawn}, chosen by {calib} from {calibration['select']['pool']} random windows")
    row = {"name": name, "method": method, "pattern": PATTERN_NAMES[pattern], "calibration": calib,
           "dir": str(out), "calib_protocol": protocol, "prune_command": entry["command"],
           "prune_wall_seconds": entry["seconds"], "sparsity": result["steps"][0]["sparsity_of_pruned_layers"]}
    return {**row, **evaluate(args, steps, name, out)}


def part_a(args, steps: Steps, dense: dict) -> dict:
    rows = []
    for method in args.methods:
        for pattern in args.patterns:
            for calib in ["plain", *args.calib_selectors]:
                rows.append(prune(args, steps, method, pattern, calib))
                print(f"(a) {rows[-1]['name']:<28} ppl {rows[-1]['ppl']:.3f}", flush=True)
    plain = {(r["method"], r["pattern"]): r for r in rows if r["calibration"] == "plain"}
    for row in rows:
        base = plain[(row["method"], row["pattern"])]
        row["ppl_vs_plain"] = row["ppl"] / base["ppl"]
        for kind in ("exact_match", "mc_accuracy"):
            if kind in row:
                row[f"retention_{kind}"] = _ratio(row[kind], dense.get(kind))
    best = {}
    for (method, pattern), base in plain.items():
        group = [r for r in rows if (r["method"], r["pattern"]) == (method, pattern)]
        winner = min(group, key=lambda r: r["ppl"])
        best[f"{method} {pattern}"] = {"calibration": winner["calibration"], "ppl": winner["ppl"],
                                       "plain_ppl": base["ppl"]}
    return {"rows": rows, "best": best}


def _ratio(value, reference):
    return value / reference if reference else None


# ------------------------------------------------------------------------------------------------
# (b) recovery and (c) Light-PEFT
# ------------------------------------------------------------------------------------------------

def base_model(args, steps: Steps) -> dict:
    """The plain-calibration Wanda 2:4 model of (a) (pruned and evaluated here when (a) did not run)."""
    return prune(args, steps, *BASE)


def recovery_pool(args, steps: Steps) -> dict:
    """The pool file (a seeded random --pool-tokens of the default corpus) and its census: the samples and
    tokens on its calibration side, the side recover reads."""
    folder = args.work / args.b_dir
    pool = folder / "pool.jsonl"
    split = ["--split-tokens", args.pool_split_tokens] if args.pool_split_tokens else []
    steps(f"{args.b_dir}/pool", ["data", "select", "default", "--method", "random", "--budget",
                                 f"{args.pool_tokens} tokens", *split, "--model", args.model, "--seed", 0, "--out",
                                 pool], [pool])
    census = folder / "pool-census.jsonl"
    steps(f"{args.b_dir}/pool-census", ["data", "select", pool, "--method", "random", "--budget", "1 samples",
                                        "--model", args.model, "--seed", 0, "--out", census], [census])
    report = json.loads((census.parent / (census.name + ".report.json")).read_text())
    tokens, samples = report["tokens"]["pool"], report["samples"]["pool"]
    budget = int(SHARE * tokens)
    if budget < args.train_seqlen:
        raise SystemExit(f"the pool's calibration side holds {tokens:,} tokens: {SHARE:.0%} of it is less than one "
                         f"training window of {args.train_seqlen}; raise --pool-tokens")
    return {"file": str(pool), "samples": samples, "tokens": tokens, "budget_tokens": budget,
            "split_tokens": args.pool_split_tokens,
            "protocol": (f"{pool}, a seeded random {args.pool_tokens:,} tokens of the default corpus's calibration "
                         "side" + (f", its documents cut into pieces of at most {args.pool_split_tokens} tokens "
                                   "first (`data select --split-tokens`)" if args.pool_split_tokens else
                                   ", whole documents") +
                         f"; recover reads its calibration side (every 10th sample held out): {samples:,} "
                         f"samples, {tokens:,} tokens counted with the model's tokenizer")}


def one_pass_steps(tokens: int, args) -> int:
    return max(1, math.ceil((tokens // args.train_seqlen) / args.batch_size))


def recover(args, steps: Steps, base: dict, pool: dict, name: str, selector: str, full: bool = False,
            light_peft: bool = False, count: int | None = None) -> dict:
    """One masked-LoRA recovery of the base model on (a selection of) the pool, and its evaluation: one pass
    over its data, or `count` steps (the data repeated)."""
    seed = 0 if full else args.recover_seed
    name = name if seed == 0 else f"{name}-seed{seed}"
    out, record = args.work / args.b_dir / name, args.work / args.b_dir / f"{name}.json"
    budget = f"{pool['samples']} samples" if full else f"{pool['budget_tokens']} tokens"
    count = count or one_pass_steps(pool["tokens"] if full else pool["budget_tokens"], args)
    command = ["recover", base["dir"], "--method", "lora", "--rank", args.rank, "--lr", args.lr, "--seqlen",
               args.train_seqlen, "--batch-size", args.batch_size, "--seed", seed, "--steps", count, "--data",
               pool["file"], "--data-select", selector, "--budget", budget]
    early = max(1, count // 10)
    if light_peft:
        if count < 2:
            raise SystemExit(f"Light-PEFT needs at least 2 steps, the 20% budget gives {count}; raise --pool-tokens")
        command += ["--light-peft", "--light-peft-steps", early]
    command += ["--checkpoint-every", 0, "--no-progress", *_device(args), "--out", out, "--overwrite", "--json",
                record]
    entry = steps(f"{args.b_dir}/{name}", command, [out / "prunekit.json", record])
    report = json.loads(record.read_text())
    selection = report["data"].get("selection") or {}
    windows = max(1, report["data"]["windows"])
    over = (f"one pass over {windows} packed windows" if report["steps"] <= math.ceil(windows / report["batch_size"])
            else f"{report['steps'] * report['batch_size'] / windows:.1f} passes over {windows} packed windows")
    row = {"name": name, "selector": selector, "share": 1.0 if full else SHARE, "budget": budget,
           "steps": report["steps"], "batch_size": report["batch_size"], "seqlen": report["seqlen"],
           "windows": report["data"]["windows"], "tokens_trained": report["tokens"],
           "tokens_selected": selection.get("tokens_selected"), "samples_kept": (selection.get("samples") or {}).get(
               "kept"), "trainable_parameters": report["trainable_parameters"],
           "loss_before": report["loss_before"], "loss_after": report["loss_after"],
           "sparsity_after": report["sparsity_after"], "recover_command": entry["command"],
           "recover_wall_seconds": entry["seconds"], "recover_seconds": report["seconds"],
           "train_protocol": (f"masked LoRA r{args.rank}, lr {args.lr:g}, {report['steps']} steps x "
                              f"{report['batch_size']} windows x {report['seqlen']} tokens ({over}), seed {seed}")}
    if light_peft:
        row["light_peft"] = report["light_peft"]
        row["light_peft_steps"] = early
    return {**row, **evaluate(args, steps, f"{args.b_dir}-{name}", out)}


def part_b(args, steps: Steps, base: dict, pool: dict) -> dict:
    full = recover(args, steps, base, pool, "lora-full", "random", full=True)
    if args.equal_steps:            # the data budget alone: every 20% run trains as long as the 100% run
        rows = [recover(args, steps, base, pool, f"lora-{selector}-20-steps{full['steps']}", selector,
                        count=full["steps"]) for selector in args.recover_selectors]
    else:
        rows = [recover(args, steps, base, pool, f"lora-{selector}-20", selector)
                for selector in args.recover_selectors]
    improvement = base["ppl"] - full["ppl"]
    for row in [full, *rows]:
        row["share_closed"] = (base["ppl"] - row["ppl"]) / improvement if improvement > 0 else None
        print(f"(b) {row['name']:<22} ppl {row['ppl']:.3f}", flush=True)
    scored = [r for r in rows if r["share_closed"] is not None]
    best = max(scored, key=lambda r: r["share_closed"]) if scored else None
    return {"pool": pool, "base": _base_summary(base), "full": full, "rows": rows,
            "target": {"share": TARGET, "best": best["selector"] if best else None,
                       "reached": best["share_closed"] if best else None,
                       "met": best["share_closed"] >= TARGET if best else None}}


def part_c(args, steps: Steps, base: dict, pool: dict) -> dict:
    plain = recover(args, steps, base, pool, "lora-random-20", "random")
    light = recover(args, steps, base, pool, "lora-random-20-light-peft", "random", light_peft=True)
    peft = light["light_peft"]
    return {"base": _base_summary(base), "plain": plain, "light": light,
            "trainable": {"plain": plain["trainable_parameters"], "light_before": peft["trainable_before"],
                          "light_after": peft["trainable_after"], "saved": peft["saved"]}}


def _base_summary(base: dict) -> dict:
    return {key: base.get(key) for key in ("name", "dir", "ppl", "ppl_protocol", "exact_match", "mc_accuracy",
                                          "calib_protocol", "prune_command", "eval_command")}


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args)
    started = datetime.now(timezone.utc)
    result = {"date": started.isoformat(timespec="minutes"), "commit": _commit(), "host": _host(),
              "argv": sys.argv[1:] if argv is None else list(argv), "settings": _settings(args), "notes": args.note}
    dense = evaluate(args, steps, "dense", args.model)      # the reference of every retention
    result["dense"] = dense
    if "a" in args.parts:
        result["a"] = part_a(args, steps, dense)
    if "b" in args.parts or "c" in args.parts:
        base, pool = base_model(args, steps), recovery_pool(args, steps)
        if "b" in args.parts:
            result["b"] = part_b(args, steps, base, pool)
        if "c" in args.parts:
            result["c"] = part_c(args, steps, base, pool)
    result["commands"] = steps.log
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


def _commit() -> str | None:
    """The checkout's commit (git resolves a linked worktree too), or None outside a git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def _host() -> dict:
    import torch
    from prunekit.bench_host import cpu_model, load_average
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average_start": load_average()}


def _settings(args) -> dict:
    return {"model": args.model, "parts": args.parts, "device": args.device, "dtype": "float32",
            "a": {"methods": args.methods, "patterns": [PATTERN_NAMES[p] for p in args.patterns],
                  "calib_selectors": args.calib_selectors, "samples": args.samples, "calib_pool": args.calib_pool,
                  "seqlen": args.seqlen},
            "b": {"selectors": args.recover_selectors, "pool_tokens": args.pool_tokens, "share": SHARE,
                  "pool_split_tokens": args.pool_split_tokens, "recover_seed": args.recover_seed,
                  "equal_steps": args.equal_steps,
                  "train_seqlen": args.train_seqlen, "batch_size": args.batch_size, "rank": args.rank, "lr": args.lr,
                  "steps": ("20% runs: the 100% run's steps (data repeated)" if args.equal_steps else
                            "one pass: ceil((budget tokens // train_seqlen) / batch_size)")},
            "eval": {"seqlen": args.eval_seqlen, "max_tokens": args.max_eval_tokens,
                     "suites": "perplexity" if args.no_knowledge else "perplexity,knowledge"}}


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _seconds(s) -> str:
    return "-" if s is None else (f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s")


def _code(*commands) -> str:
    return "<br>".join(f"`{c}`" for c in commands if c)


def _knowledge(row: dict, dense: dict | None) -> tuple[str, str]:
    if "mc_accuracy" not in row:
        return "-", "-"
    retention = _ratio(row["mc_accuracy"], (dense or {}).get("mc_accuracy"))
    return (f"{row['exact_match']:.1%} / {row['mc_accuracy']:.1%}",
            "-" if retention is None else f"{retention:.3f}")


def markdown(result: dict) -> str:
    s = result["settings"]
    host = result["host"]
    lines = ["# Data selection on SmolLM2-135M (issue 19)", "",
             f"- date: {result['date']}; commit {result['commit']}",
             f"- command: `python bench/selection_smollm2.py {' '.join(shlex.quote(a) for a in result['argv'])}`",
             f"- machine: {host['cpu']}, {host['cores']} cores, torch threads {host['torch_threads']}; Python "
             f"{host['python']}, torch {host['torch']}; model {s['model']}, {s['dtype']} on {s['device']}",
             f"- evaluation of every model: `prunekit eval DIR --suite {s['eval']['suites']} --seqlen "
             f"{s['eval']['seqlen']} --max-tokens {s['eval']['max_tokens']}` (each row's command is beside it)"]
    dense = result.get("dense")
    if dense:
        know, _ = _knowledge(dense, dense)
        lines += [f"- dense model: perplexity {dense['ppl']:.3f}, knowledge exact / MC {know} "
                  f"({_code(dense['eval_command'])})",
                  f"- perplexity protocol: {dense['ppl_protocol']}"]
        if "knowledge_protocol" in dense:
            lines += [f"- knowledge protocol: {dense['knowledge_protocol']}; retention = model multiple-choice "
                      "accuracy / the dense model's"]
    if "a" in result:
        a = s["a"]
        lines += ["", "## (a) Calibration selection", "",
                  f"Each pruning calibrates on {a['samples']} windows of {a['seqlen']} tokens: plain = drawn at "
                  f"random; a selector = chosen from {a['calib_pool']} random windows by `--calib-select`. "
                  "Perplexity protocol: the line above (every row); x plain = perplexity / the plain row's of the "
                  "same method and pattern.", "",
                  "| method | pattern | calibration | perplexity | x plain | knowledge exact / MC | retention (MC) | "
                  "calibration protocol | commands |", "|---|---|---|---:|---:|---:|---:|---|---|"]
        if dense:
            know, _ = _knowledge(dense, dense)
            lines.append(f"| dense | - | - | {dense['ppl']:.3f} | - | {know} | 1.000 | - | "
                         f"{_code(dense['eval_command'])} |")
        for r in result["a"]["rows"]:
            know, retention = _knowledge(r, dense)
            lines.append(f"| {r['method']} | {r['pattern']} | {r['calibration']} | {r['ppl']:.3f} | "
                         f"{r['ppl_vs_plain']:.3f} | {know} | {retention} | {r['calib_protocol']} | "
                         f"{_code(r['prune_command'], r['eval_command'])} |")
        lines += ["", "Lowest perplexity per method and pattern (same protocol): " + "; ".join(
            f"{k}: {v['calibration']} {v['ppl']:.3f} (plain {v['plain_ppl']:.3f})"
            for k, v in result["a"]["best"].items()) + "."]
    for part in ("b", "c"):
        if part in result:
            base = result[part]["base"]
            break
    else:
        base = None
    if "b" in result:
        b = result["b"]
        full = b["full"]
        lines += ["", "## (b) Recovery data selection", "",
                  f"Base: {base['name']} ({base['calib_protocol']}), perplexity {base['ppl']:.3f} "
                  f"[{base['ppl_protocol']}]; {_code(base['prune_command'], base['eval_command'])}.",
                  f"Pool: {b['pool']['protocol']}. The selected runs keep {SHARE:.0%} of its tokens "
                  f"({b['pool']['budget_tokens']:,} tokens); share closed = (base - run) / (base - 100% run) in "
                  "perplexity. Perplexity protocol: as the base's.", "",
                  "| data | budget | training | perplexity | share closed | loss before -> after | "
                  "knowledge exact / MC | retention (MC) | commands |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in [full, *b["rows"]]:
            label = "100% of the pool" if r is full else f"{r['selector']} 20%, {r['steps']} steps"
            know, retention = _knowledge(r, dense)
            lines.append(f"| {label} | {r['budget']} | {r['train_protocol']} | {r['ppl']:.3f} | "
                         f"{_pct(r['share_closed'])} | {r['loss_before']:.3f} -> {r['loss_after']:.3f} | {know} | "
                         f"{retention} | {_code(r['recover_command'], r['eval_command'])} |")
        t = b["target"]
        verdict = ("not measured (no improvement from the 100% run)" if t["met"] is None else
                   f"{t['best']} closes {t['reached']:.1%}: {'met' if t['met'] else 'not met'}")
        lines += ["", f"Target: the best selector closes >= {t['share']:.0%} of the 100% run's improvement: "
                      f"{verdict}."]
    if "c" in result:
        c = result["c"]
        plain, light, trainable = c["plain"], c["light"], c["trainable"]
        know_plain, _ = _knowledge(plain, dense)
        know_light, _ = _knowledge(light, dense)
        lines += ["", "## (c) Light-PEFT vs plain masked LoRA", "",
                  f"Same base ({base['name']}), data (random {SHARE:.0%} of the pool) and steps; Light-PEFT "
                  f"(arXiv 2406.03792) prunes adapter modules and ranks after {light['light_peft_steps']} early "
                  f"steps. Perplexity protocol: {light['ppl_protocol']}.", "",
                  "| adapters | trainable parameters | perplexity | knowledge exact / MC | training | commands |",
                  "|---|---:|---:|---:|---|---|",
                  f"| masked LoRA r{s['b']['rank']} | {trainable['plain']:,} | {plain['ppl']:.3f} | {know_plain} | "
                  f"{plain['train_protocol']} | {_code(plain['recover_command'], plain['eval_command'])} |",
                  f"| + Light-PEFT | {trainable['light_before']:,} -> {trainable['light_after']:,} "
                  f"({trainable['saved']:.1%} saved) | {light['ppl']:.3f} | {know_light} | {light['train_protocol']} "
                  f"| {_code(light['recover_command'], light['eval_command'])} |"]
    lines += ["", "Commands (wall time; cores other processes kept busy meanwhile):", ""]
    lines += [f"- `{c['command']}` ({_seconds(c['seconds'])}; others {c['other_cores_busy']}"
              f"{'; reused from an earlier run' if c.get('reused') else ''})" for c in result["commands"]]
    if result["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
