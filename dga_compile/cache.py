"""`DGACache`: a transformers `Cache` whose full-attention layers hold a compressed DGA cache.

    from dga_compile import DGACache, DGAConfig
    from dga_compile.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register(DGAConfig()))
    out = model.generate(ids, cache=DGACache(DGAConfig(), model.config), max_new_tokens=64)

What a layer holds and what a decode query attends to is defined in docs/dga.md ("Decoding") and
in code by `dga_compile.decode_reference`; this module is the incremental form of it. Per layer,
after a prefill of N ≥ min_seq_len tokens:

- *packed* slots: the focus tokens' K/V (λ = 0), then one aggregated K̄/V̄ per block of m positions
  (λ = β·log(members), −inf while the block is still inside the window or has no member);
- *recent* raw tokens: every position from the first block not yet complete, with λ = 0 (−inf at
  focus tokens, which sit in the packed slots, and at padding).

A decode step appends its tokens to the recent run; a block is aggregated (with the mean query of
its anchor over the query heads of each kv head) when its anchor arrives, and replaces its members
once the anchor is w positions old. Attention reads the slots only (`dga_compile.decode_op`).

The cache is driven by the attention function: `DGALayer.update` hands itself to the attention
call through HF's ``kwargs`` (key `CACHE_LAYER_KEY`), and an attention that knows it (the one
`dga_compile.integrations.transformers.register` installs) calls `DGALayer.attend`. An attention
that does not (plain "sdpa") never compresses the cache: the next step then raises `CacheError`
instead of silently attending to a cache it cannot read.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._validation import mask_4d
from .config import DGAConfig
from .decode_op import decode_attention
from .decode_reference import (aggregate_blocks, block_anchors, complete_blocks, compresses, focus_mask,
                               group_log_weight)
from .errors import CacheError
from .selection import working_dtype

try:
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DynamicLayer
    from transformers.cache_utils import get_layer_types_and_kwargs
except ImportError:  # pragma: no cover - transformers is an optional dependency
    Cache = CacheLayerMixin = object
    DynamicLayer = DYNAMIC_LAYER_TYPE_MAPPING = get_layer_types_and_kwargs = None

__all__ = ["DGACache", "DGALayer", "CACHE_LAYER_KEY", "cache_nbytes"]

#: The key under which `DGALayer.update` puts itself into the attention call's kwargs.
CACHE_LAYER_KEY = "dga_cache_layer"


class _Slots:
    """Keys [B, H, n, D], values [B, H, n, Dv] and log-weights λ [B, H, n] in buffers that grow along
    dim 2 (capacity doubling, so appends write in place); rows ``start`` … ``stop`` − 1 are live."""

    def __init__(self, k: Tensor, v: Tensor, lam: Tensor):
        self._k, self._v, self._lam = k.new_empty(0), v.new_empty(0), lam.new_empty(0)
        self.start = self.stop = 0
        self._alloc(k.shape[:2], k.shape[-1], v.shape[-1], k.shape[2], k.dtype, lam.dtype, k.device)
        self.append(k, v, lam)

    def _alloc(self, bh, d, dv, rows, dtype, lam_dtype, device):
        cap = max(16, 2 * rows)
        live = self.stop - self.start
        k, v = torch.zeros(*bh, cap, d, dtype=dtype, device=device), torch.zeros(*bh, cap, dv, dtype=dtype, device=device)
        lam = torch.full((*bh, cap), float("-inf"), dtype=lam_dtype, device=device)
        if live:
            k[:, :, :live], v[:, :, :live], lam[:, :, :live] = self.keys, self.values, self.lam
        self._k, self._v, self._lam, self.start, self.stop = k, v, lam, 0, live

    @property
    def keys(self) -> Tensor:
        return self._k[:, :, self.start:self.stop]

    @property
    def values(self) -> Tensor:
        return self._v[:, :, self.start:self.stop]

    @property
    def lam(self) -> Tensor:
        return self._lam[:, :, self.start:self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def append(self, k: Tensor, v: Tensor, lam: Tensor) -> None:
        n = k.shape[2]
        if self.stop + n > self._k.shape[2]:
            self._alloc(k.shape[:2], k.shape[-1], v.shape[-1], len(self) + n, k.dtype, lam.dtype, k.device)
        self._k[:, :, self.stop:self.stop + n] = k
        self._v[:, :, self.stop:self.stop + n] = v
        self._lam[:, :, self.stop:self.stop + n] = lam
        self.stop += n

    def drop_front(self, n: int) -> None:
        self.start += n

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Applies a batch-dim op (beam reordering, repetition, selection) to the buffers."""
        self._k, self._v, self._lam = fn(self._k), fn(self._v), fn(self._lam)

    def nbytes(self) -> int:
        """Bytes of the live rows (keys, values and λ)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.lam))


def _real_tokens(attention_mask: Optional[Tensor], batch: int, n: int, device) -> Tensor:
    """bool [B, n]: which of the last n key positions the last query may see (False: padding).
    ``attention_mask`` is what HF passes to attention: None, bool or additive, [B, 1, Nq, Nk]."""
    vis = mask_4d(attention_mask)
    if vis is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return vis[:, 0, -1, -n:].expand(batch, n)


class DGALayer(CacheLayerMixin):
    """One full-attention layer of a `DGACache` (module docstring). Dense until its first forward
    (the prefill) ends; compressed then if that forward held ≥ ``config.min_seq_len`` tokens."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config: DGAConfig, layer_idx: Optional[int] = None):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.n_seen = 0                  # positions cached so far (the next query's position)
        self.n_prefill = 0               # length of the first forward
        self.packed: Optional[_Slots] = None
        self.recent: Optional[_Slots] = None
        self.n_focus = 0                 # focus slots at the front of `packed` (the most any row has)
        self.blocks_active = 0           # blocks complete so far; `recent` starts at their end
        self._awaiting = False           # a forward stored tokens; its attention has not called attend

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    @property
    def compressed(self) -> bool:
        return self.packed is not None

    def update(self, key_states: Tensor, value_states: Tensor, *args, kwargs: Optional[dict] = None,
               **unused) -> tuple[Tensor, Tensor]:
        """Stores the step's keys/values [B, Hkv, n, D]; returns what a dense attention reads before
        compression (all keys and values so far), after it the step's own (attention then reads the
        slots through `attend`). Links this layer into ``kwargs`` for the attention call."""
        if self._awaiting:
            self._check_driven()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.compressed:
            lam = torch.zeros(key_states.shape[:3], dtype=self.recent.lam.dtype, device=key_states.device)
            self.recent.append(key_states, value_states, lam)
            out = key_states, value_states
        else:
            first = self.n_seen == 0
            self.keys = key_states if first else torch.cat([self.keys, key_states], -2)
            self.values = value_states if first else torch.cat([self.values, value_states], -2)
            self.n_prefill = n if first else self.n_prefill
            out = self.keys, self.values
        self.n_seen += n
        self._awaiting = True
        if isinstance(kwargs, dict):
            kwargs[CACHE_LAYER_KEY] = self
        return out

    def _check_driven(self) -> None:
        """The last forward's attention did not call `attend`: fine for a layer that stays dense."""
        self._awaiting = False
        if self.compressed or compresses(self.n_prefill, self.config) and self.n_seen == self.n_prefill:
            raise CacheError(
                f"DGACache layer {self.layer_idx}: the attention of the last forward did not read the DGA cache "
                f"({self.n_seen} tokens; the layer compresses prefills of ≥ min_seq_len={self.config.min_seq_len}). "
                "Only an attention registered by dga-compile drives it: load the model with attn_implementation="
                "dga_compile.integrations.transformers.register(config) (or register_attention(name, sdpa) for a "
                "dense prefill), or pass a transformers DynamicCache instead")

    def attend(self, query: Tensor, attention_mask: Optional[Tensor], scale: float, dense: Callable[[], Tensor],
               sliding_window: Optional[int] = None, impl: Optional[str] = None) -> Tensor:
        """The attention output [B, Hq, n, Dv] of this forward's queries [B, Hq, n, D].

        Before compression ``dense()`` computes it from what `update` returned (the model's own
        attention: dense or the DGA op); a prefill of ≥ min_seq_len tokens is then compressed.
        After compression the queries read the slots. ``attention_mask`` is the HF mask of this
        forward (None, bool or additive [B, 1, n, n_seen]); ``impl`` overrides ``config.impl``.
        """
        self._awaiting = False
        if sliding_window is not None:
            raise ValueError(f"DGACache layer {self.layer_idx} is a sliding-window layer (window {sliding_window}); "
                             "build the cache as DGACache(config, model.config) so that such layers keep their "
                             "own dense window cache")
        if not self.compressed:
            out = dense()
            if self.n_seen == self.n_prefill == query.shape[2] and compresses(self.n_prefill, self.config):
                self._compress(query, attention_mask, scale)
            return out
        return self._decode(query, attention_mask, scale, impl or self.config.impl)

    def _compress(self, q: Tensor, attention_mask: Optional[Tensor], scale: float) -> None:
        """Prefill of N positions -> packed slots (focus, blocks) + the recent raw run (docs/dga.md)."""
        cfg, m = self.config, self.config.group_size
        k, v = self.keys, self.values
        B, Hkv, N, D = k.shape
        wd = working_dtype(k.dtype)
        real = _real_tokens(attention_mask, B, N, k.device)
        r = min(cfg.num_probe, N)
        focus = focus_mask(q[:, :, N - r:].to(wd), k.to(wd), real, scale, cfg)            # [B, Hkv, N]
        n_f = focus.sum(-1)                                                               # [B, Hkv]
        self.n_focus = int(n_f.max()) if n_f.numel() else 0
        order = (~focus).to(torch.int8).argsort(dim=-1, stable=True)[..., :self.n_focus]      # focus positions, in order
        fk = k.gather(2, order[..., None].expand(-1, -1, -1, D))
        fv = v.gather(2, order[..., None].expand(-1, -1, -1, v.shape[-1]))
        fl = torch.zeros(B, Hkv, self.n_focus, dtype=wd, device=k.device)
        fl = fl.masked_fill(torch.arange(self.n_focus, device=k.device) >= n_f[..., None], float("-inf"))
        raw = real[:, None, :] & ~focus                                                   # grouped or raw tokens
        formed = N // m                                           # blocks whose anchor has arrived
        self.blocks_active = min(complete_blocks(N, cfg), formed)
        kbar, vbar, glam = self._blocks(q, 0, k[:, :, :formed * m], v[:, :, :formed * m], raw[..., :formed * m], scale)
        glam[..., self.blocks_active:] = float("-inf")                                    # pending: still in the window
        self.packed = _Slots(torch.cat([fk, kbar], 2), torch.cat([fv, vbar], 2), torch.cat([fl, glam], 2))
        start = self.blocks_active * m
        rl = torch.zeros(B, Hkv, N - start, dtype=wd, device=k.device).masked_fill(~raw[..., start:], float("-inf"))
        self.recent = _Slots(k[:, :, start:], v[:, :, start:], rl)
        self.keys = self.values = None

    def _blocks(self, q: Tensor, q_first: int, k: Tensor, v: Tensor, members: Tensor, scale: float):
        """(K̄, V̄, λ) of the n blocks spanned by k, v [B, Hkv, n·m, ·] and members bool [B, Hkv, n·m];
        the first block starts at row ``q_first`` of q (negative: before it), so block j's anchor
        query is row q_first + (j+1)·m − 1."""
        B, Hkv = k.shape[:2]
        m = self.config.group_size
        n = k.shape[2] // m
        anchors = block_anchors(0, n, m, k.device) + q_first
        mem = members.reshape(B, Hkv, n, m)
        wd = working_dtype(k.dtype)
        kbar, vbar = aggregate_blocks(q[:, :, anchors].to(wd), k.to(wd), v.to(wd), mem, scale)
        return kbar.to(k.dtype), vbar.to(v.dtype), group_log_weight(mem.sum(-1), self.config.group_bias, wd)

    def _decode(self, q: Tensor, attention_mask: Optional[Tensor], scale: float, impl: str) -> Tensor:
        cfg, m = self.config, self.config.group_size
        n = q.shape[2]
        i0 = self.n_seen - n                                        # the step's first position
        if attention_mask is not None:                              # padding among the step's own tokens
            new = self.recent.lam[:, :, -n:]
            new.masked_fill_(~_real_tokens(attention_mask, q.shape[0], n, q.device)[:, None, :], float("-inf"))
        first, stop = i0 // m, self.n_seen // m                     # blocks whose anchor is in this step
        if stop > first:
            at = first * m - self.blocks_active * m                 # their first position, in `recent`
            span = slice(at, at + (stop - first) * m)
            kbar, vbar, lam = self._blocks(q, first * m - i0, self.recent.keys[:, :, span], self.recent.values[:, :, span],
                                           torch.isfinite(self.recent.lam[:, :, span]), scale)
            self.packed.append(kbar, vbar, torch.full_like(lam, float("-inf")))
        active = min(complete_blocks(i0, cfg), stop)
        if active > self.blocks_active:                             # blocks leaving the window: members -> one slot
            drop = (active - self.blocks_active) * m
            members = torch.isfinite(self.recent.lam[:, :, :drop]).reshape(*q.shape[:1], -1, active - self.blocks_active, m)
            at = self.n_focus + self.blocks_active
            self.packed.lam[:, :, at:at + active - self.blocks_active] = group_log_weight(
                members.sum(-1), cfg.group_bias, self.packed.lam.dtype)
            self.recent.drop_front(drop)
            self.blocks_active = active
        return decode_attention(q, self.packed.keys, self.packed.values, self.packed.lam, self.recent.keys,
                                self.recent.values, self.recent.lam, float(scale), impl)

    # ---- Cache layer protocol -------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """As `DynamicLayer`: masks cover every position, so dense layers of the same cache share them."""
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes this layer holds now (slots and λ; the dense keys and values before compression)."""
        if self.compressed:
            return self.packed.nbytes() + self.recent.nbytes()
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)

    def slots_at(self, n_seen: int) -> int:
        """Slots per (row, kv head) once a step ends at ``n_seen`` positions (a compressed layer
        fed one token per step): n_focus + ⌊n_seen/m⌋ blocks + the recent run from the first block
        not complete for position n_seen − 1."""
        m = self.config.group_size
        formed = n_seen // m
        return self.n_focus + formed + n_seen - min(complete_blocks(n_seen - 1, self.config), formed) * m

    def num_slots(self) -> int:
        """Slots a decode query reads per (row, kv head), −inf ones included (n_seen before compression)."""
        return len(self.packed) + len(self.recent) if self.compressed else self.n_seen

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        if self.compressed:
            self.packed.map_batch(fn)
            self.recent.map_batch(fn)
        elif self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(f"NYI: a DGA cache cannot be cropped (asked to remove {tokens_to_remove} tokens): "
                             "aggregated blocks cannot be split again. Assisted / speculative decoding needs a "
                             "DynamicCache")

    def reset(self) -> None:
        self.__init__(self.config, self.layer_idx)


class DGACache(Cache):
    """A transformers `Cache` that keeps DGA's compressed cache in every full-attention layer.

    Args:
        config: the `DGAConfig` (γ, m, r, w, β, min_seq_len, sinks; ``dense_layers`` and a
            plan's "dense" sites keep a plain `DynamicLayer`, a plan's other entries set their
            layer's parameters; ``impl`` picks the decode kernel). Default ``DGAConfig()``.
        model_config: the model's config: sliding-window and other non-full layers then get the
            layer transformers would give them (a sliding layer keeps its own dense window).
            Without it every layer is a DGA layer (a sliding-window layer then raises).

    Use with a model whose attention drives it (`dga_compile.integrations.transformers.register`),
    e.g. ``model.generate(ids, cache=DGACache(cfg, model.config))``. Greedy, sampling,
    beam search (`reorder_cache`), streaming and stopping criteria work as with `DynamicCache`;
    cropping (assisted decoding) raises.
    """

    def __init__(self, config: Optional[DGAConfig] = None, model_config=None):
        if DynamicLayer is None:
            raise ImportError("DGACache needs transformers: pip install transformers")
        self.config = config or DGAConfig()
        if not isinstance(self.config, DGAConfig):
            raise TypeError(f"config must be a DGAConfig or None, got {type(config).__name__}; model configs go in "
                            "model_config=")
        _check_decodable(self.config)
        layers = []
        if model_config is not None:
            types, kwargs = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
            layers = [self._new_layer(i, t, kw) for i, (t, kw) in enumerate(zip(types, kwargs))]
        super().__init__(layers=layers)

    def _new_layer(self, idx: int, layer_type: str = "full_attention", kwargs: Optional[dict] = None):
        site = self.config.for_site(idx)         # None: in dense_layers, or "dense" in the plan
        if layer_type == "full_attention" and site is not None:
            _check_decodable(site, f" (layer {idx}'s plan entry)" if self.config.plan is not None else "")
            return DGALayer(site, idx)
        return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**(kwargs or {}))

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes the cache holds now, over all layers."""
        return cache_nbytes(self)

    def dense_nbytes(self) -> int:
        """Bytes a `DynamicCache` with the same model config would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, DGALayer) and layer.compressed:
                k = layer.recent.keys
                total += layer.n_seen * k.shape[0] * k.shape[1] * (k.shape[-1] + layer.recent.values.shape[-1]) \
                    * k.element_size()
            else:
                total += _layer_nbytes(layer)
        return total


def _check_decodable(config: DGAConfig, where: str = "") -> None:
    """The decode semantics have no step 5′: refuse it rather than ignore it."""
    if config.expand_mass:
        raise ValueError(f"NYI: the DGA cache does not implement step 5′ (expand_mass={config.expand_mass}{where}) "
                         f"yet (docs/dga.md, Decoding); pass DGACache(config.replace(expand_mass=0.0), ...) — the "
                         f"prefill may keep it")


def cache_nbytes(cache) -> int:
    """Bytes a transformers `Cache` holds now (a `DGACache`'s slots and λ, any other layer's keys and values)."""
    return sum(_layer_nbytes(layer) for layer in cache.layers)


def _layer_nbytes(layer) -> int:
    if isinstance(layer, DGALayer):
        return layer.nbytes()
    return sum(t.numel() * t.element_size() for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, Tensor))
