"""The pruning cases that tests/test_distributed.py runs both in one process and under torchrun.

Run as a script under torchrun (`python -m torch.distributed.run --nproc-per-node 2 --standalone
tests/distributed_cases.py OUT`), every process prunes each case on its share of the windows;
rank 0 saves each pruned state dict to OUT/<case>.pt, plus OUT/observers.json (the observer
reduction checked on hand-made data), OUT/offsets.json (`distributed.offset`) and
OUT/refused.json (the messages of refused features).
Not collected by pytest (no test_ prefix).
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MOE_CONFIGS, TINY_CONFIGS, VOCAB, tiny_model, tiny_moe


def model_for(family: str):
    """A tiny model of `family`; "llama-4" is the 2-layer Llama with 4 layers (LaCo needs room)."""
    if family == "llama-4":
        from transformers import AutoModelForCausalLM
        torch.manual_seed(0)
        config = TINY_CONFIGS["llama"]()
        config.num_hidden_layers = 4
        return AutoModelForCausalLM.from_config(config).eval()
    if family in MOE_CONFIGS:
        return tiny_moe(family)
    return tiny_model(family)


def calib(windows: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (windows, 16), generator=torch.Generator().manual_seed(1))


def cases() -> dict:
    """name -> (config, sequential, windows, batch_size[, family, compensate]). 10 windows in chunks
    of 4 split 2 + 1 chunks, the last one short: uneven shards. GPT-2 stores its linears transposed
    (Conv1D), which the broadcast of the pruned weights must handle. With 8 windows in chunks of 2,
    process 0 holds windows 0-3 and process 1 windows 4-7: `gradient_samples=5` and `samples=6`
    take part of process 1's share, and the block-local gradients (Hutchinson probes seeded per
    chunk) must use the global chunk numbers."""
    from prunekit import EoraConfig, RIAConfig, SparseGPTConfig, WandaConfig
    from prunekit.methods.flap import FlapConfig
    from prunekit.methods.gblm import GBLMConfig
    from prunekit.methods.laco import LaCoConfig
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.methods.angular import AngularConfig
    from prunekit.methods.block_influence import BlockInfluenceConfig
    from prunekit.methods.pruner_zero import PrunerZeroConfig
    from prunekit.methods.sleb import SLEBConfig
    from prunekit.methods.taylor import TaylorConfig
    from prunekit.methods.wanda_sp import WandaSPConfig
    from prunekit.methods.expert_loo import ExpertLooConfig
    from prunekit.methods.moe_pruner import MoePrunerConfig
    from prunekit.methods.naee import NaeeConfig
    from prunekit.methods.reap import ReapConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # "merge=True densifies": intended here
        eora = EoraConfig(rank=4, merge=True)
    return {
        "wanda-true": (WandaConfig(sparsity=0.5), "true", 8, 2),
        "wanda-block-uneven": (WandaConfig(sparsity=0.5), "block", 10, 4),
        "wanda-2of4": (WandaConfig(nm=(2, 4)), "true", 8, 2),
        "sparsegpt-true": (SparseGPTConfig(sparsity=0.5), "true", 8, 2),
        "sparsegpt-block": (SparseGPTConfig(sparsity=0.5), "block", 8, 2),
        "magnitude": (MagnitudeConfig(sparsity=0.5), "true", 8, 2),
        "ria-2of4-permute": (RIAConfig(nm=(2, 4), permute=True), "true", 8, 2),
        # merged, so the state dicts compare the adapters too
        "sparsegpt-eora": (SparseGPTConfig(sparsity=0.5), "true", 8, 2, "llama", eora),
        "gpt2-wanda": (WandaConfig(sparsity=0.5), "true", 8, 2, "gpt2"),
        "flap": (FlapConfig(sparsity=0.2), "true", 8, 2),
        "wanda-sp": (WandaSPConfig(sparsity=0.2), "true", 8, 2),
        "block-influence": (BlockInfluenceConfig(layers=1), "true", 8, 2),
        "angular": (AngularConfig(layers=1, token="all"), "true", 8, 2),
        "wanda-owl": (WandaConfig(sparsity=0.5, allocation="owl"), "true", 8, 2, "llama-4"),
        "sparsegpt-sensitivity": (SparseGPTConfig(sparsity=0.5, allocation="sensitivity"), "true", 8, 2, "llama-4"),
        "gblm-model": (GBLMConfig(sparsity=0.5, gradient="model", gradient_samples=5), "true", 8, 2),
        "pruner-zero-block": (PrunerZeroConfig(sparsity=0.5, gradient="block"), "true", 8, 2),
        "taylor": (TaylorConfig(sparsity=0.2), "true", 8, 2),
        "taylor-uneven": (TaylorConfig(sparsity=0.2, uniform=False), "true", 10, 4),
        "sleb": (SLEBConfig(layers=2), "true", 8, 2, "llama-4"),
        "sleb-samples": (SLEBConfig(layers=1, samples=6), "true", 8, 2, "llama-4"),
        "laco": (LaCoConfig(layers=2, merge=2, interval=1, threshold=0.5, min_layer=0), "true", 8, 2, "llama-4"),
        # Mixture of experts: expert scores sum every process's routed tokens; weights inside experts
        # reduce each expert's observer (DeepSeek-V3: grouped routing, shared experts, a dense block)
        "reap": (ReapConfig(sparsity=0.5), "true", 8, 2, "mixtral"),
        "reap-non-uniform": (ReapConfig(sparsity=0.5, uniform=False), "true", 10, 4, "qwen2_moe"),
        "expert-loo": (ExpertLooConfig(experts=4), "true", 8, 2, "deepseek_v3"),
        "naee": (NaeeConfig(experts=6), "true", 8, 2, "mixtral"),
        "moe-pruner": (MoePrunerConfig(sparsity=0.5, expert_min_tokens=8), "true", 8, 2, "mixtral"),
        "sparsegpt-experts": (SparseGPTConfig(nm=(2, 4)), "block", 8, 2, "deepseek_v3"),
    }


def run_case(name: str) -> tuple[dict, dict]:
    """(the pruned state dict, the measurements behind the decisions): the depth methods' scores
    (block influence, SLEB's perplexities, LaCo's similarities), the allocation's block scores and
    the per-layer reconstruction errors, all of which must add every process's windows."""
    from prunekit import prune_
    from prunekit.io.export import to_jsonable
    case = cases()[name]
    config, sequential, windows, batch_size, family, compensate = (*case, *("llama", None)[len(case) - 4:])
    model = model_for(family)
    report = prune_(model, config, calib(windows), sequential=sequential, batch_size=batch_size, progress=False,
                    compensate=compensate)
    summary = {"scores": getattr(report, "scores", None), "allocation": getattr(report, "allocation", None),
               "errors": [layer.error for layer in getattr(report, "layers", [])]}
    return {k: v.clone() for k, v in model.state_dict().items()}, to_jsonable(summary)


