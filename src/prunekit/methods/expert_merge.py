"""Expert merging: HC-SMoE (Chen et al., "Retraining-Free Merging of Sparse MoE via Hierarchical
Clustering", arXiv 2410.08589, ICML 2025), written out as a stock checkpoint.

Instead of dropping experts, each MoE block's routed experts are grouped into `keep` clusters and
every cluster becomes one expert:

    features     f_j = (1 / T) sum_t E_j(x_t), expert j's mean output (weight 1) over a shared
                 sample of the block's calibration tokens, EVERY sampled token through EVERY expert
                 (HC-SMoE's "expert-output" similarity: it does not depend on the routing)
    clusters     agglomerative clustering with average linkage (UPGMA) on the Euclidean distances
                 ||f_i - f_j||, until `keep` clusters remain (the paper's setting); with grouped
                 routing (DeepSeek-V3's `n_group`) each group is clustered alone into keep / n_group
                 clusters, so every group keeps the same count and no cluster spans two groups
    experts      the merged expert is the frequency-weighted average of its members' parameters
                 (gate_up_proj, down_proj, and gpt-oss's biases), the weights the numbers of
                 calibration tokens routed to each member (`statistics().counts`); uniform when no
                 token reached any member
    router       ONE router row per cluster (HC-SMoE keeps every member's row pointing at the merged
                 expert, which a stock loader cannot read): see below

The merged expert is written into the slot of the cluster's most frequent member (ties: the lower
index), and the other slots are removed (`surgery.keep_experts_`). The registered score is that
representative's 1 + its frequency share, and every other member's share, so `choose` keeps exactly
the representatives.

The router row of a merged cluster (`router=`):

    "frequent"   the row of the most frequent member (the default)
    "average"    the frequency-weighted average of the members' rows
    "fit"        a least-squares row on the calibration router inputs x whose logit reproduces the
                 cluster's summed routing probability: target log sum_{j in c} exp(logit_j), so that
                 a softmax over the clusters gives exactly sum_{j in c} p_j (sigmoid routers: the
                 logit of the members' summed sigmoid scores, clipped below 1), ridge towards the
                 "average" row

Measured: mean squared error of each MoE block's output against the unpruned block, divided by the
mean square of the unpruned output, averaged over blocks; 8 -> 4 experts per block, every block on
the unpruned model's inputs, the calibration tokens [and as many held-out tokens]:

                                                       frequent       average        fit
    tiny models (tests/conftest.py, 3 seeds, 256 random-id tokens per block, every MoE block)
        mixtral                                        .873 [.885]    .948 [.939]    .826 [.905]
        granitemoe                                     .874 [.886]    .951 [.941]    .827 [.907]
        phimoe                                         .962 [.964]    .975 [.968]    .916 [.926]
        qwen2_moe                                      .547 [.556]    .591 [.596]    .501 [.538]
        qwen3_moe                                      .857 [.870]    .940 [.972]    .800 [.880]
        olmoe                                          .895 [.928]    .956 [.966]    .827 [.933]
        deepseek_v3                                    .729 [.716]    .722 [.722]    .702 [.721]
        glm4_moe                                       .342 [.341]    .326 [.330]    .313 [.353]
        gpt_oss                                        .853 [.868]    .950 [.949]    .671 [.684]
    SmolLM2-135M made a top-2-of-8 Mixtral by MoEfication (an early version of `bench/make_moe.py`,
    a weak proxy whose perplexity was far above the dense model's), 30 blocks, 1024 tokens of the
    default corpus [1024 of its evaluation split]
                                                       .397 [.451]    .437 [.490]    .501 [.489]
        "frequent" is the best of the three in 24 of 30 blocks (calibration and held-out alike)

"fit" is the best on the calibration tokens of every tiny model, but on held-out tokens its lead
reverses (mixtral, granitemoe, olmoe, qwen3_moe, deepseek_v3, glm4_moe) or shrinks, except for
gpt-oss (router bias, top-k then softmax: .684 against .868); on real text it is the worst, because
a summed-probability logit assumes the merged expert acts like each member, which an average of
unlike experts does not. "frequent" is the default: the best on real text (and on the held-out
tokens of 5 of the 9 tiny families), and exact where merging can be exact (a duplicate expert with
the same router row under top-1 routing, in the tests; under top-2 the two copies are always chosen
together, and after the merge their second slot goes to another expert, so no rule is exact).

Router bias (gpt-oss) and `e_score_correction_bias` (DeepSeek-V3, GLM-4-MoE) follow the same rule:
the most frequent member's, or the frequency-weighted average; "fit" fits the router bias as the
intercept and takes the average correction bias (it shifts the choice score, not a logit, so there
is no logit target to fit).

Measured alongside, as a warning: removing the same non-representatives WITHOUT merging gave lower
errors still (tiny .769 [.811] for mixtral; proxy .333 [.363]). Averaging the weights of experts
that are not alike makes an expert unlike any of them; merging pays off only when the members'
functions are close, which is the premise of HC-SMoE's output clustering.

Uniform mode only: the clusters need the block's count and its calibration tokens, which
non-uniform mode no longer has when it removes (it scores every block first).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import distributed
from ..experts import ExpertsConfig, RoutedTokens
from ..models.moe import expert_count, groups_of
from ..models.spec import get_module
from ..registry import register
from ..surgery import keep_experts_

ROUTER_RULES = ("frequent", "average", "fit")
SIGMOID_CEILING = 0.999          # "fit" on sigmoid routers: the summed scores are clipped below 1


@dataclass(frozen=True)
class ExpertMergeConfig(ExpertsConfig):
    router: str = "frequent"       # the merged router row: one of ROUTER_RULES (module docstring)
    max_tokens: int = 4096         # calibration tokens per block (per process) for the features and the fit
    ridge: float = 1e-2            # "fit": ridge towards the average row, relative to the mean diagonal of x^T x

    def __post_init__(self):
        super().__post_init__()
        if not self.uniform:
            raise ValueError("expert-merge clusters each block's experts on its own calibration tokens as the block "
                             "is pruned: it needs uniform counts (drop --non-uniform)")
        if self.router not in ROUTER_RULES:
            raise ValueError(f"router must be one of {', '.join(ROUTER_RULES)} (how a merged cluster's router row is "
                             f"built), got {self.router!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise ValueError(f"ridge must be a positive number, got {self.ridge!r}")


# --- pure tensor math ---------------------------------------------------------------------------

def average_linkage(distances: Tensor, count: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage (UPGMA) of the points whose pairwise distances
    are `distances` (n, n), until `count` clusters remain. Each step joins the two clusters whose
    mean pairwise distance is smallest (ties: the lowest pair of first members). Returns the clusters
    as sorted member lists, ordered by their first member."""
    size = distances.shape[0]
    if not 1 <= count <= size:
        raise ValueError(f"cannot make {count} clusters of {size} points")
    between = distances.double().clone()                                        # (n, n)
    between.fill_diagonal_(float("inf"))
    members = {i: [i] for i in range(size)}
    while len(members) > count:
        flat = int(torch.argmin(between))                                       # first minimum, row-major
        first, second = sorted(divmod(flat, size))
        n_first, n_second = len(members[first]), len(members[second])
        joined = (n_first * between[first] + n_second * between[second]) / (n_first + n_second)   # (n,)
        between[first], between[:, first] = joined, joined
        between[first, first] = float("inf")
        between[second], between[:, second] = float("inf"), float("inf")
        members[first] = sorted(members[first] + members.pop(second))
    return [members[i] for i in sorted(members)]


