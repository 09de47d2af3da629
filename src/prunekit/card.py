"""Model card: the `README.md` written next to every exported model.

A pruned checkpoint on the Hugging Face hub is only useful if a reader can tell what was done
to it, how much quality it lost under which protocol, how to load it and what speed to expect.
`model_card(recipe, record)` turns a recipe and its `prunekit.json` record into that page: YAML
front matter the hub reads (``library_name``, ``base_model``, ``tags``), then the recipe, what
was pruned, the metrics each with its protocol line, how to load it and the honest speed
statement of `expected_speedup` (below). The export writes it inside the same atomic
staging folder as the weights, so it is never half-written and never out of step with them.
No paper: this follows the hub's model-card conventions (front matter + Markdown).

Every string a user chose (the model name or path, data sources in the protocol lines, the adapter
folder) goes through `md_text`, `md_code` or `md_block`: a `|` would split a table row, a newline end a
heading, `<script>` run in a renderer that passes HTML through, and a backtick close a code span early.
`render.py` uses the same helpers for report.md.
"""
from __future__ import annotations

import html
import re

import yaml

from .registry import method_for_config

EXPECTED_SPEEDUP = {
    "unstructured": "unstructured sparsity: no speedup with dense kernels; expect smaller storage only "
                    "(once compressed) and a quality measurement",
    "nm": "N:M sparsity: no speedup with dense kernels; 2:4 needs a sparse-tensor-core runtime "
          "(measured gains there are 0-30% and none at decode batch 1)",
    "width": "width pruning: a physically smaller dense model that runs faster everywhere; decode at batch 1 "
             "reads every weight once per token, so expect up to about {ideal:.2f}x there (1 / (1 - {s:g}) of the "
             "block time; embeddings, head and attention over the context do not shrink), less for large "
             "batches and prefill; measure it with `prunekit bench`",
    "depth": "depth pruning: removes {amount} decoder blocks; prefill and decode time fall with the block count "
             "on every device (up to 1 / (1 - removed fraction) of the block time); measure it with `prunekit bench`",
    "experts": "expert pruning: removes {amount} routed experts of every MoE block; memory and checkpoint size fall "
               "with the experts removed, but every token still runs its top-k experts, so active compute and decode "
               "speed barely change (less memory traffic can help a little where weights do not fit in fast memory)",
    "search": "structure search ({target}): a physically smaller dense model whose widths, sublayers and blocks "
              "were chosen to meet the target with the least KL to the dense model; a latency target is met on the "
              "cost table measured on this machine, and the result is measured again at the end",
    "state": "state-space width: removes {s:.0%} of the SSM heads / inner channels of every mixer; a smaller dense "
             "model, decode at batch 1 faster by up to the share of mixer weights removed; measure it with "
             "`prunekit bench`",
    "compensate": "EoRA: low-rank residuals ({rank}) add parameters and a little time per token; they ship as a PEFT "
                  "adapter next to the sparse model ({merge})",
    "recover": "recovery fine-tuning: same size and speed; every pruned weight stays exactly zero",
}


def expected_speedup(step) -> str:
    """What a user should expect from this step, said before any work is done."""
    scope = method_for_config(step).scope
    if scope == "linear":
        return EXPECTED_SPEEDUP["nm" if step.nm else "unstructured"]
    if scope == "width":
        return EXPECTED_SPEEDUP["width"].format(ideal=1 / (1 - step.sparsity), s=step.sparsity)
    if scope == "experts":
        amount = f"all but {step.experts}" if step.experts is not None else f"{step.sparsity:.0%} of the"
        return EXPECTED_SPEEDUP["experts"].format(amount=amount)
    if scope == "search":
        return EXPECTED_SPEEDUP["search"].format(target=step.target)
    if scope == "state":
        return EXPECTED_SPEEDUP["state"].format(s=step.sparsity)
    if scope == "compensate":
        rank = f"rank {step.rank}" if step.rank else f"{step.budget:.1%} of each layer's parameters"
        merge = "merge: true folds them in and the model is dense again" if step.merge else "not merged"
        return EXPECTED_SPEEDUP["compensate"].format(rank=rank, merge=merge)
    if scope == "recover":
        return EXPECTED_SPEEDUP["recover"]
    amount = f"{step.layers}" if getattr(step, "layers", None) else f"{step.sparsity:.0%} of the"
    return EXPECTED_SPEEDUP["depth"].format(amount=amount)


def md_text(value, cell: bool = False) -> str:
    """`value` as inline Markdown that shows exactly as written, also in a table cell or a heading: one line,
    `& < >` as HTML entities, and backslashes before the characters Markdown would act on (`|` splits a table
    cell; `_` only where it could start or end emphasis, so that `kl_mean` stays readable; a list marker
    at the start, unless `cell`: a table cell holds no list, and its "-" for "none" stays plain)."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    text = re.sub(r"([\\`*\[\]|~#])", r"\\\1", text)
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    if cell:
        return text
    text = re.sub(r"^([-+])(?=\s|$)", r"\\\1", text)                  # a list marker at the start of a line
    return re.sub(r"^(\d{1,9})([.)])(?=\s|$)", r"\1\\\2", text)      # an ordered-list marker


def md_code(value) -> str:
    """`value` as a one-line code span (shown verbatim, HTML included) whose fence is longer than any run of
    backticks inside it. Not for table cells (a `|` there would still split the cell)."""
    text = " ".join(str(value).split())
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_block(content: str, info: str = "") -> list[str]:
    """Lines of a fenced code block holding `content` verbatim: the fence is longer than any run of backticks in
    it, so no line of the content can close the block early."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", content)), default=0))
    return [fence + info, content.rstrip("\n"), fence]


