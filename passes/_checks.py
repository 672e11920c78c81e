"""The checks every matched site must pass before it can become DGA (correctness, not policy).

`check_site` returns the first reason the op cannot compute what the site computes (no shape
metadata, not one floating type, a finite-bias mask, heads that do not group, a head dim that
is not static), or None.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _graph as g
from ._masks import MaskFacts

__all__ = ["check_site"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_site(m, mask: MaskFacts) -> Optional[str]:
    """Why the match ``m`` (a `_rules.Match` with q, k, v bound) must stay dense, or None."""
    shapes = [None if x is None else x.shape for x in (m.q, m.k, m.v)]
    if any(s is None for s in shapes):
        return "no shape metadata on q/k/v (meta['val']); trace with torch.export, make_fx or Dynamo"
    if any(len(s) != 4 for s in shapes):
        return f"q/k/v are not 4-D [B, H, N, D]: {shapes}"
    (bq, hq, _, d), (bk, hkv, nk, dk), (bv, hv, nv, _) = shapes
    dtypes = {g.tensor_val(x.node).dtype for x in (m.q, m.k, m.v)}
    if len(dtypes) != 1 or not dtypes <= set(_FLOATS):
        return f"q/k/v dtypes {sorted(map(str, dtypes))} are not one floating type"
    anchor = g.tensor_val(m.anchor)
    q_dtype = g.tensor_val(m.q.node).dtype
    if anchor is not None and anchor.dtype != q_dtype:
        return f"the attention output is {anchor.dtype} but q is {q_dtype}"
    if mask.kind == "bias":
        return "the mask holds finite additive biases (ALiBi / T5-style position bias?): not DGA-compatible"
    for what, a, b in (("batch", bq, bk), ("batch", bk, bv), ("kv heads", hkv, hv), ("key length", nk, nv),
                       ("head dim", d, dk)):
        if None not in (g.static_int(a), g.static_int(b)) and a != b:
            return f"q/k/v disagree on the {what} ({a} vs {b})"
    if None not in (g.static_int(hq), g.static_int(hkv)) and hq % hkv:
        return f"Hq={hq} is not a multiple of Hkv={hkv}"
    if m.scale is None and g.static_int(d) is None:
        return f"the head dim {d} is dynamic, so the default scale 1/sqrt(D) is not a constant"
    return None