def cluster_experts(distances: Tensor, keep: int, groups: int = 1) -> list[list[int]]:
    """`keep` clusters of the experts whose pairwise distances are `distances` (E, E); with routing
    groups, keep / groups clusters inside each of the `groups` equal, contiguous groups."""
    experts = distances.shape[0]
    if experts % groups or keep % groups:
        raise ValueError(f"{experts} experts in {groups} groups cannot keep {keep} clusters equally per group")
    per_group = experts // groups
    clusters = []
    for group in range(groups):
        start = group * per_group
        part = distances[start:start + per_group, start:start + per_group]
        clusters += [[start + i for i in cluster] for cluster in average_linkage(part, keep // groups)]
    return clusters


def merge_weights(frequencies: Tensor) -> Tensor:
    """The averaging weights (m,) of a cluster's members: their frequencies normalised to sum 1,
    uniform when every frequency is zero."""
    frequencies = frequencies.double().clamp(min=0)
    total = float(frequencies.sum())
    if total == 0:
        return torch.full_like(frequencies, 1 / frequencies.numel())
    return frequencies / total


def weighted_average(tensors: Tensor, frequencies: Tensor) -> Tensor:
    """sum_i w_i tensors[i] with w = `merge_weights(frequencies)`: (m, ...) -> (...), in float32 or
    wider, returned in the tensors' dtype."""
    weights = merge_weights(frequencies)
    wide = torch.promote_types(tensors.dtype, torch.float32)
    weights = weights.to(device=tensors.device, dtype=wide).view(-1, *([1] * (tensors.dim() - 1)))
    return (tensors.to(wide) * weights).sum(dim=0).to(tensors.dtype)


def representatives(clusters: list[list[int]], frequencies: Tensor) -> list[int]:
    """Each cluster's most frequent member (ties: the lower index)."""
    return [max(cluster, key=lambda j: (float(frequencies[j]), -j)) for cluster in clusters]


def representative_scores(clusters: list[list[int]], frequencies: Tensor) -> Tensor:
    """Scores (E,) that `choose` turns into exactly the representatives: 1 + share for each
    cluster's representative, the share (< 1) for every other member."""
    scores = merge_weights(frequencies).clone()                                  # (E,)
    for representative in representatives(clusters, frequencies):
        scores[representative] += 1
    return scores


def fit_router_row(x: Tensor, target: Tensor, prior: Tensor, ridge: float, intercept: bool = False) -> Tensor:
    """The router row w (H,) (with `intercept`, (H + 1,): the row and the bias) that minimises
    ||[x, 1] w - target||^2 + lam ||w - prior||^2 with lam = ridge x the mean diagonal of x^T x:
    x (N, H), target (N,) logits, prior (H,) or (H + 1,). Normal equations in float64 (their sums
    add across processes)."""
    x = x.double()
    if intercept:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)                    # (N, H + 1)
    gram = x.T @ x                                                               # (H, H)
    moment = x.T @ target.double().to(x.device)                                  # (H,)
    distributed.all_reduce_sum_(gram)
    distributed.all_reduce_sum_(moment)
    lam = ridge * max(float(gram.diagonal().mean()), 1e-12)
    prior = prior.double().to(x.device)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, moment + lam * prior)


