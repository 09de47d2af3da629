"""D-Pruner: unstructured pruning that keeps a domain's weights without losing the general ones
(Zhang, Liu, Zhao et al., "Pruning as a Domain-specific LLM Extractor", NAACL Findings 2024,
arXiv 2405.06275).

The paper, in three steps (its Sec. 3):
1. general importance: on open-domain calibration text, the loss change of removing each weight,
   by a second-order Taylor expansion with the empirical Fisher as the Hessian,
       G = | -g_g W + 1/2 F_g W^2 |,   g = mean_s dL_s/dW,  F = mean_s (dL_s/dW)^2
   (s the calibration windows, L the next-token loss; removing W_ij moves it by -W_ij);
2. a regularised domain loss that penalises moving the generally important weights,
       L' = L_domain + lambda * sum_ij G_ij (W'_ij - W_ij)^2;
3. the dual importance: the same Taylor estimate of removing each weight, now for L' on the domain
   calibration text. The regulariser's gradient is zero at W' = W and its curvature is 2 lambda G, so
       S = | -g_d W + 1/2 F_d W^2 + lambda G W^2 |,
   and each layer keeps the weights of highest S (per output row here, like Wanda; `per: layer` ranks
   the whole matrix).
The domain windows are the calibration set (`--calib code`, or `--domain code`, which sets it);
the general windows are drawn by the method itself from the `general` source through
`prunekit.data.calibration_data` (default: the other offline domain, `prose` for a `code` domain and
`code` for a `prose` one; `prose` when no domain is named), with the model's own tokenizer
(`model.name_or_path`) and the calibration windows' length.

Where we interpret (the reference code is not public):
- lambda is made scale-free: G is a loss and F_d a loss per squared weight, so the paper's lambda
  depends on the model's weight scale; we rescale G per layer by mean(F_d) / mean(G) before it
  enters S, so lambda = 1 weighs the general curvature like the domain curvature;
- the Fisher is the mean over windows of the squared per-window gradient (one window = one sample),
  from `gradient_samples` domain and `general_samples` general windows;
- one-shot: every score is taken on the dense model in one pre-pass (two full-model backward passes
  per window set), not re-estimated between layers;
- distributed calibration is refused (the general windows are not sharded).

How the scores reach the linear engine: `d_pruner_prescore(model, calib, cfg, names=...)` returns
{layer name: S}; the engine hands each layer its S as `stats.grad` (`gradients.WithGradient`), the
channel it already uses for model gradients, and `d_pruner` keeps the highest. The linear driver
(`prune._prune_linear`) must run a linear method's registered `prescore` and put its result in
`LinearOptions.gradients` for that (three lines); without it `d_pruner` receives no scores and says so.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..config import SparsityConfig
from ..data import ALIASES, DOMAINS, calibration_data
from ..gradients import linear_modules, window_gradients
from ..masks import lowest
from ..models.spec import get_module, weight_view
from ..registry import register


@dataclass(frozen=True)
class DPrunerConfig(SparsityConfig):
    domain: str | None = None        # what the calibration windows hold (code, prose, ...); picks `general`'s default
    general: str | None = None       # open-domain text for the general importance; None: the other domain (or prose)
    lam: float = 1.0                 # weight of the generality regulariser, scale-free (see the module docstring)
    gradient_samples: int = 32       # domain calibration windows backpropagated (the first ones)
    general_samples: int = 32        # general windows drawn and backpropagated
    seed: int = 0                    # seeds the draw of the general windows

    def __post_init__(self):
        super().__post_init__()
        for name in ("domain", "general"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a calibration source name such as {' or '.join(DOMAINS)}, "
                                 f"got {value!r}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) \
                or self.lam < 0:
            raise ValueError(f"lam must be a finite number >= 0 (1 weighs general and domain curvature alike, 0 "
                             f"ignores the general data), got {self.lam!r}")
        for name in ("gradient_samples", "general_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'seed' else 1}, got {value!r}")
        domain = _canonical(self.domain)
        if domain is not None and domain == _canonical(self.general_source):
            raise ValueError(f"d-pruner: the general data ({self.general_source}) is the domain data ({self.domain}); "
                             f"regularise with another corpus, e.g. domain: code with general: prose "
                             f"(--domain code), or domain: prose with general: code")

    @property
    def general_source(self) -> str:
        """The general (open-domain) calibration source: `general`, else the other offline domain."""
        if self.general is not None:
            return self.general
        domain = _canonical(self.domain)
        others = [d for d in DOMAINS if domain is not None and _canonical(d) != domain]
        return others[0] if domain in {_canonical(d) for d in DOMAINS} else "prose"


def _canonical(source: str | None) -> str | None:
    return None if source is None else ALIASES.get(source, source)


# ----------------------------------------------------------------------------- the math

def taylor_importance(W: Tensor, grad: Tensor, fisher: Tensor) -> Tensor:
    """|loss change| of setting each weight to zero, second order with the empirical Fisher as the
    Hessian's diagonal: | -g W + 1/2 F W^2 | (the paper's general importance). All (out, in)."""
    return (-grad * W + 0.5 * fisher * W.square()).abs()


def dual_importance(W: Tensor, grad: Tensor, fisher: Tensor, general: Tensor, lam: float) -> Tensor:
    """D-Pruner's score: the Taylor estimate of removing each weight for the regularised domain loss,
    | -g_d W + 1/2 F_d W^2 + lam * G' W^2 |, G' = G * mean(F_d) / mean(G) (scale-free lambda; G' = 0 when
    G is all zero). W, grad (g_d), fisher (F_d), general (G): (out, in). Returns (out, in)."""
    scale = fisher.double().mean() / general.double().mean() if float(general.double().mean()) > 0 else 0.0
    regulariser = lam * float(scale) * general                                              # (out, in)
    return (-grad * W + (0.5 * fisher + regulariser) * W.square()).abs()


# ----------------------------------------------------------------------------- the pre-pass

def gradient_moments(model: nn.Module, windows: Tensor, names: list[str], *, device=None,
                     progress: bool = True) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (mean_s dL_s/dW, mean_s (dL_s/dW)^2)}, each (out, in) float32 on the CPU, over the
    `windows` (n, seqlen) one at a time; L_s the mean next-token cross-entropy of window s. Neither
    the weights, their `requires_grad` nor their `.grad` change (`gradients.window_gradients`)."""
    if windows.shape[0] < 1:
        raise ValueError("d-pruner needs at least one calibration window for each gradient pass")
    shapes = [weight_view(module).shape for module in linear_modules(model, names).values()]
    sums = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    squares = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    with contextlib.closing(window_gradients(model, windows, names, device=device, desc="d-pruner gradients",
                                             progress=progress)) as per_window:
        for grads in per_window:
            for total, square, grad in zip(sums, squares, grads):
                grad = grad.double().cpu()                                               # (out, in)
                total += grad
                square += grad.square()
    n = windows.shape[0]
    return {name: ((total / n).float(), (square / n).float()) for name, total, square in zip(names, sums, squares)}


