"""The C++ CPU kernel (``impl="cpp"``: csrc/core/, PyTorch binding csrc/torch/,
dga_compile/_extension.py) vs the reference."""

import shutil

import pytest
import torch

from dga_compile import DGAConfig, _extension, dispatch, dynamic_group_attention, reference_attention
from dga_compile._validation import causal_like, mask_4d

from dga_cases import EXPAND, MASK_KINDS, SMALL, TOL, make_mask, qkv, sdpa_golden

pytestmark = pytest.mark.skipif(not _extension.available(), reason="the C++ extension is not built (make setup)")


def test_built_when_a_compiler_is_present():
    """The set-up builds the extension wherever it can: a missing one must be a missing compiler."""
    import os
    if os.environ.get("DGA_NATIVE") == "0" or (os.environ.get("CXX") is None and shutil.which("g++") is None):
        pytest.skip("no compiler, or the extension is turned off")
    assert _extension.library_path().is_file()


def _native(q, k, v, mask, causal, cfg, scale=0.25):
    """Runs the kernel into a NaN-poisoned output, so rows it failed to write show."""
    m = mask_4d(mask)
    out = torch.full(q.shape[:3] + v.shape[3:], float("nan"))
    return _extension.attention(q, k, v, m, causal, causal or causal_like(m, False), scale, cfg, out=out)


CASES = [  # id, B, Hq, Hkv, N, D, Dv, config changes on SMALL
    pytest.param(2, 4, 2, 301, 32, 32, {}, id="B2-H4-KV2-N301-D32"),
    pytest.param(1, 4, 1, 1000, 64, 64, dict(group_size=16, window=64, num_probe=32), id="B1-H4-KV1-N1000-D64-mqa"),
    pytest.param(1, 2, 2, 1023, 80, 48, dict(group_size=16, window=100), id="B1-H2-N1023-D80-Dv48"),
    pytest.param(3, 2, 2, 15, 16, 16, {}, id="B3-H2-N15-D16"),
    pytest.param(1, 2, 1, 1, 8, 8, {}, id="B1-H2-KV1-N1-D8"),
    pytest.param(1, 2, 2, 200, 256, 256, dict(window=0), id="B1-H2-N200-D256-w0"),
    pytest.param(2, 2, 2, 150, 16, 16, dict(group_bias=0.0, focus_ratio=0.0), id="B2-H2-N150-D16-beta0-nofocus"),
    pytest.param(1, 2, 2, 130, 16, 16, dict(window=500), id="B1-H2-N130-D16-w500"),
]


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,Hq,Hkv,N,D,Dv,changes", CASES)
def test_matches_reference_fp32(B, Hq, Hkv, N, D, Dv, changes, causal, mask):
    cfg = SMALL.replace(**changes)
    q, k, v = qkv(B, Hq, Hkv, N, N, D, torch.float32, seed=N, Dv=Dv)
    attn_mask = make_mask(mask, B, Hq, N, N, torch.float32, seed=N)
    out = _native(q, k, v, attn_mask, causal, cfg)
    ref = reference_attention(q, k, v, attn_mask, causal, 0.25, cfg)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def _check_step5(B, Hkv, N, b, changes, causal, mask):
    """The kernel in float32 against the reference in float64 on q [B, 4, N, 16]."""
    cfg = SMALL.replace(query_block=b, **changes)
    q, k, v = qkv(B, 4, Hkv, N, N, 16, seed=N + b)
    attn_mask = make_mask(mask, B, 4, N, N, seed=N)
    out = _native(q, k, v, attn_mask, causal, cfg)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, attn_mask, causal, 0.25, cfg),
                               **TOL[torch.float32])


