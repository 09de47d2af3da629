"""Build a real-weight Mixture-of-Experts PROXY model from a dense Llama-style LM by MoEfication.

Why: prunekit's Mixture-of-Experts methods (expert pruning and merging, pruning inside the
fused ``experts.gate_up_proj`` / ``experts.down_proj`` tensors) need an MoE checkpoint with
real, not random, weights to benchmark on a CPU, and no trained MoE is that small and
available offline. MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures
of Experts", arXiv 2110.01786) turns a dense feed-forward layer into experts without training:
the FFN's intermediate channels are split into groups, each group is an expert, and a router
chooses a few groups per token. The result here is a PROXY: its experts are slices of a dense
model, not experts trained as such, and its perplexity is worse than the dense model's.

What it does, per decoder layer of the dense model (SmolLM2-135M-Instruct by default, the
GGUF embedded in prunekit; ``gate_proj``/``up_proj`` (I, H), ``down_proj`` (H, I)):

1. **Clustering.** The I intermediate channels are split into E groups of exactly I/E
   channels by balanced spherical k-means (our own implementation): k-means on unit-norm
   channel features, where each assignment step is a greedy balanced assignment (all
   channel-centroid pairs in order of cosine similarity, a channel goes to the nearest
   centroid that still has room). The default features are the unit-norm rows of
   ``gate_proj`` (``--features gate``, the paper's parameter-clustering split); ``gate_up`` (rows of [gate | up])
   and ``activation`` (co-activation: each channel's activations on calibration tokens)
   are the alternatives.
2. **Experts.** Expert j keeps its channels' gate/up rows and down columns. transformers 5
   stores Mixtral experts fused: ``mlp.experts.gate_up_proj`` (E, 2*I/E, H) = [gate rows;
   up rows] and ``mlp.experts.down_proj`` (E, H, I/E); ``intermediate_size`` = I/E.
3. **Scaling.** Mixtral takes the softmax over all experts, keeps the top k, renormalises
   those k weights to sum 1 and sums the weighted expert outputs, while the dense MLP is the
   plain SUM of all experts. ``down_proj`` is therefore multiplied by k: with equal routing
   weights (1/k each) the MoE output is exactly the sum of the k chosen experts, and with
   k = E it equals the dense MLP (the test checks this). ``--scale fit`` (default)
   additionally multiplies each layer's ``down_proj`` by the least-squares factor c that
   best matches the dense MLP output on the calibration tokens; on SmolLM2 c is 1.00-1.36
   (the dropped experts' outputs are partly aligned with the chosen ones, so the chosen ones
   are scaled up a little); ``topk`` is k alone.
4. **Router** ``mlp.gate.weight`` (E, H). ``centroid``: row j is the mean of expert j's
   ``gate_proj`` rows (logit = mean gate pre-activation of the group). ``fit`` (default):
   on calibration MLP inputs x of the dense model, a ridge least-squares fit of the logits
   to log ||expert_j(x)|| (centered per token, since softmax ignores a shift), so the top-k
   are the experts with the largest outputs. The weight is then divided by
   ``--temperature`` (default 1000): the logits become so small that the k renormalised
   weights are nearly equal (top-2 on SmolLM2: every weight within 0.0016 of 1/2 on the
   calibration tokens), so the output is in effect the plain sum of the chosen experts
   (times the scale) while the choice itself is unchanged (the ranking survives the division).

Which choices won (perplexity, the table at the end of ``--help``): the fitted router beats
the centroid router by 8x (28k vs 235k at top-2, both with T=1000, down_proj times k) and
a random router by ~375x; T=1000 beats T=1 (softmax-weighted experts) by 6x; the per-layer
fitted scale halves it again (14k); gate rows are the best clustering features. Even so,
top-2 of 8 is a poor language model (SmolLM2's SwiGLU FFN is not sparse: the best 2 of 8
experts per token, chosen by their true output norms, leave 50-77% relative error in the
MLP output of most layers); top-4 of 8 gives ~105
against the dense 14.4, and top-8 reproduces the dense model exactly.

Attention, norms, embeddings, lm_head (tied as in the source), rope parameters, rms_norm_eps,
vocabulary and special token ids are copied; the result is a stock ``MixtralForCausalLM``
(``model_type: mixtral``) saved with safetensors and the source tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained(DIR)`` without remote code. The output directory
appears atomically (temp directory beside it, then rename); ``moefication.json`` in it
records the settings, parameter counts and both perplexities with their protocol, and
``moefication_groups.json`` the channels of every expert (layer -> expert -> channel ids).

    python bench/make_moe.py --out /tmp/moe-smollm2                    # E=8, top-2, a few minutes
    python bench/make_moe.py --out DIR --experts 16 --top-k 4 --eval-windows 8 --overwrite
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_EXPERTS = 8
DEFAULT_TOP_K = 2
DEFAULT_SAMPLES = 16
DEFAULT_SEQLEN = 256
DEFAULT_EVAL_WINDOWS = 24
DEFAULT_ROUTER = "fit"
DEFAULT_FEATURES = "gate"
DEFAULT_SCALE = "fit"
DEFAULT_TEMPERATURE = 1000.0
ROUTERS = ("fit", "centroid")
FEATURES = ("gate", "gate_up", "activation")
SCALES = ("topk", "fit")
RIDGE = 1e-3                 # ridge of the router fit, relative to the mean diagonal of X^T X
KMEANS_ITERATIONS = 30
RECORD_NAME = "moefication.json"
GROUPS_NAME = "moefication_groups.json"

# the experiments behind the defaults; printed by --help
RESULTS = """\
measured (SmolLM2-135M-Instruct float32 from the embedded GGUF; 16 calibration windows of 256 tokens, seed 0;
perplexity on the held-out default corpus, first 24 windows of 256 tokens = 6120 tokens scored, stride 256):
  dense model                                                  14.43
  E=8 top-2, router fit, T=1,    scale topk                   181618
  E=8 top-2, router fit, T=10,   scale topk                    69315
  E=8 top-2, router fit, T=1000, scale topk                    28393
  E=8 top-2, router fit, T=1000, scale fit   (the defaults)    14124
  E=8 top-2, router centroid, T=1 / T=1000, scale topk        233671 / 235181
  E=8 top-2, random router, T=1000, scale topk              1.06e7
  E=8 top-2, features gate_up / activation, fit, T=1000        37466 / 267083
  E=8 top-1, router fit, T=1000, scale topk                   7.1e8
  E=8 top-4, router fit, T=1 / T=1000, scale topk               3139 / 155.9
  E=8 top-4, router fit, T=1000, scale fit                      105.4
  E=8 top-8, router fit, T=1 / T=1000, scale topk               2686 / 14.43 (= dense)
  E=16 top-4, router fit, T=1000, scale topk / fit             14107 / 4677
