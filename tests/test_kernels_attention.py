"""Fused DGA forward kernel (kernels/attention.py) against the reference.

On CPU-only hosts the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1)
at tiny shapes; the `gpu` cases run the same checks at real shapes on CUDA (`make test-gpu`).
"""

import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from dga_compile import DGAConfig, dispatch, dynamic_group_attention, reference_attention
from dga_compile._validation import mask_4d
from dga_compile.blocked import blocked_attention
from dga_compile.selection import select

triton = pytest.importorskip("triton")
from dga_compile.kernels import available, pipeline, triton_attention  # noqa: E402
from dga_compile.kernels.attention import block_m_for, fused_forward  # noqa: E402
from dga_compile.kernels.streams import plan_mask, prepare_streams  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _qkv(B, Hq, Hkv, N, D, dtype, dv=None, device=DEV, layout="BHND"):
    """Random q, k, v; layout "BNHD" gives non-contiguous [B, H, N, D] views (as HF's transpose)."""
    def make(h, d):
        if layout == "BNHD":
            return torch.randn(B, N, h, d, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, N, d, device=device, dtype=dtype)
    return make(Hq, D), make(Hkv, D), make(Hkv, dv or D)


def _key_padding(B, N, device=DEV):
    """bool [B, N]: batch b hides its first 3·b keys (left padding) and its last b keys."""
    vis = torch.ones(B, N, dtype=torch.bool, device=device)
    for b in range(B):
        vis[b, :3 * b] = False
        vis[b, N - b:] = False
    return vis


def _mask(kind, B, N, device=DEV):
    """(attn_mask, is_causal) for a mask kind the fused kernel takes."""
    kp = _key_padding(B, N, device)
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "keypad":                                          # bool [B, 1, 1, N]
        return kp[:, None, None, :], False
    if kind == "keypad-causal":
        return kp[:, None, None, :], True
    if kind == "hf-4d":                                           # additive finfo.min, causal via the mask
        tril = torch.ones(N, N, dtype=torch.bool, device=device).tril()
        vis = tril & kp[:, None, :]
        return torch.zeros(B, 1, N, N, device=device).masked_fill(~vis[:, None], torch.finfo(torch.float32).min), False
    raise ValueError(kind)


def _golden(q, k, v, mask, causal, cfg):
    return reference_attention(q.double(), k.double(), v.double(), mask, causal, None, cfg)


def _assert_close(name, ref, out, dtype):
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"{name}: max abs error {err:.3g} > {TOL[dtype]}"


def _assert_grads_match(q, k, v, mask, causal, cfg, dtype, against=blocked_attention):
    """dq, dk, dv of `triton_attention` vs autograd through ``against``, same cotangent."""
    grad_out = torch.randn(*q.shape[:3], v.shape[-1], device=q.device, dtype=dtype)
    grads = []
    for fn in (triton_attention, against):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        fn(*leaves, mask, causal, None, cfg).backward(grad_out)
        grads.append([x.grad for x in leaves])
    for name, got, want in zip(("dq", "dk", "dv"), *grads):
        _assert_close(name, want, got, dtype)


CASES = [  # B, Hq, Hkv, N, D, Dv, dtype, mask kind, layout, group_size, window
    pytest.param(1, 2, 1, 96, 16, 16, torch.float32, "causal", "BHND", 4, 8, id="B1-H2-Hkv1-N96-D16-causal-fp32"),
    pytest.param(2, 4, 2, 77, 24, 24, torch.float32, "none", "BHND", 4, 8, id="B2-H4-Hkv2-N77-D24-full-fp32"),
    pytest.param(1, 3, 1, 101, 32, 32, torch.float16, "causal", "BNHD", 5, 6, id="B1-H3-MQA-N101-D32-causal-fp16-strided"),
    pytest.param(1, 2, 2, 90, 16, 16, torch.bfloat16, "causal", "BHND", 4, 0, id="B1-H2-N90-D16-causal-bf16-w0"),
    pytest.param(2, 2, 1, 83, 16, 8, torch.float32, "keypad", "BHND", 4, 8, id="B2-H2-Hkv1-N83-D16-Dv8-keypad-fp32"),
    pytest.param(2, 2, 2, 80, 16, 16, torch.float16, "keypad-causal", "BHND", 3, 5, id="B2-H2-N80-D16-keypad-causal-fp16"),
    pytest.param(2, 2, 1, 75, 16, 16, torch.float32, "hf-4d", "BNHD", 4, 8, id="B2-H2-Hkv1-N75-D16-hf4d-fp32"),
    pytest.param(1, 1, 1, 66, 64, 64, torch.float32, "causal", "BHND", 8, 16, id="B1-H1-N66-D64-causal-fp32"),
]


