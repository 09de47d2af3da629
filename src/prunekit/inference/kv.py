"""KV pruning at decode: Twilight's top-p selection per head, and LServe's streaming heads.

Twilight (Lin et al., arXiv 2502.02770). A fixed top-k of cached entries is too many for a head whose
attention is concentrated and too few for a flat one; Twilight keeps, per head and per step, the smallest
set of entries whose softmax mass reaches `top_p`, and attends over that set only (the softmax
renormalised over it). It runs on top of a selector's candidates. With `selector="exact"` every cached
entry is a candidate with its exact score, so the selection saves no arithmetic: it bounds what the step
attends to, and `KVPruning.kept_fraction` reports how much of the cache that was. With `selector="quest"`
(Quest, Tang et al., arXiv 2406.10774, one of the selectors Twilight's paper builds on) the cache is read in
pages of `page` entries: each page keeps the elementwise min and max of its keys, so q . k <= sum_d
max(q_d min_d, q_d max_d) bounds every score in the page from 2 vectors; the `candidates` share of pages
with the highest bound (the maximum over the query heads of a KV group, which share their entries), plus the
pages holding the sink and the window, are gathered and scored exactly, and Twilight's top-p runs on them.
A decode step then reads the page bounds (2/page of the keys) and the candidate pages, not the whole cache:
that is where its time goes at long contexts. The top-p step itself still multiplies every candidate's value
(its weight may be 0): on a CPU the selector saves the reads, the top-p bounds the attention.
The first `sink` and the last `window` entries are always kept.

Appending in place. transformers' `DynamicLayer` concatenates every decode step's entry onto the whole
cache, a copy of every key and value each step: on a CPU at 8k that copy costs more than reading the pages
Quest skips. The caches these mechanisms own (`GrowingLayer`, and the full heads of `StreamingLayer`) keep
keys and values in buffers with spare room and write the new entry into it (`Appender`); the values are
those of `DynamicLayer`, so keeping everything is still exact. The benchmark reports this cache on its own
(stock attention, nothing pruned) beside the mechanisms, so the speed that appending in place buys is not
counted as the pruning's.

Streaming heads (LServe, Yang et al., arXiv 2502.14866, after DuoAttention). Some heads attend to the
first few tokens (sinks) and to the recent ones only, whatever the context; they can keep a constant
cache of `sink` + `window` entries. A calibration pass (`calibrate_streaming`) runs the model once on a
long calibration window and measures, for every full-attention KV head, how much its output changes when
it is restricted to sink + window (relative squared error, averaged over the queries that the restriction
affects and over the query heads of the group); the `heads` fraction with the smallest change, over all
layers, becomes streaming. Prefill is exact (every head sees the whole prompt); after it, a streaming
head's cache holds only its sink and window entries (`StreamingLayer`, the memory saved is real), and
its decode steps attend over them. Sliding-window layers (Gemma 3) are already bounded and stay as they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from .configs import StreamingConfig, TwilightConfig


def top_p_mask(probs: Tensor, top_p: float, sink: int = 0, window: int = 0) -> Tensor:
    """Per row of `probs` (..., T): the smallest set of entries whose mass reaches `top_p` (an entry is kept
    when the mass of the entries ranked before it is still below top_p; entries tied with the last one kept
    are kept too), plus the first `sink` and the last `window` entries. Returns a bool mask of the same shape.

    The set is found from the largest entries only: `topk` of a small k (a partial sort, far cheaper than
    sorting every entry) and, while some row has not reached `top_p` inside its k largest, four times as
    many. Attention concentrated on a few entries, Twilight's reason to be, stops at the first k."""
    length = probs.shape[-1]
    if top_p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)           # every entry
    k = min(length, max(32, length // 32))
    while True:
        ordered = probs.topk(k, dim=-1).values                    # descending
        inside = ordered.cumsum(dim=-1) - ordered < top_p          # kept among the k largest
        if k == length or not bool(inside[..., -1].any()):        # every row stopped inside its k largest
            break
        k = min(length, 4 * k)
    threshold = ordered.gather(-1, inside.sum(-1, keepdim=True) - 1)      # the smallest kept value per row
    keep = probs >= threshold
    if sink:
        keep[..., :sink] = True
    if window:
        keep[..., -window:] = True
    return keep


class Appender:
    """Keys and values (B, H, T, D) grown in place: buffers with room for an eighth more entries (at least
    256), the filled part returned as views. A decode step writes one entry; only outgrowing the room
    copies (once per T/8 steps)."""

    def __init__(self):
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.length = 0

    def append(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        need = self.length + keys.shape[-2]
        if self.keys is None or need > self.keys.shape[-2] or self.keys.shape[:2] != keys.shape[:2]:
            room = need + max(256, need // 8)
            grown_keys = keys.new_empty(*keys.shape[:2], room, keys.shape[-1])
            grown_values = values.new_empty(*values.shape[:2], room, values.shape[-1])
            if self.length:
                grown_keys[:, :, :self.length] = self.keys[:, :, :self.length]
                grown_values[:, :, :self.length] = self.values[:, :, :self.length]
            self.keys, self.values = grown_keys, grown_values
        self.keys[:, :, self.length:need] = keys
        self.values[:, :, self.length:need] = values
        self.length = need
        return self.filled()

    def filled(self) -> tuple[Tensor, Tensor]:
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def held_bytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()


class GrowingLayer(DynamicLayer):
    """`DynamicLayer` appending in place (`Appender`): same keys and values, no copy of the cache per step.
    `keys`/`values` are views of the filled part; transformers' batch reshuffles (`batch_select_indices`,
    `batch_repeat_interleave`) replace them with new tensors, which the next update takes over."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.appender = Appender()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.numel() and (self.keys.data_ptr() != self.appender.keys.data_ptr()
                                  or self.keys.shape[:2] != self.appender.keys.shape[:2]):
            self.appender = Appender()                      # replaced by a batch reshuffle: start from it
            self.appender.append(self.keys, self.values)
        self.keys, self.values = self.appender.append(key_states, value_states)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self.appender.length = min(self.appender.length, self.keys.shape[-2])

    def held_bytes(self) -> int:
        return self.appender.held_bytes() if self.is_initialized else 0


class StreamingLayer(DynamicLayer):
    """The cache of one full-attention layer whose `stream` KV heads keep only their first `sink` and last
    `window` entries; the other heads keep everything. `get_seq_length` counts every token seen, so
    positions and masks stay those of the whole sequence."""

    def __init__(self, stream: Tensor, sink: int, window: int):
        super().__init__()
        self.stream, self.sink, self.window = stream.bool(), sink, window
        self.seen = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        stream = self.stream.to(key_states.device)
        self.full_index, self.stream_index = (~stream).nonzero().flatten(), stream.nonzero().flatten()
        full, stream = self.full_index, self.stream_index
        self.keys, self.values = key_states[:, full, :0], value_states[:, full, :0]
        self.full = Appender()
        self.stream_keys, self.stream_values = key_states[:, stream, :0], value_states[:, stream, :0]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.seen and key_states.shape[-2] > 1:
            raise ValueError("streaming heads take the prompt in one prefill; chunked prefill or assisted decoding "
                             "would need the entries they already dropped")
        first = self.seen == 0
        self.seen += key_states.shape[-2]
        self.keys, self.values = self.full.append(key_states[:, self.full_index], value_states[:, self.full_index])
        keys = torch.cat([self.stream_keys, key_states[:, self.stream_index]], dim=-2)
        values = torch.cat([self.stream_values, value_states[:, self.stream_index]], dim=-2)
        if keys.shape[-2] > self.sink + self.window:
            keys = torch.cat([keys[:, :, :self.sink], keys[:, :, -self.window:]], dim=-2)
            values = torch.cat([values[:, :, :self.sink], values[:, :, -self.window:]], dim=-2)
        self.stream_keys, self.stream_values = keys, values
        if first:                                   # the prefill attends over the whole prompt, every head
            return key_states, value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def cached_entries(self) -> int:
        """Key and value vectors held (both heads kinds), for memory accounting."""
        if not self.is_initialized:
            return 0
        return 2 * (self.keys.shape[1] * self.keys.shape[2] + self.stream_keys.shape[1] * self.stream_keys.shape[2])

    def held_bytes(self) -> int:
        """Bytes allocated: the full heads' buffers (with their spare room) and the streaming heads' entries."""
        if not self.is_initialized:
            return 0
        return self.full.held_bytes() + 2 * self.stream_keys.numel() * self.stream_keys.element_size()


class KVPruning:
    """The decode-time KV mechanism of `pruning(...)`: Twilight top-p selection, streaming heads, or both
    (streaming heads keep their window; Twilight selects within the other heads)."""

    def __init__(self, configs: list, calibration: Tensor | None = None):
        self.twilight = next((c for c in configs if isinstance(c, TwilightConfig)), None)
        self.streaming = next((c for c in configs if isinstance(c, StreamingConfig)), None)
        self.quest = self.twilight is not None and self.twilight.selector == "quest"
        # a new cache per generation: its layers append in place (GrowingLayer), streaming heads need their own
        # layers, and Quest's page bounds belong to one cache
        self.streams = self.streaming is not None and self.streaming.heads > 0
        self.owns_cache = True
        self.calibration = calibration
        self.bounds: dict[int, tuple[Tensor, Tensor]] = {}   # layer -> per-page key min, max (B, Hkv, pages, D)
        self.heads: dict[int, Tensor] = {}         # layer -> streaming KV heads (bool)
        self.layers: dict[int, StreamingLayer] = {}
        self.kept, self.seen = 0, 0                # Twilight: entries attended / entries cached, summed

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.seen if self.seen else None

    def enter(self, model: nn.Module) -> None:
        if self.streams and not self.heads and self.streaming.heads == 1:
            kv = model.config.num_key_value_heads or model.config.num_attention_heads
            self.heads = {i: torch.ones(kv, dtype=torch.bool) for i in full_attention_layers(model.config)}
        elif self.streams and not self.heads:
            if self.calibration is None:
                raise ValueError("streaming heads are chosen by a calibration pass: pass calibration ids (or a "
                                 "tokenizer to `generate`, which takes them from the default corpus)")
            self.heads = calibrate_streaming(model, self.calibration, self.streaming)

    def exit(self, model: nn.Module) -> None:
        self.layers = {}

    def prepare_cache(self, cache) -> None:
        self.layers, self.bounds = {}, {}
        for index, stream in self.heads.items():
            if bool(stream.any()) and not cache.layers[index].is_sliding:
                cache.layers[index] = self.layers[index] = StreamingLayer(stream, self.streaming.sink,
                                                                          self.streaming.window)
        for index, layer in enumerate(cache.layers):       # the other full-attention layers append in place
            if type(layer) is DynamicLayer:
                cache.layers[index] = GrowingLayer()

    def attention(self, module, query, key, value, mask, scaling, stock, **kwargs):
        if query.shape[2] != 1 or kwargs.get("sliding_window"):
            return None                             # prefill, or a layer that is bounded already: stock
        batch, heads, _, dim = query.shape
        layer = self.layers.get(module.layer_idx)
        kv_heads = key.shape[1] if layer is None else layer.stream.numel()
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)     # a group's query heads as rows
        if layer is None:
            if self.twilight is None:
                return None
            out = self._select(grouped, key, value, scaling, module.layer_idx)
        else:
            out = torch.empty(grouped.shape, dtype=query.dtype, device=query.device)
            full, stream = layer.full_index, layer.stream_index
            out[:, full] = self._select(grouped[:, full], layer.keys, layer.values, scaling, module.layer_idx) \
                if self.twilight \
                else self._dense(grouped[:, full], layer.keys, layer.values, scaling)
            out[:, stream] = self._dense(grouped[:, stream], layer.stream_keys, layer.stream_values, scaling)
        return out.reshape(batch, 1, heads, dim), None

    @staticmethod
    def _dense(query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
        return F.scaled_dot_product_attention(query, key, value, scale=scaling)

    def _select(self, query: Tensor, key: Tensor, value: Tensor, scaling: float, layer: int) -> Tensor:
        cfg = self.twilight
        cached = key.shape[-2]
        parts = [(key, value)]
        if self.quest and cached // cfg.page > 0:
            parts = self._candidates(query, key, value, layer)
        scores = torch.cat([torch.matmul(query.float(), k.float().transpose(-1, -2)) for k, _ in parts], dim=-1)
        probs = torch.softmax(scores * scaling, dim=-1)
        keep = top_p_mask(probs, cfg.top_p, cfg.sink, cfg.window)
        self.kept += int(keep.sum())
        self.seen += keep.numel() // probs.shape[-1] * cached
        weights = probs * keep
        weights = weights / weights.sum(dim=-1, keepdim=True)
        split = weights.split([v.shape[-2] for _, v in parts], dim=-1)
        return sum(torch.matmul(w, v.float()) for w, (_, v) in zip(split, parts)).to(query.dtype)

    def _candidates(self, query: Tensor, key: Tensor, value: Tensor, layer: int) -> list[tuple[Tensor, Tensor]]:
        """Quest: the candidate entries of each KV head, in cache order, as two (keys, values) parts: the
        chosen pages (B, Hkv, count * page, D) (the pages with the highest score bound and those holding the
        sink and the window) and the partial page at the end (B, Hkv, cached % page, D). The pages are taken
        from a paged view of the cache (no copy of the rest); the parts are not concatenated, the scores are."""
        cfg, page = self.twilight, self.twilight.page
        batch, heads, cached, dim = key.shape
        pages = cached // page
        lo, hi = self._page_bounds(key, pages, layer)                                 # (B, Hkv, pages, D)
        q = query.float()                                                              # (B, Hkv, g, D)
        bound = q.clamp(min=0) @ hi.transpose(-1, -2) + q.clamp(max=0) @ lo.transpose(-1, -2)   # (B, Hkv, g, pages)
        bound = bound.amax(dim=2)                                                      # (B, Hkv, pages)
        forced = torch.zeros(pages, dtype=torch.bool, device=key.device)
        forced[:math.ceil(cfg.sink / page)] = True                                     # pages holding the sink
        if cfg.window:
            forced[max(0, (cached - cfg.window) // page):] = True                      # ... and the window
        count = min(pages, int(forced.sum()) + math.ceil(cfg.candidates * pages))
        chosen = bound.masked_fill(forced, float("inf")).topk(count, dim=-1).indices.sort(dim=-1).values

        def pick(x: Tensor) -> Tensor:
            # per (sequence, head): its pages as rows of a view (a cache head is contiguous: no copy), the
            # chosen rows copied by index_select, which moves whole rows (element-wise indexing is slower)
            out = x.new_empty(batch, heads, count, page * dim)
            for b in range(batch):
                for h in range(heads):
                    torch.index_select(x[b, h, :pages * page].reshape(pages, page * dim), 0, chosen[b, h],
                                       out=out[b, h])
            return out.view(batch, heads, count * page, dim)

        return [(pick(key), pick(value)), (key[:, :, pages * page:], value[:, :, pages * page:])]

    def _page_bounds(self, key: Tensor, pages: int, layer: int) -> tuple[Tensor, Tensor]:
        """Per page, the elementwise min and max of its keys (float32); pages already summarised are kept,
        so a decode step reads only the keys of the pages completed since the last one."""
        page = self.twilight.page
        lo, hi = self.bounds.get(layer, (None, None))
        done = 0 if lo is None or lo.shape[:2] != key.shape[:2] or lo.shape[2] > pages else lo.shape[2]
        if done < pages:
            new = key[:, :, done * page:pages * page].float().reshape(*key.shape[:2], pages - done, page, -1)
            lo = new.amin(dim=3) if done == 0 else torch.cat([lo, new.amin(dim=3)], dim=2)
            hi = new.amax(dim=3) if done == 0 else torch.cat([hi, new.amax(dim=3)], dim=2)
            self.bounds[layer] = (lo, hi)
        return lo, hi


def full_attention_layers(config) -> list[int]:
    """The layers whose cache transformers does not bound by a sliding window."""
    from transformers import DynamicCache
    return [i for i, layer in enumerate(DynamicCache(config=config).layers) if not layer.is_sliding]


def calibrate_streaming(model: nn.Module, ids: Tensor, cfg: StreamingConfig) -> dict[int, Tensor]:
    """Which KV heads become streaming: one forward pass over `ids` (1, T) with T > sink + window, measuring
    per full-attention layer and KV head the relative squared change of the head's output on the queries
    that sink + window cannot see all of; the `cfg.heads` fraction with the least change, over all layers."""
    from .runtime import activate, attend
    ids = ids.reshape(1, -1)
    if ids.shape[1] <= cfg.sink + cfg.window:
        raise ValueError(f"streaming-head calibration needs more than sink + window = {cfg.sink + cfg.window} "
                         f"tokens to see what the window loses; got {ids.shape[1]}")
    errors: dict[int, Tensor] = {}

    class Probe:
        owns_cache = False

        def enter(self, model):
            pass

        def exit(self, model):
            pass

        def prepare_cache(self, cache):
            pass

        def attention(self, module, query, key, value, mask, scaling, stock, **kwargs):
            if query.shape[2] > 1 and not kwargs.get("sliding_window"):
                length = query.shape[2]
                i = torch.arange(length).unsqueeze(1)
                j = torch.arange(length).unsqueeze(0)
                causal = j <= i
                streaming = causal & ((j < cfg.sink) | (i - j < cfg.window))
                rows = slice(cfg.sink + cfg.window, None)           # the queries the restriction changes
                full = attend(query[:, :, rows], key, value, scaling, causal[rows].to(query.device))
                short = attend(query[:, :, rows], key, value, scaling, streaming[rows].to(query.device))
                kv = key.shape[1]
                change = ((full - short).float().square().sum(-1) / full.float().square().sum(-1).clamp(min=1e-30))
                errors[module.layer_idx] = change.mean(dim=(0, 1)).view(kv, -1).mean(-1).cpu()   # (Hkv,)
            return None

    with activate(model, [Probe()]), torch.inference_mode():
        model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    pairs = sorted((float(e), layer, head) for layer, row in errors.items() for head, e in enumerate(row))
    chosen = pairs[:round(cfg.heads * len(pairs))]
    heads = {layer: torch.zeros(row.numel(), dtype=torch.bool) for layer, row in errors.items()}
    for _, layer, head in chosen:
        heads[layer][head] = True
    return heads