def layer_importances(model: nn.Module, domain: Tensor, general: Tensor, names: list[str], cfg: DPrunerConfig, *,
                      device=None, progress: bool = True) -> dict[str, Tensor]:
    """{name: S} for the linears `names`: G from the `general` windows, then S from the `domain` windows
    (token ids, (n, seqlen) each). The general moments are freed before the domain pass."""
    general_importance = {}
    for name, (grad, fisher) in gradient_moments(model, general, names, device=device, progress=progress).items():
        general_importance[name] = taylor_importance(_dense(model, name), grad, fisher)
    scores = {}
    for name, (grad, fisher) in gradient_moments(model, domain, names, device=device, progress=progress).items():
        scores[name] = dual_importance(_dense(model, name), grad, fisher, general_importance.pop(name), cfg.lam)
    return scores


def _dense(model: nn.Module, name: str) -> Tensor:
    return weight_view(get_module(model, name)).detach().float().cpu()                 # (out, in)


def general_windows(model: nn.Module, cfg: DPrunerConfig, seqlen: int) -> Tensor:
    """`general_samples` windows of `seqlen` tokens of the general source, tokenized with the model's own
    tokenizer (found at `model.name_or_path`)."""
    from transformers import AutoTokenizer
    location = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not location:
        raise ValueError("d-pruner draws its general calibration text with the model's tokenizer, found at "
                         "model.name_or_path, which this model lacks; load it with from_pretrained / prunekit.load, "
                         "or compute the scores with layer_importances(model, domain_ids, general_ids, ...)")
    tokenizer = AutoTokenizer.from_pretrained(location)
    return calibration_data(tokenizer, cfg.general_source, samples=cfg.general_samples, seqlen=seqlen, seed=cfg.seed)


def d_pruner_prescore(model: nn.Module, calib: Tensor, cfg: DPrunerConfig, *, names: list[str], device=None,
                      progress: bool = True, **_) -> dict[str, Tensor]:
    """Every pruned layer's dual importance S, from the first `gradient_samples` calibration (domain)
    windows and `general_samples` windows of the general source: {layer name: (out, in) float32 CPU}."""
    distributed.refuse("d-pruner")
    general = general_windows(model, cfg, seqlen=int(calib.shape[1]))
    return layer_importances(model, calib[:cfg.gradient_samples], general, names, cfg, device=device,
                             progress=progress)


# ----------------------------------------------------------------------------- the method

def d_pruner_score(W: Tensor, stats, cfg: DPrunerConfig) -> Tensor:
    """The layer's dual importance S as the engine hands it over (`stats.grad`), (out, in)."""
    score = getattr(stats, "grad", None)
    if score is None:
        raise TypeError("d-pruner scores every weight in a whole-model pre-pass (d_pruner_prescore: gradients on "
                        "the general and the domain windows), and the linear driver did not hand those scores "
                        "over: it does not run a linear method's registered prescore yet (prune._prune_linear)")
    if score.shape != W.shape:
        raise ValueError(f"d-pruner: a score of shape {tuple(score.shape)} for a weight of shape {tuple(W.shape)}")
    return score.to(W.device)


@register("d-pruner", DPrunerConfig, calibrated=True, score=d_pruner_score, prescore=d_pruner_prescore)
def d_pruner(W: Tensor, stats, cfg: DPrunerConfig) -> Tensor:
    return W.masked_fill(lowest(d_pruner_score(W, stats, cfg), cfg.sparsity, cfg.nm, cfg.per), 0)