def _case_inputs(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w, device=DEV, probe=8):
    torch.manual_seed(zlib.crc32(repr((B, Hq, Hkv, N, D, kind)).encode()))   # stable across processes
    q, k, v = _qkv(B, Hq, Hkv, N, D, dtype, Dv, device, layout)
    mask, causal = _mask(kind, B, N, device)
    cfg = DGAConfig(focus_ratio=0.15, group_size=m, num_probe=probe, window=w, min_seq_len=16)
    return q, k, v, mask, causal, cfg


@pytest.mark.parametrize("B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w", CASES)
def test_fused_kernel_matches_reference(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w):
    """The kernel alone, output poisoned with NaN before launch, against the float64 reference."""
    q, k, v, mask, causal, cfg = _case_inputs(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w)
    scale = 1 / math.sqrt(D)
    plan = plan_mask(mask, causal, B, N, N)
    assert not plan.reason
    sel = select(q.float(), k.float(), v.float(), mask_4d(mask), causal, scale, cfg)
    bm = block_m_for(D)
    st = prepare_streams(sel, plan, N, m, w, bm, dtype)
    out = torch.full((B, Hq, N, Dv), float("nan"), dtype=dtype, device=q.device)
    fused_forward(q, st, causal=plan.causal, scale=scale, group_logit=cfg.group_bias * math.log(m),
                  group_size=m, window=w, block_m=bm, out=out)
    ref = _golden(q, k, v, mask, causal, cfg)
    _assert_close("out", ref, out, dtype)
    dense = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                           attn_mask=None if mask is None else mask_4d(mask), enable_gqa=True)
    assert (ref - dense).nan_to_num().abs().max() > 1e-2, "the case must be really approximate"


@pytest.mark.parametrize("B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w", [CASES[2], CASES[5], CASES[6]])
def test_triton_attention_matches_reference(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w):
    """The whole kernel pipeline (scoring, sort, aggregation, fused step 5) against the reference."""
    q, k, v, mask, causal, cfg = _case_inputs(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w)
    _assert_close("out", _golden(q, k, v, mask, causal, cfg), triton_attention(q, k, v, mask, causal, None, cfg), dtype)


@pytest.mark.parametrize("spec", [
    pytest.param(dict(focus_ratio=1.0), id="gamma1"),
    pytest.param(dict(group_size=1), id="m1"),
])
def test_exact_special_cases_equal_sdpa(spec):
    """γ = 1 and m = 1 make DGA exactly dense attention."""
    torch.manual_seed(1)
    q, k, v = _qkv(1, 2, 1, 70, 16, torch.float32)
    cfg = DGAConfig(min_seq_len=16, num_probe=8, window=4, group_bias=1.0).replace(**spec)
    out = triton_attention(q, k, v, None, True, None, cfg)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("nq, nk", [(40, 40), (1, 70), (33, 70)], ids=["short", "decode", "Nq!=Nk"])
