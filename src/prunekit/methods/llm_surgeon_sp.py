"""The structured LLM Surgeon: remove whole attention heads and FFN channels by their Kronecker-factored
cost, in several shots, with the correlated update of the layer that reads them (van der Ouderaa et al.,
arXiv 2312.17244, Sec. 3.3-3.5, "structured pruning": rows and columns).

A unit of the width driver (`structured.py`: an FFN channel, a query head, a KV group) lives in two
places: rows of its producers (gate/up, q/k/v) and columns Q of its consumer (down, o). Removing it is
one event: the consumer's inputs Q become zero. Under the consumer's Kronecker factors F ~= G (x) A
(A = X^T X of its input, G = E[g g^T] of the loss gradient at its output), removing the whole columns Q
and moving every other weight optimally costs (the paper's column cost; for one column j it is
1/2 w_j^T G w_j / [A^-1]_jj)

    cost(Q) = 1/2 tr( W_:,Q^T G W_:,Q [A^-1]_QQ^-1 )                                   (W: (out, columns))

and the update is  dW = -W_:,Q [A^-1]_QQ^-1 [A^-1]_Q,:  , in which G cancels: every row loses the
same columns. The producers' rows go with the unit. The paper prunes each layer's rows and columns
independently by one threshold, a removed row leaving a dead column behind it; removing a unit for
real (a smaller checkpoint) takes both at once, and its cost is the column cost above (the row costs
of the producers estimate the same event without the consumer's compensation, so adding them would
count it twice). Rows of the consumer (the residual stream's width) are not removed: no stock
config describes a per-layer hidden size.

Shots (Sec. 3.5). In uniform mode (the default) the driver tells each group how many units it keeps
(`Coupled.target_keep`), and the method removes them in `shots` rounds on a linear schedule: each
round ranks the units left by their cost on the weights the earlier rounds updated, removes the
cheapest (query heads: the same number from every KV group), applies the update, and downdates A^-1
to the columns that remain (A^-1 <- A^-1 - A^-1_:,Q [A^-1]_QQ^-1 A^-1_Q,:, the inverse of A over
the kept columns). The returned scores put the units in that order (the removed first, by round),
so the driver removes exactly them; its `liar` compensation then applies the update for the final
set in one solve, which equals the chain of per-round updates (OBS updates on one quadratic
compose) up to where the damping goes. Non-uniform mode ranks every block's units together after
all are scored, so no block knows its count while scored: there the scores are one round's costs.

Curvature (`curvature`, G of the consumer; A is always the consumer input's X^T X):
  "kfac"      (default) the paper's full G (out, out), summed over the tokens of the first
              `gradient_samples` windows from one whole-model backward pass each
              (`gradients.output_covariances`), on the dense model before the block loop
  "gradient"  its diagonal only (out floats per consumer, same pass)
  "identity"  G = I: the cost is the layer-wise OBS cost of removing the columns (ZipLM's), no
              backward pass

Damping: A gets `damp` x mean diag(A), G gets `damp_g` x mean diag(G) (as `llm-surgeon`).
Scale of G: its sum over tokens, not a mean; it multiplies every cost of a group alike, so uniform
mode is unaffected and non-uniform mode standardizes scores per group first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..gradients import output_covariances
from ..models import spec_for
from ..models.spec import get_module
from ..registry import register
from ..stats import Hessian
from ..structured import Coupled, WidthConfig, coupled_groups
from ..updates import OBS_DAMP
from .llm_surgeon import damped_factor

SP_CURVATURES = ("kfac", "gradient", "identity")


@dataclass(frozen=True)
class LLMSurgeonSPConfig(WidthConfig):
    shots: int = 5                 # rounds on the linear schedule (the paper's 5); uniform mode
    curvature: str = "kfac"        # G of the consumer: "kfac" (full), "gradient" (diagonal), "identity" (G = I)
    damp: float = OBS_DAMP         # dampening of A, a fraction of its mean diagonal
    damp_g: float = 0.1            # dampening of G, a fraction of its mean diagonal (the reference's damp_g)
    gradient_samples: int = 32     # calibration windows backpropagated for G
    compensate: str = "liar"       # the correlated update of the consumer is part of the method

    def __post_init__(self):
        super().__post_init__()
        if self.compensate not in ("auto", "liar"):
            raise ValueError(f"llm-surgeon-sp removes columns together with their correlated update (compensate "
                             f"'liar', the default); got compensate={self.compensate!r}: use another width method for "
                             "scores alone or a bias fold")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or not 1 <= self.shots <= 100:
            raise ValueError(f"shots must be an integer in [1, 100], got {self.shots!r} (5 is the paper's)")
        if self.curvature not in SP_CURVATURES:
            raise ValueError(f"curvature must be 'kfac' (the full output-gradient covariance G), 'gradient' (its "
                             f"diagonal) or 'identity' (G = I, no backward pass), got {self.curvature!r}")
        for name, value in (("damp", self.damp), ("damp_g", self.damp_g)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 10:
                raise ValueError(f"{name} must be a number in [0, 10), got {value!r} (0.01 for damp, 0.1 for "
                                 "damp_g are the usual values)")
        if isinstance(self.gradient_samples, bool) or not isinstance(self.gradient_samples, int) \
                or self.gradient_samples < 1:
            raise ValueError(f"gradient_samples must be an integer >= 1, got {self.gradient_samples!r}")

    @property
    def compensation(self) -> str:
        return "liar"


# ----------------------------------------------------------------------------- the math (pure)

def unit_columns(column_units: Tensor, units: int) -> Tensor:
    """(units, q) consumer columns of each unit, every unit holding the same number q of columns."""
    order = torch.argsort(column_units, stable=True)
    per_unit = column_units.numel() // units
    if per_unit * units != column_units.numel() or not torch.equal(column_units[order].reshape(units, per_unit),
                                                                  torch.arange(units)[:, None].expand(-1, per_unit)):
        raise ValueError("every unit must own the same number of consumer columns")
    return order.reshape(units, per_unit)


def column_costs(W: Tensor, G: Tensor | None, Ainv: Tensor, columns: Tensor) -> Tensor:
    """cost(Q_u) = 1/2 tr(W_Q^T G W_Q [A^-1]_QQ^-1) for every unit u, columns: (units, q) -> (units,).
    W: (out, in); G: (out, out), its diagonal (out,), or None (G = I); Ainv: (in, in)."""
    if G is None:
        GW = W
    elif G.dim() == 1:
        GW = G[:, None] * W
    else:
        GW = G @ W                                                           # (out, in)
    Wq, GWq = W[:, columns], GW[:, columns]                                  # (out, units, q)
    M = torch.einsum("oup,ouq->upq", Wq, GWq)                                # (units, q, q): W_Q^T G W_Q
    C = Ainv[columns[:, :, None], columns[:, None, :]]                        # (units, q, q): [A^-1]_QQ
    return 0.5 * torch.linalg.solve(C, M).diagonal(dim1=1, dim2=2).sum(dim=1)


def remove_columns(W: Tensor, Ainv: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """Remove the columns Q: the updated W (Q zero, the rest moved by -W_:,Q [A^-1]_QQ^-1 [A^-1]_Q,:)
    and A^-1 downdated to the remaining columns (rows and columns Q zero)."""
    C = Ainv[Q][:, Q]                                                        # (q, q)
    K = torch.linalg.solve(C, Ainv[Q])                                       # (q, in): [A^-1]_QQ^-1 [A^-1]_Q,:
    W = W - W[:, Q] @ K
    Ainv = Ainv - Ainv[:, Q] @ K
    W[:, Q] = 0
    Ainv[Q, :] = 0
    Ainv[:, Q] = 0
    return W, Ainv


def surgeon_order(W: Tensor, G: Tensor | None, Ainv: Tensor, columns: Tensor, n_remove: int, shots: int,
                  per_group: int = 1) -> Tensor:
    """Scores (units,), lower removed first: `n_remove` units taken in `shots` rounds on a linear schedule,
    each round the cheapest by `column_costs` on the weights the earlier rounds updated; with `per_group`
    > 1 (query heads sharing a KV head) every round takes the same number from each KV group. The removed
    units score -(n_remove - position), the rest their final cost (>= 0)."""
    units = columns.shape[0]
    W, Ainv = W.double(), Ainv.double()
    G = None if G is None else G.double()
    groups = units // per_group if per_group > 1 else 1
    step = groups if per_group > 1 else 1                                    # removals per round come in these
    alive = torch.ones(units, dtype=torch.bool)
    order: list[int] = []
    for shot in range(1, shots + 1):
        target = n_remove if shot == shots else int(round(n_remove * shot / shots / step)) * step
        take = target - len(order)
        if take <= 0:
            continue
        cost = torch.full((units,), float("inf"), dtype=torch.float64)
        cost[alive] = column_costs(W, G, Ainv, columns[alive.to(columns.device)]).cpu()   # removed: A^-1 rows zero
        if per_group > 1:
            by_group = cost.reshape(groups, per_group)
            picked = by_group.topk(take // groups, dim=1, largest=False).indices + \
                torch.arange(groups)[:, None] * per_group
            picked = picked.flatten()
            picked = picked[torch.argsort(cost[picked], stable=True)]
        else:
            picked = torch.argsort(cost, stable=True)[:take]
        order.extend(int(u) for u in picked)
        alive[picked] = False
        W, Ainv = remove_columns(W, Ainv, columns[picked.to(columns.device)].flatten())
    scores = torch.zeros(units, dtype=torch.float64)
    if alive.any():
        scores[alive] = column_costs(W, G, Ainv, columns[alive.to(columns.device)]).cpu().clamp_min(0)
    for position, unit in enumerate(order):
        scores[unit] = -float(len(order) - position)
    return scores


# ----------------------------------------------------------------------------- the driver's side

def _consumer_names(model: nn.Module, cfg: LLMSurgeonSPConfig) -> dict[int, list[str]]:
    """{block: [consumer module name per coupled group]}, in the driver's group order."""
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    return {index: [group.name for group in coupled_groups(model, index, block, cfg)]
            for index, block in enumerate(blocks)}