def observer_data(rank: int) -> torch.Tensor:
    """(2 processes x 3 chunks, 5 tokens, 6 features) with a large mean (MeanVar's hard case)."""
    data = torch.randn(6, 5, 6, generator=torch.Generator().manual_seed(7)) + 100.0
    return data if rank is None else data[3 * rank:3 * rank + 3]


def check_observers(rank: int) -> dict:
    """Each process observes its half; after reduce_stats_ it must equal one observer of all data."""
    from prunekit.distributed import reduce_stats_
    from prunekit.stats import Hessian, InputNorm, MeanVar
    result = {}
    for cls in (InputNorm, Hessian, MeanVar):
        half, full = cls(6, torch.device("cpu")), cls(6, torch.device("cpu"))
        for chunk in observer_data(rank):
            half.update(chunk)
        for chunk in observer_data(None):
            full.update(chunk)
        reduce_stats_(half)
        diffs = {n: float((getattr(half, n) - getattr(full, n)).abs().max() / getattr(full, n).abs().max())
                 for n in cls.SUMS}
        # the float32 statistics the methods read: rounded once from float64 sums, so bit-identical
        views = {"InputNorm": ("sq_norm",), "Hessian": ("H", "sq_norm"), "MeanVar": ("mean", "var")}[cls.__name__]
        equal = {n: bool(torch.equal(getattr(half, n), getattr(full, n))) for n in views}
        result[cls.__name__] = {"tokens": half.tokens, "full_tokens": full.tokens, "rel_diff": diffs,
                                "float32_equal": equal}
    return result


def offsets() -> list[int]:
    """`distributed.offset` of (3 + rank) items per process: [0, 3] for 2 processes."""
    from prunekit import distributed
    return [distributed.offset(3 + distributed.rank())]


def refused(out_dir: Path, rank: int) -> dict:
    """What must refuse to run distributed, with its messages: a recovery (fine-tuning) step, and
    SLEB's `samples` when the first windows all lie on one process."""
    from prunekit import prune_
    from prunekit.api import run_recipe
    from prunekit.methods.sleb import SLEBConfig
    from prunekit.recipe import recipe_from_dict
    messages = {}
    model_dir = out_dir / f"tiny-{rank}"
    tiny_model("llama").save_pretrained(model_dir)
    recipe = recipe_from_dict({"model": str(model_dir), "steps": [{"method": "lora", "steps": 1}]})
    try:
        run_recipe(recipe, progress=False, echo=lambda *a, **k: None)
        messages["recovery"] = None
    except ValueError as err:
        messages["recovery"] = str(err)
    try:
        prune_(model_for("llama-4"), SLEBConfig(layers=1, samples=2), calib(8), batch_size=2, progress=False)
        messages["sleb-samples"] = None
    except ValueError as err:
        messages["sleb-samples"] = str(err)
    return messages


def main(out: str) -> None:
    from prunekit import distributed
    distributed.init_from_env(torch.device("cpu"))
    rank = distributed.rank()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {name: run_case(name) for name in cases()}
    observers = check_observers(rank)
    messages = refused(out_dir, rank)
    gathered = [None] * distributed.world_size()
    torch.distributed.all_gather_object(gathered, offsets())
    if rank == 0:
        for name, (state, summary) in results.items():
            torch.save(state, out_dir / f"{name}.pt")
            (out_dir / f"{name}.json").write_text(json.dumps(summary))
        (out_dir / "observers.json").write_text(json.dumps(observers))
        (out_dir / "offsets.json").write_text(json.dumps(gathered))
        (out_dir / "refused.json").write_text(json.dumps(messages))
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1])