def test_dense_outside_dga(nq, nk):
    """Below min_seq_len or with Nq ≠ Nk the result is SDPA's."""
    q = torch.randn(1, 2, nq, 16, device=DEV)
    k, v = torch.randn(2, 1, 2, nk, 16, device=DEV)
    out = triton_attention(q, k, v, None, False, None, DGAConfig(min_seq_len=64))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_fallback_warns_once_and_matches_blocked():
    """A per-head mask is not a kernel case: impl="triton" gives one NYI warning, then what "auto"
    runs (not the kernel), with the blocked path's result; calling the kernels directly raises."""
    q, k, v, _, _, cfg = _case_inputs(1, 2, 2, 70, 16, 16, torch.float32, "none", "BHND", 4, 4)
    mask = torch.rand(1, 2, 70, 70, device=DEV) > 0.3
    dispatch._warned.clear()
    with warnings.catch_warnings(record=True) as seen, dispatch.recording() as ran:
        warnings.simplefilter("always")
        out = dynamic_group_attention(q, k, v, mask, config=cfg.replace(impl="triton"))
        dynamic_group_attention(q, k, v, mask, config=cfg.replace(impl="triton"))
    assert [str(w.message) for w in seen if "NYI" in str(w.message)].__len__() == 1
    assert ran and "triton" not in ran
    torch.testing.assert_close(out, blocked_attention(q, k, v, mask, False, None, cfg))
    with pytest.raises(NotImplementedError, match="NYI: per-head mask"):
        triton_attention(q, k, v, mask, False, None, cfg)


@pytest.mark.parametrize("attn_mask, reason", [
    pytest.param(torch.ones(1, 2, 1, 8, dtype=torch.bool), "per-head", id="per-head"),
    pytest.param(torch.ones(8, 8, dtype=torch.bool).triu(), "not causal", id="anti-causal"),
])
def test_plan_mask_reasons(attn_mask, reason):
    assert reason in plan_mask(attn_mask, False, 1, 8, 8).reason


def test_plan_mask_reads_hf_mask_as_causal_key_padding():
    mask, _ = _mask("hf-4d", 2, 12, "cpu")
    plan = plan_mask(mask, False, 2, 12, 12)
    assert plan.causal and not plan.reason
    assert torch.equal(plan.key_visible, _key_padding(2, 12, "cpu"))


