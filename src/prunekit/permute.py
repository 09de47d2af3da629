"""Channel permutation for N:M sparsity: reorder a layer's input channels so that the weights N:M
keeps hold more of the score (RIA's channel reallocation + linear-sum-assignment refinement,
Zhang et al., "Plug-and-Play", ICLR 2024; no arXiv preprint, see the ICLR proceedings).

N:M keeps the best m - n of every m *consecutive* inputs, so two important channels that happen to
sit in the same group of m compete for the same slots. Any order of the inputs is as good for the
hardware, so we choose one:

  1. balanced allocation: sort the channels by their total score and deal them out so that every
     group of m receives one channel from each quantile (a snake order, as the reference does);
  2. refinement: for each slot position c of the groups, re-assign the channels sitting at slot c
     to the groups by a linear assignment that maximises the retained score exactly (the other
     m - 1 channels of every group held fixed), over blocks of `block_groups` groups.

Matches `prune_ria` of biomedical-cybernetics/Relative-importance-and-activation-pruning
(lib/prune.py, `--reallocation --lsa`, importance_score="sum"), except that we never return an
order worse than the identity (the reference keeps the reallocated order even when it loses).

Pure: `nm_permutation` only returns `perm`. Pruning `score[:, perm]` means the layer computes with
its inputs in the order `perm`, so whoever applies it must permute the *producer* of those inputs
the same way (gate/up rows for a down_proj's columns), or keep the permutation alongside the
weight. The engine does that; nothing here touches a model.
"""
from __future__ import annotations

import torch
from torch import Tensor


def retained_score(score: Tensor, n: int, m: int) -> float:
    """Sum of the scores that N:M keeps (the m - n highest of every m consecutive inputs)."""
    out_features, in_features = score.shape
    if in_features % m:
        raise ValueError(f"N:M {n}:{m} needs the input dimension ({in_features}) to be a multiple of {m}")
    groups = score.double().reshape(out_features, in_features // m, m)
    return float(groups.topk(m - n, dim=2).values.sum())


def nm_permutation(score: Tensor, n: int, m: int, *, rounds: int = 1, block_groups: int = 64) -> Tensor | None:
    """A permutation `perm` of the input columns with retained_score(score[:, perm]) larger than
    retained_score(score), or None if none was found. Deterministic.

    rounds: refinement sweeps over the m slot positions (0: balanced allocation only).
    block_groups: groups of m that one linear assignment may exchange channels between (the
    assignment costs out * block_groups^2 per block; the reference's "--fast" uses 4 to 16 blocks).
    """
    out_features, in_features = score.shape
    if in_features % m:
        raise ValueError(f"N:M {n}:{m} needs the input dimension ({in_features}) to be a multiple of {m}")
    score = score.double()
    identity = torch.arange(in_features, device=score.device)
    baseline = retained_score(score, n, m)
    balanced = _balanced_allocation(score, m)
    perm = balanced if retained_score(score[:, balanced], n, m) > baseline else identity
    for _ in range(rounds):
        for slot in range(m):
            perm = _refine_slot(score, perm, n, m, slot, block_groups)
    if retained_score(score[:, perm], n, m) <= baseline + 1e-12 * abs(baseline):   # no gain beyond rounding
        return None
    return perm.cpu()


def _balanced_allocation(score: Tensor, m: int) -> Tensor:
    """Group g gets, at slot k, the g-th channel of the k-th quantile of channels sorted by total
    score (every other quantile reversed, so the heaviest and the lightest pair up)."""
    in_features = score.shape[1]
    groups = in_features // m
    order = score.sum(dim=0).argsort(stable=True)                                   # (in,) ascending
    perm = torch.empty_like(order)
    for slot in range(m):
        chunk = order[slot * groups:(slot + 1) * groups]
        perm[slot::m] = chunk.flip(0) if slot % 2 else chunk
    return perm


def _refine_slot(score: Tensor, perm: Tensor, n: int, m: int, slot: int, block_groups: int) -> Tensor:
    """Re-assign the channels at position `slot` of every group, block by block, by maximum
    retained score; never lowers it (the current assignment is one of the candidates)."""
    perm = perm.clone()
    groups = perm.numel() // m
    keep = m - n
    for first in range(0, groups, block_groups):
        last = min(first + block_groups, groups)
        cols = perm[first * m:last * m].reshape(last - first, m)                    # (B, m) channel ids
        moving = score[:, cols[:, slot]]                                           # (out, B): candidates
        others = torch.cat([cols[:, :slot], cols[:, slot + 1:]], dim=1)             # (B, m - 1)
        rest = score[:, others].sort(dim=2, descending=True).values                # (out, B, m - 1)
        # With the m - 1 fixed scores r_1 >= r_2 >= ... of a group, adding x keeps
        # r_1 + ... + r_{keep-1} + max(x, r_keep): only the last term depends on the candidate.
        base = rest[:, :, :keep - 1].sum(dim=(0, 2))                                # (B,)
        threshold = rest[:, :, keep - 1]                                           # (out, B)
        # sum over rows of max(a, b) = (a + b + |a - b|) / 2; cdist gives the |a - b| sums
        gain = (moving.sum(0)[:, None] + threshold.sum(0)[None, :]
                + torch.cdist(moving.T, threshold.T, p=1)) / 2                      # (B cand, B group)
        assignment = _max_assignment(gain + base[None, :])     # (B,): group s gets candidate assignment[s]
        cols[:, slot] = cols[assignment, slot]
        perm[first * m:last * m] = cols.reshape(-1)
    return perm


def _max_assignment(value: Tensor) -> Tensor:
    """assignment[s] = the row given to column s, maximising sum_s value[assignment[s], s].
    scipy's exact solver when installed (an optional dependency), else pairwise swaps."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return _swap_assignment(value)
    rows, cols = linear_sum_assignment(value.cpu().numpy(), maximize=True)
    assignment = torch.empty(len(cols), dtype=torch.long)
    assignment[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return assignment.to(value.device)


def _swap_assignment(value: Tensor, max_swaps: int = 10_000) -> Tensor:
    """Start from the identity and apply the best improving swap of two columns' rows until none
    is left: a local optimum, never below the identity."""
    size = value.shape[0]
    assignment = torch.arange(size, device=value.device)
    tolerance = 1e-12 * float(value.abs().max().clamp_min(1e-300))
    for _ in range(max_swaps):
        current = value[assignment, torch.arange(size, device=value.device)]      # (B,)
        crossed = value[assignment].T                          # crossed[s, t] = value[assignment[t], s]
        gain = crossed + crossed.T - current[:, None] - current[None, :]           # swap the rows of s and t
        best = int(gain.argmax())
        s, t = divmod(best, size)
        if float(gain[s, t]) <= tolerance:
            break
        assignment[[s, t]] = assignment[[t, s]]
    return assignment
