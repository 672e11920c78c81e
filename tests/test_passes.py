"""The rewrite rules on small hand-made graphs (torch.export, make_fx; no Inductor).

Each positive case checks the count of rewritten sites AND that the rewritten program equals
the original at γ = 1 (exact DGA); negative cases check that the site stays dense with a reason.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

from dga_compile import DGAConfig, RewriteError, rewrite

EXACT = DGAConfig(focus_ratio=1.0, group_size=4, window=2, num_probe=4, min_seq_len=0)
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


def _check_rewritten(module, args, n_sites=1, cfg=EXACT, decompose=False, tol=1e-5):
    ep = torch.export.export(module, args)
    if decompose:
        ep = ep.run_decompositions()
    out, report = rewrite(ep, cfg)
    assert report.num_rewritten == n_sites == _count(out), str(report)
    assert _count(ep) == 0, "rewrite() mutated its input"
    torch.testing.assert_close(out.module()(*args), module(*args), rtol=tol, atol=tol)
    return report


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


@pytest.mark.parametrize("decompose", [False, True], ids=["aten-sdpa", "decomposed"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_sdpa_spellings_export_B2_H4_N13_D8(spelling, decompose):
    q, k, v = _qkv()
    mask = _causal_bool(13)
    report = _check_rewritten(Sdpa(spelling), (q, k, v, mask), decompose=decompose)
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


@pytest.mark.parametrize("upcast", [False, True], ids=["fp32", "upcast"])
@pytest.mark.parametrize("mask_form", ["none", "add", "masked_fill", "where"])
def test_hand_written_export_B2_H4_N13_D8(mask_form, upcast):
    q, k, v = _qkv()
    module = HandWritten(mask_form=mask_form, upcast=upcast, dropout=True)
    report = _check_rewritten(module, (q, k, v, _mask_for(mask_form)))
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
    report = _check_rewritten(module, (q, k, v, mask), decompose=decompose)
    assert ("gqa:repeat_kv" in report.sites[0].tags) == gqa


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_hand_written_half_precision(dtype):
    q, k, v = _qkv(dtype=dtype)
    mask = torch.where(_causal_bool(13), 0.0, torch.finfo(dtype).min).to(dtype)
    _check_rewritten(HandWritten(upcast=True), (q, k, v, mask), tol=3e-2)


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
