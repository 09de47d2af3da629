"""Issue 21, part 6: messages that help. Each case failed (a traceback, a temporary path after the work, the
Python spelling of a flag, "0 tokens" without the reason) before its fix."""
import errno
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model, tiny_tokenizer

from prunekit.cli import main


def test_short_eval_data_says_its_held_out_split_is_empty(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("one two three four five\n")
    assert main(["eval", str(tiny_model_dir), "--data", str(data), "--seqlen", "4"]) == 2
    err = capsys.readouterr().err
    assert f"the evaluation split of {data}" in err and "held-out text only" in err and "Traceback" not in err


def test_json_naming_a_directory_fails_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import prunekit.io.loading as loading
    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert main(["eval", str(tiny_model_dir), "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory" in capsys.readouterr().err


def test_unwritable_out_parent_fails_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import prunekit.io.loading as loading
    monkeypatch.setattr(loading, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code = main(["prune", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot write {tmp_path / 'out'}: {tmp_path} does not accept new files" in err
    assert not (tmp_path / "out").exists()


def test_custom_code_refusal_names_the_cli_flag(tmp_path, capsys):
    folder = tmp_path / "custom"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="x-custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text("raise SystemExit('custom code ran')\n")
    assert main(["eval", str(folder)]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("prunekit: error:") and "pass --trust-remote-code" in line
    assert "trust_remote_code=True" not in err and "Traceback" not in err


def test_allow_pickle_with_a_pickle_the_safe_loader_refuses_is_one_line(tmp_path, capsys):
    folder = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    state = dict(model.state_dict())
    state["extra"] = print                         # a global the weights-only unpickler refuses
    torch.save(state, folder / "pytorch_model.bin")
    assert main(["eval", str(folder), "--allow-pickle"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("prunekit: error:") and "holds more than tensors" in line and "Traceback" not in err


def test_a_full_disk_reported_by_safetensors_is_a_disk_full_error(tmp_path, monkeypatch):
    # safetensors 0.8 raises its own SafetensorError ("... (os error 28)"), not an OSError, on a full disk
    import prunekit.io.export as export

    class SafetensorError(Exception):
        pass

    def full(model, path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(export, "_save_model", full)
    try:
        export.save_pretrained_atomic(tiny_model("llama"), None, tmp_path / "out")
    except export.DiskFullError as err:
        assert "disk full" in str(err) and "nothing was written" in str(err)
    else:
        raise AssertionError("no DiskFullError")
    assert list(tmp_path.iterdir()) == []


def test_bench_has_the_trust_remote_code_flag(monkeypatch):
    import prunekit.bench as bench
    seen = {}
    monkeypatch.setattr(bench, "benchmark", lambda *a, **k: seen.update(k) or {"rows": []})
    monkeypatch.setattr(bench, "format_table", lambda result: "")
    assert main(["bench", "some-model", "--trust-remote-code"]) == 0
    assert seen["trust_remote_code"] is True
