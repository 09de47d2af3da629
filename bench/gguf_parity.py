"""GGUF exports of SmolLM2-135M in llama.cpp against transformers: does the file compute the same model?

For the dense model (f32, f16, bf16 and q8_0 files) and three pruned outputs written as llama.cpp's `deci`
architecture or the stock one (non-uniform FLAP width, sublayer-drop of attention, depth), this measures:
the export time and file size; the largest logit difference on a fixed prompt (f32 KV cache); whether greedy
continuations of fixed prompts are equal (32 tokens each); and perplexity on the held-out default text with
prunekit's protocol in both runtimes (llama.cpp with its default f16 KV cache).

    .venv/bin/python bench/gguf_parity.py [--out bench/results/gguf_parity.json]

Writes bench/results/gguf_parity.{json,md}. Timing numbers are wall clock on this machine and only indicative
(export time); the comparison numbers do not depend on load.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Pruning a neural network means",
           "Once upon a time, in a small village,"]
PRUNED = {
    "flap-20-non-uniform": ["--method", "flap", "--sparsity", "0.2", "--non-uniform"],
    "sublayer-drop-6-attention": ["--method", "sublayer-drop", "--layers", "6", "--sublayers", "attention"],
    "depth-block-influence-6": ["--method", "block-influence", "--layers", "6"],
}


def compare(model, tokenizer, path: Path, text) -> dict:
    from prunekit.eval.llama_cpp import gguf_greedy, gguf_perplexity, open_gguf
    from prunekit.eval.perplexity import perplexity
    ids = tokenizer(PROMPTS[0])["input_ids"]
    llm = open_gguf(path, n_ctx=64, f32_cache=True)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    model.generation_config.eos_token_id = None
    equal = 0
    for prompt in PROMPTS:
        p = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        equal += gguf_greedy(path, p, 32, f32_cache=True) == want
    ppl_ours = perplexity(model, text, seqlen=256).ppl
    ppl_theirs = gguf_perplexity(path, text, seqlen=256)
    return {"max_logit_diff": float(np.abs(theirs - ours).max()), "logit_scale": float(np.abs(ours).max()),
            "greedy_equal": f"{equal}/{len(PROMPTS)}", "ppl_transformers": ppl_ours, "ppl_llama_cpp": ppl_theirs["ppl"],
            "ppl_ratio": ppl_theirs["ppl"] / ppl_ours, "ppl_protocol": ppl_theirs["protocol"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/gguf_parity.json")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens for the perplexities")
    args = parser.parse_args()
    from prunekit.data import evaluation_data
    from prunekit.io.gguf_writer import export_gguf
    from prunekit.io.loading import load
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-parity-") as work:
        work = Path(work)
        sources = {"dense": "default"}
        for name, flags in PRUNED.items():
            out = work / name
            subprocess.run([sys.executable, "-m", "prunekit", "prune", "default", *flags, "--samples", "32",
                            "--seqlen", "256", "--no-eval", "--out", str(out)], check=True, capture_output=True)
            sources[name] = str(out)
        for name, source in sources.items():
            model, tokenizer = load(source)
            text = evaluation_data(tokenizer, "default", max_tokens=args.tokens)
            for outtype in (("f32", "f16", "bf16", "q8_0") if name == "dense" else ("f32",)):
                started = time.perf_counter()
                result = export_gguf(source, work / f"{name}-{outtype}.gguf", outtype=outtype)
                seconds = time.perf_counter() - started
                row = {"model": name, "outtype": outtype, "arch": result.arch, "bytes": result.bytes,
                       "export_seconds": round(seconds, 1), "notes": result.notes}
                row.update(compare(model, tokenizer, result.path, text))
                rows.append(row)
                print(json.dumps(row), flush=True)
    from prunekit.bench_host import cpu_model
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": cpu_model(), "commit": commit.strip(), "command": "python bench/gguf_parity.py", "rows": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"`{record['command']}` on {record['cpu']}, {record['date']}, commit {record['commit']}. Perplexity: "
             f"{rows[0]['ppl_protocol'].split(', ', 2)[-1]}; transformers float32 with prunekit's protocol.", "",
             "| model | file | llama.cpp arch | MiB | export s | max logit diff (of max logit) | greedy equal | "
             "ppl transformers | ppl llama.cpp | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['outtype']} | {r['arch']} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['export_seconds']} | {r['max_logit_diff']:.2e} ({r['logit_scale']:.1f}) | "
                     f"{r['greedy_equal']} | "
                     f"{r['ppl_transformers']:.3f} | {r['ppl_llama_cpp']:.3f} | {r['ppl_ratio']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
