"""The rewrite rules on small hand-made graphs (torch.export, make_fx; no Inductor).

Each positive case checks the count of rewritten sites, that the rewritten program equals the
original at γ = 1 (exact DGA), AND that at γ < 1 it equals `reference_attention` on the site's
own q / k / v, mask, causality and scale (`_check_reference`): a rewrite that drops the causal
flag, a mask or the GQA grouping is exact at γ = 1 but differs there. Negative cases check that
the site stays dense with a reason.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from dga_cases import TOL
from dga_compile import DGAConfig, RewriteError, reference_attention, rewrite
from dga_compile import policy

EXACT = DGAConfig(focus_ratio=1.0, group_size=4, window=2, num_probe=4, min_seq_len=0)
#: γ < 1 at small N: DGA really groups (m = 4), windows (w = 4) and probes (r = 8)
APPROX = DGAConfig(focus_ratio=0.1, group_size=4, window=4, num_probe=8, min_seq_len=0)
DGA = torch.ops.dga.attention.default


def _qkv(B=2, H=4, Hkv=4, N=13, D=8, Nk=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Nk or N, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _causal_bool(N, Nk=None):
    return torch.ones(N, Nk or N, dtype=torch.bool).tril()


def _hf_additive(N, B=2, pad=3):
    """HF-style float mask: causal AND right padding of the second batch row, as where(vis, 0, finfo.min).

    (Left padding would leave fully masked query rows, where eager softmax over finfo.min averages
    all values but SDPA and DGA output 0.)"""
    vis = _causal_bool(N).expand(B, 1, N, N).clone()
    vis[1, :, :, N - pad:] = False
    return torch.where(vis, 0.0, torch.finfo(torch.float32).min)


def _count(program) -> int:
    gm = program.graph_module if isinstance(program, torch.export.ExportedProgram) else program
    return sum(n.target is DGA for n in gm.graph.nodes)


def _check_rewritten(module, args, n_sites=1, cfg=EXACT, decompose=False, tol=1e-5, semantic=None):
    """Counts and γ = 1 exactness; with ``semantic`` (the site's reference_attention arguments)
    also `_check_reference` at γ < 1."""
    ep = torch.export.export(module, args)
    if decompose:
        ep = ep.run_decompositions()
    out, report = rewrite(ep, cfg)
    assert report.num_rewritten == n_sites == _count(out), str(report)
    assert _count(ep) == 0, "rewrite() mutated its input"
    torch.testing.assert_close(out.module()(*args), module(*args), rtol=tol, atol=tol)
    if semantic is not None:
        _check_reference(ep, args, semantic, module(*args))
    return report


def _check_reference(program, args, semantic, dense, layout=None):
    """At γ < 1 the rewritten ``program`` equals ``reference_attention(**semantic)`` (in the
    output ``layout``, a function of the [B, H, N, D] result), and differs from ``dense``."""
    out, report = rewrite(program, APPROX)
    got = (out.module() if isinstance(out, torch.export.ExportedProgram) else out)(*args)
    want = reference_attention(**semantic, config=APPROX)
    want = layout(want) if layout else want
    torch.testing.assert_close(got, want, **TOL[want.dtype])
    assert (want.double() - dense.double()).abs().max() > 0.02, "DGA equals dense here: the check cannot fail"


class Sdpa(torch.nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, mask):
        s = self.spelling
        if s == "positional":
            return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False)
        if s == "keyword-scale":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
        if s == "causal-positional":
            return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
        if s == "causal-gqa":
            return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
        raise AssertionError(s)


SPELLINGS = ["positional", "keyword-scale", "causal-positional", "causal-gqa"]


def _sdpa_semantic(spelling, q, k, v, mask):
    """What `Sdpa` computes, as reference_attention arguments."""
    if spelling == "causal-gqa":
        k, v = k[:, :2], v[:, :2]
    causal = "causal" in spelling
    return dict(q=q, k=k, v=v, attn_mask=None if causal else mask, is_causal=causal,
                scale=0.2 if spelling == "keyword-scale" else None)


@pytest.mark.parametrize("decompose", [False, True], ids=["aten-sdpa", "decomposed"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_sdpa_spellings_export_B2_H4_N13_D8(spelling, decompose):
    q, k, v = _qkv()
    mask = _causal_bool(13)
    report = _check_rewritten(Sdpa(spelling), (q, k, v, mask), decompose=decompose,
                              semantic=_sdpa_semantic(spelling, q, k, v, mask))
    assert report.sites[0].causal == ("yes" if "causal" in spelling and not decompose else "mask")


@pytest.mark.parametrize("op", ["flash_cpu", "math"])
def test_aten_backend_variants_tuple_outputs_make_fx(op):
    """The fused ATen variants return tuples: the rewrite replaces output [0]. (make_fx decomposes
    the math variant into matmul/_safe_softmax, which the hand-written rule takes.)"""
    q, k, v = _qkv(N=11)
    mask = _hf_additive(11)

    def f(q, k, v, mask):
        if op == "flash_cpu":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask)[0]
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, scale=0.3)[0]

    gm = make_fx(f)(q, k, v, mask)
    out, report = rewrite(gm, EXACT)
    assert report.num_rewritten == 1 == _count(out)
    assert report.sites[0].tags == ("aten:flash_cpu",) if op == "flash_cpu" else report.sites[0].rule == "matmul-softmax"
    torch.testing.assert_close(out(q, k, v, mask), f(q, k, v, mask))
    semantic = dict(q=q, k=k, v=v, attn_mask=mask, is_causal=False, scale=None if op == "flash_cpu" else 0.3)
    _check_reference(gm, (q, k, v, mask), semantic, f(q, k, v, mask))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_joint_forward_backward_graph_B2_H4_N11_D8(causal):
    """A joint graph (forward + backward, as aot_autograd traces training): the forward op and
    its flash_cpu backward are both replaced; outputs and gradients equal the original at γ = 1."""
    def f(q, k, v, grad):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return (out,) + torch.autograd.grad(out, (q, k, v), grad)

    q, k, v = (x.requires_grad_() for x in _qkv(N=11))
    grad = torch.randn(2, 4, 11, 8)
    gm = make_fx(f, tracing_mode="fake")(q, k, v, grad)
    out, report = rewrite(gm, EXACT)
    assert report.num_rewritten == 1 and "joint" in report.sites[0].tags, str(report)
    assert not any("flash" in str(n.target) for n in out.graph.nodes)
    torch.testing.assert_close(out(q, k, v, grad), f(q, k, v, grad), rtol=1e-5, atol=1e-5)
    # γ < 1: output and gradients are reference_attention's and its autograd's
    approx, _ = rewrite(gm, APPROX)
    want = reference_attention(q, k, v, None, causal, None, APPROX)
    want = (want,) + torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), approx(q, k, v, grad), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert (want[0] - f(q, k, v, grad)[0]).abs().max() > 0.02


def test_logsumexp_used_stays_dense():
    q, k, v = _qkv(N=11)

    def f(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        return out, lse

    out, report = rewrite(make_fx(f)(q, k, v), EXACT)
    assert report.num_rewritten == 0 and "logsumexp" in report.sites[0].reason


class HandWritten(torch.nn.Module):
    """softmax(q·kᵀ·s + mask)·v in configurable spellings (HF eager, GPT-2, BERT, older code)."""

    def __init__(self, scale_form="mul", kt_form="transpose", mask_form="add", gqa=False, upcast=False, dropout=False):
        super().__init__()
        self.scale_form, self.kt_form, self.mask_form = scale_form, kt_form, mask_form
        self.gqa, self.upcast, self.dropout = gqa, upcast, dropout

    def forward(self, q, k, v, mask):
        if self.gqa:  # repeat_kv: [B, Hkv, N, D] -> [B, Hkv·n, N, D]
            B, Hkv, N, D = k.shape
            n = q.shape[1] // Hkv
            k = k[:, :, None].expand(B, Hkv, n, N, D).reshape(B, Hkv * n, N, D)
            v = v[:, :, None].expand(B, Hkv, n, N, D).reshape(B, Hkv * n, N, D)
        d = q.shape[-1]
        kt = {"transpose": lambda: k.transpose(-1, -2), "transpose23": lambda: k.transpose(2, 3),
              "permute": lambda: k.permute(0, 1, 3, 2)}[self.kt_form]()
        if self.scale_form == "q":
            q = q * d ** -0.5
        w = torch.matmul(q, kt)
        if self.scale_form == "mul":
            w = w * (1.0 / math.sqrt(d))
        elif self.scale_form == "div":
            w = w / math.sqrt(d)
        if self.mask_form == "add":
            w = w + mask
        elif self.mask_form == "masked_fill":
            w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        elif self.mask_form == "where":
            w = torch.where(mask, w, torch.tensor(torch.finfo(w.dtype).min))
        if self.upcast:
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            w = w.softmax(-1)
        if self.dropout:
            w = F.dropout(w, p=0.1, training=False)
        return torch.matmul(w, v)


def _mask_for(form, N=13):
    return _hf_additive(N) if form == "add" else _causal_bool(N).expand(2, 1, N, N)


def _hand_written_semantic(module, q, k, v, mask):
    """What `HandWritten` computes, as reference_attention arguments (k, v before repeat_kv)."""
    return dict(q=q, k=k, v=v, attn_mask=None if module.mask_form == "none" else mask, is_causal=False,
                scale=1.0 if module.scale_form == "none" else None)


@pytest.mark.parametrize("upcast", [False, True], ids=["fp32", "upcast"])
@pytest.mark.parametrize("mask_form", ["none", "add", "masked_fill", "where"])
def test_hand_written_export_B2_H4_N13_D8(mask_form, upcast):
    q, k, v = _qkv()
    module = HandWritten(mask_form=mask_form, upcast=upcast, dropout=True)
    mask = _mask_for(mask_form)
    report = _check_rewritten(module, (q, k, v, mask), semantic=_hand_written_semantic(module, q, k, v, mask))
    site = report.sites[0]
    assert site.rule == "matmul-softmax" and "scale=1/sqrt(D)" in site.tags
    assert site.mask == {"none": "none", "add": "input"}.get(mask_form, "bool")  # a float graph input: checked by the op


@given(scale_form=st.sampled_from(["mul", "div", "q", "none"]),
       kt_form=st.sampled_from(["transpose", "transpose23", "permute"]),
       mask_form=st.sampled_from(["none", "add", "masked_fill", "where"]),
       gqa=st.booleans(), batch=st.sampled_from([1, 2]), decompose=st.booleans())
@settings(max_examples=12, deadline=None)
def test_hand_written_spellings_property(scale_form, kt_form, mask_form, gqa, batch, decompose):
    q, k, v = _qkv(B=batch, Hkv=2 if gqa else 4, N=9)
    mask = _mask_for(mask_form, 9)[:batch]
    module = HandWritten(scale_form, kt_form, mask_form, gqa)
    report = _check_rewritten(module, (q, k, v, mask), decompose=decompose,
                              semantic=_hand_written_semantic(module, q, k, v, mask))
    assert ("gqa:repeat_kv" in report.sites[0].tags) == gqa


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hand_written_half_precision(dtype):
    q, k, v = _qkv(dtype=dtype)
    mask = torch.where(_causal_bool(13), 0.0, torch.finfo(dtype).min).to(dtype)
    module = HandWritten(upcast=True)
    _check_rewritten(module, (q, k, v, mask), tol=3e-2, semantic=_hand_written_semantic(module, q, k, v, mask))


# ------------------------------------------------------------------------------------ negatives

class ReturnsWeights(HandWritten):
    def forward(self, q, k, v, mask):
        w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask).softmax(-1)
        return w @ v, w


class Alibi(torch.nn.Module):
    def forward(self, q, k, v, slopes):
        N = q.shape[2]
        pos = torch.arange(N, dtype=q.dtype)
        bias = slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_weights_with_other_users_stay_dense():
    q, k, v = _qkv()
    out, report = rewrite(torch.export.export(ReturnsWeights(), (q, k, v, _hf_additive(13))), EXACT)
    assert report.num_rewritten == 0 and _count(out) == 0
    assert "other users" in report.sites[0].reason


def test_finite_bias_mask_stays_dense():
    q, k, v = _qkv()
    out, report = rewrite(torch.export.export(Alibi(), (q, k, v, torch.rand(4))), EXACT)
    assert report.num_rewritten == 0 and report.sites[0].mask == "bias"
    with pytest.raises(RewriteError, match="finite additive biases"):
        rewrite(torch.export.export(Alibi(), (q, k, v, torch.rand(4))), EXACT.replace(strict=True))


def test_cross_attention_stays_dense():
    q, k, v = _qkv(N=7, Nk=13)
    out, report = rewrite(torch.export.export(Sdpa("positional"), (q, k, v, None)), EXACT)
    assert report.num_rewritten == 0 and "Nq=7 ≠ Nk=13" in report.sites[0].reason


def test_report_table_and_default_config_runs_dga():
    """Default-style config (γ < 1) on N=64 really changes the output; the report renders."""
    q, k, v = _qkv(N=64, D=16)
    ep = torch.export.export(Sdpa("causal-positional"), (q, k, v, None))
    out, report = rewrite(ep, DGAConfig(min_seq_len=0, group_size=4, window=4, num_probe=8))
    got, want = out.module()(q, k, v, None), ep.module()(q, k, v, None)
    assert torch.isfinite(got).all() and (got - want).abs().max() > 1e-3
    assert "1 of 1" in report.summary() and report.table().row_count == 1


class SlidingWindow(torch.nn.Module):
    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2])
        vis = (i[None, :] > i[:, None] - self.window) & (i[None, :] <= i[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis)


@pytest.mark.parametrize("window, rewritten", [(8, False), (4096, True)], ids=["W8-dense", "W4096-rewritten"])
def test_min_saving_policy_sliding_window(window, rewritten):
    """A sliding window W in the graph bounds the keys per query: small W leaves DGA nothing to save."""
    q, k, v = _qkv(N=13)
    out, report = rewrite(torch.export.export(SlidingWindow(window), (q, k, v)), DGAConfig(min_seq_len=0))
    assert report.num_rewritten == rewritten
    assert rewritten or f"sliding window of {window} keys" in report.sites[0].reason


class TwoLayers(torch.nn.Module):
    def forward(self, q, k, v):
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(x, k, v, is_causal=True)


def test_dense_layers_policy_keeps_named_sites_dense():
    """DGAConfig.dense_layers names attention sites by their order in the graph; those stay dense, with the reason."""
    q, k, v = _qkv(N=13)
    out, report = rewrite(torch.export.export(TwoLayers(), (q, k, v)), DGAConfig(min_seq_len=0, dense_layers=(1,)))
    assert [s.rewritten for s in report.sites] == [True, False]
    assert "dense_layers=(1,)" in report.sites[1].reason


# ------------------------------------------------------------------ einsum, bmm on [B·H, N, D] views

#: einsum spellings: (scores, output, operands in BSHD, the key operand first)
EINSUMS = {
    "bhid": ("bhid,bhjd->bhij", "bhij,bhjd->bhid", False, False),
    "bhqd": ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd", False, False),
    "ellipsis": ("...id,...jd->...ij", "...ij,...jd->...id", False, False),
    "bshd": ("bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", True, False),
    "k-first": ("bhjd,bhid->bhij", "bhjd,bhij->bhid", False, True),
}
FILLS = {"-finfo.max": lambda dt: -torch.finfo(dt).max, "finfo.min": lambda dt: torch.finfo(dt).min,
         "-inf": lambda dt: float("-inf")}


class Einsum(torch.nn.Module):
    """softmax(einsum(q, k)·s masked_fill(~mask, fill))·v as research code writes it."""

    def __init__(self, spelling, fill, scale):
        super().__init__()
        self.spelling, self.fill, self.scale = spelling, fill, scale

    def forward(self, q, k, v, mask):
        scores_eq, out_eq, bshd, k_first = EINSUMS[self.spelling]
        d = q.shape[-1]
        s = torch.einsum(scores_eq, k, q) if k_first else torch.einsum(scores_eq, q, k)
        s = s / math.sqrt(d) if self.scale == "div" else s * d ** -0.5
        s = s.masked_fill(~mask, FILLS[self.fill](s.dtype))
        p = s.softmax(-1)
        return torch.einsum(out_eq, v, p) if k_first else torch.einsum(out_eq, p, v)


@pytest.mark.parametrize("decompose", [False, True], ids=["einsum", "decomposed"])
@pytest.mark.parametrize("fill", list(FILLS))
@pytest.mark.parametrize("spelling, scale", [("bhid", "div"), ("bhqd", "mul"), ("ellipsis", "div"), ("bshd", "mul"),
                                             ("k-first", "div")], ids=["bhid-div", "bhqd-mul", "ellipsis-div",
                                                                       "bshd-mul", "k_first-div"])
def test_einsum_attention_B2_H4_N13_D8(spelling, fill, scale, decompose):
    """Attention spelled with torch.einsum (was left dense with no report entry): a tagged variant
    of the matmul-softmax rule, in BHSD and BSHD letterings, masks filled with −finfo.max,
    finfo.min or −inf, the scale by division or multiplication."""
    q, k, v = _qkv()
    mask = _causal_bool(13).expand(2, 1, 13, 13).clone()
    mask[1, :, :, 10:] = False  # right padding too
    bshd = EINSUMS[spelling][2]
    args = tuple(x.transpose(1, 2) for x in (q, k, v)) + (mask,) if bshd else (q, k, v, mask)
    module = Einsum(spelling, fill, scale)
    report = _check_rewritten(module, args, decompose=decompose)
    site = report.sites[0]
    assert site.rule == "matmul-softmax" and "scale=1/sqrt(D)" in site.tags and site.mask == "bool"
    assert ("einsum" in site.tags) == (not decompose)
    ep = torch.export.export(module, args)
    _check_reference(ep, args, dict(q=q, k=k, v=v, attn_mask=mask, is_causal=False, scale=None), module(*args),
                     layout=(lambda o: o.transpose(1, 2)) if bshd else None)


class Bmm3d(torch.nn.Module):
    """Attention on [B·H, N, D] views: torch.bmm, kᵀ by transpose(1, 2) or mT, a [B·H, N, N] mask."""

    def __init__(self, kt, split):
        super().__init__()
        self.kt, self.split = kt, split

    def forward(self, q, k, v, mask):
        B, H, N, D = q.shape
        q3, k3, v3 = (x.reshape(B * H, N, D) for x in (q, k, v))
        kt = k3.transpose(1, 2) if self.kt == "transpose" else k3.mT
        s = torch.bmm(q3, kt) / math.sqrt(D) + mask.expand(B, H, N, N).reshape(B * H, N, N)
        o = torch.bmm(s.softmax(-1), v3)
        return o.view(B, H, N, D) if self.split else o


@pytest.mark.parametrize("split", [True, False], ids=["out-4d", "out-3d"])
@pytest.mark.parametrize("kt", ["transpose", "mT"])
def test_bmm_3d_attention_with_head_split_B2_H4_N11_D8(kt, split):
    """3-D [B·H, N, D] attention (was NYI): the graph reshapes q/k/v from [B, H, N, D], which
    proves the split of B·H; the output stays [B·H, N, Dv] when the model keeps it 3-D."""
    q, k, v = _qkv(N=11)
    mask = _hf_additive(11)
    module = Bmm3d(kt, split)
    report = _check_rewritten(module, (q, k, v, mask))
    assert "3d" in report.sites[0].tags and report.sites[0].mask == "input"
    layout = None if split else (lambda o: o.reshape(8, 11, 8))
    _check_reference(torch.export.export(module, (q, k, v, mask)), (q, k, v, mask),
                     dict(q=q, k=k, v=v, attn_mask=mask, is_causal=False, scale=None), module(q, k, v, mask), layout)


def test_bmm_3d_attention_without_head_split_stays_dense_with_reason():
    """q/k/v that are 3-D graph inputs do not show how B·H splits: dense, and the report says why."""
    def f(q3, k3, v3):
        return torch.bmm(torch.bmm(q3, k3.transpose(1, 2)).softmax(-1), v3)

    x = torch.randn(8, 11, 8)
    out, report = rewrite(make_fx(f)(x, x, x), EXACT)
    assert report.num_rewritten == 0 and "3-D [B·H, N, D] attention whose split of B·H" in report.sites[0].reason


# ------------------------------------------------------------------ cross-attention, what stays dense and why

class Projected(torch.nn.Module):
    """q from x, k and v from ``memory`` (cross-attention) or from x (self-attention), Nq = Nk."""

    def __init__(self, cross):
        super().__init__()
        torch.manual_seed(0)
        self.cross, self.q, self.k, self.v = cross, *(torch.nn.Linear(32, 32) for _ in range(3))

    def forward(self, x, memory):
        src = memory if self.cross else x
        B, N, _ = x.shape
        q, k, v = (lin(t).view(B, N, 4, 8).transpose(1, 2) for lin, t in ((self.q, x), (self.k, src), (self.v, src)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, 32)


def test_cross_attention_with_equal_lengths_stays_dense_and_says_why():
    """Cross-attention with Nq == Nk was rewritten with no note: the graph shows q and k/v read
    different inputs, and DGA's anchor and window rules are defined for self-attention only."""
    x, memory = torch.randn(2, 13, 32), torch.randn(2, 13, 32)
    out, report = rewrite(torch.export.export(Projected(cross=True), (x, memory)), EXACT)
    assert report.num_rewritten == 0 and report.sites[0].reason == policy.CROSS
    _, report = rewrite(torch.export.export(Projected(cross=False), (x, memory)), EXACT)
    assert report.num_rewritten == 1 and policy.NOT_CAUSAL in report.sites[0].reason


def test_non_causal_site_of_unknown_origin_is_noted():
    """Not causal, and q/k/v are graph inputs (nothing shows they come from one sequence): rewritten, with a note."""
    q, k, v = _qkv()
    _, report = rewrite(torch.export.export(Sdpa("positional"), (q, k, v, None)), EXACT)
    assert report.num_rewritten == 1 and policy.NOT_CAUSAL_UNKNOWN in report.sites[0].reason


def test_softmax_without_product_with_v_is_reported_dense():
    """A softmax over q·kᵀ whose weights feed no product with v is a near miss: listed with its reason."""
    def f(q, k):
        return (q @ k.transpose(-1, -2)).softmax(-1).sum(-1)

    q, k, _ = _qkv()
    out, report = rewrite(make_fx(f)(q, k), EXACT)
    assert report.num_rewritten == 0 and "do not feed a product with v" in report.sites[0].reason


def test_bool_mask_cast_to_float_is_a_bias():
    """scores + mask.float() adds 1.0 where the mask is True: a bias (was read as a bool mask)."""
    def f(q, k, v, mask):
        return ((q @ k.transpose(-1, -2)) * 0.3 + mask.float()).softmax(-1) @ v

    q, k, v = _qkv()
    out, report = rewrite(make_fx(f)(q, k, v, _causal_bool(13)), EXACT)
    assert report.num_rewritten == 0 and report.sites[0].mask == "bias"


class InGraphWindow(torch.nn.Module):
    """A sliding window built in the graph, spelled as HF and older code do."""

    def __init__(self, spelling, window):
        super().__init__()
        self.spelling, self.window = spelling, window

    def forward(self, q, k, v):
        i = torch.arange(q.shape[2])
        q_idx, kv_idx = i[:, None], i[None, :]
        if self.spelling == "kv>q-W":
            vis = (kv_idx > q_idx - self.window) & (kv_idx <= q_idx)
        elif self.spelling == "q-kv<W":
            vis = (q_idx - kv_idx < self.window) & (q_idx >= kv_idx)
        else:  # "fill": masked where kv ≤ q − W or kv > q
            vis = ~((kv_idx <= q_idx - self.window) | (kv_idx > q_idx))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis)