def test_op_impl_triton_forward_and_backward():
    """torch.ops.dga.attention with impl="triton": kernel forward and backward, against the blocked path."""
    q, k, v, _, causal, cfg = _case_inputs(1, 2, 1, 70, 16, 16, torch.float32, "causal", "BHND", 4, 4)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with dispatch.recording() as ran:
        out = dynamic_group_attention(*leaves, is_causal=True, enable_gqa=True, config=cfg.replace(impl="triton"))
        out.square().sum().backward()
    assert ran == ["triton", "triton"], "the kernels ran neither the forward nor the recomputed one"
    ref_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    ref = blocked_attention(*ref_leaves, None, True, None, cfg)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for name, a, b in zip("qkv", leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("query_block", [0, 16], ids=["no-step5", "step5-b16"])
def test_triton_op_eager_matches_launcher(query_block):
    """torch.ops.dga.fused_forward (the triton op Inductor sees on CUDA) runs eagerly like the launcher."""
    if pipeline._fused_forward_op is None:
        pytest.skip("torch.library.triton_op is missing in this torch")
    q, k, v, mask, causal, cfg = _case_inputs(1, 2, 1, 64, 16, 16, torch.float32, "causal", "BHND", 4, 4)
    cfg = cfg.replace(expand_mass=0.7, query_block=query_block or 1)
    plan = plan_mask(mask, causal, 1, 64, 64)
    sel = select(q, k, v, None, True, 0.25, cfg)
    st = prepare_streams(sel, plan, 64, 4, 4, block_m_for(16), torch.float32)
    if query_block:
        st = pipeline._expand(q, st, plan, 0.25, cfg, block_m_for(16))
    args = (True, 0.25, math.log(4), 4, 4, block_m_for(16), query_block)
    torch.testing.assert_close(torch.ops.dga.fused_forward(q, *st, *args), pipeline._launch(q, *st, *args))


def test_stream_arguments_in_streams_order():
    """The kernels, the launcher (the triton op's schema) and the autograd function take the
    stream tensors in the one `Streams` order."""
    import inspect

    from dga_compile.kernels.attention import _fwd_kernel
    from dga_compile.kernels.attention_bwd import _bwd_kernel
    from dga_compile.kernels.streams import Streams
    n = len(Streams._fields)
    assert _fwd_kernel.arg_names[1:1 + n] == [f.upper() for f in Streams._fields]
    assert _bwd_kernel.arg_names[1:1 + n] == [f.upper() for f in Streams._fields]
    params = list(inspect.signature(pipeline._launch).parameters)
    assert params[1:1 + n] == list(Streams._fields) and tuple(params[1 + n:]) == pipeline._STEP5_ARGS


def test_available_in_interpreter_or_cuda():
    assert available()


# --------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    pytest.param(2, 8, 2, 4096, 128, torch.bfloat16, "causal", id="B2-H8-Hkv2-N4096-D128-causal-bf16"),
    pytest.param(1, 4, 4, 3001, 64, torch.float16, "none", id="B1-H4-N3001-D64-full-fp16"),
    pytest.param(1, 4, 1, 2500, 256, torch.bfloat16, "causal", id="B1-H4-MQA-N2500-D256-causal-bf16"),
    pytest.param(2, 4, 2, 2048, 96, torch.float32, "hf-4d", id="B2-H4-Hkv2-N2048-D96-hf4d-fp32"),
    pytest.param(2, 4, 2, 2048, 128, torch.float16, "keypad-causal", id="B2-H4-Hkv2-N2048-D128-keypad-causal-fp16"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B, Hq, Hkv, N, D, dtype, kind", GPU_CASES)
def test_gpu_triton_attention_matches_reference(B, Hq, Hkv, N, D, dtype, kind):
    q, k, v, mask, causal, cfg = _case_inputs(B, Hq, Hkv, N, D, D, dtype, kind, "BNHD", 16, 256, "cuda", 64)
    cfg = cfg.replace(min_seq_len=1024)
    out = triton_attention(q, k, v, mask, causal, None, cfg)
    ref = reference_attention(q.float(), k.float(), v.float(), mask, causal, None, cfg)
    _assert_close("out", ref, out, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_compile_sees_triton_op():
    """Under torch.compile on CUDA the fused kernel is a triton op in the graph, not an opaque call."""
    q, k, v, mask, causal, cfg = _case_inputs(1, 4, 2, 2048, 64, 64, torch.bfloat16, "causal", "BHND", 16, 256,
                                              "cuda", 64)
    cfg = cfg.replace(min_seq_len=1024)
    from torch._inductor.utils import run_and_get_code
    fn = torch.compile(lambda q, k, v: triton_attention(q, k, v, None, True, None, cfg))
    out, codes = run_and_get_code(fn, q, k, v)
    assert any("_fwd_kernel" in code for code in codes), "Inductor's output code does not launch the fused kernel"
    _assert_close("compiled", triton_attention(q, k, v, None, True, None, cfg), out, torch.bfloat16)


@pytest.mark.parametrize("B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w", [CASES[0], CASES[3], CASES[4], CASES[6]])
def test_triton_backward_matches_blocked_autograd(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w):
    """dq, dk, dv of `triton_attention` (Triton backward kernel + autograd through gathers and
    aggregation) equal autograd through the blocked path."""
    q, k, v, mask, causal, cfg = _case_inputs(B, Hq, Hkv, N, D, Dv, dtype, kind, layout, m, w)
    _assert_grads_match(q, k, v, mask, causal, cfg, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B, Hq, Hkv, N, D, dtype, kind", [GPU_CASES[0], GPU_CASES[3]])
def test_gpu_triton_backward_matches_blocked(B, Hq, Hkv, N, D, dtype, kind):
    q, k, v, mask, causal, cfg = _case_inputs(B, Hq, Hkv, N, D, D, dtype, kind, "BNHD", 16, 256, "cuda", 64)
    cfg = cfg.replace(min_seq_len=1024)
    _assert_grads_match(q, k, v, mask, causal, cfg, dtype)


def test_autotune_prune_predicate():
    """`fits_shared_memory` drops configs whose K/V tiles overflow shared memory, never all of them."""
    from dga_compile.kernels.attention import _CONFIGS, fits_shared_memory
    kept = fits_shared_memory(_CONFIGS, {}, BLOCK_D=256, BLOCK_DV=256)
    assert 0 < len(kept) < len(_CONFIGS) and all(c.kwargs["BLOCK_N"] < 128 for c in kept)
    assert fits_shared_memory(_CONFIGS, {}, BLOCK_D=64, BLOCK_DV=64) == _CONFIGS
    assert len(fits_shared_memory(_CONFIGS[-1:], {}, BLOCK_D=4096, BLOCK_DV=4096)) == 1