def llm_surgeon_sp_prescore(model: nn.Module, calib: Tensor, cfg: LLMSurgeonSPConfig, *, device=None,
                            progress: bool = True, **_) -> dict[int, list[Tensor | None]]:
    """{block: [G of each group's consumer]}: (out, out) for kfac, (out,) for gradient, None for identity."""
    names = _consumer_names(model, cfg)
    if cfg.curvature == "identity":
        return {index: [None] * len(group_names) for index, group_names in names.items()}
    flat = [name for group_names in names.values() for name in group_names]
    G = output_covariances(model, calib, flat, samples=cfg.gradient_samples, device=device, progress=progress,
                           first_window=distributed.offset(calib.shape[0]), diagonal=cfg.curvature == "gradient")
    return {index: [G[name] for name in group_names] for index, group_names in names.items()}


@register("llm-surgeon-sp", LLMSurgeonSPConfig, scope="width", stats=Hessian, calibrated=True,
          prescore=llm_surgeon_sp_prescore)
def llm_surgeon_sp(group: Coupled, inputs: tuple, cfg: LLMSurgeonSPConfig) -> Tensor:
    hessian, G = inputs                                                      # the driver's (observer, prescore)
    if not isinstance(hessian, Hessian):
        raise TypeError("llm-surgeon-sp needs the consumer input's X^T X (stats.Hessian), got "
                        f"{type(hessian).__name__}")
    _, W = group.weights()                                                   # (out, columns)
    U, _, _ = hessian.inverse_cholesky(cfg.damp)                             # U^T U = (A + lambda I)^-1
    Ainv = (U.T @ U).to(W.device)                                            # (columns, columns)
    if G is not None:
        G = damped_factor(G.to(W.device), cfg.damp_g)                        # (out, out) or (out,)
    columns = unit_columns(group.column_units, group.units).to(W.device)
    if group.target_keep is None:                                            # non-uniform: one round's costs
        return column_costs(W.double(), None if G is None else G.double(), Ainv.double(), columns).cpu()
    return surgeon_order(W, G, Ainv, columns, group.units - group.target_keep, cfg.shots,
                         group.per_group if group.kind == "heads" else 1)
