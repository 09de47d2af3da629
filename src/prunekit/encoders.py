"""Causal LMs as text encoders, pruned by depth: pooling, the contrastive loss, L3Prune.

Thennal D K, Fischer, Biemann, "Large Language Models Are Overparameterized Text Encoders"
(arXiv 2410.14578, RepL4NLP 2025): an LLM turned into a text embedder (the final hidden states
mean-pooled or last-token-pooled, then supervised contrastive fine-tuning) loses almost nothing
when its last ~30% of decoder blocks are dropped *before* a short contrastive fine-tune (1000
steps in the paper). This module is that recipe on prunekit's depth machinery:

    embed             texts -> L2-normalised embeddings: right-padded batches, pooled over the
                      attention mask, at the model's output or at any block boundary
    contrastive_loss  InfoNCE with in-batch negatives (row i of q matches row i of d)
    cut_losses        the "initial loss" of every cut (keep the first k blocks, k = 1..L), from ONE
                      forward pass per batch with output_hidden_states
    l3prune           the paper's two cuts from those losses: {"large": k, "small": k}
    last_k            the plain rule: drop the last `fraction` of the blocks
    prune_encoder_    keep the first k blocks (`depth.remove_blocks`); the model stays a stock
                      checkpoint (`io.export.save_pretrained_atomic` writes it)
    finetune_encoder_ a brief, seeded, CPU-sized contrastive fine-tune (all parameters or the last
                      blocks)

Every k in this module is a number of blocks KEPT (the first k), as in the paper's code, never a
number removed.

What a cut's representation is
------------------------------
A model cut after k blocks computes `final_norm(h_k)` (h_k: the residual stream after block k;
the final norm and, for OPT, `project_out` are `depth.output_layers`) and pools it. `cut_losses`
and `embed(layer=k)` apply the same output layers to the intermediate hidden states, so the loss
of cut k equals the loss of the truncated model (tests/test_encoders.py checks this against
`prune_encoder_` for several families). The authors' code (github.com/thennal10/l3prune, file
l3prune/l3prune.py and its forward overrides) applies the final norm to every intermediate
representation in the same way.

L3Prune, exactly as implemented (and where it is interpreted)
-------------------------------------------------------------
1. loss(k) for k = 1..L: the mean, over batches of training pairs, of the contrastive loss of the
   pooled representations of cut k, before any training (the paper's "initial loss").
2. With midpoint = L // 2 (integer division):
       small = argmin of loss(k) over k = 1 .. midpoint
       large = argmin of loss(k) over k = midpoint + 1 .. L
   ties go to the smaller k (numpy's argmin, as in the authors' code). Source of the rule: the
   authors' released implementation (github.com/thennal10/l3prune, `l3prune()` in
   l3prune/l3prune.py: "minima before and after midpoint"); the paper's abstract only says the
   two configurations come from the model's initial loss, and its method section could not be
   read from this workspace, so the code is what this matches. Note that `large` may be L itself
   (no block removed) when the full model has the lowest loss of the upper half.
Interpretations: the authors' code scores (query, positive, hard negative) triples with the
LLM2Vec loss (similarity scale 20); the task here has no hard negatives, so the loss is InfoNCE
with in-batch negatives only, temperature 0.05 (= scale 20). That code samples 100 batches of 64
pairs; the CLI uses what fits a CPU (its report records the counts). A trailing partial batch is
dropped when there is at least one full batch (a smaller batch has fewer negatives and a lower
loss), as fixed-size sampled batches never see one.

Pooling, padding, tokens
------------------------
Texts are tokenized one by one without special tokens (as everywhere in prunekit) and padded on
the RIGHT: a causal model's real tokens then never see a pad and keep their positions, so a
padded text embeds exactly like the same text alone (tested). "mean" averages the hidden states
under the attention mask; "last" takes the last real token, after an EOS token is appended when
the tokenizer has one (the authors' eos-token pooling appends it too; their default pooling,
a position-weighted mean, is not offered here).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .depth import DepthConfig, decoder_blocks, output_layers, remove_blocks

POOLINGS = ("mean", "last")
TEMPERATURE = 0.05        # the paper's (LLM2Vec's) similarity scale 20 = 1 / 0.05
MAX_LENGTH = 128          # tokens per text, after which a text is cut (CPU-sized)


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------

def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def _num_blocks(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def _token_ids(tokenizer, texts: Sequence[str], pooling: str, max_length: int) -> tuple[Tensor, Tensor]:
    """(ids, mask), both (batch, longest): each text tokenized alone, then right-padded."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    eos = tokenizer.eos_token_id if pooling == "last" else None
    rows = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, not a str")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"text {index} ({text[:40]!r}) has no tokens; drop empty texts before embedding")
        ids = list(ids[:max_length - 1]) + [eos] if eos is not None else list(ids[:max_length])
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def _pool(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """(batch, seq, hidden), (batch, seq) right-padded -> (batch, hidden), float32."""
    hidden = hidden.float()
    if pooling == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)                  # (batch, seq, 1)
        return (hidden * weights).sum(1) / weights.sum(1)
    last = mask.sum(1) - 1                                             # right padding: last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _apply(modules: list[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