def cluster_logit(logits: Tensor, routing: str) -> Tensor:
    """The logit (N,) whose routing probability is the cluster's summed probability, from the
    members' logits (N, m): log sum exp for softmax-like routers; for sigmoid routers the logit of
    the summed sigmoid scores, clipped below 1 (SIGMOID_CEILING)."""
    logits = logits.double()
    if routing == "sigmoid-grouped":
        total = logits.sigmoid().sum(dim=1).clamp(max=SIGMOID_CEILING)
        return torch.log(total) - torch.log1p(-total)
    return torch.logsumexp(logits, dim=1)


# --- the block ------------------------------------------------------------------------------------

_CLUSTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # routed -> (keep, clusters), one block


@torch.no_grad()
def mean_outputs(routed: RoutedTokens, rows: Tensor) -> Tensor:
    """(E, H) float64: every expert's mean output (weight 1) over the tokens `rows`, every process's."""
    sums = torch.stack([routed.expert_output(j, rows).double().sum(dim=0) for j in range(routed.num_experts)])
    count = torch.tensor([float(rows.numel())], dtype=torch.float64, device=sums.device)
    distributed.all_reduce_sum_(sums)
    distributed.all_reduce_sum_(count)
    return sums / max(float(count), 1.0)


def block_clusters(routed: RoutedTokens, cfg: ExpertMergeConfig, keep: int) -> list[list[int]]:
    """The block's clusters (computed once per block and count)."""
    cached = _CLUSTERS.get(routed)
    if cached is not None and cached[0] == keep:
        return cached[1]
    features = mean_outputs(routed, routed.sample(cfg.max_tokens))           # (E, H)
    clusters = cluster_experts(torch.cdist(features, features), keep, groups_of(routed.router))
    _CLUSTERS[routed] = (keep, clusters)
    return clusters


