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

Selectors live one per file (`random.py`, `perplexity.py`, `clusters.py`, `entropy.py`): `NEEDS_MODEL`, an
optional `score_batch(texts, model, tokenizer, options) -> scores` and `order(scores, lengths, options) ->
indices`. A selector that needs a vector per sample, not a number, has `embed_batch(texts, model, tokenizer,
options) -> Tensor (B, width)` instead (clusters and entropy: an embedding; statistic: an activation profile):
step 1 keeps each vector projected to `embed_dim` (default 32, or the selector's `EMBED_DIM`) dimensions by a
seeded random projection, as float16 bits in a flat `array("H")` (2 * embed_dim bytes per sample; see embed.py),
appends it to `scores.jsonl` with the run, and step 2 passes the (N, d) tensor as `options["embeddings"]` (in a
copy of the options: the report's options stay plain). A selector that also has `order_and_labels` (clusters)
returns each sample's cluster with its order: the cluster goes beside each kept sample and per-cluster kept /
dropped counts into the report. A selector with its own `write_selection(out, pool, keep, labels, model,
tokenizer, options) -> {"written", ...}` (qtuning: the quadrant and the loss spans of every kept sample) writes
step 4's records itself; the rest of what it returns goes into the report as `loss_mask`.
A selector whose stored record is only the shared embedding (`STORED_AS = "embedding"`: clusters, entropy)
reads and writes the same run directory as the others of its kind: scoring once serves both.
"""
from __future__ import annotations

import json
import math
import os
import time
from array import array
from pathlib import Path

import torch

from . import clusters, donod, entropy, paser, perplexity, qtuning, random as random_selector, statistic
from .pool import Budget, Pool, parse_budget, write_selection

SELECTORS = {"random": random_selector, "perplexity": perplexity, "clusters": clusters, "entropy": entropy,
             "donod": donod, "paser": paser, "qtuning": qtuning, "statistic": statistic}
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


def stored_as(method: str) -> str:
    """What a selector's stored scores are: its own name, or the kind it shares with others (`STORED_AS`)."""
    return getattr(SELECTORS.get(method), "STORED_AS", method)


def _load_run(run_dir: Path | None, method: str) -> tuple[array, array, array]:
    scores, lengths, vectors = array("d"), array("q"), array("H")      # vectors: float16 bit patterns
    if run_dir is None or not (run_dir / "scores.jsonl").is_file():
        return scores, lengths, vectors
    with open(run_dir / "scores.jsonl", encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break                                  # a line cut by an interruption: score it again
            if stored_as(record.get("method")) != stored_as(method):
                raise ValueError(f"--run-dir {run_dir} holds scores of {record.get('method')!r}, not {method!r}; "
                                 "use another run directory")
            scores.append(record["score"])
            lengths.append(record["length"])
            if record.get("embedding"):
                vectors.frombytes(torch.tensor(record["embedding"], dtype=torch.float16).numpy().tobytes())
    return scores, lengths, vectors


def score_pool(pool: Pool, method: str, model=None, tokenizer=None, options: dict | None = None,
               run_dir=None, batch_size: int = BATCH, progress: bool = True):
    """(scores, lengths, embeddings) of every sample of `pool`, in pool order (see step 1); embeddings is
    an (N, d) float16 tensor for selectors with `embed_batch`, else None."""
    from tqdm.auto import tqdm

    from ..data import tokenize
    from . import embed
    selector, options = SELECTORS[method], options or {}
    embeds = hasattr(selector, "embed_batch")
    dim = int(options.get("embed_dim", getattr(selector, "EMBED_DIM", embed.DIM)))
    run_dir = Path(run_dir) if run_dir is not None else None
    scores, lengths, vectors = _load_run(run_dir, method)
    width = len(vectors) // len(lengths) if len(lengths) else None    # the stored dimension of a resumed run
    if embeds and width is not None and (width == 0 or len(vectors) != width * len(lengths)):
        raise ValueError(f"--run-dir {run_dir} holds no complete embedding per sample; use another run "
                         "directory")
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
            rows = None
            if embeds:
                reduced = embed.project(selector.embed_batch(batch, model, tokenizer, options), dim,
                                        options.get("seed", 0))
                if width is not None and reduced.shape[1] != width:
                    raise ValueError(f"--run-dir {run_dir} holds embeddings of {width} dimensions, this model "
                                     f"gives {reduced.shape[1]}; use another run directory")
                width = reduced.shape[1]
                vectors.frombytes(reduced.numpy().tobytes())
                rows = reduced.tolist()
            scores.extend(batch_scores)
            lengths.extend(batch_lengths)
            if log is not None:
                log.write("".join(json.dumps({"method": method, "score": s, "length": n,
                                              **({"embedding": rows[i]} if rows is not None else {})}) + "\n"
                                  for i, (s, n) in enumerate(zip(batch_scores, batch_lengths))))
                log.flush()
            bar.update(len(batch))
        bar.close()
    finally:
        if log is not None:
            log.close()
    embeddings = None
    if embeds and len(lengths):
        embeddings = torch.frombuffer(vectors, dtype=torch.float16).view(len(lengths), -1)
    return scores, lengths, embeddings


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
           run_dir=None, options: dict | None = None, progress: bool = True, split_tokens: int | None = None) -> dict:
    """Select from `source` with `method` within `budget`, write OUT (+ OUT.report.json); returns the report.
    `split_tokens`: cut the source's samples into pieces of at most that many tokens first (`pool.Pool`)."""
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
    pool = Pool(source, text_field, split_tokens=split_tokens, tokenizer=tokenizer)
    _check_out(out, pool)
    scores, lengths, embeddings = score_pool(pool, method, model, tokenizer, options, run_dir, progress=progress)
    if not lengths:
        raise ValueError(f"the pool {pool.describe()} holds no samples on its calibration side")
    order_options = dict(options) if embeddings is None else {**options, "embeddings": embeddings}
    labels = None
    if hasattr(selector, "order_and_labels"):
        priority, labels = selector.order_and_labels(scores, lengths, order_options)
    else:
        priority = selector.order(scores, lengths, order_options)
    kept = fill(priority, lengths, budget)
    del priority                                       # a list over the whole pool: free it before the report
    loss_mask = None
    if hasattr(selector, "write_selection"):           # qtuning: its own records (quadrant, loss spans)
        loss_mask = selector.write_selection(out, pool, set(kept), labels, model, tokenizer, options)
        written = loss_mask.pop("written")
    else:
        written = write_selection(out, pool, set(kept), scores if hasattr(selector, "score_batch") else None, labels)
    report = _report(method, budget, pool, scores, lengths, kept, written, _plain(options), selector,
                     time.perf_counter() - started, tokenizer)
    if labels is not None:
        report["clusters"] = _cluster_counts(labels, kept, order_options.get("complexity"))
    if "radius" in order_options:
        report["radius"] = order_options["radius"]
    if loss_mask is not None:
        report["loss_mask"] = loss_mask
    from ..io.atomic import write_json_atomic
    write_json_atomic(report_path(out), report)
    return report


def _plain(options: dict) -> dict:
    """The options a report can hold: entries that are not JSON (a model passed in, as PASER's pruned
    model) are left out."""
    plain = {}
    for key, value in options.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        plain[key] = value
    return plain


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


def _cluster_counts(labels, kept, complexity=None) -> list[dict]:
    """Per cluster: its size, how many of its samples were kept and dropped (and its complexity)."""
    sizes: dict[int, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    kept_by: dict[int, int] = {}
    for index in kept:
        kept_by[labels[index]] = kept_by.get(labels[index], 0) + 1
    rows = []
    for label in sorted(sizes):
        row = {"cluster": label, "size": sizes[label], "kept": kept_by.get(label, 0),
               "dropped": sizes[label] - kept_by.get(label, 0)}
        if complexity is not None and label < len(complexity):
            row["complexity"] = complexity[label]
        rows.append(row)
    return rows


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
    if report.get("clusters"):
        lines.append(f"  {len(report['clusters'])} clusters (kept / dropped of each):")
        for row in report["clusters"]:
            lines.append(f"    cluster {row['cluster']}: kept {row['kept']:,} / dropped {row['dropped']:,} of "
                         f"{row['size']:,}" + (f", complexity {row['complexity']}" if "complexity" in row else ""))
    if report.get("radius") is not None:
        lines.append(f"  coverage radius {report['radius']}")
    if report.get("loss_mask"):
        mask = report["loss_mask"]
        lines.append(f"  loss mask: {mask['loss_targets']:,} of the kept samples' {mask['targets']:,} target tokens "
                     "count in the loss (the rest stay in the input only)")
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
