"""Compressed sparse storage benchmark (io/sparse.py, Endor arXiv 2406.11674) on SmolLM2-135M.

For Wanda at 50 % and 70 % unstructured and 2:4, on the embedded default model (`prunekit.load("default")`):

  storage   file size of the dense export (zeros stored) vs the sparse export (bitmap + nonzeros), whole folder
            and weights only; bytes per weight of the compressed tensors; export time (median of 3); load
            time (median of 3, each in a fresh process: `prunekit.load` for the dense export, `load_sparse`
            for the sparse one); and that every tensor comes back bit for bit.
  offload   resident memory (VmRSS after loading, VmHWM peak) and greedy decode speed of the dense model vs
            `offloaded_sparse_model` (blocks decompressed one at a time), same prompt, same threads, one
            warm-up, median of repeats; and whether both produce the same logits and tokens.

    python bench/sparse_storage.py                      # ~15 min on 2 cores (pruning ~2 min per setting)
    python bench/sparse_storage.py --settings wanda-50 --repeats 1 --new-tokens 4    # quicker

Pruned models are made with the CLI (`prunekit prune default --method wanda ... --no-eval --out DIR`) under
--work (default /tmp/prunekit-sparse-bench) and reused when present. Every measurement runs in its own
subprocess (this file with --child). Results: bench/results/sparse_storage.json and .md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from prunekit.bench_host import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRUNEKIT = Path(sys.executable).with_name("prunekit")
SETTINGS = {                                    # name -> the CLI flags that make it
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda-70": ["--method", "wanda", "--sparsity", "0.7"],
    "wanda-2of4": ["--method", "wanda", "--nm", "2:4"],
}
PROMPT = "The history of the printing press begins in"


# --------------------------------------------------------------------------- child jobs (one per process)

def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _child(job: dict) -> dict:
    import torch
    torch.set_num_threads(job["threads"])
    import transformers

    from prunekit.io.loading import load
    from prunekit.io.sparse import export_sparse, load_sparse, offloaded_sparse_model
    folder = job.get("dir") or job.get("src") or job.get("dense")
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):                   # the baseline includes the modeling code, imported here
        transformers.AutoModelForCausalLM.from_config(config)
    baseline = _status("VmRSS")
    kind = job["kind"]
    if kind == "export":
        start = time.perf_counter()
        stats = export_sparse(job["src"], job["out"], overwrite=True)
        return {"seconds": time.perf_counter() - start, "stats": {k: v for k, v in stats.items() if k != "files"}}
    if kind == "load":
        start = time.perf_counter()
        model, _ = load(job["dir"]) if job["format"] == "dense" else load_sparse(job["dir"])
        return {"seconds": time.perf_counter() - start, "rss_mb": _status("VmRSS") / 2**20,
                "baseline_mb": baseline / 2**20}
    if kind == "check":                          # same logits, dense export vs offloaded sparse model
        dense, tokenizer = load(job["dense"])
        offloaded, _ = offloaded_sparse_model(job["sparse"])
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            a, b = dense(ids).logits, offloaded(ids).logits
        return {"logits_equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}
    if kind == "generate":
        start = time.perf_counter()
        if job["mode"] == "dense":
            model, tokenizer = load(job["dir"])
            extra = {}
        else:
            model, tokenizer = offloaded_sparse_model(job["dir"])
            info = model.prunekit_sparse_offload
            extra = {"compressed_mb": info.compressed_bytes / 2**20,
                     "largest_block_mb": info.largest_block_bytes / 2**20}
        load_s = time.perf_counter() - start
        rss_loaded = _status("VmRSS")
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids

        def generate(count):
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            return time.perf_counter() - started, out[0, ids.shape[1]:].tolist()

        generate(4)                                                      # warm-up
        firsts, fulls, tokens = [], [], None
        for _ in range(job["repeats"]):
            firsts.append(generate(1)[0])
            seconds, tokens = generate(job["new_tokens"] + 1)
            fulls.append(seconds)
        decode = (statistics.median(fulls) - statistics.median(firsts)) / job["new_tokens"]
        return {"load_s": load_s, "baseline_mb": baseline / 2**20, "rss_loaded_mb": rss_loaded / 2**20,
                "rss_end_mb": _status("VmRSS") / 2**20, "peak_mb": _status("VmHWM") / 2**20,
                "decode_tok_s": 1 / decode, "prefill_plus_one_s": statistics.median(firsts), "tokens": tokens,
                "load_average_1min": os.getloadavg()[0], **extra}
    raise ValueError(kind)


def run_child(job: dict, timeout: int = 1800) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"child {job['kind']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent

def folder_bytes(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"folder": sum(p.stat().st_size for p in files),
            "weights": sum(p.stat().st_size for p in files if p.name.endswith(".safetensors"))}


def prune(name: str, work: Path) -> tuple[Path, list[str], float | None]:
    out = work / f"pruned-{name}"
    command = [str(PRUNEKIT), "prune", "default", *SETTINGS[name], "--no-eval", "--out", str(out)]
    if (out / "prunekit.json").is_file():
        return out, command, None
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return out, command, time.perf_counter() - start


def bit_exact(dense: Path, sparse: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from prunekit.io.sparse import load_sparse_state
    original = {}
    for file in sorted(dense.glob("*.safetensors")):
        original.update(load_file(str(file)))
    restored = load_sparse_state(sparse)
    same = original.keys() == restored.keys() and all(
        torch.equal(restored[k], v) and restored[k].dtype == v.dtype for k, v in original.items())
    negative = sum(int(((v == 0) & torch.signbit(v)).sum()) for v in original.values() if v.is_floating_point())
    return {"bit_exact": same, "tensors": len(original), "negative_zeros_in_source": negative}


def measure(name: str, args, work: Path) -> dict:
    threads = args.threads
    dense, command, prune_s = prune(name, work)
    sparse = work / f"sparse-{name}"
    exports = [run_child({"kind": "export", "src": str(dense), "out": str(sparse), "threads": threads})
               for _ in range(args.repeats)]
    stats = exports[-1]["stats"]
    storage = json.loads((sparse / "prunekit.json").read_text())["storage"]
    compressed = [t for t in storage["tensors"].values() if t["compressed"]]
    weights = sum(t["bytes_dense"] / (4 if t["dtype"] == "float32" else 2) for t in compressed)
    stored = sum(t["bytes_stored"] for t in compressed)
    density = statistics.fmean(t["density"] for t in compressed) if compressed else None
    sizes = {"dense_export": folder_bytes(dense), "sparse_export": folder_bytes(sparse)}
    load = {"dense": [], "sparse": []}
    for _ in range(args.repeats):                # interleaved, so that other load on the machine hits both alike
        for fmt, folder in (("dense", dense), ("sparse", sparse)):
            job = {"kind": "load", "format": fmt, "dir": str(folder), "threads": threads}
            load[fmt].append(run_child(job)["seconds"])
    load = {fmt: (statistics.median(values), values) for fmt, values in load.items()}
    row = {
        "setting": name, "prune_command": " ".join(command), "prune_seconds": prune_s,
        "bytes": sizes,
        "ratio_folder": sizes["sparse_export"]["folder"] / sizes["dense_export"]["folder"],
        "ratio_weights": sizes["sparse_export"]["weights"] / sizes["dense_export"]["weights"],
        "compressed_tensors": len(compressed), "kept_dense_block_tensors": stats["tensors_kept_dense"],
        "mean_density_compressed": density,
        "bytes_per_weight_compressed": stored / weights if weights else None,
        "bytes_per_weight_formula": f"1/8 + {density:.4f} x 4 = {0.125 + density * 4:.4f}" if density else None,
        "ratio_tensor_bytes": stats["ratio"],
        "export_s": statistics.median(e["seconds"] for e in exports), "export_runs_s": [e["seconds"] for e in exports],
        "load_dense_s": load["dense"][0], "load_dense_runs_s": load["dense"][1],
        "load_sparse_s": load["sparse"][0], "load_sparse_runs_s": load["sparse"][1],
        **bit_exact(dense, sparse),
    }
    if not args.no_offload:
        check = run_child({"kind": "check", "dense": str(dense), "sparse": str(sparse), "threads": threads})
        job = {"kind": "generate", "threads": threads, "repeats": args.repeats, "new_tokens": args.new_tokens}
        runs = {"dense": [], "offloaded": []}
        for _ in range(args.rounds):             # interleaved processes, each with its own warm-up and repeats
            runs["dense"].append(run_child({**job, "mode": "dense", "dir": str(dense)}))
            runs["offloaded"].append(run_child({**job, "mode": "offloaded", "dir": str(sparse)}))
        summary = {mode: {**items[0], **{key: statistics.median(item[key] for item in items) for key in
                                         ("decode_tok_s", "rss_loaded_mb", "rss_end_mb", "peak_mb", "load_s")},
                          "decode_tok_s_runs": [item["decode_tok_s"] for item in items]}
                   for mode, items in runs.items()}
        row["offload"] = {"check": check, **summary,
                          "same_tokens": all(item["tokens"] == runs["dense"][0]["tokens"]
                                             for items in runs.values() for item in items)}
    print(json.dumps({k: v for k, v in row.items() if k != "offload"}, default=str), flush=True)
    return row


def markdown(result: dict) -> str:
    mb = 2**20
    lines = [
        "# Compressed sparse storage (bitmap + nonzeros) on SmolLM2-135M",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['cpu']} ({result['cores']} cores), torch {result['versions']['torch']}, "
        f"transformers {result['versions']['transformers']}; {result['date']}; load average "
        f"{result['load_average']['before'][0]:.1f} before, {result['load_average']['after'][0]:.1f} after (1 min)",
        "- protocol: Wanda on the embedded SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32; tied "
        "embeddings, 28.3M of its 134.5M weights, stay dense), pruned with the CLI (default calibration, "
        "`--no-eval`), saved dense (zeros stored); then `export_sparse`. Sizes are file sizes (st_size). "
        f"Export and load times: median of {result['repeats']} runs, each in a fresh process, threads = "
        f"{result['threads']}; load = `prunekit.load(dense)` vs `load_sparse(sparse)` (both include the "
        "tokenizer). Offload: greedy decode of a fixed prompt, one warm-up, decode tokens/s = "
        f"{result['new_tokens']} / (median t({result['new_tokens']}+1 tokens) - median t(1 token)) over "
        f"{result['repeats']} repeats in each of {result['rounds']} processes per model, alternated (dense, "
        "offloaded, dense, ...), medians reported; RSS = VmRSS after loading and after decoding, peak = VmHWM, "
        "all absolute (the baseline, after importing torch, transformers, prunekit and the modeling code, is its "
        "own column). The dense export is loaded by transformers with "
        "its safetensors memory-mapped, so its RSS after loading counts only the pages touched so far; after "
        "decoding every weight has been read.",
        "",
        "| setting | block density | dense folder MB | sparse folder MB | folder ratio | weights ratio | B/weight "
        "(compressed, fp32) | export s | load dense s | load sparse s | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        b = row["bytes"]
        lines.append(
            f"| {row['setting']} | {row['mean_density_compressed']:.3f} | {b['dense_export']['folder'] / mb:.1f} | "
            f"{b['sparse_export']['folder'] / mb:.1f} | {row['ratio_folder']:.3f} | {row['ratio_weights']:.3f} | "
            f"{row['bytes_per_weight_compressed']:.4f} | {row['export_s']:.2f} | "
            f"{row['load_dense_s']:.2f} | {row['load_sparse_s']:.2f} | {row['bit_exact']} |")
    offload = [row for row in result["rows"] if "offload" in row]
    if offload:
        lines += ["", "| setting | model | import baseline MB | RSS after load MB | RSS after decoding MB | "
                  "peak RSS MB | decode tok/s | compressed MB held | largest dense block MB | logits equal | "
                  "same tokens |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in offload:
            o = row["offload"]
            for label, run in (("dense export", o["dense"]), ("offloaded sparse", o["offloaded"])):
                extra = (f"{run['compressed_mb']:.1f} | {run['largest_block_mb']:.1f}" if "compressed_mb" in run
                         else " | ")
                lines.append(f"| {row['setting']} | {label} | {run['baseline_mb']:.0f} | {run['rss_loaded_mb']:.0f} | "
                             f"{run['rss_end_mb']:.0f} | {run['peak_mb']:.0f} | {run['decode_tok_s']:.2f} | {extra} | "
                             f"{o['check']['logits_equal']} | {o['same_tokens']} |")
    lines += ["", "Bytes per weight of a compressed tensor: 1/8 (the bitmap) + density x dtype bytes (the values) "
              "before exponent coding (format version 2: the high byte of every stored float deflated, the rest raw; "
              "lossless), which takes the values to about 0.86 of that. The folder ratio includes the embeddings, "
              "norms (stored with exponent coding too), tokenizer and config."]
    for row in result["rows"]:
        if row["setting"] == "wanda-50":
            lines += ["", f"Target ({result['target']}): measured {row['ratio_folder']:.3f}x (folder), "
                      f"{row['ratio_weights']:.3f}x (weights file); the compressed block weights alone are "
                      f"{row['bytes_per_weight_compressed'] / 4:.3f}x: "
                      + ("met." if row["ratio_folder"] <= 0.6 else
                         "not met: what stays dense (the tied 49152 x 576 embedding, 21 % of the weights, never "
                         "pruned) keeps the file above 0.6x.")]
    seen = [*result["load_average"]["before"][:1], *result["load_average"]["after"][:1],
            *(run.get("load_average_1min", 0) for row in offload for run in (row["offload"]["dense"],
                                                                              row["offload"]["offloaded"]))]
    if max(seen) > result["cores"]:
        lines += ["", f"**Timing caveat**: other processes shared this machine during the run (1-minute load average "
                  f"up to {max(seen):.1f} on {result['cores']} cores), so the export, load and decode times above are "
                  "not reliable (2 threads on oversubscribed cores stall); sizes, ratios, bytes per weight, "
                  "bit-exactness, equal logits and RSS do not depend on it."]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/prunekit-sparse-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="dense/offloaded generation processes, alternated")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-offload", action="store_true", help="skip the RSS / decode-speed part")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sparse_storage.json")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    import torch
    import transformers
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = [measure(name, args, args.work) for name in args.settings]
    result = {
        "command": "python bench/sparse_storage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
        "cores": os.cpu_count(), "threads": args.threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
        "rounds": args.rounds, "prompt": PROMPT,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "target": "sparse storage at 50 % <= 0.6x the dense file",
        "load_average": {"before": load_before, "after": os.getloadavg()},   # other work on the machine skews timings
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
