"""`prunekit report DIR`: human-readable reports (Markdown + self-contained HTML with plots).

`prunekit.report` holds the data records a run produces; this module turns a finished folder
into something to read:

* a **sweep** folder (``results.jsonl`` from `prunekit sweep`): perplexity, KL to the dense
  model, top-1 agreement and knowledge retention against achieved sparsity, one line per method
  (N:M patterns as their own labelled series), the full results table, the protocol lines and
  warnings; and speed against quality when bench results are present. Bench results are read
  from ``DIR/models/<point folder>/bench.json`` (write them with ``prunekit bench
  DIR/models/<point> --baseline MODEL --json DIR/models/<point>/bench.json``).
* a **run** folder (``prunekit.json`` from `prunekit run`/`prune`, optionally ``eval.json`` from
  ``prunekit eval --json`` and ``bench.json`` from ``prunekit bench --json``): achieved sparsity
  per layer, or kept width per block for structured runs, the metrics with their protocols, and
  the recipe.
* a **data selection** (``selected.jsonl`` from `prunekit data select`, with its ``selected.jsonl.report.json``):
  what was kept and dropped per cluster (or Q-Tuning quadrant) and the score ranges of both sides; written
  beside it as ``selected.jsonl.report.md`` / ``.report.html`` and ``selected.jsonl.figures/``.

Outputs: ``DIR/report.md``, ``DIR/report.html`` and ``DIR/figures/*.png``, each written
atomically. The HTML embeds every PNG as a base64 data URI and its CSS inline, so it is one
file that opens anywhere, offline; each figure is ``<figure id="fig-NAME">`` with an ``alt``
text and a caption, and a small inline script records how many images decoded
(``document.body.dataset.figuresLoaded``) so a headless browser can check the page. Matplotlib
(Agg backend) is imported only here, lazily. No paper: a reporting convenience.

The folder's records are data someone else may have written: every string from them (model names, paths,
point ids, method names, protocol lines, warnings, the recipe) is escaped, in the HTML with `html.escape`
and in the Markdown with the model card's helpers (`card.md_text`, `md_block`), so a `<script>` shows as
text and a `|` or a newline cannot break a table.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .card import md_block, md_text
from .io.atomic import write_atomic
from .sweep import METRICS, RESULTS_JSONL, folder_name, read_rows

# (figure name, metric column(s), y label, caption) for the sweep curves.
CURVES = (
    ("perplexity", ("ppl",), "perplexity", "Perplexity against achieved sparsity (lower is better)."),
    ("kl", ("kl_mean",), "KL(dense || pruned), nats/token", "KL divergence to the dense model's next-token "
     "distribution against achieved sparsity (lower is better)."),
    ("top1", ("top1_agreement",), "top-1 agreement with dense", "Share of positions where the pruned model's "
     "most likely next token equals the dense model's."),
    ("retention", ("retention_mc", "retention_exact"), "retention of dense accuracy", "Knowledge retention "
     "(pruned / dense accuracy): multiple choice (solid) and exact match (dashed)."),
)


def render(folder, title: str | None = None) -> dict:
    """Write report.md, report.html and figures/ into `folder`; return {"md", "html", "figures"}. A data
    selection (a .jsonl file with its .report.json) gets its report files beside it."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".jsonl":
        return _render_selection(folder, title)
    if (folder / RESULTS_JSONL).exists():
        sections = _sweep_sections(folder)
        title = title or f"prunekit sweep: {folder.name}"
    elif (folder / "prunekit.json").exists():
        sections = _run_sections(folder)
        title = title or f"prunekit run: {folder.name}"
    else:
        raise FileNotFoundError(f"{folder} holds neither {RESULTS_JSONL} (a sweep) nor prunekit.json (a run); "
                                "pass the --out folder of `prunekit sweep` or `prunekit run`")
    figures_dir = folder / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures = [block for block in sections if block[0] == "figure"]
    for _, name, png, _ in figures:
        write_atomic(figures_dir / f"{name}.png", png)
    write_atomic(folder / "report.md", _markdown(title, sections))
    write_atomic(folder / "report.html", _html(title, sections))
    return {"md": folder / "report.md", "html": folder / "report.html",
            "figures": [name for _, name, _, _ in figures]}


