"""Write a (pruned) model as one GGUF file that llama.cpp runs: our own writer on `gguf.GGUFWriter`.

The `gguf` package reads and writes the container but has no Hugging Face -> GGUF converter, so
this module holds that knowledge for the families we prune, as data:

* `ARCHES`: what each llama.cpp architecture can represent (rope layout, which biases its loader
  reads, whether the query width may differ from the hidden size, per-layer widths, experts);
* `FAMILIES`: which stock architecture serves a `config.model_type`, and whether the `deci`
  architecture (Nemotron-NAS, the only llama.cpp graph with per-layer tensors) can take it.

`plan_gguf(model)` reads what the weights need (per-block heads, KV heads and FFN widths, biases
that are not all zero, experts) and picks the stock architecture when it can hold them, else
`deci` when the family fits it, else refuses with the reason: a model llama.cpp cannot run is
never written as a file that fails at load. A block whose attention has no heads left is written
as an attention-free deci layer (n_head 0), except block 0, which gets a one-head attention whose
weights are zero: llama.cpp reads the head size from layer 0's head count and sets it to 0 when that
is 0. A block whose FFN has no channels left is written with a one-wide FFN whose weights are zero,
because this llama.cpp's deci graph skips the whole layer (attention included) when its FFN width
is 0 (`models/deci.cpp`: `if (n_ff == 0) continue`). Both stand-ins add exactly zero.

Rope: Hugging Face stores q/k rows in "rotate half" order; llama.cpp's `llama` and `deci` graphs
rotate interleaved pairs, so their q/k rows (and biases) are permuted per head (`_interleave`);
`qwen2` / `qwen3` use the same "neox" order as Hugging Face and are written as they are.

The tokenizer: a model converted from a GGUF (the embedded default) gets its source file's
`tokenizer.*` fields back verbatim (vocabulary, merges, pre-tokenizer, chat template); any other
is converted from its Hugging Face tokenizer with `gguf.vocab` (byte-level BPE -> "gpt2",
SentencePiece-style BPE/Unigram -> "llama").

Outtypes: f32, f16, bf16 and q8_0 for 2-D weights; norms, biases and 1-D tensors stay f32 (as
llama.cpp requires). q8_0 quantises rows in blocks of 32: a tensor whose rows are not a multiple
of 32 is written f16 instead and counted in the result. The file is written atomically.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("prunekit")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GgufArch:
    """What one llama.cpp architecture's loader and graph can represent."""
    name: str                          # general.architecture
    interleaved_rope: bool             # rope on interleaved pairs: q/k rows permuted from HF order
    biases: frozenset = frozenset()    # linear biases the loader reads: q, k, v, o, gate, up, down
    free_query_width: bool = True      # heads x head_dim may differ from the hidden size
    per_layer: bool = False            # heads / KV heads / FFN width per layer; 0 heads = no attention
    qk_norm: bool = False              # per-head RMSNorm of q and k (Qwen3)
    experts: bool = False              # routed experts (uniform count: GGUF has one expert_count)


_ALL_BIASES = frozenset({"q", "k", "v", "o", "gate", "up", "down"})

ARCHES = {
    "llama": GgufArch("llama", interleaved_rope=True, biases=_ALL_BIASES, experts=True),
    "qwen2": GgufArch("qwen2", interleaved_rope=False, biases=frozenset({"q", "k", "v"}), free_query_width=False),
    "qwen3": GgufArch("qwen3", interleaved_rope=False, biases=frozenset({"q", "k", "v"}), qk_norm=True),
    "qwen3moe": GgufArch("qwen3moe", interleaved_rope=False, biases=frozenset({"q", "k", "v"}), qk_norm=True,
                         experts=True),
    "gemma3": GgufArch("gemma3", interleaved_rope=False, qk_norm=True),
    "phi3": GgufArch("phi3", interleaved_rope=False, free_query_width=False),
    "deci": GgufArch("deci", interleaved_rope=True, biases=_ALL_BIASES, per_layer=True),
}


@dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` maps to llama.cpp."""
    stock: str                 # the architecture llama.cpp names it by
    deci: bool                 # pre-norm RMSNorm, SiLU-gated FFN, full rope: deci can hold per-layer widths
    norms: dict | None = None  # Hugging Face norm names in a block -> GGUF names, when not the llama pair
    norm_shift: float = 0.0    # added to every norm weight (Gemma's RMSNorm multiplies by 1 + w)
    projections: dict | None = None   # Hugging Face linear names -> GGUF names, when not llama's q/k/v/o, gate/up/down


FAMILIES = {
    "llama": Family("llama", deci=True),
    "mistral": Family("llama", deci=True),        # llama.cpp runs Mistral as llama (sliding window ignored)
    "qwen2": Family("qwen2", deci=True),
    "qwen3": Family("qwen3", deci=False),         # q/k norms: deci has none
    "mixtral": Family("llama", deci=False),
    "qwen3_moe": Family("qwen3moe", deci=False),
    "gemma3_text": Family("gemma3", deci=False, norm_shift=1.0, norms={
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}),
    # fused projections, written fused: attn_qkv = [q | k | v] rows, ffn_up = [gate | up] rows
    "phi3": Family("phi3", deci=False, projections={"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                                                     "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),
}

# Hugging Face names inside a decoder block -> GGUF names inside `blk.N`
_BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _block_tensors(family: Family) -> dict:
    norms = family.norms or {k: v for k, v in _BLOCK_TENSORS.items() if k.endswith("layernorm.weight")}
    projections = family.projections or {k: v for k, v in _BLOCK_TENSORS.items() if k not in norms}
    return {**norms, **projections}


_BIAS_KIND = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "attn_qkv": "qkv",
              "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


class GgufUnsupportedError(ValueError):
    """The model has something no llama.cpp architecture can run; the message says what."""


@dataclass
class BlockShape:
    heads: int
    kv_heads: int
    ffn: int                   # FFN channels (per expert for MoE blocks)
    experts: int = 0


@dataclass
class GgufPlan:
    arch: GgufArch
    family: Family
    blocks: list[BlockShape]
    head_dim: int
    biases: set[str]                                  # kinds of nonzero biases present
    notes: list[str] = field(default_factory=list)

    @property
    def uniform(self) -> bool:
        first = self.blocks[0]
        return all((b.heads, b.kv_heads, b.ffn) == (first.heads, first.kv_heads, first.ffn) for b in self.blocks)


def _head_dim(config) -> int:
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def _layers(state: dict) -> int:
    return 1 + max((int(k.split(".")[2]) for k in state if k.startswith("model.layers.")), default=-1)


def _block_shapes(state: dict, config, head_dim: int) -> list[BlockShape]:
    shapes = []
    for i in range(_layers(state)):
        p = f"model.layers.{i}."
        o, k = state.get(p + "self_attn.o_proj.weight"), state.get(p + "self_attn.k_proj.weight")
        heads = 0 if o is None else o.shape[1] // head_dim
        if k is not None:
            kv = k.shape[0] // head_dim
        else:                                                     # fused [q | k | v] (Phi-3), or no attention
            qkv = state.get(p + "self_attn.qkv_proj.weight")
            kv = 0 if qkv is None else (qkv.shape[0] - heads * head_dim) // (2 * head_dim)
        if p + "mlp.experts.gate_up_proj" in state:
            gate_up = state[p + "mlp.experts.gate_up_proj"]          # (E, 2I, H)
            shapes.append(BlockShape(heads, kv, gate_up.shape[1] // 2, experts=gate_up.shape[0]))
            continue
        down = state.get(p + "mlp.down_proj.weight")
        shapes.append(BlockShape(heads, kv, 0 if down is None else down.shape[1]))
    return shapes


def _present_biases(state: dict, family: Family) -> set[str]:
    """Kinds of linear bias that carry information (width pruning adds all-zero q/k/v biases when it
    turns a config's bias flag on; those are dropped rather than forcing another architecture). A nonzero
    bias the family's tensor map does not know is refused, never dropped."""
    names = _block_tensors(family)
    kinds = set()
    for name, tensor in state.items():
        if name.startswith("model.layers.") and name.endswith(".bias") and bool(tensor.any()):
            short = names.get(name.split(".", 3)[3][:-len(".bias")])
            if short not in _BIAS_KIND:
                raise GgufUnsupportedError(f"{name}: GGUF export has no place for this bias")
            kinds.add(_BIAS_KIND[short])
    return kinds


def plan_gguf(model) -> GgufPlan:
    """The llama.cpp architecture this model is written as, or GgufUnsupportedError saying why none fits."""
    config = model.config
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise GgufUnsupportedError(
            f"GGUF export does not support model type {config.model_type!r}; supported: "
            f"{', '.join(sorted(FAMILIES))}")
    _check_rope(config)
    state = model.state_dict()
    head_dim = _head_dim(config)
    plan = GgufPlan(ARCHES[family.stock], family, _block_shapes(state, config, head_dim), head_dim,
                    _present_biases(state, family))
    if family.stock == "gemma3":
        _check_gemma3(config, len(plan.blocks))
    window = getattr(config, "sliding_window", None)
    if (family.stock != "gemma3" and window and window < config.max_position_embeddings
            and getattr(config, "use_sliding_window", True)):
        plan.notes.append(f"llama.cpp's {family.stock} graph has no sliding window: the same model up to {window} "
                          "tokens of context, full attention beyond")
    needs = _needs(plan, config)
    missing = _missing(plan.arch, needs)
    if missing:
        if not family.deci:
            raise GgufUnsupportedError(
                f"llama.cpp cannot run this {config.model_type} model: its architecture {plan.arch.name!r} "
                f"has no {', '.join(missing)}, and the per-layer architecture 'deci' cannot hold a "
                f"{config.model_type} block" + _deci_reason(config))
        deci_missing = _missing(ARCHES["deci"], needs)
        if deci_missing:
            raise GgufUnsupportedError(f"llama.cpp cannot run this model: neither {plan.arch.name!r} nor 'deci' has "
                                       f"{', '.join(deci_missing)}")
        plan.notes.append(f"written as llama.cpp's 'deci' architecture (per-layer widths): {plan.arch.name!r} "
                          f"has no {', '.join(missing)}")
        plan.arch = ARCHES["deci"]
    return plan


def _deci_reason(config) -> str:
    if config.model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        return " (it has per-head q/k norms). Prune it uniformly (--uniform) to export it to GGUF"
    return " (it has routed experts: GGUF has one expert count, so prune experts uniformly)"


def _needs(plan: GgufPlan, config) -> list[str]:
    needs = [f"{kind} bias" for kind in sorted(plan.biases)]
    if any(b.heads * plan.head_dim != config.hidden_size for b in plan.blocks):
        needs.append("query width other than the hidden size")
    if not plan.uniform or any(b.heads == 0 or b.ffn == 0 for b in plan.blocks):
        needs.append("per-layer widths")
    experts = {b.experts for b in plan.blocks}
    if experts != {0}:
        needs.append("experts")
        dense = [i for i, b in enumerate(plan.blocks) if not b.experts]
        if dense:
            raise GgufUnsupportedError(f"llama.cpp's {plan.arch.name} graph needs routed experts in every block; this "
                                       f"model has dense FFN blocks {dense} (mlp_only_layers / decoder_sparse_step)")
        if not getattr(config, "norm_topk_prob", True):
            raise GgufUnsupportedError(f"llama.cpp's {plan.arch.name} graph renormalises the top-k router weights; "
                                       "this model does not (norm_topk_prob=False), so llama.cpp would compute "
                                       "another function")
        if len(experts) > 1:
            raise GgufUnsupportedError(
                f"GGUF has one expert count for all layers, and this model's blocks keep {sorted(experts)} experts; "
                "prune experts uniformly (--uniform) to export it to GGUF")
    return needs


def _missing(arch: GgufArch, needs: list[str]) -> list[str]:
    missing = []
    for need in needs:
        if need.endswith(" bias") and need.split()[0] not in arch.biases:
            missing.append(need)
        elif need.startswith("query width") and not arch.free_query_width:
            missing.append(need)
        elif need == "per-layer widths" and not arch.per_layer:
            missing.append(need)
        elif need == "experts" and not arch.experts:
            missing.append(need)
    return missing


def _rope_parameters(config, kind: str = "full_attention") -> dict:
    """The rope of the full-attention layers (or of `kind`): transformers 5 nests it per attention type
    for families with sliding layers (Gemma 3), older versions keep rope_theta / rope_scaling."""
    params = getattr(config, "rope_parameters", None)
    if params and kind in params:
        return dict(params[kind])
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def _check_rope(config) -> None:
    kind = _rope_parameters(config).get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise GgufUnsupportedError(f"GGUF export supports rope types default, linear and llama3; this model uses "
                                   f"{kind!r}")
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if partial != 1.0:
        raise GgufUnsupportedError(f"GGUF export needs rope over the whole head; this model rotates {partial:.0%}")


def _llama3_rope_factors(params: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's rope frequency divisors (one per rotated pair), which llama.cpp reads as `rope_freqs`:
    long wavelengths are divided by `factor`, short ones kept, the band between interpolated."""
    base, factor = params["rope_theta"], params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    context = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / freqs
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    divisor = 1 / ((1 - smooth) / factor + smooth)
    divisor = torch.where(wavelength < context / high, torch.ones_like(divisor), divisor)
    divisor = torch.where(wavelength > context / low, torch.full_like(divisor, factor), divisor)
    return divisor.float()


def _interleave(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from Hugging Face's [first halves | second halves] to interleaved pairs
    (row i and row i + d/2 of a head become rows 2i and 2i+1), which llama.cpp's rope rotates."""
    if heads == 0:
        return rows
    shape = rows.shape
    return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _tensors(model, plan: GgufPlan):
    """Yield (GGUF name, float tensor) for every tensor llama.cpp reads, in file order."""
    config, state = model.config, model.state_dict()
    yield "token_embd.weight", state["model.embed_tokens.weight"]
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        yield "rope_freqs.weight", _llama3_rope_factors(rope, plan.head_dim)
    for i, shape in enumerate(plan.blocks):
        p = f"model.layers.{i}."
        for hf, short in _block_tensors(plan.family).items():
            is_linear = not hf.endswith(".weight")
            names = [(hf + ".weight", short + ".weight")] if is_linear else [(hf, short)]
            if is_linear and _BIAS_KIND[short] in plan.biases:
                names.append((hf + ".bias", short + ".bias"))
            for hf_name, gguf_name in names:
                tensor = state.get(p + hf_name)
                if tensor is None:
                    continue
                if shape.heads == 0 and hf.startswith(("self_attn", "input_layernorm")):
                    continue                                  # an attention-free layer (block 0: below)
                if (shape.ffn == 0 or shape.experts) and hf.startswith(("mlp.", "post_attention")):
                    continue                                  # the zero FFN or the experts below
                if plan.arch.interleaved_rope and short in ("attn_q", "attn_k"):
                    tensor = _interleave(tensor, shape.heads if short == "attn_q" else shape.kv_heads)
                if plan.family.norm_shift and gguf_name.endswith("norm.weight"):
                    tensor = tensor.float() + plan.family.norm_shift
                yield f"blk.{i}.{gguf_name}", tensor
        if shape.heads == 0 and i == 0:
            yield from _zero_attention(config.hidden_size, plan.head_dim)
        if shape.experts:
            yield f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"]
            yield from _expert_tensors(state, p, i)
        elif shape.ffn == 0:
            yield from _zero_ffn(config.hidden_size, i)
    yield "output_norm.weight", state["model.norm.weight"].float() + plan.family.norm_shift
    if not getattr(config, "tie_word_embeddings", False):
        yield "output.weight", state["lm_head.weight"]


def _expert_tensors(state: dict, p: str, i: int):
    """Routed experts stacked per projection: llama.cpp's ffn_{gate,up}_exps (E, I, H), ffn_down_exps (E, H, I)."""
    yield f"blk.{i}.ffn_gate_inp.weight", state[p + "mlp.gate.weight"]
    gate_up = state[p + "mlp.experts.gate_up_proj"]                # (E, 2I, H): [gate | up]
    half = gate_up.shape[1] // 2
    yield f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :half]
    yield f"blk.{i}.ffn_up_exps.weight", gate_up[:, half:]
    yield f"blk.{i}.ffn_down_exps.weight", state[p + "mlp.experts.down_proj"]


def _zero_attention(hidden: int, head_dim: int):
    """Block 0's one-head attention whose output is exactly zero (see the module docstring)."""
    yield "blk.0.attn_norm.weight", torch.ones(hidden)
    for name in ("attn_q", "attn_k", "attn_v"):
        yield f"blk.0.{name}.weight", torch.zeros(head_dim, hidden)
    yield "blk.0.attn_output.weight", torch.zeros(hidden, head_dim)


def _written_heads(plan: GgufPlan) -> tuple[list[int], list[int]]:
    """Per-layer query and KV head counts as written (block 0 without attention: the zero one-head stand-in)."""
    heads = [b.heads for b in plan.blocks]
    kv = [b.kv_heads for b in plan.blocks]
    if heads[0] == 0:
        heads[0] = kv[0] = 1
    return heads, kv


def _zero_ffn(hidden: int, i: int):
    """A one-channel FFN whose output is exactly zero (see the module docstring)."""
    yield f"blk.{i}.ffn_norm.weight", torch.ones(hidden)
    yield f"blk.{i}.ffn_gate.weight", torch.zeros(1, hidden)
    yield f"blk.{i}.ffn_up.weight", torch.zeros(1, hidden)
    yield f"blk.{i}.ffn_down.weight", torch.zeros(hidden, 1)


def _encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, GGML type) for one tensor; 1-D tensors stay f32. Returns a note when q8_0 had to
    fall back to f16 (rows not a multiple of 32)."""
    import gguf
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or outtype == "f32":
        return data, gguf.GGMLQuantizationType.F32, None
    if outtype == "f16" or (outtype == "q8_0" and data.shape[-1] % 32):
        note = None if outtype == "f16" else "q8_0 needs rows in multiples of 32"
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16, note
    qtype = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, qtype), qtype, None


def _check_range(model, outtype: str) -> None:
    """f16 holds magnitudes up to 65504: a weight beyond it would be written as infinity."""
    if outtype != "f16":
        return
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() and tensor.abs().max().item() > 65504:
            raise GgufUnsupportedError(f"{name} holds values beyond float16's range (|x| > 65504): use --outtype "
                                       "bf16, q8_0 or f32")


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _metadata(writer, model, plan: GgufPlan, outtype: str, name: str) -> None:
    import gguf
    config = model.config
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[outtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(plan.blocks))
    writer.add_vocab_size(int(config.vocab_size))
    blocks = plan.blocks
    if plan.arch.per_layer:
        heads, kv_heads = _written_heads(plan)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_feed_forward_length([b.ffn or 1 for b in blocks])   # 0 channels: the zero FFN above
    else:
        writer.add_head_count(blocks[0].heads)
        writer.add_head_count_kv(blocks[0].kv_heads)
        writer.add_feed_forward_length(blocks[0].ffn)
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if plan.arch.name == "gemma3":
        _gemma3_metadata(writer, config)
    if blocks[0].experts:
        writer.add_expert_count(blocks[0].experts)
        writer.add_expert_used_count(int(config.num_experts_per_tok))
        if plan.arch.name == "qwen3moe":
            writer.add_expert_feed_forward_length(blocks[0].ffn)


def _gemma3_metadata(writer, config) -> None:
    """Sliding-window layers as a per-layer pattern (exact after depth pruning), their own rope base, and the
    final soft-capping."""
    types = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) and "sliding_attention" in types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
        writer.add_rope_freq_base_swa(float(_rope_parameters(config, "sliding_attention")["rope_theta"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _check_gemma3(config, blocks: int) -> None:
    """llama.cpp's Gemma 3 graph fixes what it cannot read from the file: the attention scale (1/sqrt(head_dim),
    or 1/sqrt(hidden/heads) when the model has 62 layers, as Gemma-3-27B) and no attention soft-capping."""
    scale = config.hidden_size / config.num_attention_heads if blocks == 62 else _head_dim(config)
    if not math.isclose(float(config.query_pre_attn_scalar), scale):
        raise GgufUnsupportedError(f"llama.cpp scales Gemma 3 attention by 1/sqrt({scale:g}) for a {blocks}-layer "
                                   f"model; this one uses query_pre_attn_scalar={config.query_pre_attn_scalar}")
    if getattr(config, "attn_logit_softcapping", None):
        raise GgufUnsupportedError("llama.cpp's Gemma 3 graph has no attention soft-capping; this model sets "
                                   f"attn_logit_softcapping={config.attn_logit_softcapping}")


def _source_gguf(source: dict | None) -> Path | None:
    """The GGUF file the model was converted from (recorded in prunekit.json), if it is still there."""
    path = Path((source or {}).get("path") or "")
    return path if path.suffix == ".gguf" and path.is_file() else None


def _copy_tokenizer(writer, gguf_path: Path) -> None:
    """The source GGUF's tokenizer fields, verbatim: vocabulary, merges, pre-tokenizer, chat template."""
    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    for key, entry in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = entry.types[0]
        sub = entry.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, entry.contents(), vtype, sub_type=sub)


def _byte_level_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, from tokenizer.json (known regexes only)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    pattern = splits[0] if splits else ""
    if r"\p{N}{1,3}" in pattern:
        return "llama-bpe"
    if r"\p{N}|" in pattern or r"\p{N}| ?" in pattern:
        return "qwen2"
    log.warning("GGUF: unrecognised pre-tokenizer %s; writing 'default' (llama.cpp may split text differently "
                "from transformers)", pattern or pre.get("type"))
    return "default"


def _vocab(folder: Path):
    """(gguf.vocab reader, tokenizer.ggml.model, tokenizer.ggml.pre) for a saved Hugging Face tokenizer."""
    import json

    import gguf
    data = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").is_file() else {}
    kind = (data.get("model") or {}).get("type")
    if kind == "BPE" and not (data.get("model") or {}).get("byte_fallback", False):
        return gguf.vocab.BpeVocab(folder), "gpt2", _byte_level_pre(data)
    if kind in ("BPE", "Unigram") or (folder / "tokenizer.model").is_file():
        return gguf.vocab.LlamaHfVocab(folder), "llama", "default"
    raise GgufUnsupportedError(f"this tokenizer ({kind or 'no tokenizer.json'}) has no GGUF form: llama.cpp reads "
                               "byte-level BPE and SentencePiece vocabularies")


def _saved_tokenizer(tokenizer):
    """A temporary folder holding the tokenizer's files (gguf.vocab reads files)."""
    import tempfile
    if tokenizer is None:
        raise GgufUnsupportedError("GGUF export needs the model's tokenizer (llama.cpp reads its vocabulary from "
                                   "the file); save the tokenizer next to the model")
    folder = tempfile.TemporaryDirectory(prefix="prunekit-gguf-tok-")
    tokenizer.save_pretrained(folder.name)
    return folder


def _convert_tokenizer(writer, tokenizer) -> None:
    """The Hugging Face tokenizer as GGUF fields (via `gguf.vocab`)."""
    import gguf
    with _saved_tokenizer(tokenizer) as folder:
        path = Path(folder)
        vocab, model_name, pre = _vocab(path)
        tokens, scores, types = [], [], []
        for text, score, token_type in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(token_type)
        writer.add_tokenizer_model(model_name)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if model_name == "llama":
            writer.add_token_scores(scores)
        gguf.SpecialVocab(path, load_merges=model_name == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def preflight(model, tokenizer, source: dict | None = None) -> None:
    """Before a long pruning run that ends in a GGUF file: the family, its rope and the tokenizer are ones
    the writer can take (what pruning decides, such as per-layer widths, is checked when writing)."""
    config = model.config
    if config.model_type not in FAMILIES:
        raise GgufUnsupportedError(f"GGUF export does not support model type {config.model_type!r}; supported: "
                                   f"{', '.join(sorted(FAMILIES))}")
    _check_rope(config)
    if _source_gguf(source) is None:
        with _saved_tokenizer(tokenizer) as folder:
            _vocab(Path(folder))


@dataclass
class GgufResult:
    path: Path
    arch: str
    outtype: str
    tensors: int
    bytes: int
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "arch": self.arch, "outtype": self.outtype, "tensors": self.tensors,
                "bytes": self.bytes, "seconds": round(self.seconds, 2), "notes": self.notes}


def check_gguf_output(out: str | os.PathLike, overwrite: bool = False, protect=()) -> Path:
    """Validate a GGUF destination before any work: an existing file needs overwrite (and must be a GGUF
    file, not something else the user keeps), a folder is refused, the input is never replaced."""
    from .atomic import check_writable
    from .export import _related
    raw = Path(os.path.abspath(Path(out).expanduser()))
    path = raw.resolve()
    if path.suffix != ".gguf":
        raise ValueError(f"a GGUF output path ends in .gguf, got {out}")
    for item in protect or ():
        if item and _related(path, Path(item).expanduser().resolve()):
            raise ValueError(f"refusing to write {path}: it is, or lies inside, the input model {item}")
    if path.is_dir():
        raise IsADirectoryError(f"{out} is a directory; give a file name ending in .gguf")
    check_writable(path)
    if path.exists() or raw.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                                  "another --out")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError(f"refusing to overwrite {out}: it is not a GGUF file")
    return path


def write_gguf(model, tokenizer, out: str | os.PathLike, outtype: str = "f16", source: dict | None = None,
               overwrite: bool = False, protect=(), name: str | None = None) -> GgufResult:
    """Write `model` (+ tokenizer) to the GGUF file `out`, atomically; see the module docstring.

    source: the model's recorded source (prunekit.json "source"): when it names a GGUF file that still
    exists, that file's tokenizer fields are copied; otherwise `tokenizer` is converted.
    """
    import time

    import gguf

    from .atomic import write_atomic
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    path = check_gguf_output(out, overwrite, protect)
    started = time.perf_counter()
    plan = plan_gguf(model)
    _check_range(model, outtype)
    notes = list(plan.notes)
    fallbacks = []

    def write(tmp: Path) -> int:
        writer = gguf.GGUFWriter(str(tmp), plan.arch.name)
        _metadata(writer, model, plan, outtype, name or Path(out).stem)
        source_file = _source_gguf(source)
        if source_file is not None:
            _copy_tokenizer(writer, source_file)
        else:
            _convert_tokenizer(writer, tokenizer)
        count = 0
        with torch.no_grad():
            for gguf_name, tensor in _tensors(model, plan):
                data, qtype, note = _encode(tensor, outtype)
                if note:
                    fallbacks.append(gguf_name)
                writer.add_tensor(gguf_name, data, raw_dtype=qtype)
                count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return count

    counted = {}
    try:
        write_atomic(path, lambda tmp: counted.setdefault("n", write(tmp)))
    except OSError as err:
        if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        free = shutil.disk_usage(path.parent).free / 2**20
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"{path} was not created"
        raise OSError(errno.ENOSPC, f"disk full while writing the GGUF file {path}; nothing was written: {kept} and "
                                    f"the temporary file was removed ({free:.0f} MB free in {path.parent}). Free "
                                    "space or choose another --out, then run again") from err
    if fallbacks:
        notes.append(f"{len(fallbacks)} tensor(s) written f16 instead of q8_0 (rows not a multiple of 32): "
                     f"{', '.join(fallbacks[:4])}{' ...' if len(fallbacks) > 4 else ''}")
    return GgufResult(path, plan.arch.name, outtype, counted["n"], path.stat().st_size,
                      time.perf_counter() - started, notes)


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16", overwrite: bool = False,
                trust_remote_code: bool = False) -> GgufResult:
    """`prunekit export DIR --format gguf`: load a saved (pruned) model the way prunekit loads it (stock or
    `load_pruned`) and write it as GGUF. The input is never modified."""
    import json

    from .loading import load
    check_gguf_output(out, overwrite, protect=[model_dir])       # fail before the slow load
    model, tokenizer = load(model_dir, trust_remote_code=trust_remote_code)
    source = None
    record = Path(model_dir) / "prunekit.json"
    if record.is_file():
        source = json.loads(record.read_text()).get("source")
    elif str(model_dir).endswith(".gguf") or str(model_dir) == "default":
        from .loading import describe_source
        source = describe_source(model_dir)
    return write_gguf(model, tokenizer, out, outtype, source=source, overwrite=overwrite, protect=[model_dir])