@pytest.mark.parametrize("spelling", ["kv>q-W", "q-kv<W", "fill"])
def test_sliding_window_spellings_are_proven(spelling):
    """Each spelling proves the window (dense below min_saving, with the same reason) and causality."""
    q, k, v = _qkv(N=13)
    _, report = rewrite(torch.export.export(InGraphWindow(spelling, 8), (q, k, v)), DGAConfig(min_seq_len=0))
    assert report.num_rewritten == 0 and "sliding window of 8 keys" in report.sites[0].reason
    _, report = rewrite(torch.export.export(InGraphWindow(spelling, 12), (q, k, v)), APPROX.replace(min_saving=0.0))
    assert report.num_rewritten == 1 and "not causal" not in report.sites[0].reason


# ------------------------------------------------------------------ the site policy

@pytest.mark.parametrize("facts, rewrite_, reason", [
    pytest.param(policy.SiteFacts(nq=5, nk=9), False, "Nq=5 ≠ Nk=9", id="decode"),
    pytest.param(policy.SiteFacts(same_sequence=False), False, "cross-attention", id="cross"),
    pytest.param(policy.SiteFacts(weights_used=True, same_sequence=False), False, "other users", id="weights-first"),
    pytest.param(policy.SiteFacts(position=3), False, "dense_layers=(3,)", id="dense-layer"),
    pytest.param(policy.SiteFacts(window=64, nk=4096), False, "sliding window of 64 keys", id="short-window"),
    pytest.param(policy.SiteFacts(window=64, nk=64), True, "", id="window-not-shorter-than-Nk"),
    pytest.param(policy.SiteFacts(window=4096, nk=8192), True, "", id="long-window"),
    pytest.param(policy.SiteFacts(causal=False, same_sequence=True), True, "bidirectional", id="bidirectional"),
    pytest.param(policy.SiteFacts(causal=True), True, "", id="causal"),
])
def test_policy_decisions(facts, rewrite_, reason):
    decision = policy.decide(facts, DGAConfig(dense_layers=(3,)))
    assert decision.rewrite == rewrite_ and reason in decision.reason and (reason or not decision.reason)