@pytest.mark.parametrize("mask", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("Hkv,N,b,changes", [  # config changes on SMALL; b never divides N
    pytest.param(2, 63, 16, dict(sinks=4, expand_mass=0.5), id="KV2-N63-b16-s4-tau0.5-g0.1"),
    pytest.param(1, 65, 7, dict(expand_mass=0.9, focus_ratio=0.0, expand_max=0.3), id="KV1-N65-b7-tau0.9-g0-max0.3"),
])
def test_sinks_and_expansion_every_mask_B2_H4_D16(Hkv, N, b, changes, causal, mask):
    """Sinks and step 5′ (row estimates, τ-sets, their union, the dense ceiling) with every mask kind."""
    _check_step5(2, Hkv, N, b, changes, causal, mask)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N,b,changes", [
    pytest.param(130, 64, dict(sinks=4, expand_mass=0.5, focus_ratio=0.0), id="N130-b64-s4-tau0.5-g0"),
    pytest.param(301, 50, dict(sinks=4, expand_mass=0.9, expand_max=0.3), id="N301-b50-s4-tau0.9-g0.1-max0.3"),
    pytest.param(130, 9, dict(sinks=4), id="N130-s4-tau0"),
    pytest.param(65, 1, dict(sinks=4, expand_mass=0.5, focus_ratio=0.0, expand_bias=0.0, expand_max=0.3),
                 id="N65-b1-s4-tau0.5-g0-be0-max0.3"),
])
def test_sinks_and_expansion_sizes_B1_H4_KV2_D16_padleft(N, b, changes, causal):
    _check_step5(1, 2, N, b, changes, causal, "pad_left")


@pytest.mark.parametrize("mask", ["none", "pad_left", "bool"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tau0_ignores_the_other_expansion_fields_bit_for_bit_B2_H4_KV2_N130_D16(causal, mask):
    """τ = 0 is the kernel without step 5′: query_block, expand_bias, expand_max change no bit."""
    q, k, v = qkv(2, 4, 2, 130, 130, 16, torch.float32, seed=1)
    attn_mask = make_mask(mask, 2, 4, 130, 130, torch.float32)
    base = _native(q, k, v, attn_mask, causal, SMALL)
    other = _native(q, k, v, attn_mask, causal, SMALL.replace(query_block=5, expand_bias=0.0, expand_max=0.3))
    assert torch.equal(base, other)


def test_nan_query_row_adds_nothing_to_the_expansion_B1_H2_N70_D16():
    """A NaN query row (no anchor, no probe: γ = 0) is that row's NaN; its estimate adds nothing to
    its block's E, so every other row is the reference's."""
    cfg = EXPAND.replace(focus_ratio=0.0, sinks=4)
    q, k, v = qkv(1, 2, 2, 70, 70, 16, seed=2)
    i = 41                                           # anchors are 4 + 4g + 3: 41 is none
    q[0, 1, i, 3] = float("nan")
    out, want = _native(q, k, v, None, True, cfg), reference_attention(q, k, v, None, True, 0.25, cfg)
    assert out[0, 1, i].isnan().all()
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, 1, i] = False
    torch.testing.assert_close(out[others].double(), want[others], **TOL[torch.float32])


@pytest.mark.parametrize("cfg", [SMALL.replace(focus_ratio=1.0), SMALL.replace(group_size=1)], ids=["gamma1", "m1"])
@pytest.mark.parametrize("mask", ["none", "pad_left", "bool"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_cases_equal_sdpa_B2_H4_KV2_N97_D16(cfg, causal, mask):
    q, k, v = qkv(2, 4, 2, 97, 97, 16, torch.float32, seed=3)
    attn_mask = make_mask(mask, 2, 4, 97, 97, torch.float32)
    out = _native(q, k, v, attn_mask, causal, cfg)
    torch.testing.assert_close(out, sdpa_golden(q, k, v, attn_mask, causal, 0.25), **TOL[torch.float32])


@pytest.mark.parametrize("dtype,mask,cfg", [
    *(pytest.param(dtype, mask, SMALL, id=f"{mask}-{name}") for dtype, name in ((torch.bfloat16, "bf16"),
      (torch.float16, "fp16")) for mask in ("none", "pad_right")),
    pytest.param(torch.float32, "pad_right", EXPAND.replace(query_block=30), id="pad_right-fp32-s2-tau0.7-b30"),
    pytest.param(torch.bfloat16, "none", EXPAND.replace(query_block=30), id="none-bf16-s2-tau0.7-b30"),
    pytest.param(torch.float16, "pad_right", EXPAND.replace(query_block=30), id="pad_right-fp16-s2-tau0.7-b30"),
])
def test_half_types_through_the_op_B2_H4_KV2_N257_D32(dtype, mask, cfg):
    """impl="auto" sends fp32 and 16-bit CPU inference through the kernel (in float32) and returns their dtype."""
    q, k, v = qkv(2, 4, 2, 257, 257, 32, dtype, seed=7)
    attn_mask = make_mask(mask, 2, 4, 257, 257)
    with dispatch.recording() as ran:
        out = dynamic_group_attention(q, k, v, attn_mask, 0.0, True, 0.25, enable_gqa=True, config=cfg)
    assert ran == ["cpp"] and out.dtype == dtype
    torch.testing.assert_close(out, reference_attention(q, k, v, attn_mask, True, 0.25, cfg), **TOL[dtype])


@pytest.mark.parametrize("cfg", [SMALL, EXPAND], ids=["small", "s2-tau0.7-b16"])
def test_fully_masked_rows_give_zero_B1_H2_N120_D16(cfg):
    q, k, v = qkv(1, 2, 2, 120, 120, 16, torch.float32, seed=4)
    mask = torch.ones(1, 1, 120, 120, dtype=torch.bool)
    mask[..., 50:53, :] = False
    out = _native(q, k, v, mask, True, cfg)
    assert bool((out[:, :, 50:53] == 0).all()) and not out.isnan().any()
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, True, 0.25, cfg), **TOL[torch.float32])


def test_non_contiguous_mask_and_inputs_B2_H4_KV2_N190_D16():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 4, 2, 190, 190, 16, torch.float32))
    mask = (torch.rand(2, 4, 190, 190, generator=torch.Generator().manual_seed(0)) < 0.9).transpose(-1, -2)
    assert not q.is_contiguous() and mask.stride(-1) != 1
    out = _native(q, k, v, mask, True, SMALL)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, True, 0.25, SMALL), **TOL[torch.float32])


