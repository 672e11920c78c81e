"""Generated attention graphs through `rewrite()` and the backend's pass: 0 silent miscompiles.

Each case is drawn from a seeded generator: a spelling (SDPA, matmul-softmax, einsum, bmm on
[B·H, N, D] views), a layout (BHSD, BSHD), a mask (none, bool, additive with −inf / finfo.min /
−finfo.max, key padding), causality (flag, graph-built tril, none), GQA (``repeat_kv``,
``enable_gqa``), fp32/fp16/bf16 and odd sizes. Every case checks that

- the number of rewritten sites equals the number of attention sites (1, or 2 for two layers);
- at γ = 1 the rewritten program equals eager (the glue is exact);
- at γ < 1 it equals `reference_attention` on the site's own q / k / v, mask, causality and
  scale (a rewrite that drops the causal flag, a mask or the GQA grouping differs by far more).

Most cases trace with `torch.export` (a quarter decomposed by ``make_fx``), one in ten also
goes through Dynamo with the backend's pass. ``make test`` runs the first `FAST` cases; the
slow mark adds the rest (`CASES` in all) and a few through ``backend="dga"`` with Inductor.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from dga_cases import TOL
from dga_compile import DGAConfig, reference_attention, rewrite
from dga_compile.passes import rewrite_graph_module

EXACT = DGAConfig(focus_ratio=1.0, group_size=4, window=2, num_probe=4, min_seq_len=0)
APPROX = DGAConfig(focus_ratio=0.1, group_size=4, window=4, num_probe=8, min_seq_len=0)
DGA = torch.ops.dga.attention.default
CASES, FAST = 520, 100
#: eager vs exact DGA: eager rounds its scores and softmax to the dtype, DGA works in float32
EAGER_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
             torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}
EINSUM = {"bhsd": [("bhid,bhjd->bhij", "bhij,bhjd->bhid"), ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"),
                   ("bnid,bnjd->bnij", "bnij,bnjd->bnid"), ("...id,...jd->...ij", "...ij,...jd->...id")],
          "bshd": [("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"), ("bihd,bjhd->bhij", "bhij,bjhd->bihd")]}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One generated attention graph."""

    spelling: str  # sdpa | matmul | einsum | bmm3d
    layout: str    # bhsd | bshd: the layout of the inputs and the output
    mask: str      # none | bool | additive | padding
    causal: str    # none | flag (is_causal, or a tril built in the graph) | mask (ANDed into the mask input)
    gqa: str       # none | repeat (repeat_kv in the graph) | enable (SDPA enable_gqa)
    scale: str     # default | mul | div | q | explicit | none
    fill: str      # -inf | min | -max: the masked value of float masks and masked_fill
    kt: str        # transpose | permute | mT: how kᵀ is spelled (matmul, bmm3d)
    upcast: bool   # softmax in float32, cast back
    dtype: torch.dtype
    B: int
    H: int
    Hkv: int
    N: int
    D: int
    layers: int    # 1, or 2 sites one after the other
    trace: str     # export | decomposed | dynamo

    @property
    def id(self) -> str:
        dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return (f"{self.spelling}-{self.layout}-{self.mask}-causal_{self.causal}-gqa_{self.gqa}-{self.scale}-{dt}"
                f"-B{self.B}-H{self.H}-Hkv{self.Hkv}-N{self.N}-D{self.D}-L{self.layers}-{self.trace}")


def draw(seed: int) -> Spec:
    r = random.Random(seed)
    spelling = r.choice(["sdpa", "matmul", "einsum", "bmm3d"])
    H = r.choice([1, 2, 4])
    gqa = r.choice(["none", "repeat"] + (["enable"] if spelling == "sdpa" else [])) if H > 1 else "none"
    scale = r.choice(["default", "explicit"] if spelling == "sdpa" else ["mul", "div", "q", "none", "explicit"])
    return Spec(spelling, r.choice(["bhsd", "bshd"]), r.choice(["none", "bool", "additive", "padding"]),
                r.choice(["none", "flag", "mask"]), gqa, scale, r.choice(["-inf", "min", "-max"]),
                r.choice(["transpose", "permute", "mT"]), r.random() < 0.5,
                r.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]), r.choice([1, 2, 3]), H,
                H // 2 if gqa != "none" else H, r.choice([5, 9, 13, 17, 23, 31]), r.choice([4, 8, 12]),
                r.choice([1, 1, 1, 2]), r.choice(["export", "export", "decomposed"]) if seed % 10 else "dynamo")


def _fill(spec: Spec) -> float:
    return {"-inf": float("-inf"), "min": torch.finfo(spec.dtype).min, "-max": -torch.finfo(spec.dtype).max}[spec.fill]


