"""EoRA: training-free low-rank compensation of the pruning error, exported as a PEFT LoRA adapter
(Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv 2410.21271).

For a pruned linear, the error dW = W_dense - W_pruned (out, in) is approximated by B A with
B (out, r) and A (r, in), chosen to minimise the error the layer makes on its calibration inputs,
||X (dW - B A)^T||_F^2 = trace(E H E^T) with E = dW - B A and H = X^T X = Q diag(lam) Q^T.
Writing H = M M^T with M = Q diag(sqrt lam), that error is ||E M||_F^2, so the best rank-r B A is
the truncated SVD of the projected error dW M = U S V^T mapped back through M^-1 (Eckart-Young in
the activation-weighted norm):

    B A = U_r S_r V_r^T M^-1,    M^-1 = diag(1/sqrt lam) Q^T

Plain SVD of dW (`svd_factors`) minimises ||E||_F instead: optimal only if every input direction
carries the same energy, which LLM activations (a few outlier features) never do.

Matches the authors' implementation (`eora_compute_lora`, GPTQModel's `eora` module, linked from
NVlabs/EoRA): eigendecomposition of H in float64, projection and SVD in float32, the same
product B A. Two deliberate differences, neither changes what B A approximates where H has signal:
  * the eigenvalue floor. The reference replaces negative eigenvalues by the smallest positive
    one and, if M is still singular, adds 1e-6 to it. We clamp every eigenvalue to
    EIG_FLOOR * lam_max: directions below that are float32 accumulation noise (H is summed in
    float32, so its eigenvalues are only resolved to ~1e-7 of the largest), a dead input feature
    gives an exact 0, and 1/sqrt(lam) there would put arbitrarily large entries into A along
    directions the calibration data never visited. The floor bounds that amplification to
    EIG_FLOOR^-1/2 = 1e3 and, in those directions, falls back to plain-SVD behaviour. A zero H
    (no signal at all) gives plain SVD.
  * how S_r is split between the two factors. The reference returns B = U_r sqrt(S_r) and
    A = sqrt(S_r) V_r^T M^-1, which is balanced only when H is a per-sample mean of O(1)
    activations; our `Hessian` is a sum over tokens, and B, A would then drift apart by
    (tokens)^(1/4). We scale each rank-one term so that its column of B and its row of A have
    equal norms: invariant to H's scale, and the split that keeps a float16/bfloat16 adapter
    (and any later fine-tuning of it) well conditioned. B A is unchanged.

The adapter is written as a standard PEFT LoRA directory (`save_peft_adapter`): it loads with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pruned), adapter_dir)` and
computes W_pruned x + B A x, keeping the sparse weights sparse. `merge_adapters_` folds B A into
the weights instead, which restores a dense model.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .io.atomic import clean_stale_staging, staging_dir
from .io.export import normalize_permissions, swap_into_place
from .models.spec import is_linear, weight_view
from .registry import register
from .stats import Hessian

EIG_FLOOR = 1e-6   # eigenvalues of H are clamped to EIG_FLOOR * lam_max (see the module docstring)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class EoraConfig:
    rank: int | None = 16          # rank r of every compensated layer (capped at min(out, in))
    budget: float | None = None    # instead of rank: adapter parameters r*(out+in) as a fraction of out*in, per layer
    merge: bool = False            # fold B A into the weights: a dense model, the sparsity is gone
    adapter_dir: str = "eora_adapter"  # subdirectory of the export that receives the PEFT adapter

    def __post_init__(self):
        if self.budget is not None and self.rank == EoraConfig.rank:
            # like nm over sparsity: giving a budget replaces the default rank
            object.__setattr__(self, "rank", None)
        if (self.rank is None) == (self.budget is None):
            raise ValueError(f"set exactly one of rank and budget (got rank={self.rank!r}, budget={self.budget!r}): "
                             "rank=16 gives every layer rank 16; budget=0.05 gives each layer 5% of its "
                             "parameters as adapter parameters")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r} (16 to 128 are typical)")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not 0 < self.budget < 1):
            raise ValueError(f"budget must be a number in (0, 1), got {self.budget!r} "
                             "(0.05: adapter parameters are 5% of each compensated layer's)")
        if not isinstance(self.adapter_dir, str) or not self.adapter_dir or Path(self.adapter_dir).is_absolute() \
                or ".." in Path(self.adapter_dir).parts:
            raise ValueError(f"adapter_dir must be a relative folder name inside the export, got {self.adapter_dir!r}")
        if self.merge:
            warnings.warn("EoraConfig(merge=True) folds the low-rank compensation into the weights: the result is "
                          "a dense model and the sparsity is lost. Keep merge=False to ship the sparse model plus a "
                          "PEFT adapter.", UserWarning, stacklevel=3)


def layer_rank(cfg: EoraConfig, out_features: int, in_features: int) -> int:
    """Rank of one layer's adapter: cfg.rank, or the largest r with r*(out+in) <= budget*out*in
    (at least 1); never more than min(out, in), where the factorisation is already exact."""
    if cfg.rank is not None:
        rank = cfg.rank
    else:
        rank = max(1, int(cfg.budget * out_features * in_features / (out_features + in_features)))
    return min(rank, out_features, in_features)


def check_rank_fits(cfg: EoraConfig, shapes) -> None:
    """An explicit rank above min(out, in) of some layer would be clamped there by `layer_rank`: refuse it
    before any work, with the largest rank every layer (`shapes`: their (out, in)) can take."""
    smallest = min(min(shape) for shape in shapes)
    if cfg.rank is not None and cfg.rank > smallest:
        raise ValueError(f"EoRA rank {cfg.rank} is above what the smallest pruned layer can hold (min(out, in) = "
                         f"{smallest}); use --eora-rank {smallest} or less")


def eigen_basis(H: Tensor, eps: float = EIG_FLOOR) -> tuple[Tensor, Tensor]:
    """(Q (in, in), lam (in,)) float32 with H ~= Q diag(lam) Q^T and lam >= eps * lam_max > 0.

    Computed once per observer: q/k/v (and gate/up) read the same input and share it.
    """
    lam, Q = torch.linalg.eigh(H.double())             # (in,), (in, in); float64: H spans many decades
    top = lam.max()
    if top > 0:
        lam = lam.clamp_min(eps * top)
    else:                                              # no signal at all: weight every direction alike
        lam = torch.ones_like(lam)
    return Q.float(), lam.float()


def eora_factors(delta: Tensor, H: Tensor, rank: int, *, eps: float = EIG_FLOOR,
                 basis: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(B (out, r), A (r, in)) float32 minimising ||X (delta - B A)^T||_F for H = X^T X.

    `rank` is capped at min(out, in) (full rank reproduces delta). `basis` is `eigen_basis(H)`
    when the caller already has it (shared inputs).
    """
    delta = delta.float()                                            # (out, in)
    rank = _checked_rank(delta, rank)
    if H.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({delta.shape[1]}, {delta.shape[1]}) "
                         f"for a weight of shape {tuple(delta.shape)}")
    Q, lam = basis if basis is not None else eigen_basis(H, eps)
    Q, lam = Q.to(delta.device), lam.to(delta.device)
    projected = delta @ (Q * lam.sqrt())                             # (out, in): delta M, M = Q diag(sqrt lam)
    U, S, Vh = torch.linalg.svd(projected, full_matrices=False)      # (out, k), (k,), (k, in)
    B = U[:, :rank] * S[:rank]                                       # (out, r)
    A = (Vh[:rank] * lam.rsqrt()) @ Q.T                              # (r, in): V_r^T M^-1
    return _balanced(B, A)


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(B (out, r), A (r, in)) float32: the plain truncated SVD of delta (the unweighted baseline)."""
    delta = delta.float()                                            # (out, in)
    rank = _checked_rank(delta, rank)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return _balanced(U[:, :rank] * S[:rank], Vh[:rank])


def weighted_error(delta: Tensor, B: Tensor, A: Tensor, H: Tensor) -> float:
    """||X (delta - B A)^T||_F^2 = trace(E H E^T), E = delta - B A, from H = X^T X (float64)."""
    E = delta.double() - B.double() @ A.double()                    # (out, in)
    return float(((E @ H.double()) * E).sum())


def _checked_rank(delta: Tensor, rank: int) -> int:
    if delta.dim() != 2:
        raise ValueError(f"delta must be a 2-D (out, in) weight difference, got shape {tuple(delta.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return min(rank, *delta.shape)


def _balanced(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each rank-one term b_i a_i so that |b_i| = |a_i|; B A is unchanged."""
    b_norm, a_norm = B.norm(dim=0), A.norm(dim=1)                    # (r,), (r,)
    live = (b_norm > 0) & (a_norm > 0)
    # A term with a zero factor contributes nothing (delta of lower rank than r): zero both.
    gain = torch.where(live, (a_norm / b_norm.where(live, 1)).sqrt(), 0)  # (r,)
    B = B * gain
    A = A * torch.where(live, 1 / gain.where(live, 1), 0)[:, None]
    return B.contiguous(), A.contiguous()


