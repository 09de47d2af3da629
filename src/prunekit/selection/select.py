"""Choose the samples of a pool that a budget keeps: score (one streamed pass), order, fill, write.

    1. score   one pass over the pool in batches: each sample's length in tokens (with the model's
               tokenizer, when there is one) and, for selectors that score, its score. Kept as a few
               numbers per sample (`array`), never the text; with `run_dir` every batch is appended to
               `scores.jsonl` there, so an interrupted scoring resumes where it stopped.
    2. order   the selector's priority over the pool's indices (`order(scores, lengths, options)`).
    3. fill    take samples in that order while the budget allows: a fraction or a number of samples
               exactly; a token budget never exceeded (a sample that would overflow is skipped, smaller
               ones later in the order may still fit).
    4. write   a second pass writes the kept samples to the output (`pool.write_selection`) and the
               report beside it (OUT.report.json: method, budget, pool, what was kept and dropped).

Selectors live one per file (`random.py`, `perplexity.py`): `NEEDS_MODEL`, an optional
`score_batch(texts, model, tokenizer, options) -> scores` and `order(scores, lengths, options) -> indices`.
"""
from __future__ import annotations

import json
import math
import os
import time
from array import array
from pathlib import Path

from . import perplexity, random as random_selector
from .pool import Budget, Pool, parse_budget, write_selection

SELECTORS = {"random": random_selector, "perplexity": perplexity}
BATCH = 8


def _batches(pool: Pool, skip: int, size: int):
    batch = []
    for index, text in enumerate(pool):
        if index < skip:
            continue
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _load_run(run_dir: Path | None, method: str) -> tuple[array, array]:
    scores, lengths = array("d"), array("q")
    if run_dir is None or not (run_dir / "scores.jsonl").is_file():
        return scores, lengths
    with open(run_dir / "scores.jsonl", encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break                                  # a line cut by an interruption: score it again
            if record.get("method") != method:
                raise ValueError(f"--run-dir {run_dir} holds scores of {record.get('method')!r}, not {method!r}; "
                                 "use another run directory")
            scores.append(record["score"])
            lengths.append(record["length"])
    return scores, lengths


def score_pool(pool: Pool, method: str, model=None, tokenizer=None, options: dict | None = None,
               run_dir=None, batch_size: int = BATCH, progress: bool = True) -> tuple[array, array]:
    """(scores, lengths) of every sample of `pool`, in pool order (see step 1)."""
    from tqdm.auto import tqdm

    from ..data import tokenize
    selector, options = SELECTORS[method], options or {}
    run_dir = Path(run_dir) if run_dir is not None else None
    scores, lengths = _load_run(run_dir, method)
    log = None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / "scores.jsonl", "a", encoding="utf-8")
    try:
        bar = tqdm(desc=f"data select: {method} scores", unit="sample", disable=not progress, initial=len(scores))
        for batch in _batches(pool, len(scores), batch_size):
            batch_lengths = [len(tokenize(tokenizer, text)) if tokenizer is not None else len(text.split())
                             for text in batch]
            batch_scores = (selector.score_batch(batch, model, tokenizer, options)
                            if hasattr(selector, "score_batch") else [0.0] * len(batch))
            scores.extend(batch_scores)
            lengths.extend(batch_lengths)
            if log is not None:
                log.write("".join(json.dumps({"method": method, "score": s, "length": n}) + "\n"
                                  for s, n in zip(batch_scores, batch_lengths)))
                log.flush()
            bar.update(len(batch))
        bar.close()
    finally:
        if log is not None:
            log.close()
    return scores, lengths


def fill(priority: list[int], lengths, budget: Budget) -> list[int]:
    """The samples the budget keeps, taken in `priority` order (step 3)."""
    total = len(lengths)
    if budget.kind == "fraction":
        count = max(1, round(budget.value * total))
        return priority[:count]
    if budget.kind == "samples":
        if budget.value > total:
            raise ValueError(f"the budget of {int(budget.value):,} samples is larger than the pool ({total:,} samples)")
        return priority[:int(budget.value)]
    pool_tokens = sum(lengths)
    if budget.value > pool_tokens:
        raise ValueError(f"the budget of {int(budget.value):,} tokens is larger than the pool ({pool_tokens:,} tokens)")
    kept, spent = [], 0
    for index in priority:
        if spent + lengths[index] <= budget.value:
            kept.append(index)
            spent += lengths[index]
    return kept