def test_defaults_long_B1_H2_KV1_N4097_D64():
    """The default config (w=256, m=16, r=128) where DGA applies (N ≥ min_seq_len)."""
    q, k, v = qkv(1, 2, 1, 4097, 4097, 64, torch.float32, seed=9)
    out = _native(q, k, v, None, True, DGAConfig())
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, 0.25, DGAConfig()), **TOL[torch.float32])


@pytest.mark.parametrize("cfg", [SMALL, EXPAND], ids=["small", "s2-tau0.7-b16"])
def test_threads_agree_B1_H4_N600_D32(cfg):
    q, k, v = qkv(1, 4, 4, 600, 600, 32, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native(q, k, v, None, True, cfg)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(_native(q, k, v, None, True, cfg), one, rtol=0, atol=0)


def test_not_used_when_autograd_needs_a_graph():
    """The op's forward records no graph (its autograd saves the inputs), so "auto" runs the kernel
    there; the backward's recomputation needs a graph and runs the blocked path."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 64, 64, 8, torch.float32))
    with dispatch.recording() as ran:
        dynamic_group_attention(q, k, v, None, 0.0, True, 0.25, config=SMALL).sum().backward()
    assert ran == ["cpp", "blocked"]
    assert q.grad is not None


@pytest.mark.parametrize("bad, message", [
    (dict(q=torch.zeros(1, 2, 8, 4, dtype=torch.float64)), "float32"),
    (dict(k=torch.zeros(1, 3, 8, 4)), "Hq % Hkv"),
    (dict(mask=torch.ones(1, 1, 8, 8)), "bool"),
], ids=["fp64", "heads", "float-mask"])
def test_bad_inputs_raise_clearly(bad, message):
    args = dict(q=torch.zeros(1, 2, 8, 4), k=torch.zeros(1, 2, 8, 4), v=torch.zeros(1, 2, 8, 4), mask=None)
    args.update(bad)
    out = torch.empty(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dga_native.attention_cpu(args["q"], args["k"], args["v"], args["mask"], out, True, True, 0.5,
                                           0.1, 4, 4, 2, 1.0, 0, 0.0, 1.0, 64, 1.0)


def test_cli_build_ext(monkeypatch, capsys):
    from dga_compile.cli import main
    assert main(["build-ext"]) == 0                       # up to date: nothing rebuilt
    assert str(_extension.library_path()) in capsys.readouterr().out
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert main(["build-ext", "--force"]) == 1              # the library stays as it was
    assert "could not start" in capsys.readouterr().err
    assert main(["build-ext", "--force", "--soft"]) == 0
    assert _extension.library_path().is_file()


def test_a_broken_library_warns_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "libdga_torch-broken.so"
    broken.write_text("not a shared object")
    monkeypatch.setattr(_extension, "library_path", lambda: broken)
    _extension.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="does not load"):
            assert not _extension.available()
    finally:
        _extension.available.cache_clear()