def _render_selection(path: Path, title: str | None) -> dict:
    record = path.with_name(path.name + ".report.json")
    if not record.is_file():
        raise FileNotFoundError(f"{path} has no {record.name} beside it: pass the --out of `prunekit data select`")
    sections = _selection_sections(json.loads(record.read_text()), path.name)
    title = title or f"prunekit data selection: {path.name}"
    figures_dir = path.with_name(path.name + ".figures")
    figures_dir.mkdir(exist_ok=True)
    figures = [block for block in sections if block[0] == "figure"]
    for _, name, png, _ in figures:
        write_atomic(figures_dir / f"{name}.png", png)
    md, page = path.with_name(path.name + ".report.md"), path.with_name(path.name + ".report.html")
    write_atomic(md, _markdown(title, sections))
    write_atomic(page, _html(title, sections))
    return {"md": md, "html": page, "figures": [name for _, name, _, _ in figures]}


def _selection_sections(report: dict, name: str) -> list[tuple]:
    """What a data selection kept and dropped: per cluster (or quadrant) and by score, then the numbers."""
    unit = "tokens" if "tokens" in report else "words"
    sections: list[tuple] = []
    clusters = report.get("clusters") or []
    if clusters:
        sections.append(("figure", "selection-clusters", _kept_dropped_png(clusters),
                         "Samples kept and dropped in each cluster of the pool (for qtuning: each quadrant of the "
                         "error-uncertainty plane)."))
    scores = report.get("scores") or {}
    if scores.get("kept") or scores.get("dropped"):
        sections.append(("figure", "selection-scores", _score_ranges_png(scores),
                         f"The {report['method']} scores of the kept and the dropped samples: min, quartiles "
                         "and max of each side."))
    rows = [["method", md_text(str(report["method"]))], ["budget", md_text(str(report["budget"]))],
            ["pool", md_text(str(report["pool"]))],
            ["samples kept / dropped / pool", f"{report['samples']['kept']:,} / {report['samples']['dropped']:,} / "
                                              f"{report['samples']['pool']:,}"],
            [f"{unit} kept / dropped / pool", f"{report[unit]['kept']:,} / {report[unit]['dropped']:,} / "
                                              f"{report[unit]['pool']:,}"],
            ["seconds", _fmt(report.get("seconds"))]]
    if report.get("loss_mask"):
        mask = report["loss_mask"]
        rows.append(["loss targets counted", f"{mask.get('loss_targets', 0):,} of {mask.get('targets', 0):,}"])
    if report.get("radius") is not None:
        rows.append(["coverage radius", _fmt(report["radius"])])
    sections += [("heading", "Selection"), ("table", ["", "value"], rows),
                 ("heading", "Protocol"), ("code", str(report.get("protocol", "")))]
    if clusters:
        sections += [("heading", "Clusters"),
                     ("table", ["cluster", "size", "kept", "dropped", "complexity"],
                      [[str(c["cluster"]), f"{c['size']:,}", f"{c['kept']:,}", f"{c['dropped']:,}",
                        _fmt(c.get("complexity"))] for c in clusters])]
    return sections


# ---------------------------------------------------------------------------------------------- sweep

def series_label(row: dict) -> str:
    """The line a row belongs to: its method, with the N:M pattern when there is one."""
    return row["method"] + (f" {row['nm'][0]}:{row['nm'][1]}" if row.get("nm") else "")


def _sweep_sections(folder: Path) -> list[tuple]:
    rows = read_rows(folder)
    if not rows:
        raise ValueError(f"{folder / RESULTS_JSONL} has no finished point yet; run the sweep first")
    sections: list[tuple] = [("text", f"{len(rows)} points from {folder / RESULTS_JSONL}.")]
    for name, columns, ylabel, caption in CURVES:
        if any(row["metrics"].get(c) is not None for row in rows for c in columns):
            sections.append(("figure", name, _curve_png(rows, columns, ylabel), caption))
    speed = _bench_points(folder, rows)
    if speed:
        sections.append(("figure", "speed", _speed_png(speed),
                         "Decode speed (tokens/s per sequence, batch 1, median) against perplexity, from each "
                         "point's bench.json; the dotted line is the dense baseline's speed."))
    columns = ["id", "method", "achieved", *[c for c, _, _ in METRICS if any(r["metrics"].get(c) is not None
                                                                          for r in rows)], "prune s", "eval s"]
    table = [[r["id"], series_label(r), _fmt(r.get("achieved_sparsity"), "{:.2%}"),
              *[_fmt(r["metrics"].get(c)) for c in columns[3:-2]], _fmt(r.get("prune_seconds")),
              _fmt(r.get("eval_seconds"))] for r in rows]
    sections += [("heading", "Results"), ("table", columns, table), ("heading", "Protocol")]
    protocols = sorted({f"{suite}: {line}" for r in rows for suite, line in (r.get("protocol") or {}).items()})
    sections.append(("list", protocols or ["(not recorded)"]))
    manifest = folder / "sweep.json"
    if manifest.exists():
        sections += [("heading", "Sweep"), ("code", json.dumps(json.loads(manifest.read_text()), indent=2))]
    warnings = sorted({w for r in rows for w in r.get("warnings") or []})
    if warnings:
        sections += [("heading", "Warnings"), ("list", warnings)]
    return sections


