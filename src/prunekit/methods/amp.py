"""AMP: attention heads and MLP pruning by projecting the inputs onto the weights (Mugnaini et al.,
"Efficient LLMs with AMP: Attention Heads and MLP Pruning", arXiv 2504.21174).

A unit matters as much as what it writes, measured as the mean L1 norm over the calibration tokens:

    head n      I_n = mean_t || h_tn W_n^T ||_1      h_tn: the head's attention output for token t
                                                     (head_dim,), W_n: its o_proj columns
                                                     (hidden, head_dim), so h_tn W_n^T is the head's
                                                     contribution to the residual stream
    channel m   I_m = mean_t | act(x_t g_m) (x_t u_m) |   the gate/up pair's output: the token's input
                                                     projected onto the channel's producer rows,
                                                     which is the down projection's input column m

Both are read from the consumer's input (o_proj / down_proj) in the driver's one calibration pass,
by the observer `AMPStats` below; the head projection needs the consumer's weight, so the observer
is built per coupled group (`for_group`). For a KV-group unit ("kv" mode) the norm is taken of the
summed contribution of its query heads, the unit's projection as a whole.

Matches the paper's criterion and its uniform allocation (`uniform: true`, the default: every block
loses the same share). Differs: the paper removes the same fraction of heads and of channels; here
attention takes the whole number of heads nearest to that share of its parameters and the MLP the
rest of the block's budget, kept channels rounded to `round_to` (the shared width driver), and
`uniform: false` is available with the driver's global ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.spec import weight_view
from ..registry import register
from ..structured import Coupled, WidthConfig


def head_projection_l1(X: Tensor, W: Tensor, column_units: Tensor, units: int) -> Tensor:
    """sum_t || X_t,u W_:,u^T ||_1 for each unit u: the L1 norm of each unit's contribution to
    the consumer's output, summed over tokens.

    X: (tokens, columns) the consumer's input; W: (out, columns) its weight; column_units:
    (columns,) the unit of each column. Returns (units,).
    """
    out = torch.zeros(units, dtype=torch.float64, device=X.device)
    for unit in range(units):
        columns = (column_units == unit).nonzero().squeeze(1)                 # the unit's columns
        contribution = X[:, columns] @ W[:, columns].T                         # (tokens, out)
        out[unit] = contribution.abs().sum().double()
    return out


def channel_l1(X: Tensor) -> Tensor:
    """sum_t |X_tj| per column j: the channels' output magnitudes, (tokens, columns) -> (columns,)."""
    return X.abs().sum(dim=0).double()


class AMPStats:
    """Running sums of AMP's per-unit L1 norms over the calibration tokens (heads: the projection
    through the consumer's columns; channels: the consumer's input itself)."""
    SUMS = ("l1",)          # plain sums: observers of disjoint windows add (distributed.reduce_stats_)

    def __init__(self, group: Coupled, device):
        self.group = group
        self.project = group.kind == "heads"
        self.column_units = group.column_units.to(device)
        size = group.units if self.project else group.column_units.numel()
        self.l1 = torch.zeros(size, dtype=torch.float64, device=device)        # (units,) or (columns,)
        self.tokens = 0

    @classmethod
    def for_group(cls, group: Coupled, device) -> "AMPStats":
        return cls(group, device)

    def update(self, X: Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()                                 # (tokens, columns)
        if self.project:
            W = weight_view(self.group.consumer).detach().to(X.device).float()  # (out, columns)
            self.l1 += head_projection_l1(X, W, self.column_units.to(X.device), self.group.units)
        else:
            self.l1 += channel_l1(X)
        self.tokens += X.shape[0]

    @property
    def mean_l1(self) -> Tensor:
        """The per-token mean of the L1 norms, (units,) for heads, (columns,) for channels."""
        return self.l1 / max(self.tokens, 1)


@dataclass(frozen=True)
class AMPConfig(WidthConfig):
    pass


@register("amp", AMPConfig, scope="width", stats=AMPStats)
def amp(group: Coupled, stats: AMPStats, cfg: AMPConfig) -> Tensor:
    return stats.mean_l1                                                       # (units,) or (columns,)