def merge_experts_(block: nn.Module, moe, routed: RoutedTokens | None, kept: Tensor, cfg: ExpertMergeConfig) -> None:
    """Merge each cluster into its representative's slot (experts, router row, biases), then keep
    only the representatives `kept` (see the module docstring)."""
    if routed is None:
        raise ValueError("expert-merge needs the block's calibration tokens when it merges (uniform mode)")
    kept = torch.as_tensor(kept, dtype=torch.long).cpu()
    clusters = block_clusters(routed, cfg, kept.numel())
    frequencies = routed.statistics().counts.double().cpu()                        # (E,)
    chosen = representatives(clusters, frequencies)
    if sorted(chosen) != sorted(kept.tolist()):
        raise ValueError(f"block {routed.block_index}: the experts to keep {kept.tolist()} are not the clusters' "
                         f"representatives {sorted(chosen)}")
    experts, router = get_module(block, moe.experts), get_module(block, moe.router)
    count = expert_count(block, moe)
    rows = routed.sample(cfg.max_tokens) if cfg.router == "fit" else None
    for cluster, representative in zip(clusters, chosen):
        if len(cluster) == 1:
            continue
        members = torch.tensor(cluster, dtype=torch.long)
        weights = frequencies[members]
        for param in experts.parameters(recurse=False):                           # (E, 2I, H), (E, H, I), biases
            if param.shape[0] == count:
                index = members.to(param.device)
                param.data[representative] = weighted_average(param.data[index], weights)
        _merge_router_(router, moe, routed, rows, members, representative, weights, cfg)
    keep_experts_(block, moe, kept)


def _merge_router_(router, moe, routed, rows, members: Tensor, representative: int, weights: Tensor,
                   cfg: ExpertMergeConfig) -> None:
    """Write one cluster's router row (and router bias, correction bias) into the representative's slot.

    The router's buffers with one entry per expert (DeepSeek-V3's `e_score_correction_bias`) are
    found as `surgery.keep_experts_` finds them, and averaged under "average" and "fit"."""
    if cfg.router == "frequent":
        return                                                     # the representative's own row stays
    bias = getattr(router, "bias", None)
    count = router.weight.shape[0]
    for buffer in router.buffers(recurse=False):
        if buffer.dim() and buffer.shape[0] == count:
            buffer[representative] = weighted_average(buffer[members.to(buffer.device)], weights)
    index = members.to(router.weight.device)
    row = weighted_average(router.weight.data[index], weights)                  # (H,)
    row_bias = weighted_average(bias.data[index], weights) if bias is not None else None
    if cfg.router == "fit":
        target = cluster_logit(routed.logits[rows][:, members.to(routed.logits.device)], moe.routing)   # (N,)
        prior = row if row_bias is None else torch.cat([row, row_bias.view(1)])
        solved = fit_router_row(routed.x[rows], target, prior, cfg.ridge, intercept=bias is not None)
        row = solved[:row.numel()].to(row.dtype)
        if bias is not None:
            row_bias = solved[-1].to(device=bias.device, dtype=bias.dtype)
    router.weight.data[representative] = row.to(router.weight.device)
    if bias is not None:
        bias.data[representative] = row_bias


@register("expert-merge", ExpertMergeConfig, scope="experts", calibrated=True, apply=merge_experts_)
def expert_merge(routed: RoutedTokens, cfg: ExpertMergeConfig, keep: int | None) -> Tensor:
    if keep is None:
        raise ValueError("expert-merge needs the number of experts to keep per block (uniform mode)")
    clusters = block_clusters(routed, cfg, keep)
    return representative_scores(clusters, routed.statistics().counts.double().cpu())   # (E,)