def select(source, method: str, budget, out, *, model=None, tokenizer=None, seed: int = 0, text_field: str = "text",
           run_dir=None, options: dict | None = None, progress: bool = True) -> dict:
    """Select from `source` with `method` within `budget`, write OUT (+ OUT.report.json); returns the report."""
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; choose from {', '.join(SELECTORS)}")
    selector = SELECTORS[method]
    budget = parse_budget(budget)
    if selector.NEEDS_MODEL and model is None:
        raise ValueError(f"{method} scores samples with a model: pass --model")
    if budget.kind == "tokens" and tokenizer is None:
        raise ValueError("a token budget counts tokens with a model's tokenizer: pass --model (or budget in samples)")
    options = {"seed": seed, **(options or {})}
    started = time.perf_counter()
    pool = Pool(source, text_field)
    _check_out(out, pool)
    scores, lengths = score_pool(pool, method, model, tokenizer, options, run_dir, progress=progress)
    if not lengths:
        raise ValueError(f"the pool {pool.describe()} holds no samples on its calibration side")
    kept = fill(selector.order(scores, lengths, options), lengths, budget)
    written = write_selection(out, pool, set(kept), scores if hasattr(selector, "score_batch") else None)
    report = _report(method, budget, pool, scores, lengths, kept, written, options, selector,
                     time.perf_counter() - started, tokenizer)
    from ..io.atomic import write_json_atomic
    write_json_atomic(report_path(out), report)
    return report


def report_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".report.json")


def _quantiles(values: list[float]) -> dict | None:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    pick = lambda q: round(finite[min(len(finite) - 1, int(q * len(finite)))], 4)  # noqa: E731
    return {"min": round(finite[0], 4), "q25": pick(0.25), "median": pick(0.5), "q75": pick(0.75),
            "max": round(finite[-1], 4), "infinite": len(values) - len(finite)}


def _report(method, budget, pool, scores, lengths, kept, written, options, selector, seconds, tokenizer) -> dict:
    kept_set = set(kept)
    dropped = [i for i in range(len(lengths)) if i not in kept_set]
    scored = hasattr(selector, "score_batch")
    unit = "tokens" if tokenizer is not None else "words"
    return {
        "method": method, "budget": str(budget), "pool": pool.describe(), "options": options,
        "samples": {"pool": len(lengths), "kept": written, "dropped": len(dropped)},
        unit: {"pool": int(sum(lengths)), "kept": int(sum(lengths[i] for i in kept)),
               "dropped": int(sum(lengths[i] for i in dropped))},
        "scores": {"kept": _quantiles([scores[i] for i in kept]), "dropped": _quantiles([scores[i] for i in dropped])}
        if scored else None,
        "seconds": round(seconds, 2),
        "protocol": (f"{method} selection from {pool.describe()}; budget {budget}; lengths in {unit}"
                     + (f" ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)})" if tokenizer else "")
                     + f"; options {json.dumps(options, sort_keys=True)}"),
    }


def report_lines(report: dict) -> list[str]:
    """The report as a few lines for the command line."""
    unit = "tokens" if "tokens" in report else "words"
    lines = [f"{report['method']} selection: kept {report['samples']['kept']:,} of {report['samples']['pool']:,} "
             f"samples ({report[unit]['kept']:,} of {report[unit]['pool']:,} {unit}), budget {report['budget']}"]
    if report.get("scores"):
        for side in ("kept", "dropped"):
            q = report["scores"][side]
            if q:
                lines.append(f"  {side} scores: min {q['min']} / median {q['median']} / max {q['max']}"
                             + (f", {q['infinite']} with nothing to score" if q["infinite"] else ""))
    lines.append(f"  protocol: {report['protocol']}")
    return lines


def _check_out(out, pool: Pool) -> None:
    """The output is a new .jsonl file, never one of the pool's own files (it is read while written)."""
    path = Path(out)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"--out {out}: the selection is written as JSON lines; name it *.jsonl")
    if os.path.isdir(path):
        raise ValueError(f"--out {out} is a directory; give a .jsonl file name")
    if pool.kind == "local":
        target = path.expanduser().resolve()
        root = pool.path.resolve()
        if target == root or root in target.parents or any(target == f.resolve() for f in pool.files):
            raise ValueError(f"--out {out} would overwrite (or land inside) the source {pool.path}; write the "
                             "selection elsewhere")
