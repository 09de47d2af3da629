"""Issue 21: one test per gate in docs/security.md, in its order. Each feeds prunekit a payload that, if it
ever ran, would write a marker file (a pickle's __reduce__, a configuration_*.py, a task's utils.py, a YAML
tag, a formula), and asserts both the refusal and that the marker was never written. Removing a gate makes
its test fail (checked for several by disabling the gate in a copy of src/)."""
import ast
import fnmatch
import json
import pickle
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.io.loading import load, load_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "prunekit"


class Planted:
    """Pickled, this is a call of open(marker, "w"): the marker's existence proves that unpickling ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def saved_model(folder: Path) -> Path:
    """The tiny Llama's config and tokenizer in `folder` (no weights yet)."""
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------ 1. pickles

def pickled_checkpoint(tmp_path: Path, marker: Path) -> Path:
    folder = saved_model(tmp_path / "pickled")
    state = dict(tiny_model("llama").state_dict())
    state["planted"] = Planted(marker)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = pickled_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match="holds only pickle checkpoints .* can execute arbitrary code"):
        load(folder)
    assert main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--no-eval"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_allow_pickle_still_refuses_code_inside_a_pickle(tmp_path):
    marker = tmp_path / "ran"
    folder = pickled_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match="holds more than tensors"):
        load(folder, allow_pickle=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 2-4. remote code

def custom_code_checkpoint(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "custom"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="x-custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_x.py").write_text(code)
    (folder / "modeling_x.py").write_text(code)
    return folder


def test_custom_model_code_never_runs_without_consent(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = custom_code_checkpoint(tmp_path, marker)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(folder)
    assert main(["eval", str(folder)]) == 2
    assert "pass --trust-remote-code if you trust them" in capsys.readouterr().err
    assert not marker.exists()


def test_custom_tokenizer_code_never_runs_without_consent(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        tokenizer = load_tokenizer(str(folder), trust_remote_code=False)
    except ValueError as err:                   # the refusal...
        assert "trust_remote_code" in str(err)
    else:                                       # ...or transformers' own class, never the planted one
        assert type(tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_a_quoted_boolean_gives_no_consent(tiny_model_dir, tmp_path, capsys):
    """`trust_remote_code: 'no'` was a non-empty string, i.e. true: it gave the consent it meant to refuse."""
    from prunekit.recipe import load_recipe
    for key in ("trust_remote_code", "allow_pickle"):
        for value in ("'no'", "'false'", "0", "yes please"):
            with pytest.raises(ValueError, match=f"{key} must be true or false"):
                load_recipe(f"model: default\n{key}: {value}\nsteps: [{{method: wanda}}]\n")
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--set",
                 "trust_remote_code='no'", "--out", str(tmp_path / "out")]) == 2
    assert "trust_remote_code must be true or false, got 'no'" in capsys.readouterr().err


def test_hub_downloads_fetch_no_code_and_no_pickles(tmp_path, monkeypatch):
    from prunekit.api import HUB_FILES, _checkpoint_dir
    from prunekit.recipe import recipe_from_dict
    never = ["modeling_x.py", "configuration_x.py", "tokenization_x.py", "pytorch_model.bin", "model.pt", "x.pth",
             "x.pkl", "x.pickle", "x.ckpt", "x.h5", "flax_model.msgpack", "x.so"]
    assert not [(name, p) for name in never for p in HUB_FILES if fnmatch.fnmatch(name, p)]
    for needed in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "chat_template.jinja"):
        assert any(fnmatch.fnmatch(needed, p) for p in HUB_FILES), needed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    recipe = recipe_from_dict({"model": "owner/custom", "trust_remote_code": True, "offload": "disk",
                               "steps": [{"method": "magnitude", "sparsity": 0.5}], "export": {"path": "out"}})
    with pytest.raises(ValueError, match="trust_remote_code models are not supported out of core"):
        _checkpoint_dir(recipe)


# ------------------------------------------------------------------------------------------ 6. templates

def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            yield func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _sources():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_template_is_ever_rendered():
    """Rendering a Jinja chat template is running a program (GGUF metadata and tokenizer configs carry them)."""
    for path, tree in _sources():
        assert "apply_chat_template" not in set(_calls(tree)), path
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("jinja2", "minijinja") for name in names), path