def model_card(recipe, record: dict) -> str:
    """Markdown (with hub front matter) for a model exported by `recipe`; `record` is what goes
    into its `prunekit.json` (run_recipe's result)."""
    from .recipe import dump_recipe

    methods = [method_for_config(step).name for step in recipe.steps]
    front = {"library_name": "transformers", "tags": ["pruned", "prunekit", *dict.fromkeys(methods)]}
    source = record.get("source") or {}
    if source.get("kind") == "hub":            # a local folder or a .gguf file is no hub id
        front["base_model"] = source.get("id", recipe.model)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {md_text(recipe.model)} pruned with prunekit ({' + '.join(methods)})", "",
             f"Produced by `prunekit run` from {md_code(recipe.model)}.", "",
             "## Recipe", "", *md_block(dump_recipe(without_export(recipe)).strip(), "yaml"), "",
             "## What was pruned", ""]
    lines += _pruned_lines(record)
    lines += ["", "## Metrics", ""]
    lines += _metric_lines(record)
    lines += ["", "## How to load", ""]
    structure = record.get("structure") or {}
    if structure.get("stock", True):
        code = ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                'model = AutoModelForCausalLM.from_pretrained("PATH")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    else:   # blocks of different widths: a stock config cannot describe them
        code = ["import prunekit", 'model, tokenizer = prunekit.load_pruned("PATH")']
    if record.get("adapter"):       # repr: a quote or a newline in the folder name stays inside the string
        code += ["from peft import PeftModel",
                 f'model = PeftModel.from_pretrained(model, {"PATH/" + str(record["adapter"])!r})  # EoRA residuals']
    lines += [*md_block("\n".join(code), "python"), "", "`PATH` is this folder (or its hub id)."]
    if not structure.get("stock", True):
        lines += ["Its decoder blocks have different widths, which a stock config cannot describe; "
                  "`prunekit.load_pruned` rebuilds them from `prunekit.json`."]
    lines += ["", "## Expected speed", ""]
    lines += [f"- step {index} ({name}): {expected_speedup(step)}"
              for index, (name, step) in enumerate(zip(methods, recipe.steps))]
    lines += ["", f"Measure it on your hardware with {md_code(f'prunekit bench PATH --baseline {recipe.model}')}.", ""]
    return "\n".join(lines)


def without_export(recipe):
    """The recipe without its export section (a card or a sweep documents the pruning, not the path)."""
    import dataclasses
    return dataclasses.replace(recipe, export=None)


def _pruned_lines(record: dict) -> list[str]:
    lines = []
    sparsity = record.get("sparsity") or {}
    if "block_linear_sparsity" in sparsity:
        lines.append(f"- zero weights: {sparsity['block_linear_sparsity']:.2%} of the decoder blocks' linear "
                     f"weights, {sparsity.get('model_sparsity', 0.0):.2%} of all parameters")
    before, after = record.get("parameters"), record.get("parameters_after")
    if before and after:
        lines.append(f"- parameters: {before:,} before, {after:,} after ({1 - after / before:.2%} removed)")
    if record.get("adapter_parameters"):
        lines.append(f"- EoRA adapter: {record['adapter_parameters']:,} parameters in {md_code(record.get('adapter'))}")
    structure = record.get("structure") or {}
    if structure.get("num_blocks") is not None:
        lines.append(f"- decoder blocks: {structure['num_blocks']}"
                     + ("" if structure.get("stock", True) else " (of different widths)"))
    for index, step in enumerate(record.get("steps") or []):
        method = md_text(step.get("method", "?"))
        if "removed_fraction_of_block_params" in step:
            lines.append(f"- step {index}: {method} removed {step['removed_fraction_of_block_params']:.2%} of the "
                         "block parameters")
        elif "sparsity_of_pruned_layers" in step:
            lines.append(f"- step {index}: {method}, {step['sparsity_of_pruned_layers']:.2%} of the pruned layers' "
                         "weights are zero")
        else:
            lines.append(f"- step {index}: {method}")
    return lines or ["- (nothing recorded)"]


def _metric_lines(record: dict) -> list[str]:
    rows = []
    for label, key in (("dense", "dense_perplexity"),
                       ("pruned, sparse weights only", "pruned_perplexity_without_adapter"),
                       ("pruned", "pruned_perplexity")):
        value = record.get(key)
        if value:
            rows.append((f"perplexity, {label}", _number(value.get("ppl")), value.get("protocol", "")))
    suites = (record.get("eval") or {}).get("suites") or {}
    for suite, values in suites.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{suite}: {name}", _number(value), values.get("protocol", "")))
    if not rows:
        return ["No evaluation was run (the recipe has no `eval:` section)."]
    lines = ["| metric | value | protocol |", "|---|---|---|"]
    lines += [f"| {md_text(name, cell=True)} | {md_text(value, cell=True)} | {md_text(protocol, cell=True)} |"
              for name, value, protocol in rows]
    return lines


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value)
