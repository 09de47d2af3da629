"""Faults and bad input, each injected once (issue 6, part 4), so the list is checkable in one place:

  1. Cholesky failure in the OBS sweep     -> dampening x10, x100, then a diagonal-H fallback, noted per layer
  2. NaN/Inf in activations or statistics  -> NonFiniteError naming block and module; nothing exported
                                              (unstructured, width scores, and every block-streaming pass)
  3. truncated/corrupt safetensors or GGUF -> CorruptCheckpointError naming the file, before any loading
  4. disk full while saving                -> DiskFullError, no half-written output, no staging folder; CLI exit 2
  5. unknown recipe keys                   -> the key and the nearest valid one, in every section
  6. YAML tags that construct objects      -> refused, nothing executes
  7. pickle checkpoints                    -> refused without --allow-pickle; torch.load always weights_only=True
  8. mask properties (exact counts, N:M, idempotence): tests/test_masks_properties.py

Related tests elsewhere (not repeated here): test_export.py (generic failed save / rename),
test_loading.py (pickle-only dir, bad GGUF magic), test_recipe.py (unknown keys), test_engine.py
(NaN in a weight).
"""
import ast
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from prunekit.io import gguf, loading
from prunekit.api import run_recipe
from prunekit.cli import main
from prunekit.core.stream import NonFiniteError
from prunekit.prune import prune_
from prunekit.io.export import DiskFullError, save_pretrained_atomic
from prunekit.io.checkpoint import CorruptCheckpointError, check_checkpoint
from prunekit.io.loading import load
from prunekit.masks import nm_violations
from prunekit.methods.sparsegpt import SparseGPTConfig
from prunekit.methods.wanda import WandaConfig
from prunekit.recipe import load_recipe, recipe_from_dict
from prunekit.stats import Hessian

FAST = {"calibration": {"samples": 4, "seqlen": 16}}


def quiet(*args):
    pass


def listing(path):
    return sorted(p.name for p in Path(path).iterdir())


def copy_model(tiny_model_dir, tmp_path, name="model"):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / name))


# --------------------------------------------------------------------------- 1. Cholesky failure

