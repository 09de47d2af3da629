"""Zero-shot tasks through upstream lm-evaluation-harness (EleutherAI, `lm_eval`), without a fork.

The pruning literature (SparseGPT arXiv 2301.00774, Wanda arXiv 2306.11695, ...) reports
zero-shot accuracy on ARC-easy, HellaSwag, PIQA, WinoGrande, BoolQ and MMLU next to perplexity.
We wrap the model already in memory with ``lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)`` and call ``lm_eval.simple_evaluate``; the numbers are lm-eval's own.

The standard tasks download their datasets from the Hugging Face Hub, so they need a network (or
a warm datasets cache). Offline, a directory of local task configs (YAML with a local
``dataset_path: json``) is passed as ``include`` (``--lm-eval-include DIR``). `lm_eval` is an
optional dependency (``pip install prunekit[eval]``), imported only here, inside the function.
"""
from __future__ import annotations


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"the lm-eval suite needs lm-evaluation-harness: pip install 'prunekit[eval]' ({err})") \
            from None
    return lm_eval, HFLM, TaskManager


def check_include_trusted(include, trust_remote_code: bool) -> None:
    """Refuse a local lm-eval task directory without consent: its YAML can run Python from it. A directory that
    does not exist is refused first (lm-eval would ignore it and fall back to the Hub's tasks)."""
    from pathlib import Path
    if include and not Path(include).expanduser().is_dir():
        raise FileNotFoundError(f"--lm-eval-include {include}: no such directory; point it at a folder of lm-eval "
                                "task configs (*.yaml)")
    if include and not trust_remote_code:
        raise ValueError(f"--lm-eval-include {include}: lm-eval task configs can run Python from their directory "
                         "(`!function` entries), so a task directory is code; pass --trust-remote-code to allow it "
                         "(trust_remote_code=True in Python)")


def _metrics(task_result: dict) -> dict:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}."""
    out = {}
    for key, value in task_result.items():
        if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name in ("", "none") else f"{metric}/{filter_name}"] = float(value)
    return out


def run_lm_eval(model, tokenizer, tasks, *, limit: int | None = None, batch_size: int = 8,
                include: str | None = None, device="cpu", trust_remote_code: bool = False) -> dict:
    """lm-eval results of `model`: {task: {metric: value}, "protocol": "...", ...} (JSON-ready).

    A task directory (`include`) is code: lm-eval task YAML can name Python functions
    (`!function utils.doc_to_text`) that lm-eval imports from that directory. So it is refused unless
    `trust_remote_code` (the CLI's --trust-remote-code, the same consent that custom model code needs)."""
    check_include_trusted(include, trust_remote_code)
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    tasks = list(tasks)
    manager = TaskManager(include_path=str(include)) if include else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval does not know the task(s) {unknown}; check the names (`lm_eval ls tasks`) or "
                         "point --lm-eval-include DIR at a directory of local task configs")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=0)
    except (ConnectionError, OSError) as err:
        raise RuntimeError(f"lm-eval could not load the task(s) {tasks}: {err}. The standard tasks download their "
                           "datasets from the Hugging Face Hub and need the network (or a warm cache); offline, "
                           "use --lm-eval-include DIR with local task configs") from None
    except Exception as err:
        if "offline" in str(err).lower() or "connect" in str(err).lower() or "hub" in str(err).lower():
            raise RuntimeError(f"lm-eval could not load the task(s) {tasks}: {err}. The task needs the network "
                               "or a local task directory (--lm-eval-include DIR)") from None
        raise
    out: dict = {}
    for task, task_result in (results or {}).get("results", {}).items():
        out[task] = _metrics(task_result)
    shots = {task: value for task, value in (results or {}).get("n-shot", {}).items()}
    samples = {task: value.get("effective") for task, value in (results or {}).get("n-samples", {}).items()
               if isinstance(value, dict)}
    out["lm_eval_version"] = lm_eval.__version__
    out["tasks"] = tasks
    out["num_fewshot"] = shots
    out["limit"] = limit
    out["samples"] = samples
    out["protocol"] = (f"lm-eval {lm_eval.__version__} tasks {', '.join(tasks)}, num_fewshot "
                       f"{shots or 'task default'}, limit {limit if limit is not None else 'none (full sets)'}, "
                       f"batch_size {batch_size}, samples {samples}" + (f", tasks from {include}" if include else ""))
    return out
