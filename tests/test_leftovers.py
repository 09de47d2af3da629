"""What a killed run leaves beside --out is cleaned up by the next run (issue 21, part 7).

Every staging folder prunekit makes beside an output (`.OUT.tmp-XXXX` for the new export,
`.OUT.old-XXXX` for the old one moved aside) holds `prunekit-staging.json`: the pid, host and start
time of the process that made it. SIGKILL during the save leaves it behind; the next run for the
same --out removes it once that process is gone, and says so. Folders without the marker are not
ours: left alone, and named in one warning. Folders of live processes are left alone.
"""
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from prunekit.cli import main
from prunekit.io.atomic import STAGING_MARKER, clean_stale_staging, staging_dir
from prunekit.io.export import save_pretrained_atomic

SRC = Path(__file__).resolve().parents[1] / "src"


def _prune(model, out) -> int:
    return main(["prune", str(model), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--out", str(out)])


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _plant(out: Path, kind: str, record: dict | None, tag: str = "a") -> Path:
    folder = out.parent / f".{out.name}.{kind}-planted{tag}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half a shard")
    if record is not None:
        (folder / STAGING_MARKER).write_text(json.dumps({"program": "prunekit", "host": socket.gethostname(),
                                                         "kind": kind, "created": "2025-01-01T00:00:00+00:00",
                                                         **record}))
    return folder


def test_sigkill_during_the_save_leaves_a_marked_folder_that_the_next_run_removes(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    killed = ("import os, signal; from prunekit.io.atomic import staging_dir; "
              f"folder = staging_dir({str(out)!r}); (folder / 'model.safetensors').write_bytes(b'half'); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -9
    (left,) = tmp_path.glob(".out.tmp-*")
    assert (left / STAGING_MARKER).is_file() and (left / "model.safetensors").is_file()

    with caplog.at_level(logging.WARNING, logger="prunekit"):
        assert _prune(tiny_model_dir, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"prunekit: removed {left}, a temporary folder left by an interrupted prunekit run" in caplog.text
    assert not (out / STAGING_MARKER).exists()                      # the marker never reaches the export


def test_stale_folders_are_removed_and_foreign_or_live_ones_left_alone(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "out"
    stale = _plant(out, "tmp", {"pid": _dead_pid()})
    reused = _plant(out, "old", {"pid": os.getpid(), "process_started": 1.0})   # our pid, another process's start
    foreign = _plant(out, "tmp", None, "b")                                         # similar name, no marker of ours
    elsewhere = _plant(out, "tmp", {"pid": _dead_pid(), "host": "another-host"}, "c")
    live = staging_dir(out)                                                      # this process, running
    other_file = tmp_path / ".out.tmp-notadir"
    other_file.write_text("a file, not a folder")

    with caplog.at_level(logging.WARNING, logger="prunekit"):
        assert _prune(tiny_model_dir, out) == 0
    assert not stale.exists() and not reused.exists()
    assert f"prunekit: removed {stale}" in caplog.text and f"prunekit: removed {reused}" in caplog.text
    assert (foreign / "model.safetensors").read_bytes() == b"half a shard"
    assert f"prunekit: warning: {foreign} looks like a temporary folder" in caplog.text
    assert "left alone" in caplog.text
    assert elsewhere.is_dir() and f"{elsewhere} is a temporary folder of a prunekit run on host another-host" \
        in caplog.text
    assert live.is_dir() and str(live) not in caplog.text
    assert other_file.read_text() == "a file, not a folder"
    assert caplog.text.count(str(foreign)) == 1                     # one warning, though checked several times
    assert (out / "prunekit.json").is_file()


def test_an_old_folder_holding_the_only_copy_is_kept(tmp_path, caplog):
    """Killed between the two renames of a swap: `.OUT.old-X/OUT` is the previous export and OUT is
    gone. Removing it would lose the only copy: it is kept, and the warning says how to get it back."""
    out = tmp_path / "out"
    aside = _plant(out, "old", {"pid": _dead_pid()})
    (aside / "out").mkdir()
    (aside / "out" / "prunekit.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        assert clean_stale_staging(out) == []
    assert (aside / "out" / "prunekit.json").is_file()
    assert f"move {aside / 'out'} back to {out}" in caplog.text
    out.mkdir()                                    # once there is an OUT again, the folder aside is stale
    assert clean_stale_staging(out) == [aside] and not aside.exists()


def test_staging_and_swap_leave_no_marker_and_no_folder(tmp_path):
    from conftest import tiny_model, tiny_tokenizer
    out = tmp_path / "out"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    save_pretrained_atomic(model, tok, out, metadata={"run": 1})
    save_pretrained_atomic(model, tok, out, metadata={"run": 2}, overwrite=True)   # the old one goes aside, then away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / STAGING_MARKER).exists()
    with pytest.raises(ValueError, match="staging kind"):
        staging_dir(out, "new")


def test_every_staging_folder_is_marked_and_cleaned(tmp_path):
    """The out-of-core steps scratch, the EoRA adapter, the GGUF conversion cache and the sweep's dense
    reference stage in marked folders too: what a killed run left is removed by the next one."""
    from prunekit.io.atomic import STAGING_MARKER, clean_stale_staging, staging_dir
    steps = staging_dir(tmp_path / "out", "steps")
    assert (steps / STAGING_MARKER).is_file()
    stale = _plant(tmp_path / "out", "steps", {"pid": _dead_pid()})
    assert clean_stale_staging(tmp_path / "out") == [stale] and steps.exists()      # ours, alive: kept

    from prunekit.eval.suites import Reference
    leftover = _plant(tmp_path / "reference", "tmp", {"pid": _dead_pid()})
    reference = Reference.__new__(Reference)
    for name in ("logprobs", "prompts", "continuations"):
        setattr(reference, name, None)
    reference.protocol = type("P", (), {"to_dict": lambda self: {}})()
    reference.suites, reference.vocab_size, reference.text = (), 0, None
    reference.perplexity = reference.knowledge = reference.lm_eval = None
    reference.save(tmp_path / "reference")
    assert not leftover.exists() and (tmp_path / "reference" / "reference.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".reference")] == []


def test_write_atomic_removes_a_killed_writers_temporary_file(tmp_path):
    from prunekit.io.atomic import write_atomic
    target = tmp_path / "model.gguf"
    dead = tmp_path / f".model.gguf.{_dead_pid()}-abcd.tmp"
    live = tmp_path / f".model.gguf.{os.getpid()}-efgh.tmp"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    write_atomic(target, b"GGUF")
    assert target.read_bytes() == b"GGUF" and not dead.exists() and live.exists()