# ---------------------------------------------------------------------------------------------
# adapters: {module name: (B (out, r), A (r, in))} over the names of `model.named_modules()`

@register("eora", EoraConfig, stats=Hessian, scope="compensate", calibrated=True)
class EoraCompensation:
    """EoRA as the linear engine's compensation callback (the registered function of the
    "compensate" scope: `fn(cfg)` returns the callback). After each layer is pruned, its low-rank
    residual (B, A) from the layer's Hessian, and a forward hook that adds it from then on, so later
    layers calibrate on the compensated model, as it will run. q/k/v share one Hessian, so one
    eigendecomposition serves the three."""

    def __init__(self, cfg: EoraConfig):
        self.cfg = cfg
        self.adapters: dict[str, tuple[Tensor, Tensor]] = {}     # layer name -> (B, A) on the CPU
        self.hooks: list = []
        # (weak reference to the last stats seen, eigenbasis of its H). Not its id(): once freed, a later
        # stats object can reuse the id and would get a basis of the wrong size. Weak, so that a group's
        # Hessian is freed when the engine is done with it, not held until the next group's.
        self.basis: tuple | None = None

    def __call__(self, name: str, module: nn.Module, W_dense: Tensor, W_pruned: Tensor, stats) -> None:
        rank = layer_rank(self.cfg, *W_dense.shape)
        if self.basis is None or self.basis[0]() is not stats:
            self.basis = (weakref.ref(stats), eigen_basis(stats.H))
        B, A = eora_factors(W_dense - W_pruned, stats.H, rank, basis=self.basis[1])   # (out, r), (r, in)
        self.adapters[name] = (B.cpu(), A.cpu())
        self.hooks.append(module.register_forward_hook(residual_hook(B, A)))

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def adapter_parameters(adapters: dict[str, tuple[Tensor, Tensor]]) -> int:
    """Number of adapter parameters, sum of r * (out + in)."""
    return sum(B.numel() + A.numel() for B, A in adapters.values())