def _bench_points(folder: Path, rows: list[dict]) -> list[tuple]:
    points = []
    for row in rows:
        path = folder / "models" / folder_name(row["id"]) / "bench.json"
        if not path.exists() or row["metrics"].get("ppl") is None:
            continue
        bench = json.loads(path.read_text())
        for entry in bench.get("rows", []):
            if entry.get("batch") == min(r["batch"] for r in bench["rows"]):
                points.append((entry["role"], series_label(row), entry["decode_tok_s_per_seq"]["median"],
                               row["metrics"]["ppl"], row))
    return points


# ---------------------------------------------------------------------------------------------- run

def _run_sections(folder: Path) -> list[tuple]:
    record = json.loads((folder / "prunekit.json").read_text())
    sections: list[tuple] = []
    layers = [layer for step in record.get("steps", []) for layer in step.get("layers", []) or []
              if isinstance(layer, dict) and "achieved" in layer]
    if layers:
        sections.append(("figure", "layer-sparsity", _bar_png([layer["name"] for layer in layers],
                                                              [layer["achieved"] for layer in layers],
                                                              "achieved sparsity"),
                         "Achieved sparsity of every pruned linear layer (zeros / weights), in model order."))
    structured = any("widths" in step or "removed_blocks" in step for step in record.get("steps", []))
    widths = (record.get("structure") or {}).get("widths") or []
    if structured and widths:
        sections.append(("figure", "widths", _widths_png(widths),
                         "Kept width per decoder block after structured pruning: FFN channels and attention heads."))
    search = folder / "search.json"
    if search.exists():
        sections += _search_sections(json.loads(search.read_text()))
    rows = []
    for label, key in (("dense perplexity", "dense_perplexity"), ("pruned perplexity", "pruned_perplexity")):
        if record.get(key):
            rows.append([label, _fmt(record[key]["ppl"]), record[key].get("protocol", "")])
    sparsity = record.get("sparsity") or {}
    if "block_linear_sparsity" in sparsity:
        rows.append(["block linear sparsity", f"{sparsity['block_linear_sparsity']:.2%}", ""])
    if record.get("parameters"):
        rows.append(["parameters", f"{record['parameters']:,} -> {record.get('parameters_after', 0):,}", ""])
    evaluation = folder / "eval.json"
    if evaluation.exists():
        data = json.loads(evaluation.read_text())
        for suite, values in (data.get("suites") or {}).items():
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append([f"{suite}: {name}", _fmt(value), str(values.get("protocol", ""))])
        if "suites" not in data and isinstance(data.get("perplexity"), dict):   # a perplexity-only eval.json
            rows.append(["perplexity (eval.json)", _fmt(data["perplexity"].get("ppl")),
                         data["perplexity"].get("protocol", "")])
    sections += [("heading", "Metrics"), ("table", ["metric", "value", "protocol"], rows)]
    bench = folder / "bench.json"
    if bench.exists():
        data = json.loads(bench.read_text())
        table = [[r["role"], str(r["batch"]), _fmt(r["prefill_ms"]["median"]),
                  _fmt(r["decode_tok_s_per_seq"]["median"]), _fmt(r.get("speedup_decode"))]
                 for r in data.get("rows", [])]
        sections += [("heading", "Speed (prunekit bench)"),
                     ("table", ["model", "batch", "prefill ms", "decode tok/s/seq", "decode speedup"], table)]
    import yaml
    sections += [("heading", "Recipe"), ("code", yaml.safe_dump(record.get("recipe", {}), sort_keys=False))]
    return sections