class Generated(torch.nn.Module):
    """The attention `spec` spells; forward(q, k, v, mask) in the spec's layout (k, v with Hkv heads)."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        #: einsum on the BSHD inputs as they are (with repeat_kv the inputs go to BHSD first)
        self.bshd_einsum = spec.spelling == "einsum" and spec.layout == "bshd" and spec.gqa == "none"
        table = EINSUM["bshd" if self.bshd_einsum else "bhsd"]
        self.equations = table[spec.N % len(table)]

    def forward(self, q, k, v, mask):
        x = q
        for _ in range(self.spec.layers):
            x = self.attend(x, k, v, mask)
        return x

    def attend(self, q, k, v, mask):
        s = self.spec
        B, H, N, D = s.B, s.H, s.N, s.D
        if s.layout == "bshd" and not self.bshd_einsum:
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        if s.gqa == "repeat":  # HF repeat_kv on [B, Hkv, N, D]
            k, v = (x[:, :, None].expand(B, s.Hkv, H // s.Hkv, N, D).reshape(B, H, N, D) for x in (k, v))
        vis = self.visible(mask, q.device)
        if s.spelling == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, is_causal=s.causal == "flag" and vis is None,
                                                 scale=0.3 if s.scale == "explicit" else None,
                                                 enable_gqa=s.gqa == "enable")
            return out.transpose(1, 2) if s.layout == "bshd" else out
        if s.scale == "q":
            q = q * D ** -0.5
        w = self.scores(q, k)
        w = {"mul": lambda: w * (1.0 / math.sqrt(D)), "div": lambda: w / math.sqrt(D), "explicit": lambda: w * 0.3,
             "q": lambda: w, "none": lambda: w}[s.scale]()
        if vis is not None:
            if s.spelling == "bmm3d":
                vis = vis if vis.dim() == 2 else vis.expand(B, H, N, N).reshape(B * H, N, N)
            w = w + vis if vis.dtype != torch.bool else (
                w.masked_fill(~vis, _fill(s)) if N % 2 else torch.where(vis, w, torch.tensor(_fill(s), dtype=w.dtype)))
        p = F.softmax(w.float(), dim=-1).to(w.dtype) if s.upcast else w.softmax(-1)
        return self.output(p, v)

    def visible(self, mask, device):
        """The mask the site applies: the input (bool, additive or key padding), ANDed with a
        causal tril built in the graph for causal="flag" (except SDPA without another mask)."""
        s = self.spec
        vis = None if s.mask == "none" and s.causal != "mask" else mask
        if s.causal == "flag" and (s.spelling != "sdpa" or vis is not None):
            tril = torch.ones(s.N, s.N, dtype=torch.bool, device=device).tril()
            if vis is None:
                vis = tril
            elif vis.dtype == torch.bool:
                vis = vis & tril
            else:
                vis = vis.masked_fill(~tril, _fill(s))
        return vis

    def scores(self, q, k):
        s = self.spec
        if s.spelling == "einsum":
            return torch.einsum(self.equations[0], q, k)
        if s.spelling == "bmm3d":
            q, k = (x.reshape(s.B * s.H, s.N, s.D) for x in (q, k))
        kt = {"transpose": lambda: k.transpose(-1, -2), "mT": lambda: k.mT,
              "permute": lambda: k.permute(*range(k.dim() - 2), k.dim() - 1, k.dim() - 2)}[s.kt]()
        return torch.bmm(q, kt) if s.spelling == "bmm3d" else q @ kt

    def output(self, p, v):
        s = self.spec
        if s.spelling == "einsum":
            out = torch.einsum(self.equations[1], p, v)
        elif s.spelling == "bmm3d":
            out = torch.bmm(p, v.reshape(s.B * s.H, s.N, s.D)).view(s.B, s.H, s.N, s.D)
        else:
            out = p @ v
        return out.transpose(1, 2) if s.layout == "bshd" and not self.bshd_einsum else out


def inputs(spec: Spec, seed: int) -> tuple:
    """(q, k, v, mask) in the spec's layout; the mask never hides a whole query row (eager softmax
    and SDPA / DGA differ there), so key 0 stays visible."""
    g = torch.Generator().manual_seed(seed)
    shape = lambda h: (spec.B, spec.N, h, spec.D) if spec.layout == "bshd" else (spec.B, h, spec.N, spec.D)
    q, k, v = (torch.randn(shape(h), generator=g).to(spec.dtype) for h in (spec.H, spec.Hkv, spec.Hkv))
    N, B = spec.N, spec.B
    if spec.mask == "bool":
        vis = torch.rand(B, 1, N, N, generator=g) < 0.8
    elif spec.mask == "padding":
        vis = torch.arange(N) < (N - torch.randint(0, N // 3 + 1, (B,), generator=g))[:, None]
        vis = vis[:, None, None, :]
    else:
        vis = torch.ones(B, 1, N, N, dtype=torch.bool)
    if spec.causal == "mask":
        vis = vis & torch.ones(N, N, dtype=torch.bool).tril()
    vis[..., 0] = True
    if spec.mask == "additive":
        return q, k, v, torch.zeros(vis.shape, dtype=spec.dtype).masked_fill(~vis, _fill(spec))
    return q, k, v, vis


def semantic(spec: Spec, args: tuple) -> dict:
    """What one site computes, for `reference_attention`: q [B, H, N, D], k/v [B, Hkv, N, D] in the
    spec's dtype, the mask, causality and the scale."""
    q, k, v, mask = args
    if spec.layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    vis = Generated(spec).visible(mask, q.device)
    scale = {"default": None, "mul": None, "div": None, "q": None, "none": 1.0, "explicit": 0.3}[spec.scale]
    return dict(q=q, k=k, v=v, attn_mask=vis, is_causal=spec.causal == "flag" and vis is None, scale=scale)