def attach_adapters(model: nn.Module, adapters: dict[str, tuple[Tensor, Tensor]]) -> list:
    """Add each residual to its layer's output with a forward hook (y += x A^T B^T), without
    touching the sparse weights; returns the hook handles (call `.remove()` to detach)."""
    handles = []
    for name, (B, A) in adapters.items():
        module = _linear(model, name)
        device = next(module.parameters()).device
        handles.append(module.register_forward_hook(residual_hook(B.to(device), A.to(device))))
    return handles


def residual_hook(B: Tensor, A: Tensor):
    """A forward hook that adds x A^T B^T to a linear layer's output (the engine uses it while
    calibrating, `attach_adapters` for evaluation)."""
    def add_residual(module, args, output):
        return output + ((args[0].to(A.dtype) @ A.T) @ B.T).to(output.dtype)
    return add_residual


@torch.no_grad()
def merge_adapters_(model: nn.Module, adapters: dict[str, tuple[Tensor, Tensor]]) -> nn.Module:
    """W += B A in place, in the weight's dtype (one rounding, from float32). Dense afterwards:
    this removes the sparsity of every layer it touches."""
    for name, (B, A) in adapters.items():
        W = weight_view(_linear(model, name))                        # (out, in), a view for Conv1D
        _check_shapes(name, W.shape, B, A)
        update = B.to(W.device, torch.float32) @ A.to(W.device, torch.float32)  # (out, in)
        W.copy_((W.float() + update).to(W.dtype))
    return model


