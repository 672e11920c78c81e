"""Attention methods compared by the evaluation, each counting every score entry it computes.

Every method is an SDPA-contract function (see `dga_compile.integrations.transformers.Attend`)
registered as a Hugging Face attention implementation (`register_method`, which also tells each
call its site: layer index and sliding window). Methods (``Method.kind``, one entry of `KINDS`
each, returning the output and its `cost.Cost`):

- ``dense``: SDPA.
- ``dga``: `dynamic_group_attention` with a `DGAConfig` (with a plan, each site's own config:
  `DGAConfig.for_site`); `dga_cost` counts its entries from the same focus split the op makes.
- ``streaming`` (StreamingLLM, Xiao et al. 2023): ``sinks`` first tokens + the last ``recent`` ones.
- ``topk``: DGA's focus set (top γ·N keys by the last r queries' scores) + the last ``recent``
  tokens, no groups ("focus tokens without groups"); pays the probe scores. With ``cost_target``
  each call solves its ``recent`` so that it costs that fraction of the call's dense entries.
- ``perhead`` (DuoAttention-like, Xiao et al. 2024): the kv heads in ``dense_heads`` (per layer,
  from calibration: `perhead.head_locality`) attend densely, every other head keeps ``sinks`` +
  ``recent`` tokens.

Sites where DGA does not apply (Nq ≠ Nk, short inputs) are dense for every method.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..api import dynamic_group_attention
from ..config import DGAConfig
from ..integrations.transformers import hf_attention_forward, register_forward
from ..blocked import expanded_counts
from ..selection import focus_split, num_focus
from .._validation import causal_like, dga_applies, mask_4d, visible_4d
from .cost import NO_SITE, Cost, CostMeter, Site, solve_increasing

__all__ = ["Method", "Call", "KINDS", "attend_fn", "dga_cost", "register_method", "current_site"]

_QUERY_BLOCK = 256
_SITE: contextvars.ContextVar[Site] = contextvars.ContextVar("dga_eval_site", default=NO_SITE)


@dataclasses.dataclass(frozen=True)
class Method:
    """One line of the comparison. ``kind``: a key of `KINDS`.

    ``config`` sets DGA's γ, m, r, w, β (and the top-k focus ratio / probes); ``sinks`` and
    ``recent`` set the baselines' kept tokens; ``cost_target`` (top-k) solves ``recent`` per call
    to that fraction of dense; ``dense_heads`` (per-head) the (layer, kv head) pairs kept dense.
    """

    kind: str
    config: DGAConfig = DGAConfig(min_seq_len=0)
    sinks: int = 4
    recent: int = 256
    cost_target: Optional[float] = None
    dense_heads: frozenset = frozenset()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Method.kind must be one of {sorted(KINDS)}, got {self.kind!r}")

    @property
    def label(self) -> str:
        c = self.config
        dense = f", layers {','.join(map(str, c.dense_layers))} dense" if c.dense_layers else ""
        if self.kind == "dga":
            return f"DGA {c.budget()}{f', plan {c.plan.name}' if c.plan else ''}{dense}"
        if self.kind == "streaming":
            return f"StreamingLLM {self.sinks} sinks + {self.recent} recent{dense}"
        if self.kind == "topk":
            recent = f"≈{self.recent} recent (equal cost per call)" if self.cost_target is not None else \
                f"{self.recent} recent"
            return f"top-k γ={c.focus_ratio:g} + {recent}{dense}"
        if self.kind == "perhead":
            return f"per-head: {len(self.dense_heads)} kv heads dense, others {self.sinks} sinks + {self.recent} recent"
        return "dense"


class Call:
    """One attention call as the methods see it: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], v, the
    mask and flags, and its `Site`; derived quantities are computed once and shared."""

    def __init__(self, q, k, v, attn_mask, is_causal, scale, dropout_p, site: Site = NO_SITE):
        self.q, self.k, self.v, self.attn_mask, self.is_causal = q, k, v, attn_mask, is_causal
        self.scale, self.dropout_p, self.site = scale, dropout_p, site
        self.vis = visible_4d(attn_mask, is_causal, q.shape[2], k.shape[2], q.device)
        self._focus: dict = {}

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, Hq, Hkv, Nq, Nk)."""
        return self.q.shape[0], self.q.shape[1], self.k.shape[1], self.q.shape[2], self.k.shape[2]

    @functools.cached_property
    def causal(self) -> bool:
        return causal_like(self.vis, self.is_causal)

    @functools.cached_property
    def visible(self) -> Tensor:
        """[B, Hq, Nq] float: keys each query may see (dense attention's entries)."""
        B, Hq, _, nq, nk = self.shape
        if self.vis is None:
            return torch.full((B, Hq, nq), float(nk))
        return self.vis.sum(-1).expand(B, Hq, nq).float().cpu()

    @functools.cached_property
    def spans(self) -> Optional[tuple[Tensor, Tensor]]:
        """(lo, hi) [B, Hq, Nq] long when each query's visible keys are one run lo..hi (causal,
        sliding-window and padding masks; empty rows: hi < lo), else None."""
        B, Hq, _, nq, nk = self.shape
        if self.vis is None:
            return torch.zeros(B, Hq, nq, dtype=torch.long), torch.full((B, Hq, nq), nk - 1, dtype=torch.long)
        v = self.vis.to(torch.uint8)
        lo, hi = v.argmax(-1), nk - 1 - v.flip(-1).argmax(-1)
        count = self.vis.sum(-1)
        empty = count == 0
        if not bool(((count == hi - lo + 1) | empty).all()):
            return None
        hi = torch.where(empty, lo - 1, hi)
        return lo.expand(B, Hq, nq).cpu(), hi.expand(B, Hq, nq).cpu()

    def focus(self, cfg: DGAConfig) -> tuple[Tensor, Tensor]:
        """The op's steps 1–2 in float32: (focus, non-focus) positions [B, Hkv, ·], each increasing."""
        key = (cfg.focus_ratio, cfg.num_probe, cfg.sinks)
        if key not in self._focus:
            self._focus[key] = focus_split(self.q.float(), self.k.float(), mask_4d(self.attn_mask), self.is_causal,
                                           self.scale_or_default, cfg)
        return self._focus[key]

    @property
    def scale_or_default(self) -> float:
        return self.scale or self.q.shape[-1] ** -0.5

    def probe_entries(self, num_probe: int) -> float:
        """Step 1's scores: the last r query rows against their visible keys, per query head."""
        return float(self.visible[..., -min(num_probe, self.shape[3]):].sum())