def reference(spec: Spec, args: tuple, config: DGAConfig) -> torch.Tensor:
    """`reference_attention` site after site, in the spec's output layout."""
    x = args[0]
    for _ in range(spec.layers):
        sem = semantic(spec, (x,) + args[1:])
        out = reference_attention(**sem, config=config)
        x = out.transpose(1, 2) if spec.layout == "bshd" else out
    return x


def _traced(module, spec: Spec, args: tuple):
    if spec.trace == "decomposed":
        return make_fx(module)(*args)
    return torch.export.export(module, args)


def _count(program) -> int:
    gm = program.graph_module if isinstance(program, torch.export.ExportedProgram) else program
    return sum(n.target is DGA for n in gm.graph.nodes)


def _dynamo(module, args, config):
    reports = []

    def backend(gm, example_inputs):
        reports.append(rewrite_graph_module(gm, config))
        return gm

    torch._dynamo.reset()
    out = torch.compile(module, backend=backend, fullgraph=True)(*args)
    return out, [s for r in reports for s in r.sites]


def check_case(seed: int) -> None:
    spec = draw(seed)
    module, args = Generated(spec), inputs(spec, seed)
    eager = module(*args)
    want = reference(spec, args, APPROX)
    for cfg, expected, tol in ((EXACT, eager, EAGER_TOL[spec.dtype]), (APPROX, want, TOL[spec.dtype])):
        if spec.trace == "dynamo":
            got, sites = _dynamo(module, args, cfg)
        else:
            out, report = rewrite(_traced(module, spec, args), cfg)
            got, sites = (out.module() if isinstance(out, torch.export.ExportedProgram) else out)(*args), report.sites
            assert _count(out) == spec.layers, spec.id
        assert len(sites) == spec.layers and all(s.rewritten for s in sites), "\n".join(map(str, sites))
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, w=f"{spec.id} at γ={cfg.focus_ratio:g}": f"{w}: {m}")


@pytest.mark.parametrize("seed", [pytest.param(i, id=f"{i}-{draw(i).id}", marks=() if i < FAST else pytest.mark.slow)
                                  for i in range(CASES)])
def test_generated_attention_rewrites_exactly(seed):
    check_case(seed)


def test_generated_cases_cover_every_variant():
    """The generator reaches every spelling, layout, mask, causality, GQA form and dtype within the fast cases."""
    specs = [draw(i) for i in range(FAST)]
    for field, values in (("spelling", {"sdpa", "matmul", "einsum", "bmm3d"}), ("layout", {"bhsd", "bshd"}),
                          ("mask", {"none", "bool", "additive", "padding"}), ("causal", {"none", "flag", "mask"}),
                          ("gqa", {"none", "repeat", "enable"}), ("trace", {"export", "decomposed", "dynamo"}),
                          ("dtype", {torch.float32, torch.float16, torch.bfloat16})):
        assert {getattr(s, field) for s in specs} == values, field


def test_generated_cases_really_run_dga():
    """A negative control: at γ < 1 most generated sites differ from dense attention by far
    more than the tolerance, so the comparison with the reference can fail."""
    differ = 0
    for seed in range(0, FAST, 4):
        spec = draw(seed)
        args = inputs(spec, seed)
        gap = (reference(spec, args, APPROX).double() - Generated(spec)(*args).double()).abs().max()
        differ += bool(gap > 0.05)
    assert differ >= FAST // 4 * 0.6, differ


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 7, 11], ids=lambda s: f"{s}-{draw(s).id}")
def test_generated_attention_through_inductor(seed):
    """backend="dga" (rewrite + Inductor) on generated graphs, at γ < 1 against the reference."""
    import dga_compile

    spec = draw(seed)
    module, args = Generated(spec), inputs(spec, seed)
    torch._dynamo.reset()
    got = dga_compile.compile(module, APPROX)(*args)
    torch.testing.assert_close(got, reference(spec, args, APPROX), **TOL[spec.dtype])