def _search_sections(body: dict) -> list[tuple]:
    """A structure search (search.json): every candidate's cost against its fitness, the best after each
    generation, and the numbers of the result against the dense model."""
    target = body["target"]
    measure = {"block_params": "decoder-block parameters", "params": "parameters", "memory": "memory bytes",
               "latency": "decode s/token (cost table)"}[target["measure"]]
    points = [(c["cost"], c["fitness"] if c["fitness"] is not None else c["fitness_select"], c["role"])
              for c in body["candidates"]]
    best, dense = body["best"], body["dense"]
    rows = [["best KL to the dense model", _fmt(best["fitness_kl"]), body["protocol"]],
            ["generations / candidates", f"{body['generation']} / {len(body['candidates'])}", ""],
            ["parameters", f"{dense['params']:,} -> {best['params']:,}", ""],
            ["memory bytes", f"{dense['memory_bytes']:,} -> {best['memory_bytes']:,}", ""]]
    if best.get("latency_s") is not None:
        rows.append(["decode latency (cost table)", f"{best['latency_s'] / dense['latency_s']:.3f}x", ""])
    if best.get("latency_measured_ratio") is not None:
        rows.append(["decode latency (measured)", f"{best['latency_measured_ratio']:.3f}x", ""])
    return [("heading", "Structure search"),
            ("figure", "search", _search_png(points, body["history"], target["budget"], measure),
             f"Left: every candidate the search evaluated, its cost ({measure}) against its KL to the dense model "
             "(first-stage candidates on the selection windows, the others on all fitness windows), the budget "
             "dashed. Right: the best candidate's KL after each generation (it never rises)."),
            ("table", ["search", "value", "protocol"], rows)]


# ---------------------------------------------------------------------------------------------- plots

def _search_png(points, history, budget, measure) -> bytes:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for index, role in enumerate(("child", "survivor", "greedy")):
        mine = [(cost, value) for cost, value, r in points if r == role and value is not None]
        if mine:
            left.scatter(*zip(*mine), s=10 if role == "child" else 25, color=f"C{index}", label=role)
    left.axvline(budget, color="black", linestyle="--", label="budget")
    left.set_xlabel(measure)
    left.set_ylabel("KL(dense || candidate)")
    left.set_yscale("log")
    left.legend(fontsize=8)
    right.plot(range(len(history)), history, marker="o", color="C3")
    right.set_xlabel("generation")
    right.set_ylabel("best KL so far")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _png(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")                     # no display; must precede pyplot's import
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _curve_png(rows, columns, ylabel) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels = list(dict.fromkeys(series_label(r) for r in rows))
    for index, label in enumerate(labels):
        mine = sorted((r for r in rows if series_label(r) == label), key=lambda r: r["achieved_sparsity"])
        nm = bool(mine[0].get("nm"))
        for column, style in zip(columns, ("-", "--")):
            points = [(r["achieved_sparsity"], r["metrics"][column]) for r in mine
                      if r["metrics"].get(column) is not None]
            if points:
                x, y = zip(*points)
                name = label if len(columns) == 1 else f"{label} ({column})"
                ax.plot(x, y, linestyle="none" if nm else style, marker="s" if nm else "o",
                        color=f"C{index}", label=name, markersize=8 if nm else 5)
    ax.set_xlabel("achieved sparsity (share of the decoder-block weights zeroed or removed)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _speed_png(points) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels = list(dict.fromkeys(label for role, label, *_ in points if role == "model"))
    for index, label in enumerate(labels):
        mine = [(speed, ppl) for role, name, speed, ppl, _ in points if role == "model" and name == label]
        ax.scatter(*zip(*mine), color=f"C{index}", label=label)
    baseline = [speed for role, _, speed, _, _ in points if role == "baseline"]
    if baseline:                              # every bench.json measured the same dense model: show their mean
        ax.axvline(sum(baseline) / len(baseline), color="black", linestyle=":", label="dense decode speed")
    ax.set_xlabel("decode tokens/s per sequence (batch 1, median)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _bar_png(names, values, ylabel) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.25 * len(names)), 4))
    ax.bar(range(len(values)), values, color="C0")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.split("layers.")[-1] for n in names], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _kept_dropped_png(clusters) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.35 * len(clusters)), 3.8))
    x = range(len(clusters))
    kept = [c["kept"] for c in clusters]
    ax.bar(x, kept, color="C2", label="kept")
    ax.bar(x, [c["dropped"] for c in clusters], bottom=kept, color="C3", alpha=0.6, label="dropped")
    ax.set_xticks(list(x))
    ax.set_xticklabels([str(c["cluster"]) for c in clusters], fontsize=7)
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _score_ranges_png(scores) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for index, side in enumerate(("kept", "dropped")):
        q = scores.get(side)
        if not q:
            continue
        ax.plot([index, index], [q["min"], q["max"]], color=f"C{2 + index}", linewidth=1)
        ax.bar(index, q["q75"] - q["q25"], bottom=q["q25"], width=0.4, color=f"C{2 + index}", alpha=0.6)
        ax.plot([index - 0.2, index + 0.2], [q["median"]] * 2, color="black")
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["kept", "dropped"])
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _widths_png(widths) -> bytes:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.6))
    blocks = range(len(widths))
    left.bar(blocks, [w.get("channels", 0) for w in widths], color="C0")
    left.set_title("FFN channels kept")
    right.bar(blocks, [w.get("heads", 0) for w in widths], color="C1", label="query heads")
    right.bar(blocks, [w.get("kv_heads", 0) for w in widths], color="C2", width=0.4, label="KV heads")
    right.set_title("attention heads kept")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("decoder block")
    return _png(fig)


