"""LazyLLM: progressive, revivable token pruning (Fu et al., arXiv 2407.14057).

Prefill computes every prompt token in every layer although the first new token depends on few of them.
LazyLLM computes, at each *stage* layer, only the prompt tokens that the last token attended to most in
the layer before (attention averaged over heads); the others stop there, and their hidden state at that
layer waits in an auxiliary cache. Later steps are lazy too: at every decode step each stage layer ranks
again, by the new token's attention in the layer before it, every prompt token that layer holds; a token
that stopped at this stage earlier and now ranks among the kept ones is *revived*: its waiting hidden
state goes through the layers from there on with the new token, so its keys and values join those
layers' caches (each token is computed at most once per layer). Tokens never come back from a cache
once they are in it; what changes per step is which of the waiting ones are computed.

How it runs on a stock model, without a copied modeling file:

* stage layers: `stages` layers evenly spaced over the depth (layer n*i/(stages+1), i = 1..stages); at
  stage i the kept share of the prompt is keep**(i/stages), so it falls progressively from 1 to `keep`;
  the last `protect_last` prompt tokens are always kept (the first new token is read from the last).
* ranking: the attention of the last computed row (the paper's), averaged over heads; with `observe` k > 1,
  over the last k rows too (SnapKV's observation window, arXiv 2404.14469: the question at the end of a
  prompt points at the facts it needs more surely than its final token alone). At decode the new token is
  the one row there is. With `pool` p > 1 a token ranks by the highest score within p//2 positions of it
  (SnapKV's pooling): the tokens around one the question points at stay with it, so a fact is kept whole
  rather than as its single most-attended token.
  A stage ranks by the last full-attention layer before it (Gemma 3's sliding layers see a window only).
* a forward pre-hook on every decoder layer replaces the rows it computes (the hidden states, their
  rotary position embeddings, their position ids and, in prefill, their rows and columns of the causal
  mask) by the rows the stage before it kept; the model's own loop never knows.
* `PositionedLayer` caches keys and values with their token positions, so a layer's cache can hold any
  subset of the sequence; its length for `generate` is the next position, so positions stay those of
  the whole sequence.
* the attention function computes prefill as stock does (on the kept rows), and every decode step with
  an explicit position mask (a key at or before the query's position, and inside the window of a
  sliding-window layer); a step with a single row on a full-attention layer is stock's own call.

With keep=1 every stage keeps everything and generation equals stock `generate` token for token.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from ..depth import decoder_blocks
from .configs import LazyLLMConfig


def pooled(positions: Tensor, scores: Tensor, length: int, width: int) -> Tensor:
    """Each score replaced by the highest within width//2 positions of its token, over the prompt's position
    axis (positions absent from a layer count as 0: a score is an attention weight, never below it)."""
    line = torch.zeros(length, dtype=scores.dtype)
    line[positions] = scores
    line = torch.nn.functional.max_pool1d(line[None, None], width, stride=1, padding=width // 2)[0, 0]
    return line[positions]


class PositionedLayer(DynamicLayer):
    """A layer cache that stores, beside each key/value entry, the position of its token."""

    def __init__(self, pruning: "TokenPruning"):
        super().__init__()
        self.pruning = pruning
        self.positions = torch.zeros(0, dtype=torch.long)
        self.next_position = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        keys, values = super().update(key_states, value_states)
        rows = self.pruning.rows
        self.positions = torch.cat([self.positions, rows.cpu()])
        self.next_position = max(self.next_position, int(rows.max()) + 1)
        return keys, values

    def get_seq_length(self) -> int:
        return self.next_position


class TokenPruning:
    """The LazyLLM mechanism of `pruning(...)` (see the module docstring)."""

    owns_cache = True

    def __init__(self, cfg: LazyLLMConfig):
        self.cfg = cfg
        self.handles: list = []
        self.layers: dict[int, PositionedLayer] = {}
        self.computed = 0                 # prompt-token x layer computations in prefill, for the note
        self.possible = 0

    # ------------------------------------------------------------------ set-up
    def enter(self, model: nn.Module) -> None:
        blocks = decoder_blocks(model)
        n = len(blocks)
        count = self.cfg.stages
        stages = sorted({max(1, min(n - 1, round(n * i / (count + 1)))) for i in range(1, count + 1)})
        self.stages = {layer: self.cfg.keep ** ((k + 1) / len(stages)) for k, layer in enumerate(stages)}
        types = getattr(model.config, "layer_types", None)
        self.layer_types = list(types) if types else ["full_attention"] * n
        # a stage ranks by the attention of the last full-attention layer before it (a sliding-window
        # layer sees only its window, Gemma 3); by the layer just before it where no such layer exists
        self.ranked_by = {}
        for layer in self.stages:
            full = [i for i in range(layer) if self.layer_types[i] != "sliding_attention"]
            self.ranked_by[layer] = full[-1] if full else layer - 1
        self.before_stage = set(self.ranked_by.values())
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: self._before_layer(index, args, kwargs), with_kwargs=True))

    def exit(self, model: nn.Module) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.layers = [], {}

    def prepare_cache(self, cache) -> None:
        self.layers = {}
        for index in range(len(cache.layers)):
            cache.layers[index] = self.layers[index] = PositionedLayer(self)
        self.waiting: dict[int, tuple[int, Tensor]] = {}      # prompt position -> (stage layer, hidden state)
        self.rope: dict[str, tuple[Tensor, Tensor]] = {}      # layer type -> (cos, sin) of every prompt position
        self.importance: dict[int, tuple[Tensor, Tensor]] = {}
        self.prompt_length = None

    def note(self) -> str | None:
        if not self.possible:
            return None
        return (f"LazyLLM: prefill computed {self.computed / self.possible:.1%} of the prompt-token x layer rows "
                f"(keep {self.cfg.keep} by the last of {len(self.stages)} stages at layers {sorted(self.stages)})")

    # ------------------------------------------------------------------ the rows each layer computes
    def _before_layer(self, index: int, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if not self.layers:
            raise ValueError("LazyLLM keeps its own KV cache: run generate inside `pruning(...)` without "
                             "past_key_values, or pass `state.new_cache()` to forward")
        kind = self.layer_types[index]
        given_rope, given_ids = kwargs["position_embeddings"], kwargs["position_ids"]
        if index == 0:                                 # a new forward pass: every given row
            self.rows = given_ids[0].clone()
            self.prefill = self.layers[0].get_seq_length() == 0
            if self.prefill:
                self.prompt_length = int(self.rows.numel())
                self.computed = self.possible = 0
        if self.prefill and kind not in self.rope:
            self.rope[kind] = given_rope
        if index in self.stages and (self.prefill or self.cfg.revive):
            hidden = self._stage(index, hidden)
        if self.prefill:
            self.computed += int((self.rows < self.prompt_length).sum())
            self.possible += self.prompt_length
        rows = self.rows.to(hidden.device)
        if not torch.equal(rows, given_ids[0].to(rows.device)):
            kwargs["position_ids"] = rows.unsqueeze(0)
            kwargs["position_embeddings"] = self._rope(kind, rows, given_rope, given_ids[0])
            mask = kwargs.get("attention_mask")
            if self.prefill and isinstance(mask, Tensor):
                kwargs["attention_mask"] = mask[..., rows, :][..., rows]
            elif not self.prefill:
                kwargs["attention_mask"] = None        # decode: the attention function masks by position
        return (hidden,), kwargs

    def _rope(self, kind: str, rows: Tensor, given: tuple, given_ids: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin of `rows`: prompt positions from the prefill's table, the new token's as given."""
        table = self.rope[kind]
        out = []
        for full, now in zip(table, given):
            parts = [full[:, rows[rows < self.prompt_length]]]
            if bool((rows >= self.prompt_length).any()):
                parts.append(now[:, (given_ids.unsqueeze(0) == rows[rows >= self.prompt_length].unsqueeze(1)).any(0)])
            out.append(torch.cat(parts, dim=1))
        return tuple(out)

    def _stage(self, index: int, hidden: Tensor) -> Tensor:
        """Choose the rows of stage layer `index` by the last row's attention in the layer that ranks it
        (`ranked_by`: the last full-attention layer before it): keep (or revive) the best-ranked prompt
        tokens present there, send the others to wait."""
        positions, scores = self.importance[self.ranked_by[index]]
        prompt = positions < self.prompt_length
        positions, scores = positions[prompt], scores[prompt]
        if self.cfg.pool > 1:
            scores = pooled(positions, scores, self.prompt_length, self.cfg.pool)
        keep = max(self.cfg.protect_last, math.ceil(self.stages[index] * self.prompt_length))
        protected = positions >= self.prompt_length - self.cfg.protect_last
        ranked = torch.where(protected, torch.full_like(scores, float("inf")), scores)
        chosen = set(positions[ranked.topk(min(keep, ranked.numel())).indices].tolist())
        rows, states = [], []
        for row, position in enumerate(self.rows.tolist()):
            if position >= self.prompt_length or position in chosen:
                rows.append(position)
                states.append(hidden[:, row])
            else:
                self.waiting[position] = (index, hidden[:, row])
        for position in sorted(chosen):                # revive what waits at this stage
            waiting = self.waiting.get(position)
            if waiting is not None and waiting[0] == index:
                del self.waiting[position]
                rows.append(position)
                states.append(waiting[1].to(hidden.device))
        order = sorted(range(len(rows)), key=rows.__getitem__)
        self.rows = torch.tensor([rows[i] for i in order], dtype=torch.long)
        return torch.stack([states[i] for i in order], dim=1)

    # ------------------------------------------------------------------ attention
    def attention(self, module, query, key, value, mask, scaling, stock, **kwargs):
        index = module.layer_idx
        layer = self.layers[index]
        positions = layer.positions.to(query.device)
        rows = self.rows.to(query.device)
        window = kwargs.get("sliding_window")
        if self.prefill or (rows.numel() == 1 and window is None):
            out = stock(mask=mask if self.prefill else None)
        else:
            allowed = positions.unsqueeze(0) <= rows.unsqueeze(1)
            if window is not None:
                allowed &= rows.unsqueeze(1) - positions.unsqueeze(0) < window
            from .runtime import attend
            out = (attend(query, key, value, scaling, allowed), None)
        if index in self.before_stage:
            k = min(self.cfg.observe, rows.numel())                   # the observing rows: the last k computed
            last = query[:, :, -k:]                                                                 # (B, H, k, D)
            last = last.reshape(query.shape[0], key.shape[1], -1, k, query.shape[-1])             # (B, Hkv, g, k, D)
            scores = torch.matmul(last.float(), key.float().transpose(-1, -2)[:, :, None]) * scaling  # (..., k, T)
            visible = positions.unsqueeze(0) <= rows[-k:].unsqueeze(1)                             # (k, T)
            if window is not None:
                visible &= rows[-k:].unsqueeze(1) - positions.unsqueeze(0) < window
            scores = scores.masked_fill(~visible, float("-inf"))
            self.importance[index] = (positions.cpu(), torch.softmax(scores, dim=-1).mean(dim=(0, 1, 2, 3)).cpu())
        return out
