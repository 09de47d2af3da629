"""How far apart are the masks of pruned models of one dense model? For every pair of the saved models given:
the share of the decoder blocks' linear weights (`*proj.weight` under `layers.N.`) that one model keeps and the
other prunes (a weight is pruned where it is exactly 0), over the whole decoder and, with `--per-block`, block by
block. Used for issue 19 (a): do calibration draws change the masks, and where?

    python bench/mask_agreement.py DIR DIR [DIR ...] [--per-block]
"""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

from safetensors.torch import load_file

BLOCK = re.compile(r"layers\.(\d+)\.")


def masks(folder: Path) -> dict:
    """name -> bool tensor (True where pruned) of every decoder-block linear weight in `folder`."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            if name.endswith("proj.weight") and BLOCK.search(name):
                out[name] = tensor == 0
    if not out:
        raise SystemExit(f"{folder}: no decoder-block linear weights (*proj.weight under layers.N.) found")
    return out


def disagreement(a: dict, b: dict) -> tuple[float, dict[int, float]]:
    """(share over all weights, share per block) of weights pruned in one and kept in the other."""
    if a.keys() != b.keys():
        raise SystemExit("the models hold different weights: compare prunings of one dense model")
    differ, total = {}, {}
    for name in a:
        block = int(BLOCK.search(name).group(1))
        differ[block] = differ.get(block, 0) + int((a[name] != b[name]).sum())
        total[block] = total.get(block, 0) + a[name].numel()
    return sum(differ.values()) / sum(total.values()), {k: differ[k] / total[k] for k in sorted(total)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="saved pruned models (folders of safetensors)")
    p.add_argument("--per-block", action="store_true", help="also the share of each decoder block")
    args = p.parse_args(argv)
    if len(args.models) < 2:
        p.error("give at least two models")
    loaded = {folder: masks(folder) for folder in args.models}
    for a, b in itertools.combinations(args.models, 2):
        whole, blocks = disagreement(loaded[a], loaded[b])
        print(f"{a} vs {b}: {whole:.2%} of the weights differ")
        if args.per_block:
            print("  per block: " + " ".join(f"{k}:{v:.2%}" for k, v in blocks.items()))


if __name__ == "__main__":
    main()