def current_site() -> Site:
    """The site of the attention call running now (set by `register_method`)."""
    return _SITE.get()


def register_method(name: str, attend: Callable, dense: Callable, dense_layers=()) -> str:
    """Registers the `Attend` ``attend`` as HF attention ``name`` (``dense`` at ``dense_layers``);
    each call runs with `current_site` set to its module's layer index and sliding window."""
    inner = hf_attention_forward(attend, dense, dense_layers)

    def forward(module, *args, **kwargs):
        token = _SITE.set(Site(getattr(module, "layer_idx", None), getattr(module, "sliding_window", None)))
        try:
            return inner(module, *args, **kwargs)
        finally:
            _SITE.reset(token)

    return register_forward(name, forward)


def attend_fn(method: Method, reason: str = ""):
    """The SDPA-contract function (q, k, v, attn_mask, is_causal, scale, dropout_p) for ``method``;
    ``reason``: why a dense method runs here (recorded in the site report)."""

    def attend(q, k, v, attn_mask, is_causal, scale, dropout_p):
        call = Call(q, k, v, attn_mask, is_causal, scale, dropout_p, current_site())
        kind, why, runs = method.kind, reason, method
        if kind == "dga" and method.config.plan is not None:        # the site's own config (DGAConfig.for_site)
            cfg = method.config.for_site(call.site.layer)
            if cfg is None:
                kind, why = "dense", f"plan {method.config.plan.name}: site {call.site.layer} dense"
            else:
                runs = dataclasses.replace(method, config=cfg)
        if kind != "dense" and not dga_applies(q.shape[2], k.shape[2], runs.config.min_seq_len):
            kind, why = "dense", "Nq ≠ Nk" if q.shape[2] != k.shape[2] else f"N < min_seq_len={runs.config.min_seq_len}"
        out, cost = KINDS[kind](runs, call)
        if CostMeter.active is not None:
            CostMeter.active.add(cost, call.site, kind, why)
        return out

    return attend


