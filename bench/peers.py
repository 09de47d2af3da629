"""Pruning peers side by side: locuslab/wanda, llm-compressor and prunekit on ONE calibration tensor.

What: one command that prunes SmolLM2-135M-Instruct (prunekit's embedded default model) to 50%
unstructured sparsity with Wanda and SparseGPT as implemented by

  * reference      -- locuslab/wanda's own `prune_wanda` / `prune_sparsegpt` (lib/prune.py), run by
                      `bench/reference_parity.py` in its transformers-4.47 venv (see
                      bench/results/reference_parity.md for that venv and the patches it needs);
  * llmcompressor  -- vLLM's llm-compressor (`oneshot` with `WandaPruningModifier` /
                      `SparseGPTModifier`), run by this file's `_llmcompressor` worker in ITS OWN
                      venv (llmcompressor pins its transformers range);
  * prunekit       -- `prunekit.prune_` with `WandaConfig` / `SparseGPTConfig`, float32, and also
                      bfloat16 when the CPU has native bf16 matmuls (amx_bf16 / avx512_bf16 flags);

and prints, per run, the time of the pruning call, the wall time and peak RSS of the whole
process (load + prune + save), and the held-out perplexity of the pruned model, each with its
ratio to the reference's run of the same method.

Why: a speed or memory claim against a peer is only worth something when every peer sees the
same tokens, runs on the same machine in the same session, and is scored by the same evaluation.
So: the (samples, seqlen) int64 windows are drawn ONCE (`prunekit.calibration_data(tok,
"default", samples, seqlen, seed=0)`), saved as safetensors, and every peer is handed that
file (its sha256 is in the JSON); every run is a separate process started alone (never two at
once), and its peak RSS is the `ru_maxrss` that `os.wait4` returns for that child (the child and
the descendants it waited for), so runs cannot inflate each other's peaks; and every pruned
checkpoint is scored by `bench/parity_compare.py` (main venv) with prunekit's `perplexity` on the
default corpus's evaluation split, which no peer calibrates on.

    python bench/peers.py --samples 8 --seqlen 128 --eval-tokens 8192      # smoke test
    python bench/peers.py                                                 # 128 x 512, full eval split

    --peers reference,llmcompressor,prunekit   --methods wanda,sparsegpt   --sparsity 0.5
    --prunekit-dtypes auto                      float32, plus bfloat16 when the CPU has bf16 matmuls
    --ref-python / --llmc-python                the peers' venvs (default /work/venv-ref, /work/venv-llmc)
    --reference                                 locuslab/wanda checkout or bare mirror
    --eval-seqlen 512 --eval-tokens N           perplexity protocol (N: first N tokens only; default all)
    --json bench/results/peers.json             rewritten after every run, so a cut-off run keeps its rows

A peer whose venv or checkout is missing, or whose run fails, gets a row with the reason instead
of numbers; the other peers still run. Times taken on a shared machine (see --note and the load
averages recorded per run) bound costs from above and are not a clean speed comparison.

The `_prunekit` and `_llmcompressor` sub-commands are the per-run workers this script starts in
a fresh process (the latter with the llm-compressor venv's python); they are not meant to be
called by hand. Nothing of the peers is copied here: they are imported and called.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = ("reference", "llmcompressor", "prunekit")
METHODS = ("wanda", "sparsegpt")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


# --------------------------------------------------------------------------- table (pure, tested)

def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row with `time_x`, `peak_x`, `ppl_x`: its value over the reference row of its method.

    A ratio is None where either number is missing (a failed or skipped run, or no reference).
    """
    refs = {r["method"]: r for r in rows if r.get("peer") == "reference"}
    out = []
    for row in rows:
        ref = refs.get(row["method"])
        row = dict(row)
        for key, ratio in (("prune_s", "time_x"), ("peak_mib", "peak_x"), ("ppl", "ppl_x")):
            a, b = row.get(key), (ref or {}).get(key)
            row[ratio] = a / b if a is not None and b else None
        out.append(row)
    return out


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of `add_ratios` rows (missing numbers as '-', failures noted)."""
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    head = ("method", "peer", "prune s", "wall s", "peak MiB", "ppl", "sparsity", "time x", "peak x", "ppl x")
    lines = [head]
    for r in rows:
        lines.append((r["method"], r["peer"], num(r.get("prune_s"), ".1f"), num(r.get("wall_s"), ".1f"),
                      num(r.get("peak_mib"), ".0f"), num(r.get("ppl"), ".4f"), num(r.get("sparsity"), ".4%"),
                      num(r.get("time_x"), ".2f"), num(r.get("peak_x"), ".2f"), num(r.get("ppl_x"), ".4f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r['method']}/{r['peer']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(text + (["failed or skipped:"] + notes if notes else []))


# --------------------------------------------------------------------------- machine facts

def cpu_facts() -> dict:
    from prunekit.bench_host import cpu_model
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {"model": cpu_model(), "cpus": os.cpu_count(),
            "bf16_flags": [f for f in BF16_FLAGS if f in flags]}


def git_commit() -> str | None:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=False, capture_output=True,
                          text=True)
    if done.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "bench/peers.py"],
                           check=False, capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+uncommitted bench/peers.py" if dirty else "")


def measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` alone, output to `log`; wall seconds, peak RSS (MiB, from wait4) and exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - started, "peak_mib": usage.ru_maxrss / 1024,
            "loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0], "log": str(log),
            "cmd": " ".join(cmd)}


def tail(path: Path, lines: int = 6) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- workers (fresh processes)

def worker_prunekit(argv) -> int:
    """Main venv: prunekit.prune_ on the saved windows, then save the model (safetensors)."""
    parser = argparse.ArgumentParser(prog="peers.py _prunekit")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    import prunekit
    from prunekit import SparseGPTConfig, WandaConfig, prune_

    ids = load_file(str(args.windows))["ids"]
    model, tok = prunekit.load("default", dtype=args.dtype)
    config = (WandaConfig if args.method == "wanda" else SparseGPTConfig)(sparsity=args.sparsity)
    started = time.perf_counter()
    prune_(model, config, ids, progress=False)
    seconds = time.perf_counter() - started
    model.save_pretrained(str(args.out))
    tok.save_pretrained(str(args.out))
    (args.out / "peer_run.json").write_text(json.dumps({
        "prune_seconds": seconds, "dtype": args.dtype, "config": repr(config), "sequential": "true (prune_ default)",
        "windows": list(ids.shape),
        "versions": {"prunekit": getattr(prunekit, "__version__", None), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads()}))
    print(f"prunekit {args.method} {args.dtype}: {seconds:.1f} s", flush=True)
    return 0


def worker_llmcompressor(argv) -> int:
    """llm-compressor venv: `oneshot` with the Wanda / SparseGPT modifier on the saved windows."""
    parser = argparse.ArgumentParser(prog="peers.py _llmcompressor")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(str(args.windows))["ids"]
    samples, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    # the modifiers' own default targets every Linear, lm_head included (it warns); the other peers prune
    # only the decoder blocks' linear layers, so lm_head is ignored here as well
    modifier = (WandaPruningModifier if args.method == "wanda" else SparseGPTModifier)(
        sparsity=args.sparsity, mask_structure="0:0", ignore=["re:.*lm_head"])

    seen = []   # the token rows the model is actually run on, to check they are our windows
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    started = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=dataset, recipe=modifier, num_calibration_samples=samples,
            max_seq_length=seqlen, shuffle_calibration_samples=False, batch_size=1, pipeline="sequential")
    seconds = time.perf_counter() - started
    hook.remove()
    seen = [s for s in seen if s.device.type != "meta"]   # the graph tracing runs the model on meta tensors
    rows = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]) if seen else torch.empty(0, seqlen, dtype=ids.dtype)
    # the sequential pipeline embeds each window once per pass over the first subgraph (calibrate, propagate)
    counts = {}
    for row in map(tuple, rows.tolist()):
        counts[row] = counts.get(row, 0) + 1
    same = sorted(counts) == sorted(map(tuple, ids.tolist())) and len(set(counts.values())) == 1

    # plain dense safetensors (no compressed-tensors format), readable by any transformers
    model.save_pretrained(str(args.out), save_compressed=False)
    tok.save_pretrained(str(args.out))
    config_path = args.out / "config.json"
    config = json.loads(config_path.read_text())
    dropped = [k for k in ("quantization_config", "sparsity_config") if config.pop(k, None) is not None]
    config_path.write_text(json.dumps(config, indent=2))
    (args.out / "peer_run.json").write_text(json.dumps({
        "prune_seconds": seconds, "modifier": repr(modifier), "pipeline": "sequential", "batch_size": 1,
        "windows": [samples, seqlen], "embedding_inputs_equal_windows": same, "embedding_calls": len(seen),
        "config_keys_dropped": dropped,
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__}, "torch_threads": torch.get_num_threads()}))
    print(f"llmcompressor {args.method}: {seconds:.1f} s; model saw exactly our windows: {same}", flush=True)
    return 0 if same else 3


# --------------------------------------------------------------------------- driver (main venv)

def prepare(work: Path, samples: int, seqlen: int) -> tuple[Path, Path, str]:
    """(checkpoint dir, windows file, sha256 of the windows) -- the windows are drawn once, here."""
    import torch
    from safetensors.torch import save_file

    import prunekit
    from prunekit.io.gguf import gguf_to_checkpoint
    from prunekit.io.loading import default_model_path

    checkpoint = Path(gguf_to_checkpoint(default_model_path()))
    _, tok = prunekit.load(str(checkpoint))
    ids = prunekit.calibration_data(tok, "default", samples=samples, seqlen=seqlen, seed=0)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (samples, seqlen), ids.shape
    work.mkdir(parents=True, exist_ok=True)
    windows = work / "windows.safetensors"
    save_file({"ids": ids.contiguous()}, str(windows))
    return checkpoint, windows, hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def evaluate(directory: Path, args, log: Path) -> dict:
    """Held-out perplexity of a checkpoint dir with bench/parity_compare.py (prunekit's protocol)."""
    out = log.with_suffix(".json")
    cmd = [sys.executable, str(HERE / "parity_compare.py"), str(directory), "--seqlen", str(args.eval_seqlen),
           "--json", str(out)]
    if args.eval_tokens:
        cmd += ["--max-tokens", str(args.eval_tokens)]
    run = measured(cmd, log)
    if run["rc"]:
        raise RuntimeError(f"evaluation failed (rc {run['rc']}): {tail(log)}")
    result = json.loads(out.read_text())["reference"]    # parity_compare's name for its first directory
    return {"ppl": result["ppl"], "sparsity": result["sparsity"], "protocol": result["protocol"],
            "eval_wall_s": run["wall_s"]}


def run_peer(peer: str, dtype: str | None, method: str, args, checkpoint: Path, windows: Path) -> dict:
    """One pruning run in a fresh process (measured), then its evaluation; a dict row."""
    name = peer if dtype in (None, "float32") else f"{peer}-{dtype}"    # the row's key, also for --resume
    out = args.work / f"{method}-{name}"
    log = args.work / "logs" / f"{method}-{name}.log"
    if peer == "reference":
        python = args.ref_python
        cmd = [str(python), str(HERE / "reference_parity.py"), "--method", method, "--sparsity", str(args.sparsity),
               "--reference", str(args.reference), "--model", str(checkpoint), "--windows", str(windows),
               "--out", str(out)]
        missing = [p for p in (python, args.reference) if not Path(p).exists()]
    elif peer == "llmcompressor":
        python = args.llmc_python
        cmd = [str(python), str(HERE / "peers.py"), "_llmcompressor", "--method", method, "--sparsity",
               str(args.sparsity), "--model", str(checkpoint), "--windows", str(windows), "--out", str(out)]
        missing = [p for p in (python,) if not Path(p).exists()]
    else:
        cmd = [sys.executable, str(HERE / "peers.py"), "_prunekit", "--method", method, "--sparsity",
               str(args.sparsity), "--dtype", dtype, "--windows", str(windows), "--out", str(out)]
        missing = []
    row = {"method": method, "peer": name, "dtype": dtype or "float32"}
    if missing:
        return row | {"error": f"skipped: {', '.join(map(str, missing))} not found"}
    env = dict(os.environ)
    if peer != "prunekit":
        env.pop("PYTHONPATH", None)   # the peers' venvs must not see prunekit's src
    print(f"[{datetime.now():%H:%M:%S}] {method} / {name} ...", flush=True)
    run = measured(cmd, log, env=env)
    row |= {k: run[k] for k in ("wall_s", "peak_mib", "loadavg_1min_before", "loadavg_1min_after", "cmd", "log")}
    if run["rc"]:
        return row | {"error": f"rc {run['rc']}: {tail(log)}"}
    meta_file = out / ("reference_parity.json" if peer == "reference" else "peer_run.json")
    meta = json.loads(meta_file.read_text())
    row |= {"prune_s": meta["prune_seconds"], "run": meta}
    try:
        row |= evaluate(out, args, args.work / "logs" / f"{method}-{name}.eval.log")
    except RuntimeError as exc:
        row["error"] = str(exc)
    print(f"    prune {row.get('prune_s', 0):.1f} s, wall {row['wall_s']:.1f} s, peak {row['peak_mib']:.0f} MiB, "
          f"ppl {row.get('ppl', float('nan')):.4f}", flush=True)
    return row


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_prunekit":
        return worker_prunekit(argv[1:])
    if argv and argv[0] == "_llmcompressor":
        return worker_llmcompressor(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--prunekit-dtypes", default="auto",
                        help="comma list, or auto: float32 (+bfloat16 on bf16 CPUs)")
    parser.add_argument("--ref-python", type=Path, default=Path("/work/venv-ref/bin/python"))
    parser.add_argument("--llmc-python", type=Path, default=Path("/work/venv-llmc/bin/python"))
    parser.add_argument("--reference", type=Path, default=Path("/work/.mirror/locuslab+wanda/repo"))
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    parser.add_argument("--work", type=Path, default=None, help="pruned checkpoints and logs (default /tmp/peers-SxL)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "peers.json")
    parser.add_argument("--note", default=None, help="recorded in the JSON (e.g. that the machine was shared)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the successful rows (and dense ppl) of --json measured on the same windows "
                             "(same sha256) and run only the missing ones")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    if bad := [m for m in methods if m not in METHODS] + [p for p in peers if p not in PEERS]:
        parser.error(f"unknown method/peer {bad}")
    cpu = cpu_facts()
    dtypes = (["float32"] + (["bfloat16"] if cpu["bf16_flags"] else []) if args.prunekit_dtypes == "auto"
              else args.prunekit_dtypes.split(","))
    args.work = args.work or Path(f"/tmp/peers-{args.samples}x{args.seqlen}")

    checkpoint, windows, digest = prepare(args.work, args.samples, args.seqlen)
    print(f"windows: {args.samples} x {args.seqlen} int64, sha256 {digest[:16]}..., {windows}", flush=True)
    result = {
        "what": "bench/peers.py: pruning peers on identical calibration windows",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "cpu": cpu, "note": args.note, "model": "SmolLM2-135M-Instruct (prunekit default: Q4_1 GGUF -> float32)",
        "checkpoint": str(checkpoint), "sparsity": args.sparsity,
        "calibration": {"source": "prunekit.calibration_data(tok, 'default', seed=0)", "samples": args.samples,
                        "seqlen": args.seqlen, "sha256": digest},
        "timing": "prune_s: the pruning call alone, timed by each run; wall_s / peak_mib: the whole process "
                  "(imports, load, prune, save); peak from os.wait4's ru_maxrss of that process",
        "ratios": "x = this row / the reference row of the same method",
        "complete": False,   # True once every requested run has been tried (the file is rewritten after each)
        "rows": [],
    }

    def save():
        result["rows"] = add_ratios(rows)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    rows: list[dict] = []
    done: dict = {}
    if args.resume and args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("calibration", {}).get("sha256") == digest and old.get("sparsity") == args.sparsity:
            done = {(r["method"], r["peer"]): r for r in old.get("rows", []) if not r.get("error")}
            result["resumed_from"] = {"date": old.get("date"), "git_commit": old.get("git_commit"),
                                      "note": old.get("note"), "rows_kept": [f"{m}/{p}" for m, p in done]}
            if "dense" in old:
                result["dense"], result["eval_protocol"] = old["dense"], old["dense"]["protocol"]
            print(f"resuming: {len(done)} rows kept from {args.json} ({old.get('date')})", flush=True)
    if not args.no_dense and "dense" not in result:
        dense = evaluate(checkpoint, args, args.work / "logs" / "dense.eval.log")
        result["dense"] = dense
        result["eval_protocol"] = dense["protocol"]
        print(f"dense ppl {dense['ppl']:.4f} [{dense['protocol']}]", flush=True)
        save()
    for method in methods:
        for peer in peers:
            for dtype in (dtypes if peer == "prunekit" else [None]):
                name = peer if dtype in (None, "float32") else f"{peer}-{dtype}"
                rows.append(done.get((method, name)) or run_peer(peer, dtype, method, args, checkpoint, windows))
                result.setdefault("eval_protocol", rows[-1].get("protocol"))
                save()
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["complete"] = True
    save()
    print(f"\nSmolLM2-135M-Instruct, {args.sparsity:.0%} unstructured; calibration {args.samples} x {args.seqlen} "
          f"(sha256 {digest[:12]}); CPU {cpu['model']} x{cpu['cpus']}")
    print(f"perplexity protocol: {result.get('eval_protocol')}")
    if "dense" in result:
        print(f"dense ppl {result['dense']['ppl']:.4f}")
    print(format_table(result["rows"]))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