def test_a_hostile_chat_template_is_carried_as_text(tmp_path):
    marker = tmp_path / "ran"
    template = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out",
                 str(out)]) == 0
    saved = "".join(p.read_text() for p in out.iterdir() if p.suffix in (".json", ".jinja"))
    assert template in saved or json.dumps(template)[1:-1] in saved      # verbatim (JSON-escaped in a .json)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 7-9. YAML

def test_yaml_tags_run_nothing(tmp_path, capsys, monkeypatch):
    from prunekit.recipe import load_recipe
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"
    tag = f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: default\nsteps: {tag}\n")
    with pytest.raises(ValueError, match="refused a YAML tag"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match=r"--set steps\.0\.sparsity=.*refused a YAML tag"):
        load_recipe("steps: [{method: wanda}]", [f"steps.0.sparsity={tag}"])
    assert main(["sweep", str(recipe), "--grid", "steps.0.sparsity=0.5", "--out", str(tmp_path / "s")]) == 2
    plain = tmp_path / "plain.yaml"
    plain.write_text("steps: [{method: magnitude, sparsity: 0.5}]\n")
    assert main(["sweep", str(plain), "--grid", f"steps.0.sparsity={tag}", "--out", str(tmp_path / "s")]) == 2
    assert main(["sweep", str(plain), "--grid", "steps.0.sparsity=0.5", "--protocol", f"seqlen={tag}",
                 "--out", str(tmp_path / "s")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error:")]
    assert len(errors) == 3 and all("refused a YAML tag" in line for line in errors)
    assert not marker.exists() and not (tmp_path / "s").exists()


def test_a_key_given_twice_is_refused():
    from prunekit.recipe import load_recipe
    with pytest.raises(ValueError, match="the key 'allow_pickle' is given twice"):
        load_recipe("allow_pickle: false\nsteps: [{method: wanda}]\nallow_pickle: true\n")


def test_a_grid_value_cannot_leave_the_sweep_folder(tmp_path):
    from prunekit.sweep import folder_name
    models = tmp_path / "models"
    for pid in ("steps.0.ignore=../../etc", "x=/abs/path", "..", ".", "a/../../b", "x=~root"):
        name = folder_name(pid)
        assert "/" not in name and name not in (".", "..", ""), name
        assert (models / name).resolve().parent == models.resolve(), name


# ------------------------------------------------------------------------------------------ 10. formulas

@pytest.mark.parametrize("formula", [
    "__import__('builtins').open('MARKER', 'w')", "open('MARKER', 'w')", "W.__class__.__init__", "W[0]",
    "[x for x in W]", "(lambda: W)()", "W if X else G", "eval('W')", "exec('W')", "getattr(W, 'abs')()",
    "mms(G).__reduce__()", "W ** 2", "abs(W, key=X)", "'MARKER'",
])
def test_a_formula_is_data_never_code(formula, tmp_path):
    from prunekit.methods.pruner_zero import PrunerZeroConfig, evaluate
    marker = tmp_path / "ran"
    formula = formula.replace("MARKER", str(marker))
    message = "not allowed|unknown function|unknown name|not a number|takes"
    with pytest.raises(ValueError, match=message):
        PrunerZeroConfig(formula=formula)
    with pytest.raises(ValueError, match=message):
        evaluate(formula, W=torch.ones(2, 2), X=torch.ones(1, 2), G=torch.ones(2, 2))
    assert not marker.exists()


def test_no_eval_exec_or_compile_in_the_package():
    for path, tree in _sources():
        names = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Name)}
        assert not names & {"eval", "exec", "compile", "__import__"}, path


# ------------------------------------------------------------------------------------------ 11. lm-eval tasks