def _dense(method: Method, call: Call) -> tuple[Tensor, Cost]:
    out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=call.attn_mask, dropout_p=call.dropout_p,
                                         is_causal=call.is_causal, scale=call.scale,
                                         enable_gqa=call.q.shape[1] != call.k.shape[1])
    return out, Cost(call.visible, call.visible)


def _dga(method: Method, call: Call) -> tuple[Tensor, Cost]:
    q, k = call.q, call.k
    out = dynamic_group_attention(q, k, call.v, attn_mask=call.attn_mask, dropout_p=call.dropout_p,
                                  is_causal=call.is_causal, scale=call.scale, enable_gqa=q.shape[1] != k.shape[1],
                                  config=method.config)
    return out, dga_cost(call, method.config) if CostMeter.active is not None else None


def dga_cost(call: Call, cfg: DGAConfig) -> Cost:
    """Every score entry DGA computes at ``cfg`` (docs/dga.md, "Cost"), from the op's own focus
    split and step 5′ choice: step 1 (probes, when any key is chosen by score), step 4
    (aggregation) as extras; per query (attention) step 5's candidates plus, with step 5′, the m
    members of each expanded group (the group's own logit stays counted)."""
    B, Hq, hkv, nq, nk = call.shape
    m, rep = cfg.group_size, Hq // hkv
    _, nonfocus = call.focus(cfg)
    G = nonfocus.shape[-1] // m
    members = nonfocus[..., :G * m].reshape(B, hkv, G, m).repeat_interleave(rep, 1).cpu()   # [B, Hq, G, m]
    complete = _complete_counts(call, members, cfg.window)
    expanded = expanded_counts(call.q, call.k, call.v, call.attn_mask, call.is_causal, call.scale_or_default,
                               cfg).cpu().float()
    probes = call.probe_entries(cfg.num_probe) if num_focus(cfg.focus_ratio, nk) else 0.0
    extra = {"probes": probes, "aggregation": float(B * Hq * G * m)}
    return Cost(call.visible - (m - 1) * complete + m * expanded, call.visible, extra)


def _complete_counts(call: Call, members: Tensor, window: int) -> Tensor:
    """[B, Hq, Nq] float: groups complete for each query (docs/dga.md, step 5). members [B, Hq, G, m]."""
    B, Hq, _, nq, nk = call.shape
    i = torch.arange(nq)
    if call.spans is not None:
        # Groups' first members and anchors both increase, so the complete groups of query i are
        # those with first ≥ lo_i and anchor ≤ hi_i (and ≤ i − w when causal): one run.
        lo, hi = call.spans
        last = torch.minimum(hi, i - window) if call.causal else hi
        before = torch.searchsorted(members[..., 0].contiguous(), lo.contiguous())
        upto = torch.searchsorted(members[..., -1].contiguous(), last.contiguous(), right=True)
        return (upto - before).clamp(min=0).float()
    from ..selection import complete_groups

    vis_full = call.vis.expand(B, Hq, nq, nk).cpu()
    complete = torch.zeros(B, Hq, nq)
    for i0 in range(0, nq, _QUERY_BLOCK):
        rows = vis_full[:, :, i0:i0 + _QUERY_BLOCK]
        complete[:, :, i0:i0 + rows.shape[2]] = complete_groups(rows, members, i0, call.causal, window).sum(-1).float()
    return complete