# ---------------------------------------------------------------------------------------------- writers

def _fmt(value, pattern: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return pattern.format(value)
    return str(value)


def _markdown(title: str, sections) -> str:
    lines = [f"# {md_text(title)}", ""]
    for block in sections:
        kind = block[0]
        if kind == "text":
            lines += [md_text(block[1]), ""]
        elif kind == "heading":
            lines += [f"## {md_text(block[1])}", ""]
        elif kind == "figure":
            lines += [f"![{md_text(block[3])}](figures/{block[1]}.png)", "", f"*{md_text(block[3])}*", ""]
        elif kind == "table":
            cells = lambda row: "| " + " | ".join(md_text(c, cell=True) for c in row) + " |"   # noqa: E731
            lines += [cells(block[1]), "|" + "---|" * len(block[1])] + [cells(r) for r in block[2]] + [""]
        elif kind == "list":
            lines += [f"- {md_text(item)}" for item in block[1]] + [""]
        elif kind == "code":
            lines += [*md_block(block[1].rstrip()), ""]
    return "\n".join(lines)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
        "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}"
        "pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px}")
# Counts the figures that decoded, for a headless browser to read back (see tests/test_render.py).
_SCRIPT = ("window.addEventListener('load',function(){var n=0;document.querySelectorAll('figure img')"
           ".forEach(function(i){if(i.complete&&i.naturalWidth>0)n++});document.body.dataset.figuresLoaded=n;});")


def _html(title: str, sections) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
             f"<style>{_CSS}</style>", f"<script>{_SCRIPT}</script>", "</head><body>", f"<h1>{esc(title)}</h1>"]
    for block in sections:
        kind = block[0]
        if kind == "text":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "heading":
            parts.append(f"<h2>{esc(block[1])}</h2>")
        elif kind == "figure":
            data = base64.b64encode(block[2]).decode()
            parts.append(f'<figure id="fig-{esc(block[1])}"><img alt="{esc(block[3])}" '
                         f'src="data:image/png;base64,{data}"><figcaption>{esc(block[3])}</figcaption></figure>')
        elif kind == "table":
            head = "".join(f"<th>{esc(str(c))}</th>" for c in block[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "code":
            parts.append(f"<pre>{esc(block[1])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------- CLI

def add_parser(subparsers):
    parser = subparsers.add_parser("report", help="write report.md and report.html (with plots) for a run or sweep")
    parser.add_argument("folder", type=Path, help="the --out folder of `prunekit sweep` or `prunekit run`, or the "
                                                  "selected.jsonl of `prunekit data select`")
    parser.add_argument("--title", default=None)
    parser.set_defaults(handler=_cli)
    return parser


def _cli(args) -> int:
    written = render(args.folder, title=args.title)
    print(f"wrote {written['md']} and {written['html']} ({len(written['figures'])} figures)")
    return 0


