"""prunekit.io.export: atomic safetensors export, prunekit.json, overwrite/protect rules, failures."""
import dataclasses
import json
import os
import stat

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import llama, word_tokenizer
from prunekit.io import export
from prunekit.io.export import METADATA_FILE, check_output_dir, save_pretrained_atomic


def tiny_tokenizer():
    return word_tokenizer(["the cat sat on the mat", "a dog ran far away"])


def tiny_llama(seed=0):
    model = llama(seed, hidden_size=32, intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    with torch.no_grad():  # look pruned: half the first block's q_proj is zero
        model.model.layers[0].self_attn.q_proj.weight[:, ::2] = 0
    return model


@dataclasses.dataclass
class FakeConfig:
    sparsity: float = 0.5
    nm: tuple = (2, 4)


@pytest.fixture
def parts():
    return tiny_llama(), tiny_tokenizer()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def listing(path):
    return sorted(p.name for p in path.iterdir())


def test_export_reloads_with_plain_transformers(parts, tmp_path):
    model, tok = parts
    out = tmp_path / "out" / "pruned"
    metadata = {"method": "wanda", "config": FakeConfig(), "ppl": float("inf"), "layers": ("a", "b"),
                "dtype": torch.bfloat16, "path": tmp_path}
    result = save_pretrained_atomic(model, tok, out, metadata=metadata)
    assert result == out.resolve()

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    assert float((reloaded.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) >= 0.5
    assert AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == tok("the cat")["input_ids"]

    files = listing(out)
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    record = json.loads((out / METADATA_FILE).read_text())
    assert record["method"] == "wanda"
    assert record["config"] == {"sparsity": 0.5, "nm": [2, 4]}
    assert record["layers"] == ["a", "b"] and record["ppl"] == "inf"
    assert record["dtype"] == "torch.bfloat16" and record["path"] == str(tmp_path)
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["prunekit"] and versions["python"].count(".") == 2
    assert listing(out.parent) == ["pruned"]  # no temp folders left next to it
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    weights = next(out.glob("*.safetensors"))
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # not the 0600 safetensors 0.8 writes


def test_existing_out_dir_is_refused_without_overwrite(parts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pretrained_atomic(*parts, out, metadata={})
    assert listing(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert listing(tmp_path) == ["out"]


def test_overwrite_replaces_a_previous_export(parts, tmp_path):
    model, tok = parts
    out = tmp_path / "out"
    save_pretrained_atomic(model, tok, out, metadata={"run": 1})
    (out / "stale.txt").write_text("from run 1")
    other = tiny_llama(seed=1)
    save_pretrained_atomic(other, tok, out, metadata={"run": 2}, overwrite=True)
    assert json.loads((out / METADATA_FILE).read_text())["run"] == 2
    assert not (out / "stale.txt").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(reloaded.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert listing(tmp_path) == ["out"]


def test_overwrite_refuses_folders_that_are_not_exports(parts, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="does not look like a model export"):
        save_pretrained_atomic(*parts, out, metadata={}, overwrite=True)
    assert listing(out) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained_atomic(*parts, empty, metadata={}, overwrite=True)
    assert METADATA_FILE in listing(empty)


def test_overwrite_replaces_only_what_prunekit_exported(parts, tmp_path):
    """A Hugging Face model that prunekit never wrote (config.json, no prunekit.json of ours) is refused
    with the reason, and left byte for byte as it was; so is a folder with a foreign prunekit.json."""
    model, tok = parts
    for name, extra in (("hf-model", None), ("foreign", '{"note": "someone else\'s file"}')):
        out = tmp_path / name
        model.save_pretrained(out)
        if extra is not None:
            (out / METADATA_FILE).write_text(extra)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(ValueError, match="was not written by prunekit"):
            save_pretrained_atomic(model, tok, out, metadata={}, overwrite=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_refuses_the_working_directory(parts, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    monkeypatch.chdir(work)
    for target in (".", tmp_path):
        with pytest.raises(ValueError, match="working directory"):
            check_output_dir(target, overwrite=True)
    assert listing(work) == ["config.json"]


def test_protected_input_is_never_replaced(parts, tmp_path):
    model, tok = parts
    source = tmp_path / "input-model"
    model.save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (source, source / "sub", tmp_path):
        with pytest.raises(ValueError, match="input model"):
            save_pretrained_atomic(model, tok, out, metadata={}, overwrite=True, protect=[source])
    gguf = tmp_path / "files" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="input model"):
        check_output_dir(gguf.parent, overwrite=True, protect=[str(gguf)])
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sorted(listing(tmp_path)) == ["files", "input-model"]
    save_pretrained_atomic(model, tok, tmp_path / "sibling", metadata={}, protect=[source])  # siblings are fine


def test_failed_save_leaves_nothing_behind(parts, tmp_path, monkeypatch):
    model, tok = parts
    out = tmp_path / "out"

    def disk_full(directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained_atomic(model, tok, out, metadata={})
    assert not out.exists()
    assert listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_export(parts, tmp_path, monkeypatch):
    model, tok = parts
    out = tmp_path / "out"
    save_pretrained_atomic(model, tok, out, metadata={"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(directory, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    with pytest.raises(OSError):
        save_pretrained_atomic(model, tok, out, metadata={"run": 2}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == ["out"]


def test_failed_rename_restores_the_old_export(parts, tmp_path, monkeypatch):
    model, tok = parts
    out = tmp_path / "out"
    save_pretrained_atomic(model, tok, out, metadata={"run": 1})
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("simulated crash while renaming the new export in")
        return real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained_atomic(model, tok, out, metadata={"run": 2}, overwrite=True)
    assert json.loads((out / METADATA_FILE).read_text())["run"] == 1
    assert listing(tmp_path) == ["out"]


def test_pickle_output_is_refused(parts, tmp_path, monkeypatch):
    model, tok = parts
    real = model.save_pretrained

    def also_pickle(directory, *args, **kwargs):
        real(directory, *args, **kwargs)
        torch.save({}, directory / "pytorch_model.bin")

    monkeypatch.setattr(model, "save_pretrained", also_pickle)
    with pytest.raises(RuntimeError, match="pickle"):
        save_pretrained_atomic(model, tok, tmp_path / "out", metadata={})
    assert listing(tmp_path) == []


def test_symlinked_out_dir_is_refused(parts, tmp_path):
    real = tmp_path / "real"
    save_pretrained_atomic(*parts, real, metadata={})
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(FileExistsError, match="symlink"):
        save_pretrained_atomic(*parts, link, metadata={}, overwrite=True)
    assert link.is_symlink() and (real / METADATA_FILE).is_file()


def test_out_dir_that_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        check_output_dir(target, overwrite=True)


def test_metadata_is_plain_json():
    value = export.to_jsonable({"nan": float("nan"), 1: (1, 2.5, None), "set": {3}, "t": torch.tensor(2.0),
                                "dev": torch.device("cpu")})
    assert value == {"nan": "nan", "1": [1, 2.5, None], "set": [3], "t": 2.0, "dev": "cpu"}
    json.dumps(value, allow_nan=False)