def save_peft_adapter(path: str | os.PathLike, adapters: dict[str, tuple[Tensor, Tensor]], model: nn.Module, *,
                      base_model_name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
                      overwrite: bool = False) -> Path:
    """Write `adapters` as a standard PEFT LoRA adapter directory; returns its resolved path.

    adapter_config.json + adapter_model.safetensors, written without importing peft. Every layer
    gets scaling 1 (lora_alpha = r); layers whose rank differs from the most common one are
    listed in rank_pattern/alpha_pattern; target_modules are the exact module names. GPT-2's
    Conv1D layers are written with fan_in_fan_out=True (lora_A/lora_B keep the (r, in)/(out, r)
    shapes; peft transposes only when merging). float32 storage loses nothing: peft computes
    adapters in float32 by default (autocast_adapter_dtype) even on a bfloat16 model.

    The folder is built next to `path` and renamed into place, so `path` is either the complete
    adapter or untouched. An existing `path` is replaced only with overwrite=True, and only if it
    is empty or holds an adapter_config.json. `base_model_name_or_path` is recorded as is (None by
    default: the base is the *pruned* checkpoint, not the dense model `model` was loaded from).
    """
    from safetensors.torch import save_file

    if not adapters:
        raise ValueError("no adapters to save")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d: set[str] = set()
    for name, (B, A) in adapters.items():
        module = _linear(model, name)
        _check_shapes(name, weight_view(module).shape, B, A)
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise ValueError(f"adapter for {name!r} contains NaN or inf; refusing to save it")
        if type(module).__name__ == "Conv1D":
            conv1d.add(name)
        ranks[name] = B.shape[1]
        prefix = f"base_model.model.{name}"                         # PeftModel's key layout, adapter name removed
        tensors[f"{prefix}.lora_A.weight"] = A.detach().to("cpu", dtype).contiguous()   # (r, in)
        tensors[f"{prefix}.lora_B.weight"] = B.detach().to("cpu", dtype).contiguous()   # (out, r)
    if conv1d and len(conv1d) != len(adapters):
        raise ValueError("a PEFT LoRA adapter has one fan_in_fan_out flag: cannot mix Conv1D layers "
                         f"({sorted(conv1d)[:3]}...) with nn.Linear layers in one adapter")

    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: r for name, r in ranks.items() if r != default_rank}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": default_rank,
        "lora_alpha": default_rank,          # scaling = lora_alpha / r = 1: the adapter adds exactly B A
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(adapters),
        "fan_in_fan_out": bool(conv1d),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    out = _check_adapter_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out)
    staging = staging_dir(out)          # marked: what a killed run leaves is removed by the next one
    try:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(text)
        normalize_permissions(staging)
        _check_adapter_dir(out, overwrite)                          # the world may have moved meanwhile
        swap_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, allow_pickle: bool = False):
    """`peft.PeftModel.from_pretrained(model, path)`: the pruned model plus its EoRA adapter.

    A local folder must hold the safetensors weights `save_peft_adapter` writes: without them peft falls
    back to adapter_model.bin, a pickle (which it reads with torch.load(weights_only=True), but prunekit
    reads no pickle unless asked: allow_pickle=True, as for models)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / ADAPTER_WEIGHTS).is_file() and not allow_pickle:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise ValueError(f"{folder} holds no {ADAPTER_WEIGHTS}" + (f" (only {', '.join(pickles)}, a pickle)"
                                                                   if pickles else "")
                         + "; prunekit loads adapters from safetensors only; pass allow_pickle=True if you "
                           "trust the file")
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("loading an EoRA adapter needs peft: pip install peft") from err
    return PeftModel.from_pretrained(model, os.fspath(path))


def _linear(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise KeyError(f"{type(model).__name__} has no module {name!r}; adapter names are those of "
                       "model.named_modules(), e.g. 'model.layers.0.self_attn.q_proj'") from err
    if not is_linear(module):
        raise TypeError(f"{name!r} is a {type(module).__name__}, not a linear layer")
    return module


def _check_shapes(name: str, weight_shape, B: Tensor, A: Tensor) -> None:
    out_features, in_features = weight_shape
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or B.shape[1] < 1 \
            or B.shape[0] != out_features or A.shape[1] != in_features:
        raise ValueError(f"adapter for {name!r}: B {tuple(B.shape)} and A {tuple(A.shape)} do not factor its "
                         f"({out_features}, {in_features}) weight; expected B (out, r) and A (r, in)")


def _check_adapter_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(os.path.abspath(Path(path).expanduser()))
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symlink; remove it or choose another adapter path")
    if not out.exists():
        return out
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if not overwrite:
        raise FileExistsError(f"adapter directory {out} already exists; pass overwrite=True to replace it")
    entries = [p.name for p in out.iterdir()]
    if entries and ADAPTER_CONFIG not in entries:
        raise ValueError(f"refusing to overwrite {out}: it is not empty and holds no {ADAPTER_CONFIG}")
    return out