def test_an_lm_eval_task_folder_is_code(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef text(doc):\n    return doc\n")
    (tasks / "planted.yaml").write_text("task: planted\ndataset_path: json\ndoc_to_text: !function utils.text\n")
    monkeypatch.setattr("prunekit.io.loading.load", lambda *a, **k: pytest.fail("loaded a model first"))
    assert main(["eval", "default", "--suite", "lm-eval", "--lm-eval-tasks", "planted", "--lm-eval-include",
                 str(tasks)]) == 2
    assert "a task directory is code; pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 12-13. adapters

def test_an_adapter_is_read_from_safetensors_only(tmp_path):
    from prunekit.eora import load_adapter
    marker = tmp_path / "ran"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({"planted": Planted(marker)}, folder / "adapter_model.bin")
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors .*adapter_model.bin, a pickle"):
        load_adapter(tiny_model("llama"), folder)
    assert not marker.exists()


@pytest.mark.parametrize("adapter_dir", ["../outside", "/tmp/elsewhere", "a/../../b", ""])
def test_an_adapter_folder_stays_inside_the_export(adapter_dir):
    from prunekit.eora import EoraConfig
    with pytest.raises(ValueError, match="adapter_dir must be a relative folder name inside the export"):
        EoraConfig(rank=2, adapter_dir=adapter_dir)


def test_a_recovery_checkpoint_is_read_weights_only(tmp_path):
    from prunekit.recovery.train import load_checkpoint
    marker = tmp_path / "ran"
    path = tmp_path / "recover-checkpoint.pt"
    torch.save({"format": 1, "planted": Planted(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 14. data

def test_only_three_hub_datasets_are_ever_loaded(monkeypatch):
    import prunekit.data as data
    assert sorted(data.HUB_DATASETS) == ["c4", "ptb", "wikitext2"]
    for spec in data.HUB_DATASETS.values():
        for kwargs in spec.splits.values():
            assert "trust_remote_code" not in kwargs and set(kwargs) <= {"path", "name", "split", "data_files"}
    monkeypatch.setattr(data, "_import_datasets", lambda: pytest.fail("asked `datasets` for a name it was handed"))
    for name in ("someone_evil_dataset", "Salesforce-wikitext", "wikitext2 "):
        with pytest.raises(ValueError, match="unknown text source"):
            data.load_text(name)


@pytest.mark.parametrize("suffix", [".pkl", ".py", ".parquet", ".csv", ".arrow", ".pt"])
def test_data_files_are_text_or_json_only(suffix, tmp_path):
    from prunekit.data import load_text
    marker = tmp_path / "ran"
    path = tmp_path / f"data{suffix}"
    torch.save({"planted": Planted(marker)}, path)
    with pytest.raises(ValueError, match=f"unsupported file type '{re.escape(suffix)}'; use .txt or .jsonl"):
        load_text(str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 15. reports

PAYLOAD = "<script>alert('x')</script><img src=x onerror=alert(1)>|`` ```\n# heading|"
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "script", "body", "h1", "h2", "p", "figure", "img",
                "figcaption", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "pre"}


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.handlers, self.sources = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.sources += [value for name, value in attrs if name == "src"]


def hostile_run_folder(folder: Path) -> Path:
    folder.mkdir()
    layers = [{"name": f"model.layers.0.{PAYLOAD}", "achieved": 0.5}]
    (folder / "prunekit.json").write_text(json.dumps({
        "recipe": {"model": PAYLOAD, "steps": [{"method": PAYLOAD, "formula": PAYLOAD}]},
        "steps": [{"method": PAYLOAD, "layers": layers}],
        "dense_perplexity": {"ppl": 12.5, "protocol": PAYLOAD}, "pruned_perplexity": {"ppl": 13.5, "protocol": PAYLOAD},
        "sparsity": {"block_linear_sparsity": 0.5}, "parameters": 10, "parameters_after": 10}))
    (folder / "eval.json").write_text(json.dumps({"suites": {PAYLOAD: {PAYLOAD: 0.5, "protocol": PAYLOAD}}}))
    return folder


def hostile_sweep_folder(folder: Path) -> Path:
    folder.mkdir()
    row = {"id": PAYLOAD, "method": PAYLOAD, "nm": None, "achieved_sparsity": 0.5, "prune_seconds": 1.0,
           "eval_seconds": 1.0, "warnings": [PAYLOAD], "metrics": {"ppl": 12.0}, "protocol": {"perplexity": PAYLOAD}}
    (folder / "results.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "sweep.json").write_text(json.dumps({"recipe": {"model": PAYLOAD}}))
    return folder


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_the_html_report_escapes_every_string(kind, tmp_path):
    from prunekit.render import render
    folder = (hostile_run_folder if kind == "run" else hostile_sweep_folder)(tmp_path / kind)
    render(folder, title=PAYLOAD)
    page = Tags()
    text = (folder / "report.html").read_text()
    page.feed(text)
    assert set(page.tags) <= ALLOWED_TAGS and page.tags.count("script") == 1         # the page's own script
    assert page.tags.count("img") == page.tags.count("figure") and page.handlers == []
    assert "&lt;script&gt;alert(" in text


def markdown_html(text: str) -> str:
    """The HTML a renderer that passes raw HTML through (as the hub's does, before sanitising) makes of `text`."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(text)


def check_markdown(text: str) -> Tags:
    html = markdown_html(text)
    page = Tags()
    page.feed(html)
    assert "script" not in page.tags and page.handlers == [], html
    assert all(source.startswith("figures/") for source in page.sources), html       # the report's own figures
    for table in re.findall(r"<table>(.*?)</table>", html, flags=re.S):
        counts = {len(re.findall(r"<t[hd][ >]", row)) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)}
        assert len(counts) == 1, table                          # a `|` or a newline split no row
    return page


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_report_md_escapes_every_string(kind, tmp_path):
    from prunekit.render import render
    folder = (hostile_run_folder if kind == "run" else hostile_sweep_folder)(tmp_path / kind)
    render(folder, title=PAYLOAD)
    text = (folder / "report.md").read_text()
    check_markdown(text)
    assert text.splitlines()[0].startswith("# &lt;script&gt;")               # the title stays one heading line


def test_the_model_card_escapes_every_string():
    from prunekit.card import model_card
    from prunekit.recipe import recipe_from_dict
    import yaml
    recipe = recipe_from_dict({"model": PAYLOAD, "steps": [{"method": "wanda", "sparsity": 0.5},
                                                           {"method": "eora", "rank": 2, "adapter_dir": "a'\"`|b"}]})
    record = {"source": {"kind": "hub", "id": PAYLOAD}, "adapter": "a'\"`|b", "adapter_parameters": 10,
              "steps": [{"method": PAYLOAD, "sparsity_of_pruned_layers": 0.5}],
              "dense_perplexity": {"ppl": 12.5, "protocol": PAYLOAD},
              "eval": {"suites": {PAYLOAD: {PAYLOAD: 0.5, "protocol": PAYLOAD}}}}
    card = model_card(recipe, record)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == PAYLOAD                                      # the front matter holds it exactly
    page = check_markdown(card.split("---\n", 2)[2])
    assert page.tags.count("h1") == 1
    heading = next(line for line in card.splitlines() if line.startswith("# "))
    assert "&lt;script&gt;" in heading and "pruned with prunekit (wanda + eora)" in heading
    code = re.search(r"\n(`{3,})python\n(.*?)\n\1\n", card, flags=re.S).group(2)
    ast.parse(code)                                           # the adapter's name stays inside its string
    assert "'PATH/a\\'\"`|b'" in code


# ------------------------------------------------------------------------------------------ 17. subprocesses

def test_no_shell_anywhere():
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                assert not any(k.arg == "shell" and getattr(k.value, "value", False) for k in node.keywords), path
                func = node.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    assert f"{func.value.id}.{func.attr}" not in ("os.system", "os.popen", "subprocess.getoutput",
                                                                  "subprocess.getstatusoutput"), path