def indefinite(n: int, smallest: float) -> torch.Tensor:
    """A symmetric (n, n) matrix with eigenvalues [smallest, 1, ..., 1] in a random basis."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0)))
    eigenvalues = torch.ones(n)
    eigenvalues[0] = smallest
    return Q @ torch.diag(eigenvalues) @ Q.T


def test_cholesky_retries_with_more_dampening_then_falls_back_to_a_diagonal():
    stats = Hessian(8, torch.device("cpu"))
    stats.H = indefinite(8, -0.05)                 # 0.01 x mean diag is too little, 0.1 x is enough
    U, damp, note = stats.inverse_cholesky(0.01)
    assert damp == pytest.approx(0.1) and "dampening raised to 0.1" in note
    assert torch.allclose(U.T @ U, torch.linalg.inv(stats.H + 0.1 * stats.H.diagonal().mean() * torch.eye(8)),
                          atol=1e-4)

    stats = Hessian(8, torch.device("cpu"))
    stats.H = indefinite(8, -50.0)                 # no dampening up to 100x rescues it
    U, damp, note = stats.inverse_cholesky(0.01)
    assert "dampening 0.01, 0.1, 1" in note and "diagonal H" in note
    assert torch.equal(U, torch.diag(U.diagonal())) and torch.isfinite(U).all()


def _make_every_hessian_indefinite(monkeypatch):
    """Inject: after each real update, add a huge constant off the diagonal (eigenvalue -big)."""
    real = Hessian.update

    def update(self, X):
        real(self, X)
        n = self.H.shape[0]
        self.H += 1000 * self.H.diagonal().mean() * (torch.ones(n, n) - torch.eye(n))
    monkeypatch.setattr(Hessian, "update", update)


@pytest.mark.parametrize("config", [SparseGPTConfig(nm=(2, 4)), WandaConfig(nm=(2, 4), update="obs")],
                         ids=["sparsegpt", "wanda+obs"])
def test_cholesky_failure_in_the_engine_keeps_the_pattern_and_notes_each_layer(config, calib, monkeypatch, caplog):
    _make_every_hessian_indefinite(monkeypatch)
    model = tiny_model("llama")
    with caplog.at_level("WARNING", logger="prunekit"):
        report = prune_(model, config, calib, progress=False)
    assert len(report.layers) == 14
    for record in report.layers:
        assert "fallback: diagonal H" in record.note, record.name
        assert record.name in caplog.text
        weight = model.get_submodule(record.name).weight
        groups = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert (groups == 2).all(), record.name                 # exactly 2 zeros in every group of 4
        assert nm_violations(weight, 2, 4) == 0


def test_cholesky_fallback_is_recorded_in_prunekit_json(tiny_model_dir, tmp_path, monkeypatch):
    _make_every_hessian_indefinite(monkeypatch)
    out = tmp_path / "out"
    recipe = recipe_from_dict({"model": str(tiny_model_dir), **FAST, "steps": [{"method": "sparsegpt", "nm": [2, 4]}],
                               "export": {"path": str(out)}})
    run_recipe(recipe, progress=False, echo=quiet)
    layers = json.loads((out / "prunekit.json").read_text())["steps"][0]["layers"]
    assert len(layers) == 14 and all("diagonal H" in layer["note"] for layer in layers)


# --------------------------------------------------------------------------- 2. NaN / Inf

def _nan_into_output_of_block(model, index):
    def hook(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()   # out of place
        hidden[0, 0, 0] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return model.model.layers[index].register_forward_hook(hook)


def _inf_into_input_of(module):
    def hook(module, args):
        X = args[0].clone()
        X[0, 0, 0] = float("inf")
        return (X, *args[1:])
    return module.register_forward_pre_hook(hook)


def test_nan_in_a_block_output_stops_the_run_and_exports_nothing(tiny_model_dir, tmp_path, monkeypatch):
    real = loading.load

    def load_with_fault(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        _nan_into_output_of_block(model, 0)
        return model, tokenizer
    monkeypatch.setattr(loading, "load", load_with_fault)
    out = tmp_path / "exports" / "out"
    recipe = recipe_from_dict({"model": str(tiny_model_dir), **FAST, "steps": [{"method": "wanda", "sparsity": 0.5}],
                               "export": {"path": str(out)}})
    with pytest.raises(NonFiniteError, match=r"block 0 \(model\.layers\.0\).*NaN/Inf outputs"):
        run_recipe(recipe, progress=False, echo=quiet)
    assert not out.exists() and not (tmp_path / "exports").exists()


@pytest.mark.parametrize("sequential", ["true", "block"])
@pytest.mark.parametrize("config", [WandaConfig(sparsity=0.5), SparseGPTConfig(sparsity=0.5)],
                         ids=["wanda", "sparsegpt"])
def test_inf_in_a_linear_input_names_block_and_module_before_writing_it(config, sequential, calib):
    model = tiny_model("llama")
    down = model.model.layers[1].mlp.down_proj
    before = down.weight.detach().clone()
    _inf_into_input_of(down)
    with pytest.raises(NonFiniteError, match=r"block 1, model\.layers\.1\.mlp\.down_proj.*NaN/Inf"):
        prune_(model, config, calib, sequential=sequential, progress=False)
    assert torch.equal(down.weight, before)                      # the faulty layer was never written


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "taylor"])
def test_inf_in_a_width_score_stops_before_any_unit_is_removed(method, calib):
    """Width pruning: an Inf in the input of down_proj makes its channel scores non-finite
    (FLAP's variance, Wanda-SP's norms, Taylor's gradients), which would rank arbitrarily."""
    from prunekit.catalog import get_method
    model = tiny_model("llama")
    _inf_into_input_of(model.model.layers[1].mlp.down_proj)
    shapes = {name: p.shape for name, p in model.model.layers[1].named_parameters()}
    with pytest.raises(NonFiniteError, match=r"block 1, model\.layers\.1\.mlp\.down_proj \(channels\).*NaN/Inf"):
        prune_(model, get_method(method).config_cls(sparsity=0.2), calib, progress=False)
    # block 1 kept every unit (uniform mode prunes block 0 before it scores block 1)
    assert {name: p.shape for name, p in model.model.layers[1].named_parameters()} == shapes


@pytest.mark.parametrize("config", [{"method": "block-influence", "layers": 1}, {"method": "flap", "sparsity": 0.2},
                                    {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}],
                         ids=["depth", "width", "allocation"])
def test_nan_in_a_block_output_stops_every_block_pass(config, calib):
    """The passes that stream blocks for depth scores, width scores and allocation check every
    block's outputs, as the unstructured engine does."""
    from prunekit.recipe import step_from_dict
    model = tiny_model("llama")
    _nan_into_output_of_block(model, 0)
    with pytest.raises(NonFiniteError, match=r"block 0 \(model\.layers\.0\).*NaN/Inf outputs"):
        prune_(model, step_from_dict(dict(config)), calib, progress=False)
    assert len(model.model.layers) == 2


def test_nan_error_exits_2_on_the_command_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real = loading.load
    monkeypatch.setattr(loading, "load",
                        lambda *a, **k: (lambda m: (_nan_into_output_of_block(m[0], 1), m)[1])(real(*a, **k)))
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--no-eval",
                 "--samples", "4", "--seqlen", "16", "--out", str(out)]) == 2
    assert "block 1 (model.layers.1)" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------------- 3. corrupt checkpoints

