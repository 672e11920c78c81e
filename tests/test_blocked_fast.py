"""The PyTorch fast no-grad forward of the blocked path (dga_compile/_blocked_fast.py, the route
`blocked_attention` takes without a mask or autograd on the CPU) vs the reference."""

import pytest
import torch
import torch.nn.functional as F

import dga_compile.blocked as blocked
from dga_compile import DGAConfig, reference_attention
from dga_compile.blocked import blocked_attention

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts calls of the fast path, so a test fails if it silently ran the masked loop."""
    calls = []
    real = blocked.fast_attention
    monkeypatch.setattr(blocked, "fast_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _qkv(B, Hq, Hkv, N, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(B, h, N, D, generator=gen, dtype=torch.float64).to(dtype)
    return make(Hq), make(Hkv), make(Hkv)


CASES = [  # B, Hq, Hkv, N, D, causal, window, group_size, focus_ratio, block
    pytest.param(2, 4, 4, 301, 16, True, 40, 4, 0.1, 32, id="B2-H4-N301-D16-causal-w40-b32"),
    pytest.param(1, 4, 2, 257, 16, True, 20, 3, 0.2, 64, id="B1-H4-KV2-N257-D16-causal-w20-b64"),  # window < block
    pytest.param(1, 2, 1, 200, 8, True, 0, 4, 0.1, 16, id="B1-H2-KV1-N200-D8-causal-w0"),
    pytest.param(1, 2, 2, 130, 8, True, 500, 4, 0.1, 7, id="B1-H2-N130-D8-causal-w500-b7"),   # no group ever complete
    pytest.param(1, 3, 3, 111, 8, True, 9, 2, 0.0, 16, id="B1-H3-N111-D8-causal-nofocus"),
    pytest.param(2, 4, 2, 203, 16, False, 40, 4, 0.1, 32, id="B2-H4-KV2-N203-D16-full"),
    pytest.param(1, 2, 2, 150, 256, True, 30, 4, 0.1, 32, id="B1-H2-N150-D256-causal"),
]


@pytest.mark.parametrize("B,Hq,Hkv,N,D,causal,window,m,gamma,block", CASES)
def test_fast_matches_reference_fp64(fast_calls, B, Hq, Hkv, N, D, causal, window, m, gamma, block):
    q, k, v = _qkv(B, Hq, Hkv, N, D, torch.float64)
    cfg = DGAConfig(min_seq_len=0, group_size=m, window=window, num_probe=8, focus_ratio=gamma)
    out = blocked_attention(q, k, v, is_causal=causal, config=cfg, block_size=block)
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=causal, config=cfg), rtol=0, atol=1e-10)
    assert fast_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fast_matches_reference_low_precision(fast_calls, dtype):
    q, k, v = _qkv(1, 4, 2, 263, 32, dtype, seed=1)
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=24, num_probe=16)
    out = blocked_attention(q, k, v, is_causal=True, config=cfg, block_size=32)
    golden = reference_attention(q.double(), k.double(), v.double(), is_causal=True, config=cfg)
    assert out.dtype == dtype
    # Both compute in fp32; the focus choice may differ from fp64 only by near-ties, so compare at dtype.
    torch.testing.assert_close(out, reference_attention(q, k, v, is_causal=True, config=cfg), rtol=0, atol=TOL[dtype])
    assert (out.double() - golden).abs().max() < 50 * TOL[dtype]
    assert fast_calls


@pytest.mark.parametrize("cfg", [DGAConfig(min_seq_len=0, focus_ratio=1.0), DGAConfig(min_seq_len=0, group_size=1)],
                         ids=["gamma1", "m1"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fast_exact_cases_equal_sdpa(fast_calls, cfg, causal):
    q, k, v = _qkv(2, 2, 2, 97, 16, torch.float64, seed=2)
    out = blocked_attention(q, k, v, is_causal=causal, config=cfg, block_size=16)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), rtol=0, atol=1e-10)
    assert fast_calls


def test_grad_uses_differentiable_path(fast_calls):
    """With inputs that need grad the fast path must not run (it records no autograd graph)."""
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 2, 120, 8, torch.float64, seed=3))
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=16, num_probe=8)
    grads = torch.autograd.grad(blocked_attention(q, k, v, is_causal=True, config=cfg, block_size=32).sum(), (q, k, v))
    ref = torch.autograd.grad(reference_attention(q, k, v, is_causal=True, config=cfg).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    assert not fast_calls


def test_masked_site_uses_masked_loop(fast_calls):
    q, k, v = _qkv(1, 2, 2, 100, 8, torch.float64, seed=4)
    mask = torch.ones(100, 100, dtype=torch.bool).tril()
    mask[:, :3] = False
    cfg = DGAConfig(min_seq_len=0, group_size=4, window=8, num_probe=8)
    with torch.no_grad():
        out = blocked_attention(q, k, v, attn_mask=mask, config=cfg, block_size=32)
    torch.testing.assert_close(out, reference_attention(q, k, v, attn_mask=mask, config=cfg), rtol=0, atol=1e-10)
    assert not fast_calls
