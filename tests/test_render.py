"""`prunekit report`: Markdown + self-contained HTML; every figure present and a decodable PNG;
a headless Chromium check when Chromium is installed."""
import base64
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import pytest

from prunekit.cli import main
from prunekit.render import render
from prunekit.sweep import folder_name


def _row(pid, method, sparsity, nm, achieved, ppl, kl, top1, ret_mc, ret_exact):
    return {"id": pid, "overrides": {}, "method": method, "scope": "linear", "sparsity": sparsity, "nm": nm,
            "achieved_sparsity": achieved, "parameters": 100, "parameters_after": 100, "prune_seconds": 0.1,
            "eval_seconds": 0.2, "warnings": ["ppl drift"] if ppl > 30 else [],
            "metrics": {"ppl": ppl, "kl_mean": kl, "top1_agreement": top1, "fdt": 3.0, "sdt": 0.2,
                        "exact_match": 0.5, "mc_accuracy": 0.5, "retention_exact": ret_exact, "retention_mc": ret_mc},
            "protocol": {"perplexity": "source=default, seqlen=32", "fidelity": "kl over 128 tokens"}}


ROWS = [_row("a", "wanda", 0.3, None, 0.3, 12.0, 0.1, 0.9, 1.0, 0.9),
        _row("b", "wanda", 0.5, None, 0.5, 15.0, 0.3, 0.8, 0.9, 0.8),
        _row("c", "sparsegpt", 0.5, None, 0.5, 14.0, 0.25, 0.82, 0.95, 0.85),
        _row("d", "wanda", 0.5, [2, 4], 0.5, 40.0, 0.9, 0.6, 0.5, 0.4)]


def _bench(tok_s_model, tok_s_dense):
    stat = lambda v: {"median": v, "min": v, "max": v}          # noqa: E731
    return {"protocol": {}, "rows": [
        {"role": "baseline", "batch": 1, "prefill_ms": stat(5.0), "decode_tok_s_per_seq": stat(tok_s_dense),
         "speedup_decode": None},
        {"role": "model", "batch": 1, "prefill_ms": stat(4.0), "decode_tok_s_per_seq": stat(tok_s_model),
         "speedup_decode": tok_s_model / tok_s_dense}]}


@pytest.fixture
def sweep_dir(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for pid, speed in (("a", 110.0), ("b", 120.0)):
        (folder / "models" / folder_name(pid)).mkdir(parents=True)
        (folder / "models" / folder_name(pid) / "bench.json").write_text(json.dumps(_bench(speed, 100.0)))
    return folder


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.images, self.captions, self.links = [], [], 0, []
        self._in_figure = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append(attrs.get("id"))
            self._in_figure = attrs.get("id")
        if tag == "img":
            self.images.append((self._in_figure, attrs.get("alt"), attrs.get("src")))
        if tag == "figcaption":
            self.captions += 1
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_html(path, expected):
    page = _Page()
    text = path.read_text()
    page.feed(text)
    assert page.figures == [f"fig-{name}" for name in expected]
    assert page.captions == len(expected)
    assert len(page.images) == len(expected)
    for figure, alt, src in page.images:
        assert figure is not None and alt
        assert src.startswith("data:image/png;base64,")
        width, height = _png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width > 0 and height > 0
    assert page.links == []                                      # nothing external
    assert "http://" not in text and "https://" not in text
    return page


def test_sweep_report_has_every_curve_the_table_and_speed(sweep_dir):
    written = render(sweep_dir)
    expected = ["perplexity", "kl", "top1", "retention", "speed"]
    assert written["figures"] == expected
    check_html(sweep_dir / "report.html", expected)
    md = (sweep_dir / "report.md").read_text()
    for name in expected:
        assert f"(figures/{name}.png)" in md
        _png_size((sweep_dir / "figures" / f"{name}.png").read_bytes())
    assert "| d | wanda 2:4 | 50.00% | 40 |" in md                 # N:M points are their own series
    assert "- perplexity: source=default, seqlen=32" in md
    assert "## Warnings" in md and "- ppl drift" in md


def test_sweep_without_optional_suites_or_bench_has_only_the_perplexity_curve(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    rows = [dict(r, metrics={"ppl": r["metrics"]["ppl"]}) for r in ROWS]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(folder), "--title", "mine"]) == 0
    page = check_html(folder / "report.html", ["perplexity"])
    assert page.images and "<h1>mine</h1>" in (folder / "report.html").read_text()


def test_report_of_a_run_and_of_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--nm", "2:4", "--out", str(out),
                 "--samples", "4", "--seqlen", "32", "--set", "eval.max_tokens=640"]) == 0
    (out / "bench.json").write_text(json.dumps(_bench(100.0, 100.0)))
    (out / "eval.json").write_text(json.dumps({"suites": {"fidelity": {"kl_mean": 0.25, "protocol": "kl, 128 tokens",
                                                                       "baseline": {"x": 1}}},
                                               "perplexity": {"ppl": 9.0}}))
    assert main(["report", str(out)]) == 0
    check_html(out / "report.html", ["layer-sparsity"])
    md = (out / "report.md").read_text()
    meta = json.loads((out / "prunekit.json").read_text())
    assert f"| pruned perplexity | {meta['pruned_perplexity']['ppl']:.4g} |" in md
    assert "| block linear sparsity | 50.00% |" in md
    assert "## Speed (prunekit bench)" in md and "nm:" in md
    assert "| fidelity: kl_mean | 0.25 | kl, 128 tokens |" in md and "eval.json" not in md
    assert main(["report", str(tmp_path)]) == 2
    assert "neither results.jsonl" in capsys.readouterr().err


def test_report_of_a_width_run_shows_kept_widths(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    widths = [{"channels": 64, "heads": 4, "kv_heads": 2}, {"channels": 32, "heads": 2, "kv_heads": 1}]
    (folder / "prunekit.json").write_text(json.dumps({
        "recipe": {"model": "m", "steps": [{"method": "flap", "sparsity": 0.3}]}, "parameters": 1000,
        "parameters_after": 700, "steps": [{"method": "flap", "widths": widths, "removed_blocks": []}],
        "structure": {"stock": False, "num_blocks": 2, "widths": widths}}))
    assert render(folder)["figures"] == ["widths"]
    check_html(folder / "report.html", ["widths"])


def test_chromium_renders_every_figure(sweep_dir, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed")
    render(sweep_dir)
    page = f"file://{sweep_dir / 'report.html'}"
    shot = tmp_path / "shot.png"
    common = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,4000", page], timeout=60,
                   capture_output=True, check=True)
    dom = subprocess.run([*common, "--dump-dom", page], timeout=60, capture_output=True, check=True, text=True).stdout
    assert 'data-figures-loaded="5"' in dom
    width, height = _png_size(shot.read_bytes())
    assert (width, height) == (1200, 4000)
    from PIL import Image
    darkest, lightest = Image.open(shot).convert("L").getextrema()
    assert darkest < 128 < lightest                              # text and plots on a white page, not blank
