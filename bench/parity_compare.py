"""Compare a model pruned by the reference (locuslab/wanda) with one pruned by prunekit.

Runs in the MAIN venv. `bench/reference_parity.py` (reference venv, transformers 4.x) prunes with
locuslab/wanda's own code on prunekit's calibration windows and saves safetensors; this script
scores that directory with prunekit's evaluation protocol -- `prunekit.perplexity` on the
held-out split of the offline default corpus, non-overlapping windows of --seqlen tokens, float32
on CPU -- and, given a prunekit-pruned directory (`prunekit prune ... --out DIR`), scores it the
same way in the same process and compares the two:

  * perplexity of each, and the relative difference (prunekit - reference) / reference;
  * sparsity of each: the fraction of exact zeros over the decoder blocks' linear weights;
  * mask agreement per linear layer: the fraction of positions where both weights are zero or
    both are nonzero, summarised as min / mean over the 210 (30 blocks x 7) layers, with the
    worst layers named;
  * relative weight difference per layer, ||W_pk - W_ref|| / ||W_ref|| (non-zero for SparseGPT,
    whose weight update depends on the mask; ~0 for Wanda, which only zeroes weights).

    python bench/parity_compare.py /tmp/parity/ref-wanda50 --prunekit /tmp/pk-wanda50 --json out.json
    python bench/parity_compare.py /tmp/parity/ref-dense            # round-trip check: dense ppl

Mask statistics are read straight from the model.safetensors files (2-D tensors named
model.layers.N.*.weight), so they do not depend on how transformers loads the config.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

LINEAR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def linear_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The decoder blocks' 2-D (linear) weights of a safetensors checkpoint directory."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if LINEAR.match(name) and tensor.dim() == 2:
                tensors[name] = tensor.float()
    if not tensors:
        raise SystemExit(f"{directory}: no model.layers.N.*.weight matrices in *.safetensors")
    return tensors


def sparsity(weights: dict[str, torch.Tensor]) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


def compare_masks(ref: dict[str, torch.Tensor], pk: dict[str, torch.Tensor]) -> dict:
    if ref.keys() != pk.keys():
        raise SystemExit(f"the two checkpoints hold different layers: {sorted(ref.keys() ^ pk.keys())[:5]}")
    rows = []
    for name in sorted(ref, key=lambda n: (int(LINEAR.match(n).group(1)), n)):
        a, b = ref[name], pk[name]
        za, zb = a == 0, b == 0
        rows.append({"layer": name,
                     "agreement": float((za == zb).float().mean()),
                     "both_zero_over_zero_union": float((za & zb).sum() / max(int((za | zb).sum()), 1)),
                     "weight_rel_diff": float((b - a).norm() / a.norm().clamp_min(1e-30)),
                     "sparsity_ref": float(za.float().mean()), "sparsity_pk": float(zb.float().mean())})
    agreement = [r["agreement"] for r in rows]
    total = sum(ref[r["layer"]].numel() for r in rows)
    weighted = sum(r["agreement"] * ref[r["layer"]].numel() for r in rows) / total
    diffs = [r["weight_rel_diff"] for r in rows]
    return {"layers": len(rows), "agreement_min": min(agreement), "agreement_mean": sum(agreement) / len(rows),
            "agreement_overall": weighted,
            "weight_rel_diff_mean": sum(diffs) / len(diffs), "weight_rel_diff_max": max(diffs),
            "worst": sorted(rows, key=lambda r: r["agreement"])[:5], "per_layer": rows}


def evaluate(directory: Path, seqlen: int, max_tokens: int | None) -> dict:
    import prunekit

    model, tok = prunekit.load(str(directory))
    started = time.perf_counter()
    result = prunekit.perplexity(model, prunekit.evaluation_data(tok, "default", max_tokens=max_tokens), seqlen=seqlen)
    ppl = float(result.ppl)
    print(f"{directory}: ppl {ppl:.4f} ({time.perf_counter() - started:.0f} s; {result.protocol})", flush=True)
    return {"dir": str(directory), "ppl": ppl, "protocol": result.protocol}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="directory written by bench/reference_parity.py")
    parser.add_argument("--prunekit", type=Path, help="directory written by `prunekit prune --out`")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only this many tokens (tests)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="parity target on |relative ppl difference|")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    args = parser.parse_args(argv)

    out: dict = {"seqlen": args.seqlen, "tolerance": args.tolerance}
    meta = args.reference / "reference_parity.json"
    if meta.is_file():
        out["reference_run"] = json.loads(meta.read_text())
    ref_w = linear_weights(args.reference)
    out["reference"] = evaluate(args.reference, args.seqlen, args.max_tokens) | {"sparsity": sparsity(ref_w)}
    if args.prunekit:
        pk_w = linear_weights(args.prunekit)
        meta = args.prunekit / "prunekit.json"
        out["prunekit"] = evaluate(args.prunekit, args.seqlen, args.max_tokens) | {"sparsity": sparsity(pk_w)}
        if meta.is_file():
            out["prunekit"]["run"] = json.loads(meta.read_text())
        ref_ppl, pk_ppl = out["reference"]["ppl"], out["prunekit"]["ppl"]
        out["ppl_rel_diff"] = (pk_ppl - ref_ppl) / ref_ppl
        out["within_tolerance"] = abs(out["ppl_rel_diff"]) <= args.tolerance
        out["masks"] = compare_masks(ref_w, pk_w)
        m = out["masks"]
        print(f"\nreference ppl {ref_ppl:.4f} (sparsity {out['reference']['sparsity']:.4%})\n"
              f"prunekit  ppl {pk_ppl:.4f} (sparsity {out['prunekit']['sparsity']:.4%})\n"
              f"relative difference {out['ppl_rel_diff']:+.3%} -> "
              f"{'within' if out['within_tolerance'] else 'OUTSIDE'} {args.tolerance:.0%}\n"
              f"mask agreement over {m['layers']} layers: min {m['agreement_min']:.4%}, "
              f"mean {m['agreement_mean']:.4%}, "
              f"overall {m['agreement_overall']:.4%}\n"
              f"weight rel. difference: mean {m['weight_rel_diff_mean']:.3e}, max {m['weight_rel_diff_max']:.3e}\n"
              "worst layers: " + ", ".join(f"{r['layer']} {r['agreement']:.4%}" for r in m["worst"][:3]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