SmolLM2's SwiGLU FFN is not sparse: even the best 2 of 8 experts per token (chosen by their true output norm)
leave 50-77% relative error in the MLP output of most layers, and the fitted router comes within a few percent
of that choice (keeping the dense MLP in layers 0-2 / 27-29 / 0-14 of the default MoE: 2004 / 9182 / 66.4).
A usable-perplexity proxy needs --top-k 4 (or more); top-2 exercises the MoE code paths, not quality."""


# ----------------------------------------------------------------------------------------------
# Balanced clustering of the intermediate channels
# ----------------------------------------------------------------------------------------------

def balanced_assignment(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row (channel) of `similarity` (I, E) to one column (cluster), at most `capacity` per column.

    Greedy: all (channel, cluster) pairs in order of decreasing similarity; a pair is taken when the
    channel is still free and the cluster has room. Needs I <= E * capacity. Returns labels (I,) int64.
    """
    channels, clusters = similarity.shape
    if channels > clusters * capacity:
        raise ValueError(f"{channels} channels do not fit in {clusters} clusters of {capacity}")
    order = torch.argsort(similarity.flatten(), descending=True, stable=True)
    labels = torch.full((channels,), -1, dtype=torch.long)
    room = [capacity] * clusters
    left = channels
    for flat in order.tolist():
        channel, cluster = divmod(flat, clusters)
        if labels[channel] >= 0 or room[cluster] == 0:
            continue
        labels[channel] = cluster
        room[cluster] -= 1
        left -= 1
        if left == 0:
            break
    return labels


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = KMEANS_ITERATIONS,
                    seed: int = 0) -> torch.Tensor:
    """Balanced spherical k-means of the rows of `features` (I, D) into `clusters` groups of I/clusters rows.

    Rows and centroids are unit vectors, similarity is the cosine; centroids start at distinct random
    rows (seeded), every assignment is `balanced_assignment`. Stops when the labels no longer change.
    Returns labels (I,) int64 with every cluster holding exactly I/clusters rows.
    """
    rows = features.shape[0]
    if rows % clusters:
        raise ValueError(f"{rows} channels cannot be split into {clusters} equal experts")
    capacity = rows // clusters
    unit = F.normalize(features.double(), dim=1)                                # (I, D)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(rows, generator=generator)[:clusters]]      # (E, D)
    labels = None
    for _ in range(iterations):
        new_labels = balanced_assignment(unit @ centroids.T, capacity)         # (I,)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        one_hot = F.one_hot(labels, clusters).double()                          # (I, E)
        centroids = F.normalize(one_hot.T @ unit, dim=1)                        # (E, D)
    return labels