def _pooled(model: nn.Module, ids: Tensor, mask: Tensor, pooling: str, layers: Sequence[int]) -> dict[int, Tensor]:
    """Pooled (not normalised) representations of the cuts in `layers` from one forward pass.

    Cut k < L: the output layers (final norm, ...) applied to the hidden state after block k;
    cut L: the model's own last_hidden_state (already through them)."""
    num_blocks = _num_blocks(model)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    need_all = any(k != num_blocks for k in layers)
    out = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=need_all, use_cache=False)
    heads = output_layers(model) if need_all else []
    pooled = {}
    for k in layers:
        hidden = out.last_hidden_state if k == num_blocks else _apply(heads, out.hidden_states[k])
        pooled[k] = _pool(hidden, mask, pooling)
    return pooled


def _check_layer(layer: int, num_blocks: int) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_blocks:
        raise ValueError(f"layer must be a block boundary 0..{num_blocks} (the hidden state after that many "
                         f"blocks; None for the model's output), got {layer!r}")


def embed(model: nn.Module, tokenizer, texts: Sequence[str], pooling: str = "mean", layer: int | None = None,
          batch_size: int = 16, max_length: int = MAX_LENGTH) -> Tensor:
    """L2-normalised embeddings of `texts`, (len(texts), hidden) float32 on the CPU.

    `layer=k` pools the hidden state after the first k blocks through the final norm, i.e. what
    the model cut to k blocks would give; None is the model's output (k = L). Texts are batched
    longest first (less padding), and returned in the given order."""
    _check_pooling(pooling)
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    num_blocks = _num_blocks(model)
    k = num_blocks if layer is None else layer
    _check_layer(k, num_blocks)
    texts = list(texts)
    if not texts:
        return torch.zeros((0, model.config.hidden_size))
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            ids, mask = _token_ids(tokenizer, [texts[i] for i in chosen], pooling, max_length)
            chunks.append(F.normalize(_pooled(model, ids, mask, pooling, [k])[k], dim=-1).cpu())
    out = torch.cat(chunks)
    result = torch.empty_like(out)
    result[torch.tensor(order)] = out
    return result


# ----------------------------------------------------------------------------------------------
# The contrastive loss and the initial loss of every cut
# ----------------------------------------------------------------------------------------------

def contrastive_loss(q: Tensor, d: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """InfoNCE with in-batch negatives: query i's positive is document i, the other documents of
    the batch are its negatives; cosine similarities divided by `temperature`, mean over queries
    (one direction, query -> document, as the LLM2Vec loss the paper uses).

        loss = mean_i [ -log softmax_j (cos(q_i, d_j) / t) at j = i ]       # q, d: (n, hidden)
    """
    if q.dim() != 2 or q.shape != d.shape:
        raise ValueError(f"q and d must both be (n, hidden) with the same shape, got {tuple(q.shape)} and "
                         f"{tuple(d.shape)}")
    if q.shape[0] < 1:
        raise ValueError("the batch is empty: give at least one (query, document) pair")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r} (the paper uses 0.05)")
    logits = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T / temperature   # (n, n)
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=logits.device))


def _check_pairs(pairs, least: int = 2) -> list[tuple[str, str]]:
    pairs = [(p[0], p[1]) for p in pairs]
    if len(pairs) < least:
        raise ValueError(f"need at least {least} (query, document) pairs: in-batch negatives need a second "
                         f"document; got {len(pairs)}")
    return pairs


def _loss_batches(pairs: list, batch_size: int) -> list[list]:
    """Consecutive batches; a trailing partial batch is dropped when a full one exists (module docstring)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def cut_losses(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], pooling: str = "mean",
               batch_size: int = 16, temperature: float = TEMPERATURE,
               max_length: int = MAX_LENGTH) -> dict[int, float]:
    """{k: initial contrastive loss of the model cut to its first k blocks} for k = 1..L.

    One forward pass per batch (the batch's queries and documents together, with
    output_hidden_states); every cut is read from that pass (module docstring). The value is the
    mean of the per-batch losses (`contrastive_loss`)."""
    _check_pooling(pooling)
    batches = _loss_batches(_check_pairs(pairs), batch_size)
    num_blocks = _num_blocks(model)
    cuts = list(range(1, num_blocks + 1))
    totals = dict.fromkeys(cuts, 0.0)
    with torch.no_grad():
        for batch in batches:
            n = len(batch)
            ids, mask = _token_ids(tokenizer, [q for q, _ in batch] + [d for _, d in batch], pooling, max_length)
            pooled = _pooled(model, ids, mask, pooling, cuts)
            for k in cuts:
                totals[k] += float(contrastive_loss(pooled[k][:n], pooled[k][n:], temperature))
    return {k: totals[k] / len(batches) for k in cuts}


def l3prune(losses: Mapping[int, float] | Sequence[float]) -> dict[str, int]:
    """L3Prune's two cuts, as numbers of blocks to keep: {"large": k, "small": k}.

    `losses`: {k: loss} for k = 1..L (`cut_losses`), or a sequence whose i-th value is the loss
    with i + 1 blocks kept. small = the k of least loss in 1..L//2, large = the k of least loss in
    L//2 + 1..L, ties to the smaller k (module docstring)."""
    if isinstance(losses, Mapping):
        keys = sorted(losses)
        if keys != list(range(1, len(keys) + 1)):
            raise ValueError(f"losses must have one entry for every cut k = 1..L (blocks kept), got keys {keys}")
        values = [losses[k] for k in keys]
    else:
        values = list(losses)
    if len(values) < 2:
        raise ValueError(f"L3Prune needs a model with at least 2 blocks (a cut in each half); got losses for "
                         f"{len(values)} block(s)")
    bad = [i + 1 for i, v in enumerate(values) if isinstance(v, bool) or not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"the losses of cuts {bad} are not finite numbers; check the model and the pairs")
    midpoint = len(values) // 2

    def best(first: int, last: int) -> int:          # the k in first..last of least loss, ties to the lower k
        return min(range(first, last + 1), key=lambda k: (float(values[k - 1]), k))

    return {"large": best(midpoint + 1, len(values)), "small": best(1, midpoint)}


