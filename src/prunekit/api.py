"""`run_recipe`: the one path every entry point takes (CLI `prune`, `run`, and Python).

load -> calibration windows -> dense perplexity -> each step through the engine -> pruned
perplexity -> sparsity scan -> atomic export with `prunekit.json`. The output directory is
checked before any work, so a bad path fails in a second, not after an hour of pruning.
"""
from __future__ import annotations

import logging
import time

from .recipe import Recipe, recipe_to_dict
from .registry import method_for_config

log = logging.getLogger("prunekit")

EXPECTED_SPEEDUP = {
    "unstructured": "unstructured sparsity: no speedup with dense kernels; expect smaller storage only "
                    "(once compressed) and a quality measurement",
    "nm": "N:M sparsity: no speedup with dense kernels; 2:4 needs a sparse-tensor-core runtime "
          "(measured gains there are 0-30% and none at decode batch 1)",
}


def run_recipe(recipe: Recipe, *, progress: bool = True, echo=print) -> dict:
    from .data import calibration_data, evaluation_data
    from .engine import prune_
    from .eval.perplexity import perplexity
    from .export import check_output_dir, save_pretrained_atomic
    from .loading import describe_source, load, resolve_device
    from .report import sparsity_report

    source = describe_source(recipe.model)
    protect = [source["path"]] if source.get("path") else []
    if recipe.export is not None:
        check_output_dir(recipe.export.path, overwrite=recipe.export.overwrite, protect=protect)
    device = resolve_device(recipe.device)
    for step in recipe.steps:
        echo(f"expected speedup: {EXPECTED_SPEEDUP['nm' if step.nm else 'unstructured']}")

    started = time.perf_counter()
    model, tokenizer = load(recipe.model, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
                            allow_pickle=recipe.allow_pickle)
    _check_seqlen(model.config, recipe)
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"model: {recipe.model} ({model.config.model_type}, {n_params / 1e6:.1f}M parameters, "
         f"{recipe.dtype}), compute on {device}")
    result: dict = {"recipe": recipe_to_dict(recipe), "source": source, "parameters": n_params, "steps": []}

    eval_text = None
    if recipe.eval is not None:
        eval_text = evaluation_data(tokenizer, recipe.eval.data, max_tokens=recipe.eval.max_tokens)
        if recipe.eval.dense:
            dense = _perplexity(perplexity, model, eval_text, recipe, device)
            echo(f"dense  {dense}")
            result["dense_perplexity"] = dense.to_dict()

    calib = None
    if any(method_for_config(step).needs_calibration for step in recipe.steps):
        c = recipe.calibration
        calib = calibration_data(tokenizer, c.source, samples=c.samples, seqlen=c.seqlen, seed=c.seed)
        result["calibration"] = {"source": c.source, "samples": c.samples, "seqlen": c.seqlen, "seed": c.seed}
        echo(f"calibration: {c.samples} windows x {c.seqlen} tokens from {c.source!r} (seed {c.seed})")

    for index, step in enumerate(recipe.steps):
        report = prune_(model, step, calib, device=device, sequential=recipe.sequential,
                        batch_size=recipe.calibration.batch_size, cache_device=recipe.cache_device,
                        progress=progress)
        echo(f"step {index}: {report.method} -> {report.sparsity:.2%} of the pruned layers' weights are zero "
             f"({len(report.layers)} layers, {report.seconds:.1f} s, sequential={report.sequential})")
        result["steps"].append(report.to_dict())

    if recipe.eval is not None:
        pruned = _perplexity(perplexity, model, eval_text, recipe, device)
        echo(f"pruned {pruned}")
        result["pruned_perplexity"] = pruned.to_dict()
    result["sparsity"] = sparsity_report(model)
    result["seconds"] = round(time.perf_counter() - started, 2)
    echo(summary_table(result))

    if recipe.export is not None:
        out = save_pretrained_atomic(model, tokenizer, recipe.export.path, metadata=_metadata(result),
                                     overwrite=recipe.export.overwrite, protect=protect)
        echo(f"saved to {out} (loads with AutoModelForCausalLM.from_pretrained)")
        result["export"] = str(out)
    return result


def _check_seqlen(config, recipe: Recipe) -> None:
    """Windows longer than the model's context would be silently wrong: refuse them up front."""
    from .data import default_seqlen
    context = default_seqlen(config, cap=1 << 30)
    asked = [("calibration.seqlen", recipe.calibration.seqlen)]
    if recipe.eval is not None:
        asked.append(("eval.seqlen", recipe.eval.seqlen))
    for name, value in asked:
        if value > context:
            raise ValueError(f"{name}={value} is longer than the model's context ({context} positions); "
                             f"use --seqlen {min(512, context)}")


def _perplexity(perplexity, model, eval_text, recipe: Recipe, device):
    return perplexity(model, eval_text, seqlen=recipe.eval.seqlen, stride=recipe.eval.stride, device=device)


def _metadata(result: dict) -> dict:
    """What goes into prunekit.json: everything but the per-block timing noise."""
    keep = dict(result)
    keep["steps"] = [{k: v for k, v in step.items() if k != "blocks"} for step in result["steps"]]
    return keep


def summary_table(result: dict) -> str:
    rows = [("model", "perplexity", "sparsity (block linears)")]
    dense = result.get("dense_perplexity")
    pruned = result.get("pruned_perplexity")
    if dense:
        rows.append(("dense", f"{dense['ppl']:.3f}", "-"))
    rows.append(("pruned", f"{pruned['ppl']:.3f}" if pruned else "-",
                 f"{result['sparsity']['block_linear_sparsity']:.2%}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    protocol = (pruned or dense or {}).get("protocol")
    if protocol:
        lines.append(f"protocol: {protocol}")
    return "\n".join(lines)