def _no_loading(monkeypatch):
    monkeypatch.setattr(loading, "_from_pretrained", lambda *a, **k: pytest.fail("loaded a corrupt checkpoint"))


def test_truncated_shard_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    path = copy_model(tiny_model_dir, tmp_path)
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    _no_loading(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*holds \d+ \(truncated\).*re-download"):
        load(path)


def test_corrupt_header_json_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    path = copy_model(tiny_model_dir, tmp_path)
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8] = ord("x")                                           # the header's opening brace
    shard.write_bytes(bytes(data))
    _no_loading(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: the header is not valid JSON"):
        load(path)


def test_header_whose_shape_does_not_match_its_bytes(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    header["w"]["shape"] = [4, 5]                                # claims 80 bytes, spans 64
    text = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    with pytest.raises(CorruptCheckpointError,
                       match=r"'w' \(F32, shape \[4, 5\]\) needs 80 bytes but its offsets span 64"):
        check_checkpoint(tmp_path)


@pytest.fixture
def sharded(tmp_path):
    path = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(path, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    check_checkpoint(path)                                       # intact: passes
    return path, index


def test_shard_listed_in_the_index_but_missing(sharded, monkeypatch):
    path, index = sharded
    missing = sorted(set(index["weight_map"].values()))[-1]
    (path / missing).unlink()
    _no_loading(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match=f"lists shard '{missing}', which is missing"):
        load(path)


def test_index_names_a_weight_its_shard_does_not_hold(sharded):
    path, index = sharded
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=f"{shards[1]}: holds no tensor '{name}'"):
        check_checkpoint(path)


def test_corrupt_checkpoint_exits_2_on_the_command_line(tiny_model_dir, tmp_path, capsys):
    path = copy_model(tiny_model_dir, tmp_path)
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert main(["prune", str(path), "--method", "magnitude", "--sparsity", "0.5", "--no-eval"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_truncated_default_gguf_is_refused_before_conversion(tmp_path, monkeypatch):
    try:
        source = loading.default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model's wheel is not installed")
    bad = tmp_path / "cut.gguf"
    with open(source, "rb") as fh:                               # only its first 64 KB: never the full model
        bad.write_bytes(fh.read(64 * 1024))
    import transformers as tf
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("converted"))
    with pytest.raises(CorruptCheckpointError, match=r"cut\.gguf is truncated or corrupt.*re-download"):
        load(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_gguf_cut_inside_its_tensor_data_is_refused(tmp_path):
    from test_loading import tiny_llama, write_tiny_gguf
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_llama(seed=5, tie=True))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="tiny.gguf"):
        load(path, cache_dir=tmp_path / "cache")


def test_corrupt_gguf_cache_is_rebuilt(tmp_path):
    from test_loading import assert_same_weights, tiny_llama, write_tiny_gguf
    reference = tiny_llama(seed=5, tie=True)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", reference)
    cache = tmp_path / "cache"
    load(path, cache_dir=cache)
    shard = next(gguf.gguf_cache_dir(path, cache).glob("*.safetensors"))
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-7])                                # damaged after it was published
    model, _ = load(path, cache_dir=cache)
    assert_same_weights(model, reference)
    assert shard.read_bytes() == whole
    assert listing(cache / "gguf") == [shard.parent.name]        # no staging folders left