def last_k(n_layers: int, fraction: float) -> int:
    """Blocks to keep when the last `fraction` of `n_layers` blocks is dropped: n_layers minus the
    count rounded half up (`depth.DepthConfig`: 0.3 of 30 -> drop 9, keep 21)."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 2:
        raise ValueError(f"the model needs at least 2 blocks to drop some and keep one, got {n_layers!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), the share of blocks to drop (0.3 drops the last 30%), "
                         f"got {fraction!r}")
    return n_layers - DepthConfig(sparsity=float(fraction)).blocks_to_remove(n_layers)


def prune_encoder_(model: nn.Module, keep_blocks: int) -> list[int]:
    """Keep the first `keep_blocks` decoder blocks, in place; returns the removed indices.

    `depth.remove_blocks` keeps the model consistent (config.num_hidden_layers, layer_types,
    layer_idx), so `io.export.save_pretrained_atomic` writes a checkpoint that stock
    `AutoModelForCausalLM.from_pretrained` loads. keep_blocks == L removes nothing."""
    num_blocks = _num_blocks(model)
    if isinstance(keep_blocks, bool) or not isinstance(keep_blocks, int) or not 1 <= keep_blocks <= num_blocks:
        raise ValueError(f"keep_blocks must be a number of blocks in 1..{num_blocks}, got {keep_blocks!r}")
    removed = list(range(keep_blocks, num_blocks))
    remove_blocks(model, removed)
    return removed


# ----------------------------------------------------------------------------------------------
# A brief contrastive fine-tune
# ----------------------------------------------------------------------------------------------

def _trainable(model: nn.Module, train_blocks: int | None) -> list[nn.Parameter]:
    if train_blocks is None:
        return list(model.parameters())
    blocks = decoder_blocks(model)
    if isinstance(train_blocks, bool) or not isinstance(train_blocks, int) or not 1 <= train_blocks <= len(blocks):
        raise ValueError(f"train_blocks must be in 1..{len(blocks)} (the last blocks to train; None trains every "
                         f"parameter), got {train_blocks!r}")
    params = [p for block in list(blocks)[-train_blocks:] for p in block.parameters()]
    return params + [p for module in output_layers(model) for p in module.parameters()]


def finetune_encoder_(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], steps: int, lr: float = 2e-5,
                      batch_size: int = 8, pooling: str = "mean", temperature: float = TEMPERATURE, seed: int = 0,
                      train_blocks: int | None = None, max_length: int = MAX_LENGTH) -> list[float]:
    """Contrastive fine-tuning in place (AdamW, InfoNCE with in-batch negatives); returns each step's loss.

    Batches walk a seeded permutation of `pairs` (a new one per epoch), so a run is repeatable;
    dropout stays off (the model is kept in eval mode). `train_blocks=None` trains every
    parameter (the paper fine-tunes with LoRA; full fine-tuning is what a CPU-sized model allows
    most simply), `train_blocks=n` only the last n blocks and the final norm."""
    _check_pooling(pooling)
    pairs = _check_pairs(pairs)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive number of optimizer steps, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
    batch_size = min(batch_size, len(pairs))
    params = _trainable(model, train_blocks)
    chosen = {id(p) for p in params}
    was_training = model.training
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = _num_blocks(model)
    order: list[int] = []
    history = []
    model.eval()
    try:
        for _ in range(steps):
            if len(order) < batch_size:
                order = torch.randperm(len(pairs), generator=generator).tolist()
            batch, order = [pairs[i] for i in order[:batch_size]], order[batch_size:]
            ids, mask = _token_ids(tokenizer, [q for q, _ in batch] + [d for _, d in batch], pooling, max_length)
            pooled = _pooled(model, ids, mask, pooling, [num_blocks])[num_blocks]
            loss = contrastive_loss(pooled[:len(batch)], pooled[len(batch):], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
    finally:
        optimizer.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
        model.train(was_training)
    return history
