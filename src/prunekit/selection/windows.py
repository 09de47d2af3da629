"""Calibration selection: choose which `samples` of a larger pool of random calibration windows a pruning
run calibrates on (`calibration: {select: METHOD, pool: N}`, `prunekit prune --calib-select METHOD`).

The candidates are token windows, not texts: each is decoded to text for the selector (which scores and
embeds text with the model, as for `prunekit data select`), and the chosen windows are returned by index,
so the calibration tensor keeps exactly the tokens that were drawn. `clusters` spreads the windows over the
concepts of the pool, `entropy` covers its embedding neighbourhoods, `perplexity` keeps the middle band
(neither boilerplate nor noise), `random` is the baseline (the first `samples` of a seeded permutation).

With `scores_dir` the selector's scores of the pool are kept under it (`DIR/METHOD-KEY/scores.jsonl`, the
run directory of `prunekit data select --run-dir`), KEY a hash of the model's weights, the candidate windows
and the options: another pruning of the same model from the same pool (Wanda and SparseGPT, 50% and 2:4)
reuses them instead of running the model over every candidate again, and an interrupted scoring resumes.
METHOD is `select.stored_as(method)`: clusters and entropy both store the model's embeddings (`embedding-KEY`),
so choosing with one after the other runs the model over the pool once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from .pool import Budget
from .select import SELECTORS, fill, score_pool, stored_as


def select_windows(model, tokenizer, windows: Tensor, method: str, keep: int, *, seed: int = 0,
                   options: dict | None = None, scores_dir=None) -> tuple[Tensor, str]:
    """(indices of the `keep` chosen rows of `windows` (N, L), sorted; a line saying what was chosen)."""
    if method not in SELECTORS:
        raise ValueError(f"unknown calibration selection {method!r}; choose from {', '.join(SELECTORS)}")
    if not 0 < keep < windows.shape[0]:
        raise ValueError(f"calibration selection keeps {keep} of {windows.shape[0]} windows: the pool must be larger")
    selector = SELECTORS[method]
    texts = [tokenizer.decode(row.tolist()) for row in windows]
    options = {"seed": seed, **(options or {})}
    was_training = model.training
    model.eval()
    try:
        run_dir = None
        if scores_dir is not None:
            run_dir = Path(scores_dir) / f"{stored_as(method)}-{pool_key(model, windows, options)}"
        scores, lengths, embeddings = score_pool(texts, method, model, tokenizer, options, run_dir=run_dir,
                                                 progress=False)
    finally:
        model.train(was_training)
    order_options = options if embeddings is None else {**options, "embeddings": embeddings}
    if hasattr(selector, "order_and_labels"):
        priority, _ = selector.order_and_labels(scores, lengths, order_options)
    else:
        priority = selector.order(scores, lengths, order_options)
    kept = torch.tensor(sorted(fill(priority, lengths, Budget("samples", keep))), dtype=torch.long)
    return kept, (f"calibration selection: {method} kept {keep} of {windows.shape[0]} candidate windows "
                  f"(prunekit.selection.{method})")


def pool_key(model, windows: Tensor, options: dict) -> str:
    """16 hex digits naming what a selector's scores depend on: every weight of the model (by value), the
    candidate windows' tokens and the options."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