def channel_groups(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Channel indices of each cluster, ascending: (E, I/E) int64 (every cluster must have I/E members)."""
    groups = [torch.nonzero(labels == cluster).flatten() for cluster in range(clusters)]
    sizes = {int(group.numel()) for group in groups}
    if len(sizes) != 1:
        raise ValueError(f"unbalanced clusters: sizes {sorted(int(g.numel()) for g in groups)}")
    return torch.stack(groups)


# ----------------------------------------------------------------------------------------------
# Dense MLP pieces and calibration statistics
# ----------------------------------------------------------------------------------------------

def dense_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (I, H), up (I, H), down (H, I)) of a Llama-style gated MLP, as float32 copies."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(mlp, name, None)
        if layer is None:
            raise TypeError(f"{type(mlp).__name__} has no {name}: MoEfication here needs a gated (SwiGLU) MLP")
        if getattr(layer, "bias", None) is not None:
            raise ValueError(f"{name} has a bias, which Mixtral experts cannot hold")
    return (mlp.gate_proj.weight.detach().float().clone(), mlp.up_proj.weight.detach().float().clone(),
            mlp.down_proj.weight.detach().float().clone())


@torch.no_grad()
def collect_mlp_inputs(model, calib: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Inputs of every decoder layer's MLP (the post-attention-norm hidden states) on `calib` (S, T) token ids.

    Runs the dense model; returns one float32 (S*T, H) tensor per layer.
    """
    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    for index, layer in enumerate(layers):
        def hook(module, args, index=index):
            captured[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        hooks.append(layer.mlp.register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    try:
        for start in range(0, calib.shape[0], batch_size):
            model(input_ids=calib[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return [torch.cat(chunks).cpu() for chunks in captured]


def intermediate_activations(inputs: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activations silu(x G^T) * (x U^T): (N, I) for inputs (N, H)."""
    return F.silu(inputs @ gate.T) * (inputs @ up.T)


def expert_output_norms(activations: torch.Tensor, down: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """||expert_j(x)|| for every token and expert (without any scaling): (N, E) from activations (N, I)."""
    norms = []
    for group in groups:                                            # group: (I/E,)
        output = activations[:, group] @ down[:, group].T             # (N, H)
        norms.append(output.norm(dim=1))
    return torch.stack(norms, dim=1)


def centroid_router(gate: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Router (E, H): row j is the mean of expert j's gate_proj rows (logit: the group's mean gate pre-activation)."""
    return gate[groups].mean(dim=1)                                   # (E, I/E, H) -> (E, H)


def fit_router(inputs: torch.Tensor, norms: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Router (E, H) whose logits x W^T fit log ||expert_j(x)|| (centered per token) by ridge least squares.

    inputs (N, H) are the MLP inputs, norms (N, E) the experts' output norms on them. Centering per token
    removes what a softmax ignores; the ridge is `ridge` times the mean diagonal of X^T X.
    """
    target = torch.log(norms.double() + 1e-6)                        # (N, E)
    target = target - target.mean(dim=1, keepdim=True)
    x = inputs.double()                                               # (N, H)
    gram = x.T @ x                                                    # (H, H)
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    weight_t = torch.linalg.solve(gram, x.T @ target)                 # (H, E)
    return weight_t.T.float()


# ----------------------------------------------------------------------------------------------
# The Mixtral model
# ----------------------------------------------------------------------------------------------

def mixtral_config(source, experts: int, top_k: int):
    """MixtralConfig with the dense model's attention, rope, norms, vocabulary and token ids; FFN width I/E."""
    from transformers import MixtralConfig

    if source.intermediate_size % experts:
        raise ValueError(f"intermediate_size {source.intermediate_size} is not divisible by {experts} experts")
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], got {top_k}")
    if getattr(source, "attention_bias", False) or getattr(source, "mlp_bias", False):
        raise ValueError("the source model has attention or MLP biases, which Mixtral cannot hold")
    rope = getattr(source, "rope_parameters", None)
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(source, "rope_theta", 10000.0)}
    return MixtralConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size // experts,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=getattr(source, "num_key_value_heads", None) or source.num_attention_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        initializer_range=getattr(source, "initializer_range", 0.02),
        rms_norm_eps=source.rms_norm_eps,
        pad_token_id=getattr(source, "pad_token_id", None),
        bos_token_id=getattr(source, "bos_token_id", None),
        eos_token_id=getattr(source, "eos_token_id", None),
        tie_word_embeddings=bool(getattr(source, "tie_word_embeddings", False)),
        sliding_window=None,
        attention_dropout=getattr(source, "attention_dropout", 0.0),
        num_experts_per_tok=top_k,
        num_local_experts=experts,
        rope_parameters=dict(rope),
    )


def _layer_scale(moe_block, inputs: torch.Tensor, dense_output: torch.Tensor) -> float:
    """Least-squares factor c minimising ||dense - c * moe(x)|| over calibration inputs (N, H)."""
    with torch.no_grad():
        routed = moe_block(inputs[None].to(moe_block.gate.weight.dtype))[0].float()   # (N, H)
    return float((routed * dense_output).sum() / (routed * routed).sum().clamp_min(1e-12))


@torch.no_grad()
def moefy(model, experts: int = DEFAULT_EXPERTS, top_k: int = DEFAULT_TOP_K, calib: torch.Tensor | None = None, *,
          router: str | None = None, features: str = DEFAULT_FEATURES, scale: str | None = None,
          temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, info: dict | None = None):
    """MixtralForCausalLM made from the dense Llama-style `model` by MoEfication (see the module docstring).

    experts: E, number of experts per layer (must divide intermediate_size); top_k: experts per token.
    calib: (S, T) token ids for the calibration statistics; needed by router="fit", features="activation"
    and scale="fit". router: "fit" | "centroid" (default: "fit" with calib, else "centroid").
    features: clustering features, "gate" | "gate_up" | "activation". scale: "topk" (down_proj * top_k)
    | "fit" (times a per-layer least-squares factor; default: "fit" with calib, else "topk").
    temperature: the router weight is divided by it.
    info: if a dict, filled with the channel groups (layer -> (E, I/E) list) and the per-layer scales.
    The source model is not modified; the result is in eval mode, on the CPU, in the source's dtype.
    """
    from transformers import MixtralForCausalLM

    router = router or ("fit" if calib is not None else "centroid")
    scale = scale or ("fit" if calib is not None else "topk")
    if router not in ROUTERS or features not in FEATURES or scale not in SCALES:
        raise ValueError(f"router must be one of {ROUTERS}, features one of {FEATURES}, scale one of {SCALES}")
    needs_calib = router == "fit" or features == "activation" or scale == "fit"
    if needs_calib and calib is None:
        raise ValueError(f"router={router!r}, features={features!r}, scale={scale!r} need calibration token ids")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    source = model.config
    config = mixtral_config(source, experts, top_k)
    dtype = next(model.parameters()).dtype
    inputs = collect_mlp_inputs(model, calib) if needs_calib else None
    moe = MixtralForCausalLM(config).to(dtype).eval()

    dense_state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    state = {"model.embed_tokens.weight": dense_state["model.embed_tokens.weight"],
             "model.norm.weight": dense_state["model.norm.weight"],
             "lm_head.weight": dense_state.get("lm_head.weight", dense_state["model.embed_tokens.weight"])}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    scales, all_groups = [], []
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            state[prefix + name] = dense_state[prefix + name]
        gate, up, down = dense_weights(layer.mlp)                    # (I, H), (I, H), (H, I)
        layer_inputs = inputs[index] if inputs is not None else None  # (N, H)
        activations = (intermediate_activations(layer_inputs, gate, up)   # (N, I)
                       if layer_inputs is not None else None)
        if features == "gate":
            channel_features = gate                                   # (I, H)
        elif features == "gate_up":
            channel_features = torch.cat([F.normalize(gate, dim=1), F.normalize(up, dim=1)], dim=1)   # (I, 2H)
        else:
            channel_features = activations.T                          # (I, N)
        groups = channel_groups(balanced_kmeans(channel_features, experts, seed=seed + index), experts)  # (E, I/E)
        all_groups.append(groups)

        gate_up = torch.cat([gate[groups], up[groups]], dim=1)        # (E, I/E, H) x2 -> (E, 2I/E, H)
        expert_down = down[:, groups].permute(1, 0, 2) * top_k        # (H, E, I/E) -> (E, H, I/E)
        if router == "fit":
            router_weight = fit_router(layer_inputs, expert_output_norms(activations, down, groups))   # (E, H)
        else:
            router_weight = centroid_router(gate, groups)             # (E, H)
        router_weight = router_weight / temperature

        block = moe.model.layers[index].mlp
        block.gate.weight.copy_(router_weight.to(dtype))
        block.experts.gate_up_proj.copy_(gate_up.to(dtype))
        block.experts.down_proj.copy_(expert_down.to(dtype))
        layer_scale = 1.0
        if scale == "fit":
            block.float()
            layer_scale = _layer_scale(block, layer_inputs, activations @ down.T)
            expert_down = expert_down * layer_scale
            block.to(dtype)
        scales.append(top_k * layer_scale)
        state[prefix + "mlp.gate.weight"] = router_weight.to(dtype)
        state[prefix + "mlp.experts.gate_up_proj"] = gate_up.to(dtype)
        state[prefix + "mlp.experts.down_proj"] = expert_down.to(dtype)

    expected = set(moe.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    result = moe.load_state_dict(state, strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"load_state_dict: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings and moe.lm_head.weight.data_ptr() != moe.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after loading")
    if info is not None:
        info["groups"] = [groups.tolist() for groups in all_groups]
        info["down_scale"] = scales
    return moe.eval()


def parameter_counts(moe) -> dict:
    """Total parameters (tied weights once) and the parameters active per token (top_k of E experts)."""
    config = moe.config
    total = sum(parameter.numel() for parameter in moe.parameters())       # parameters() yields tied ones once
    expert_params = sum(block.mlp.experts.gate_up_proj.numel() + block.mlp.experts.down_proj.numel()
                        for block in moe.model.layers)
    active = total - expert_params + expert_params * config.num_experts_per_tok // config.num_local_experts
    return {"total": total, "experts": expert_params, "active_per_token": active,
            "router": sum(block.mlp.gate.weight.numel() for block in moe.model.layers)}


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def _make_readable(directory: Path) -> None:
    """Give `directory` (mkdtemp makes it 0700) and its files the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def save_atomically(moe, tokenizer, out: str | os.PathLike, record: dict | None = None,
                    overwrite: bool = False, check_ids: torch.Tensor | None = None,
                    groups: list | None = None) -> Path:
    """Save `moe` (safetensors), `tokenizer`, `record` (moefication.json) and `groups` into `out`, atomically.

    Everything is written to a temporary directory beside `out` and renamed into place; an existing
    non-empty `out` is refused unless `overwrite`. With `check_ids` (B, T), the temporary copy is reloaded
    with AutoModelForCausalLM first and must give the same logits as `moe`.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        moe.save_pretrained(temporary, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        if record is not None:
            (temporary / RECORD_NAME).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if groups is not None:
            (temporary / GROUPS_NAME).write_text(json.dumps(groups, separators=(",", ":")) + "\n")
        _make_readable(temporary)
        if check_ids is not None:
            reloaded = AutoModelForCausalLM.from_pretrained(temporary, dtype=next(moe.parameters()).dtype).eval()
            if type(reloaded).__name__ != "MixtralForCausalLM":
                raise RuntimeError(f"reloaded as {type(reloaded).__name__}, not MixtralForCausalLM")
            with torch.no_grad():
                expected = moe(input_ids=check_ids, use_cache=False).logits
                got = reloaded(input_ids=check_ids, use_cache=False).logits
            if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
                raise RuntimeError(f"reloaded logits differ by {float((expected - got).abs().max()):.3g}")
            del reloaded
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(temporary, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=RESULTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output directory (the Mixtral checkpoint)")
    parser.add_argument("--model", default="default",
                        help='dense source: "default" (embedded SmolLM2-135M-Instruct), a local HF dir or a hub id')
    parser.add_argument("--experts", type=int, default=DEFAULT_EXPERTS,
                        help=f"experts per layer E (default {DEFAULT_EXPERTS}; must divide intermediate_size)")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"experts per token (default {DEFAULT_TOP_K}, i.e. top-{DEFAULT_TOP_K} of "
                             f"{DEFAULT_EXPERTS})")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help=f"calibration windows for the router fit (default {DEFAULT_SAMPLES})")
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN,
                        help=f"tokens per calibration and evaluation window (default {DEFAULT_SEQLEN})")
    parser.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                        help=f"perplexity on the first N windows of the held-out split (default "
                             f"{DEFAULT_EVAL_WINDOWS}; 0: skip perplexity)")
    parser.add_argument("--router", choices=ROUTERS, default=DEFAULT_ROUTER,
                        help=f"router initialisation (default {DEFAULT_ROUTER})")
    parser.add_argument("--features", choices=FEATURES, default=DEFAULT_FEATURES,
                        help=f"channel features for the clustering (default {DEFAULT_FEATURES})")
    parser.add_argument("--scale", choices=SCALES, default=DEFAULT_SCALE,
                        help=f"down_proj scaling: topk = times top_k, fit = times top_k and a per-layer "
                             f"least-squares factor (default {DEFAULT_SCALE})")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"router weight divided by this; large = near-equal weights for the top-k "
                             f"(default {DEFAULT_TEMPERATURE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and k-means")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv=None) -> int:
    """Load the dense model, MoEfy it, measure both perplexities, save the Mixtral checkpoint."""
    args = build_parser().parse_args(argv)
    out = args.out.absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        print(f"error: {out} exists and is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    from prunekit.data import calibration_data, evaluation_data
    from prunekit.eval.perplexity import perplexity
    from prunekit.io.loading import load

    started = time.perf_counter()
    model, tokenizer = load(args.model)
    calib = calibration_data(tokenizer, "default", samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    evaluation = (evaluation_data(tokenizer, "default", max_tokens=args.eval_windows * args.seqlen)
                  if args.eval_windows > 0 else None)
    dense_ppl = perplexity(model, evaluation, seqlen=args.seqlen) if evaluation is not None else None
    if dense_ppl is not None:
        print(f"dense: {dense_ppl}", flush=True)

    info: dict = {}
    built = time.perf_counter()
    moe = moefy(model, args.experts, args.top_k, calib, router=args.router, features=args.features,
                scale=args.scale, temperature=args.temperature, seed=args.seed, info=info)
    build_seconds = time.perf_counter() - built
    moe_ppl = perplexity(moe, evaluation, seqlen=args.seqlen) if evaluation is not None else None
    if moe_ppl is not None:
        print(f"MoE:   {moe_ppl}", flush=True)

    counts = parameter_counts(moe)
    dense_total = sum(parameter.numel() for parameter in model.parameters())
    record = {
        "what": "PROXY Mixture-of-Experts made by MoEfication (arXiv 2110.01786) of a dense model; "
                "NOT a trained MoE: experts are slices of the dense MLPs",
        "source_model": args.model,
        "source_architecture": type(model).__name__,
        "architecture": type(moe).__name__,
        "experts": args.experts,
        "top_k": args.top_k,
        "intermediate_size_per_expert": moe.config.intermediate_size,
        "clustering": f"balanced spherical k-means on {args.features} channel features "
                      f"(greedy balanced assignment, seed {args.seed})",
        "router": args.router,
        "router_temperature": args.temperature,
        "scaling": args.scale,
        "scaling_rule": ("down_proj x top_k x a per-layer least-squares factor (fitted on the calibration tokens)"
                         if args.scale == "fit" else "down_proj x top_k"),
        "down_proj_scale_per_layer": [round(value, 6) for value in info["down_scale"]],
        "calibration": {"source": "default", "samples": args.samples, "seqlen": args.seqlen, "seed": args.seed},
        "parameters": counts | {"dense_total": dense_total},
        "perplexity": {"dense": dense_ppl.to_dict() if dense_ppl else None,
                       "moe": moe_ppl.to_dict() if moe_ppl else None},
        "channel_groups": f"{GROUPS_NAME}: layer -> expert -> intermediate channel ids of the dense MLP",
        "build_seconds": round(build_seconds, 1),
    }
    save_atomically(moe, tokenizer, out, record, overwrite=args.overwrite, check_ids=calib[:1, :32],
                    groups=info["groups"])
    seconds = time.perf_counter() - started
    record["total_seconds"] = round(seconds, 1)
    partial = out / f".{RECORD_NAME}.tmp"
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, out / RECORD_NAME)
    summary = {key: record[key] for key in ("experts", "top_k", "router", "scaling", "router_temperature")}
    print(json.dumps(summary | {"parameters": record["parameters"]}))
    if dense_ppl and moe_ppl:
        ratio = moe_ppl.ppl / dense_ppl.ppl if math.isfinite(moe_ppl.ppl) else math.inf
        print(f"perplexity dense {dense_ppl.ppl:.2f} -> MoE {moe_ppl.ppl:.2f} (x{ratio:.2f}); PROXY, not trained")
    print(f"saved {out} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