def _is_focus(call: Call, cfg: DGAConfig) -> Tensor:
    """Bool [B, Hq, 1, Nk]: the focus keys of each query head."""
    focus, _ = call.focus(cfg)
    B, Hq, hkv, _, nk = call.shape
    is_focus = torch.zeros(B, hkv, nk, dtype=torch.bool, device=call.q.device).scatter_(-1, focus, True)
    return is_focus.repeat_interleave(Hq // hkv, 1)[:, :, None, :]


def _recent_rows(call: Call, recent: int, i0: int, i1: int) -> Tensor:
    """Bool [1, 1, i1 − i0, Nk]: the last ``recent`` keys of each query (both sides when not causal)."""
    i = torch.arange(i0, i1, device=call.q.device)[:, None]
    j = torch.arange(call.shape[4], device=call.q.device)[None, :]
    keep = (i - j < recent) & (j <= i) if call.causal else (j - i).abs() < recent
    return keep[None, None]


def _streaming(method: Method, call: Call) -> tuple[Tensor, Cost]:
    sinks = torch.arange(call.shape[4], device=call.q.device) < method.sinks

    def rows(i0, i1):
        return _recent_rows(call, method.recent, i0, i1) | sinks

    return _masked_sdpa(call, rows)


def _topk(method: Method, call: Call) -> tuple[Tensor, Cost]:
    cfg = method.config
    is_focus = _is_focus(call, cfg)
    recent = method.recent
    if method.cost_target is not None:
        recent = _topk_recent(call, cfg, method.cost_target)
    if CostMeter.active is not None:
        CostMeter.active.recents.append(recent)

    def rows(i0, i1):
        return _recent_rows(call, recent, i0, i1) | is_focus

    out, cost = _masked_sdpa(call, rows)
    cost.extra["probes"] = call.probe_entries(cfg.num_probe)
    return out, cost


def _topk_recent(call: Call, cfg: DGAConfig, fraction: float) -> int:
    """The recent window at which top-k + window costs ``fraction`` of this call's dense entries
    (probes included), counted from its focus set; needs one visible run per query (else the
    widest window that stays within the budget is approximated by the causal count)."""
    B, Hq, hkv, nq, nk = call.shape
    focus, _ = call.focus(cfg)
    focus_q = focus.repeat_interleave(Hq // hkv, 1).cpu().contiguous()             # [B, Hq, n_f]
    i = torch.arange(nq)
    lo, hi = call.spans if call.spans is not None else (torch.zeros(B, Hq, nq, dtype=torch.long),
                                                         i.expand(B, Hq, nq))
    hi = torch.minimum(hi, i)
    budget = fraction * float(call.visible.sum()) - call.probe_entries(cfg.num_probe)

    def kept(recent: int) -> float:
        start = torch.maximum(lo, i - recent + 1)
        near = (hi - start + 1).clamp(min=0)
        far_end = torch.minimum(hi, i - recent)          # focus keys older than the window
        far = (torch.searchsorted(focus_q, far_end.contiguous(), right=True)
               - torch.searchsorted(focus_q, lo.contiguous())).clamp(min=0)
        return float((near + far).sum())

    return solve_increasing(kept, budget, 1, nk)


def _perhead(method: Method, call: Call) -> tuple[Tensor, Cost]:
    B, Hq, hkv, _, nk = call.shape
    dense = torch.tensor([(call.site.layer, h // (Hq // hkv)) in method.dense_heads for h in range(Hq)],
                         device=call.q.device)[None, :, None, None]
    sinks = torch.arange(nk, device=call.q.device) < method.sinks

    def rows(i0, i1):
        return _recent_rows(call, method.recent, i0, i1) | sinks | dense

    return _masked_sdpa(call, rows)


def _masked_sdpa(call: Call, rows: Callable[[int, int], Tensor]) -> tuple[Tensor, Cost]:
    """SDPA restricted to ``vis ∧ rows(i0, i1)``, one query block at a time (bounded memory);
    ``rows`` gives the kept keys of queries i0..i1 (bool, broadcastable to [B, Hq, i1 − i0, Nk])."""
    q, k, v = call.q, call.k, call.v
    B, Hq, hkv, nq, nk = call.shape
    rep = Hq // hkv
    kh, vh = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
    out = torch.empty(B, Hq, nq, v.shape[-1], dtype=q.dtype, device=q.device)
    kept = torch.zeros(B, Hq, nq)
    for i0 in range(0, nq, _QUERY_BLOCK):
        i1 = min(i0 + _QUERY_BLOCK, nq)
        allowed = rows(i0, i1)
        if call.vis is not None:
            allowed = allowed & (call.vis if call.vis.shape[-2] == 1 else call.vis[..., i0:i1, :])
        allowed = allowed.expand(B, Hq, i1 - i0, nk)
        out[:, :, i0:i1] = F.scaled_dot_product_attention(q[:, :, i0:i1], kh, vh, attn_mask=allowed, scale=call.scale)
        kept[:, :, i0:i1] = allowed.sum(-1).float().cpu()
    return out, Cost(kept, call.visible)


#: method kind -> ``(method, call) -> (output [B, Hq, Nq, Dv], Cost)``
KINDS: dict[str, Callable[[Method, Call], tuple[Tensor, Cost]]] = {
    "dense": _dense, "dga": _dga, "streaming": _streaming, "topk": _topk, "perhead": _perhead}
