"""`run_recipe`: the one path every entry point takes (CLI `prune`, `run`, and Python).

load -> calibration windows -> dense perplexity -> each step through the engine (`apply_steps`, shared with
`prunekit sweep`) -> pruned perplexity -> sparsity scan -> atomic export with `prunekit.json` and a model
card (`README.md`). The output directory is checked before any work, so a bad path fails in a second, not
after an hour of pruning.

Under torchrun (WORLD_SIZE > 1) every process runs this function: each loads the model and the
same calibration windows, the engine keeps each process's share and combines their statistics
(`distributed.py`); only rank 0 prints, evaluates perplexity and exports, the others wait for it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .card import expected_speedup
from .recipe import Recipe, recipe_to_dict
from .registry import method_for_config

log = logging.getLogger("prunekit")

def run_recipe(recipe: Recipe, *, progress: bool = True, echo=print, run_dir=None, resume: bool = False) -> dict:
    """Run `recipe`; `run_dir` records finished blocks so that `resume=True` continues an
    interrupted run (see io/runs.py); `recipe.offload == "disk"` streams blocks from the checkpoint."""
    if resume and run_dir is None:
        raise ValueError("resume=True continues a recorded run: pass its run_dir (CLI --run-dir)")
    if recipe.offload == "disk":
        return _run_out_of_core(recipe, progress=progress, echo=echo, run_dir=run_dir, resume=resume)
    if run_dir is not None:
        for index, step in enumerate(recipe.steps):
            if method_for_config(step).scope == "compensate" and not step.merge:
                raise ValueError(f"--run-dir: steps.{index} (eora, merge: false) keeps its adapters outside the "
                                 "model, which a step checkpoint does not hold; set merge: true or run without "
                                 "--run-dir")
    from .data import evaluation_data
    from .eval.perplexity import perplexity
    from .io.export import check_output_dir
    from .io.loading import BF16_HINT, cpu_has_native_bf16, describe_source, load, resolve_device
    from .report import parameter_counts, sparsity_report
    from .surgery import structure_record
    from . import distributed

    source = describe_source(recipe.model)
    protect = [source["path"]] if source.get("path") else []
    if recipe.export is not None:
        check_output_dir(recipe.export.path, overwrite=recipe.export.overwrite, protect=protect)
    device = distributed.init_from_env(resolve_device(recipe.device))
    main = distributed.is_main()
    if not main:                   # one voice: rank 0 prints and shows progress
        echo, progress = (lambda *args, **kwargs: None), False
    if distributed.is_distributed():
        echo(f"distributed calibration: {distributed.world_size()} processes "
             f"({'nccl' if device.type == 'cuda' else 'gloo'}); rank 0 evaluates and exports")
        for step in recipe.steps:
            if method_for_config(step).scope == "recover":
                distributed.refuse("a recovery (fine-tuning) step")
        if any(needs_calibration(step) for step in recipe.steps):      # fail before loading the model
            distributed.chunk_range(recipe.calibration.samples, recipe.calibration.batch_size, 0,
                                    distributed.world_size())
    for step in recipe.steps:
        echo(f"expected speedup: {expected_speedup(step)}")

    started = time.perf_counter()
    model, tokenizer = load(recipe.model, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
                            allow_pickle=recipe.allow_pickle)
    check_seqlen(model.config, recipe)
    if recipe.export is not None and recipe.export.format == "gguf":
        _gguf_preflight(model, tokenizer, recipe, source)
    n_params = sum(p.numel() for p in model.parameters())
    echo(f"model: {recipe.model} ({model.config.model_type}, {n_params / 1e6:.1f}M parameters, "
         f"{recipe.dtype}), compute on {device}")
    if device.type == "cpu" and recipe.dtype == "float32" and cpu_has_native_bf16():
        echo(BF16_HINT)
    check_memory(model, recipe, device, echo)      # before the windows are drawn: 10**9 of them fail in a second
    result: dict = {"recipe": recipe_to_dict(recipe), "source": source, "parameters": n_params, "steps": []}

    eval_text = None
    if recipe.eval is not None and main:
        eval_text = evaluation_data(tokenizer, recipe.eval.data, max_tokens=recipe.eval.max_tokens)
        if recipe.eval.dense:
            dense = _perplexity(perplexity, model, eval_text, recipe, device)
            echo(f"dense  {dense}")
            result["dense_perplexity"] = dense.to_dict()

    calib = _calibration(recipe, tokenizer, result, echo, model)
    run = None
    if run_dir is not None:
        from .io.runs import Run, inputs_fingerprint
        run = Run(run_dir, recipe_to_dict(recipe), inputs_fingerprint(_checkpoint_dir(recipe), calib), resume)
    cache_device = recipe.cache_device or ("cpu" if recipe.offload == "cpu" else None)

    start = 0
    if run is not None and run.last_step() >= 0:         # resume after the last finished step
        from .io.loading import load_pruned
        done = run.last_step()
        model, _ = load_pruned(run.step_dir(done), dtype=recipe.dtype)
        model.eval()
        result["steps"] = json.loads((run.step_dir(done) / "prunekit.json").read_text())["steps"]
        start = done + 1
        echo(f"steps 0..{done}: finished in an earlier session ({run.step_dir(done)}); continuing after them")
    reports, adapters = apply_steps(model, tokenizer, recipe, calib, device=device, progress=progress,
                                    echo=echo, cache_device=cache_device, run=run, start=start,
                                    earlier=result["steps"])
    result["steps"].extend(reports)

    if recipe.eval is not None and main:
        if adapters:                  # what the user runs: the sparse weights plus the adapter
            from .eora import attach_adapters
            sparse_only = _perplexity(perplexity, model, eval_text, recipe, device)
            echo(f"pruned, without the EoRA adapter {sparse_only}")
            result["pruned_perplexity_without_adapter"] = sparse_only.to_dict()
            handles = attach_adapters(model, adapters)
            try:
                pruned = _perplexity(perplexity, model, eval_text, recipe, device)
            finally:
                for handle in handles:
                    handle.remove()
        else:
            pruned = _perplexity(perplexity, model, eval_text, recipe, device)
        echo(f"pruned {pruned}" + (" (with the EoRA adapter)" if adapters else ""))
        result["pruned_perplexity"] = pruned.to_dict()
    result["sparsity"] = sparsity_report(model)
    result["parameters_after"] = parameter_counts(model)[1]
    if adapters:
        from .eora import adapter_parameters
        result["adapter_parameters"] = adapter_parameters(adapters)
    result["structure"] = structure_record(model)
    result["seconds"] = round(time.perf_counter() - started, 2)
    echo(summary_table(result))

    if recipe.export is not None and main:
        out = export_model(model, tokenizer, recipe, result, adapters, recipe.export.path,
                           overwrite=recipe.export.overwrite, protect=protect)
        echo(f"saved to {out} (loads with {_loader_text(result['structure']['stock'], recipe)})")
        if adapters:
            echo(f"EoRA adapter in {out / result['adapter']} (loads with peft.PeftModel.from_pretrained(model, "
                 f"'{out / result['adapter']}'))")
        result["export"] = str(out)
    if distributed.is_distributed():
        result["distributed"] = {"processes": distributed.world_size(), "rank": distributed.rank()}
    distributed.finish()           # the other processes wait here until rank 0 has exported
    return result


def apply_steps(model, tokenizer, recipe: Recipe, calib, *, device, progress: bool = True,
                echo=print, cache_device=None, run=None, start: int = 0, earlier=()) -> tuple[list[dict], dict]:
    """Run `recipe.steps[start:]` on an already-loaded `model` in place with the given calibration windows.

    Returns (one report dict per step run, the unmerged EoRA adapters by layer name). `run_recipe` and
    `prunekit sweep` share it, so a sweep point prunes exactly as `prunekit run` would. `run` (runs.Run)
    records every finished block of an unstructured/N:M step, and the whole model after every step
    but the last (with `earlier`, the reports of the steps before `start`, in its prunekit.json), so
    that an interrupted run resumes where it stopped."""
    from .prune import prune_
    adapters: dict = {}
    reports: list[dict] = []
    steps = list(recipe.steps)
    for index, step in enumerate(steps):
        if index < start:
            continue                                   # finished in an earlier session (run_recipe loaded it)
        scope = method_for_config(step).scope
        if scope == "compensate":
            continue                                   # computed in the pass of the step before it
        if scope == "recover":
            reports.append(_recover(model, tokenizer, step, recipe, device, progress, echo))
            _save_step(run, index, model, tokenizer, recipe, [*earlier, *reports])
            continue
        following = steps[index + 1] if index + 1 < len(steps) else None
        compensate = following if following is not None and method_for_config(following).scope == "compensate" else None
        residency, state_dir = None, None
        if run is not None and scope == "search":
            state_dir = run.path / f"search-step{index}"      # the search resumes from its own state
        elif run is not None:
            from .core.residency import InMemory
            residency = run.recorder(index, InMemory())
        report = prune_(model, step, calib, device=device, sequential=recipe.sequential,
                        batch_size=recipe.calibration.batch_size,
                        cache_device=cache_device if cache_device is not None else recipe.cache_device,
                        progress=progress, compensate=compensate, residency=residency, state_dir=state_dir,
                        resume=state_dir is not None and (state_dir / "search-state.json").is_file())
        if run is not None:
            report.layers = run.layer_records(index)     # with the blocks finished before a resumption
        if compensate is not None and not compensate.merge:
            adapters.update(report.adapters)
        if getattr(report, "allocation", None):
            a = report.allocation
            echo(f"step {index}: {a['kind']} allocation, block sparsity {min(a['block_sparsity']):.2%}.."
                 f"{max(a['block_sparsity']):.2%} around {a['target']:.2%} (planned total {a['planned']:.4%})")
        echo(describe_step(index, report))
        if scope == "search":
            echo(search_lines(report.search))
        if compensate is not None:
            from .eora import adapter_parameters
            echo(f"step {index + 1}: eora -> {len(report.adapters)} low-rank residuals, "
                 f"{adapter_parameters(report.adapters) / 1e6:.2f}M parameters"
                 + (" (merged: the model is dense again)" if compensate.merge else " (PEFT adapter)"))
        reports.append(report.to_dict())
        if scope == "search":
            reports[-1]["search"] = report.search          # written as search.json next to the model
        _save_step(run, index + (compensate is not None), model, tokenizer, recipe, [*earlier, *reports])
    return reports, adapters


def _save_step(run, index: int, model, tokenizer, recipe: Recipe, reports: list[dict]) -> None:
    """With a run directory and more steps to come: the whole model after step `index`, so that a
    resumption starts from it (only the latest such checkpoint is kept)."""
    if run is None or index >= len(recipe.steps) - 1:
        return
    from . import distributed
    from .io.export import save_pretrained_atomic
    from .surgery import structure_record
    record = {"recipe": recipe_to_dict(recipe), "steps": [_without_blocks(r) for r in reports],
              "structure": structure_record(model)}
    if distributed.is_main():           # every process holds the same model
        save_pretrained_atomic(model, tokenizer, run.step_dir(index), metadata=record, overwrite=True)
        run.forget_steps_before(index)
    distributed.barrier()


def _without_blocks(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("blocks", "search")}


def search_lines(body: dict) -> str:
    """What a structure search found, against the dense model, with its protocol."""
    best, dense = body["best"], body["dense"]
    lines = [f"search: best KL to the dense model {best['fitness_kl']:.5f} after {body['generation']} generations "
             f"({len(body['candidates'])} candidates evaluated)",
             f"  parameters {dense['params'] / 1e6:.2f}M -> {best['params'] / 1e6:.2f}M; memory "
             f"{dense['memory_bytes'] / 1e6:.1f} -> {best['memory_bytes'] / 1e6:.1f} MB"]
    if best.get("latency_s") is not None:
        line = (f"  decode latency (cost table) {dense['latency_s'] * 1e3:.2f} -> {best['latency_s'] * 1e3:.2f} "
                f"ms/token ({best['latency_s'] / dense['latency_s']:.3f}x)")
        if best.get("latency_measured_ratio") is not None:
            line += (f"; measured {best['latency_measured_s'] * 1e3:.2f} ms/token, "
                     f"{best['latency_measured_ratio']:.3f}x the dense model's")
        lines.append(line)
    lines.append(f"  protocol: {body['protocol']}")
    return "\n".join(lines)


def describe_step(index: int, report, where: str = "") -> str:
    """One line (plus notes) saying what step `index` did."""
    from .report import StructureReport
    if isinstance(report, StructureReport):
        return (f"step {index}: {report.method} removed {report.removed_fraction:.2%} of the block parameters "
                f"({report.block_params_before / 1e6:.1f}M -> {report.block_params_after / 1e6:.1f}M; model "
                f"{report.model_params_before / 1e6:.1f}M -> {report.model_params_after / 1e6:.1f}M), "
                f"{report.seconds:.1f} s{where}" + "".join(f"\n  note: {note}" for note in report.notes))
    return (f"step {index}: {report.method} -> {report.sparsity:.2%} of the pruned layers' weights are zero "
            f"({len(report.layers)} layers, {report.seconds:.1f} s, sequential={report.sequential}{where})")


def _calibration(recipe: Recipe, tokenizer, result: dict, echo, model=None):
    from .data import calibration_windows
    if not any(needs_calibration(step) for step in recipe.steps):
        return None
    c = recipe.calibration
    drawn = c.pool_size if c.select else c.samples
    calib, covered = calibration_windows(tokenizer, c.source, samples=drawn, seqlen=c.seqlen, seed=c.seed)
    result["calibration"] = {"source": c.source, "samples": c.samples, "seqlen": c.seqlen, "seed": c.seed,
                             "split_tokens": covered.split_tokens, "distinct_tokens": covered.distinct_tokens}
    echo(f"calibration: {drawn} windows x {c.seqlen} tokens from {c.source!r} (seed {c.seed}); "
         f"{covered.line(c.seqlen)}")
    if c.select:
        if model is None:
            raise ValueError("calibration.select scores the candidate windows with the loaded model, which an "
                             "out-of-core run (--offload disk) does not hold; drop one of them")
        from . import distributed
        from .selection.windows import select_windows
        if c.scores is not None and distributed.is_distributed():
            raise ValueError("calibration.scores is one file that every process would append to; keep the scores "
                             "in a single-process run (the same model and pool reuse them) or drop --calib-scores")
        kept, line = select_windows(model, tokenizer, calib, c.select, c.samples, seed=c.seed, scores_dir=c.scores)
        calib = calib[kept]
        result["calibration"]["select"] = {"method": c.select, "pool": drawn, "kept": kept.tolist()}
        echo(line)
    return calib


def check_memory(model, recipe: Recipe, device, echo) -> None:
    """Say what the calibration pass will hold at least, and refuse it before it starts when that cannot fit
    (core/budget.py)."""
    import psutil
    import torch

    from .core.budget import Estimate, check_fits, estimate
    from .models import spec_for
    from .models.spec import get_module
    if not any(needs_calibration(step) for step in recipe.steps):
        return
    blocks = get_module(model, spec_for(model).blocks)
    widest = max((m.in_features for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)), default=0)
    hessian = any(method_for_config(step).name == "sparsegpt" or getattr(step, "update", "none") in ("obs", "admm")
                  or method_for_config(step).scope == "compensate" for step in recipe.steps)
    element = next(model.parameters()).element_size()
    c = recipe.calibration
    # true-sequential linear pruning keeps every window's group input alive at each meeting point (lockstep.py)
    lockstep = recipe.sequential == "true" and any(
        method_for_config(step).scope == "linear" and needs_calibration(step) for step in recipe.steps)
    need = estimate(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in blocks[0].parameters()),
                    model.config.hidden_size, widest, c.samples, c.seqlen, element, hessian, False, lockstep)
    echo(need.line())
    block_order = ["--sequential block (the reference order: two passes per block, no group inputs held)"]
    on_device = torch.device(device).type == "cuda" and (recipe.cache_device or str(device)) != "cpu"
    if on_device:
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        device_need = estimate(0, 0, model.config.hidden_size, widest, c.samples, c.seqlen, element, hessian, True,
                               lockstep)
        check_fits(device_need, free, c.samples, c.seqlen, str(device),
                   ["--cache-device cpu", *(block_order if lockstep else [])])
    hints = ["--offload disk (weights stay on disk, one block in memory)", *(block_order if lockstep else [])]
    host_need = Estimate(need.weights, 0, 0) if on_device else need      # on a GPU the activations live there
    check_fits(host_need, psutil.virtual_memory().available, c.samples, c.seqlen, "this machine", hints)


def _checkpoint_dir(recipe: Recipe):
    """The local safetensors directory (or GGUF file) the recipe's model comes from."""
    from .io.loading import classify_source, gguf_to_checkpoint
    kind, where = classify_source(recipe.model)
    if kind in ("default", "gguf"):
        return gguf_to_checkpoint(where, trust_remote_code=recipe.trust_remote_code)
    if kind == "hub":              # the files out-of-core pruning reads; never pickles or remote code
        from huggingface_hub import snapshot_download
        if recipe.trust_remote_code:
            raise ValueError("--offload disk builds the stock architecture from config.json; trust_remote_code "
                             "models are not supported out of core")
        folder = Path(snapshot_download(str(where), allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{recipe.model!r} has no safetensors weights on the Hub; out-of-core pruning reads "
                             "safetensors only (convert the checkpoint first)")
        return folder
    return where


# what `--offload disk` / `--run-dir` download for a Hub id: config, safetensors shards, tokenizer
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def _run_out_of_core(recipe: Recipe, *, progress, echo, run_dir, resume) -> dict:
    """`offload: disk`: every step streams block by block from a checkpoint into the next one.

    Step k reads the output of step k-1 (the input model for k = 0) and writes a complete
    checkpoint: the last step writes the export, the others an intermediate checkpoint in a
    scratch folder next to it, or in the run directory with `--run-dir`, where a finished step is
    kept and skipped on `--resume` (an unstructured/N:M step also resumes block by block)."""
    import shutil
    from .card import model_card
    from .io.atomic import staging_dir
    from .io.export import check_output_dir
    from .io.loading import load_tokenizer, describe_source, resolve_device
    from .io.offload import check_step, prune_out_of_core
    for index, step in enumerate(recipe.steps):
        try:
            check_step(step)
        except ValueError as err:
            raise ValueError(f"steps.{index}: {err}") from None
    if recipe.export is None:
        raise ValueError("--offload disk writes the pruned blocks straight into the export: give --out")
    if recipe.export.format == "gguf":
        raise ValueError("export.format gguf writes from the whole model in memory, which --offload disk never holds: "
                         f"prune out of core, then run `prunekit export {recipe.export.path} --format gguf --out "
                         "FILE.gguf` on a machine that holds the pruned model")
    from . import distributed
    started = time.perf_counter()
    location = _checkpoint_dir(recipe)
    check_output_dir(recipe.export.path, overwrite=recipe.export.overwrite, protect=[location])
    dtype = _out_of_core_dtype(recipe, location)
    device = distributed.init_from_env(resolve_device(recipe.device))
    main = distributed.is_main()
    if not main:                   # one voice: rank 0 prints, shows progress and writes every checkpoint
        echo, progress = (lambda *args, **kwargs: None), False
    if distributed.is_distributed():
        echo(f"distributed calibration: {distributed.world_size()} processes "
             f"({'nccl' if device.type == 'cuda' else 'gloo'}), out of core; rank 0 writes the checkpoints")
    for step in recipe.steps:
        echo(f"expected speedup: {expected_speedup(step)}")
    tokenizer = load_tokenizer(str(location), recipe.trust_remote_code)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    result: dict = {"recipe": recipe_to_dict(recipe), "source": describe_source(recipe.model), "steps": [],
                    "offload": "disk", "dtype": str(dtype).removeprefix("torch.")}
    calib = _calibration(recipe, tokenizer, result, echo)
    run = None
    if run_dir is not None:
        from .io.runs import Run, inputs_fingerprint
        run = Run(run_dir, recipe_to_dict(recipe), inputs_fingerprint(location, calib), resume)
        if main:
            for leftover in run.path.glob(".step*.tmp-*"):     # a killed step's staging folder
                shutil.rmtree(leftover, ignore_errors=True)
        distributed.barrier()           # before any process stages the next step there
    if recipe.eval is not None:
        echo(f"note: perplexity is skipped with --offload disk (the model is never whole in memory); "
             f"evaluate the output with `prunekit eval {recipe.export.path}`")
    out_path = Path(recipe.export.path).expanduser().resolve()
    scratch = None
    if run is None and len(recipe.steps) > 1:
        if main:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            scratch = staging_dir(out_path, "steps")      # marked: a killed run's scratch is removed next time
        scratch = distributed.broadcast_object(scratch)     # every process reads the steps rank 0 wrote
    source, out, last = location, None, len(recipe.steps) - 1
    try:
        for index, step in enumerate(recipe.steps):
            target = out_path if index == last else (run.step_dir(index) if run else scratch / f"step{index}")
            if run is not None and index <= run.last_step() < last:
                if index == run.last_step():
                    result["steps"] = json.loads((target / "prunekit.json").read_text())["steps"]
                    echo(f"steps 0..{index}: finished in an earlier session ({target}); continuing after them")
                    source = target
                continue
            linear = method_for_config(step).scope == "linear"
            hook = (lambda residency, k=index: run.recorder(k, residency)) if run is not None and linear else None

            def record(report, k=index) -> dict:
                """prunekit.json of this step's output, written inside its atomic staging."""
                if run is not None and linear:  # noqa: B023 -- called by prune_out_of_core in this iteration
                    report.layers = run.layer_records(k)   # with the blocks finished before a resumption
                result["steps"] = result["steps"][:k] + [report.to_dict()]
                return export_metadata(result)
            report, out, _ = prune_out_of_core(
                source, step, calib, target, dtype=dtype, device=device, sequential=recipe.sequential,
                batch_size=recipe.calibration.batch_size, progress=progress, tokenizer=tokenizer,
                overwrite=recipe.export.overwrite if index == last else True, protect=[location],
                metadata=record, card=(lambda rec: model_card(recipe, rec)) if index == last else None,
                residency_hook=hook, write=main)
            distributed.barrier()                       # rank 0's checkpoint is in place before anyone reads it
            echo(describe_step(index, report, ", out of core"))
            if run is not None and index < last:
                run.forget_steps_before(index)             # step `index` is what a resumption reads
            source = out
    finally:
        if scratch is not None and main:
            shutil.rmtree(scratch, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["export"] = str(out)
    stock = json.loads((out / "prunekit.json").read_text()).get("structure", {}).get("stock", True)
    echo(f"saved to {out} (loads with {_loader_text(stock, recipe)})")
    if distributed.is_distributed():
        result["distributed"] = {"processes": distributed.world_size(), "rank": distributed.rank()}
    distributed.finish()
    return result


def _out_of_core_dtype(recipe: Recipe, location):
    """The recipe's dtype; "auto" is the checkpoint's own float dtype (float32 if it names none)."""
    import torch
    from .io.loading import resolve_dtype
    dtype = resolve_dtype(recipe.dtype)
    if dtype != "auto":
        return dtype
    config = json.loads((Path(location) / "config.json").read_text())
    named = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(named, torch.float32)


def _recover(model, tokenizer, step, recipe: Recipe, device, progress, echo) -> dict:
    """A recovery step: its own training windows from the calibration source (step.samples, or
    steps x batch_size windows, of step.seqlen or calibration.seqlen tokens); kd's teacher is
    recipe.model loaded again, i.e. the dense model before any step."""
    from .io.loading import load
    from .recovery import format_summary, recovery_windows
    c = recipe.calibration
    windows = recovery_windows(tokenizer, step, c.source, seqlen=c.seqlen, seed=c.seed)
    teacher = None
    if step.needs_teacher:
        teacher, _ = load(recipe.model, dtype=recipe.dtype, trust_remote_code=recipe.trust_remote_code,
                          allow_pickle=recipe.allow_pickle)
    report = method_for_config(step).fn(model, step, windows, teacher=teacher, device=device, progress=progress)
    echo(format_summary(report))
    return report


def export_model(model, tokenizer, recipe: Recipe, record: dict, adapters: dict, path, *, overwrite: bool,
                 protect=()) -> Path:
    """Save a pruned model atomically with its prunekit.json (`record` without per-block noise), its
    model card and, with unmerged EoRA residuals, the PEFT adapter (record["adapter"] names its
    folder). The one export of `run_recipe` and `prunekit sweep`; returns the output folder."""
    from .card import model_card
    from .io.export import save_pretrained_atomic
    adapter_dir = None
    if adapters:
        adapter_dir = next(s for s in recipe.steps if method_for_config(s).scope == "compensate").adapter_dir
        record["adapter"] = adapter_dir
    metadata = export_metadata(record)
    card = model_card(recipe, metadata)

    def write_extras(staging):
        # inside the atomic staging: the card, adapter and GGUF file appear together with the weights or not at all
        if adapters:
            from .eora import save_peft_adapter
            save_peft_adapter(staging / adapter_dir, adapters, model)
        (staging / "README.md").write_text(card)
        searches = [step["search"] for step in record.get("steps", []) if step.get("search")]
        if searches:               # every candidate the structure search evaluated, with costs and fitness
            (staging / SEARCH_FILE).write_text(json.dumps(searches[-1], indent=1) + "\n")
        if recipe.export is not None and recipe.export.format == "gguf":
            from .io.gguf_writer import write_gguf
            written = write_gguf(model, tokenizer, staging / GGUF_FILE, outtype=recipe.export.outtype,
                                 source=record.get("source"), name=Path(path).name)
            record["gguf"] = metadata["gguf"] = {**written.to_dict(), "path": GGUF_FILE}   # into prunekit.json
    return save_pretrained_atomic(model, tokenizer, path, metadata=metadata, overwrite=overwrite, protect=protect,
                                  extra=write_extras)


GGUF_FILE = "model.gguf"
SEARCH_FILE = "search.json"


def _wraps_layers(recipe: Recipe) -> bool:
    """A step leaves extra modules around its linears (ARMOR's block-diagonal wrappers)."""
    return any(getattr(step, "wraps_layers", False) for step in recipe.steps)


def _loader_text(stock: bool, recipe: Recipe) -> str:
    if _wraps_layers(recipe):
        return ("prunekit.load_pruned: its linears carry block-diagonal wrappers that a stock config cannot describe; "
                "stock from_pretrained would load the sparse cores alone")
    return ("AutoModelForCausalLM.from_pretrained" if stock else
            "prunekit.load_pruned: its blocks have different widths, which a stock config cannot describe")


def _gguf_preflight(model, tokenizer, recipe: Recipe, source: dict) -> None:
    """An export that ends in a GGUF file fails now, not after the pruning, if the writer cannot take it."""
    from .io.gguf_writer import preflight
    if _wraps_layers(recipe):
        raise ValueError("armor keeps block-diagonal wrappers around its 2:4 cores, which no llama.cpp graph "
                         "computes; export safetensors (loads with prunekit.load_pruned) instead of gguf")
    for index, step in enumerate(recipe.steps):
        if method_for_config(step).scope == "compensate" and not step.merge:
            raise ValueError(f"steps.{index}: an EoRA adapter kept apart (merge: false) has no place in a GGUF file; "
                             "set merge: true for export.format gguf")
    preflight(model, tokenizer, source)


def needs_calibration(step) -> bool:
    method = method_for_config(step)
    return method.scope != "recover" and method.needs_calibration_for(step)   # recovery reads its own windows


def check_seqlen(config, recipe: Recipe) -> None:
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


def export_metadata(result: dict) -> dict:
    """What goes into prunekit.json: everything but the per-block timing noise."""
    keep = dict(result)
    keep["steps"] = [_without_blocks(step) for step in result["steps"]]
    return keep


def summary_table(result: dict) -> str:
    rows = [("model", "perplexity", "parameters", "sparsity (block linears)")]
    dense = result.get("dense_perplexity")
    pruned = result.get("pruned_perplexity")
    if dense:
        rows.append(("dense", f"{dense['ppl']:.3f}", f"{result['parameters'] / 1e6:.1f}M", "-"))
    after = result.get("parameters_after", result["parameters"])
    sparsity = f"{result['sparsity']['block_linear_sparsity']:.2%}"
    without = result.get("pruned_perplexity_without_adapter")
    if without:
        rows.append(("pruned, sparse weights only", f"{without['ppl']:.3f}", f"{after / 1e6:.1f}M", sparsity))
        extra = result.get("adapter_parameters", 0)
        rows.append(("pruned + EoRA adapter", f"{pruned['ppl']:.3f}" if pruned else "-",
                     f"{after / 1e6:.1f}M + {extra / 1e6:.2f}M", sparsity))
    else:
        rows.append(("pruned", f"{pruned['ppl']:.3f}" if pruned else "-", f"{after / 1e6:.1f}M", sparsity))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    protocol = (pruned or dense or {}).get("protocol")
    if protocol:
        lines.append(f"protocol: {protocol}")
    return "\n".join(lines)