# --------------------------------------------------------------------------- 4. disk full

@pytest.fixture
def parts():
    from test_export import tiny_llama, tiny_tokenizer
    return tiny_llama(), tiny_tokenizer()


def _fill_disk_in_the_weights_writer(monkeypatch):
    """Inject ENOSPC inside transformers' safetensors writer, after a partial file is on disk."""
    import transformers.modeling_utils as modeling_utils

    def writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(modeling_utils, "safe_save_file", writer)


def test_disk_full_on_a_new_export_leaves_no_directory(parts, tmp_path, monkeypatch):
    model, tok = parts
    _fill_disk_in_the_weights_writer(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match="disk full.*nothing was written.*was not created") as info:
        save_pretrained_atomic(model, tok, out, metadata={})
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path) == []                               # neither out nor a staging folder


def test_disk_full_on_overwrite_keeps_the_old_export_byte_for_byte(parts, tmp_path, monkeypatch):
    model, tok = parts
    out = tmp_path / "out"
    save_pretrained_atomic(model, tok, out, metadata={"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def tokenizer_save(directory, *args, **kwargs):               # weights written, then the disk fills
        (Path(directory) / "tokenizer.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tok, "save_pretrained", tokenizer_save)
    with pytest.raises(DiskFullError, match="previous export in .* is unchanged"):
        save_pretrained_atomic(model, tok, out, metadata={"run": 2}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["out"]


def test_disk_full_exits_2_with_a_clear_message(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _fill_disk_in_the_weights_writer(monkeypatch)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "nothing was written" in err
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------- 5. unknown recipe keys

@pytest.mark.parametrize("text, key, nearest", [
    ("modle: default\nsteps: [{method: wanda}]", "modle", "model"),
    ("steps: [{method: wanda}]\ncalibration: {sampels: 4}", "sampels", "samples"),
    ("steps: [{method: wanda}]\neval: {seqlne: 32}", "seqlne", "seqlen"),
    ("steps: [{method: wanda}]\nexport: {pth: out}", "pth", "path"),
    ("steps: [{method: wanda, sparsty: 0.5}]", "sparsty", "sparsity"),
], ids=["top", "calibration", "eval", "export", "step"])
def test_unknown_key_names_the_nearest_valid_one(text, key, nearest):
    with pytest.raises(ValueError, match=f"unknown key '{key}'.*did you mean '{nearest}'"):
        load_recipe(text)


# --------------------------------------------------------------------------- 6. YAML loaded safely

def test_python_tags_are_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: default\nsteps: {tag}\n")
    with pytest.raises(ValueError, match="refused a YAML tag.*python/object/apply"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match=r"--set steps\.0\.sparsity=.*refused a YAML tag"):
        load_recipe("steps: [{method: wanda}]", [f"steps.0.sparsity={tag}"])
    assert main(["run", str(recipe)]) == 2
    assert "refused a YAML tag" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------- 7. pickles

def test_pickle_only_checkpoint_needs_the_flag(tmp_path, capsys):
    path = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load(path)
    assert main(["prune", str(path), "--method", "magnitude", "--sparsity", "0.5", "--no-eval"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def _torch_load_calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                    and func.value.id == "torch"):
                yield node


def test_every_torch_load_passes_weights_only_true():
    source = Path(__file__).resolve().parents[1] / "src"
    calls = 0
    for file in sorted(source.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        assert "from torch import load" not in file.read_text(), file
        for call in _torch_load_calls(tree):
            calls += 1
            flags = {kw.arg: kw.value for kw in call.keywords}
            assert "weights_only" in flags, f"{file}:{call.lineno} torch.load without weights_only"
            value = flags["weights_only"]
            assert isinstance(value, ast.Constant) and value.value is True, f"{file}:{call.lineno}"
    assert calls >= 1                                            # the scan does see recovery/train.py's call


def test_the_torch_load_scan_can_fail():
    bad = ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n")
    calls = list(_torch_load_calls(bad))
    assert len(calls) == 2
    assert not any(kw.arg == "weights_only" and kw.value.value is True for call in calls for kw in call.keywords)
