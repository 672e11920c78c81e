"""Selection kernels (kernels/scoring.py, kernels/aggregation.py) against the reference steps 1–4.

Interpreter at tiny shapes on CPU hosts (conftest sets TRITON_INTERPRET=1); `gpu` cases at real
shapes on CUDA. Outputs are poisoned with NaN before launch.
"""

import zlib

import pytest
import torch

from dga_compile._validation import visible_rows
from dga_compile.selection import aggregate_groups, importance_scores, split_focus

pytest.importorskip("triton")
from dga_compile.kernels.aggregation import aggregate_groups_triton
from dga_compile.kernels.scoring import importance_scores_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(B, Hq, Hkv, N, D, Dv, dtype, device, strided):
    torch.manual_seed(zlib.crc32(repr((B, Hq, Hkv, N, D, Dv, str(dtype))).encode()))   # stable across processes
    if strided:  # [B, N, H, D] memory viewed as [B, H, N, D], as after HF's transpose
        mk = lambda h, d: torch.randn(B, N, h, d, device=device, dtype=dtype).transpose(1, 2)
    else:
        mk = lambda h, d: torch.randn(B, h, N, d, device=device, dtype=dtype)
    return mk(Hq, D), mk(Hkv, D), mk(Hkv, Dv)


def _key_visible(B, N, device):
    vis = torch.ones(B, N, dtype=torch.bool, device=device)
    for b in range(B):
        vis[b, :2 * b] = False
        vis[b, N - b:] = False
    return vis


CASES = [  # B, Hq, Hkv, N, D, Dv, dtype, causal, key padding, strided
    pytest.param(1, 2, 1, 70, 16, 16, torch.float32, True, False, False, id="B1-H2-Hkv1-N70-D16-causal-fp32"),
    pytest.param(2, 4, 2, 53, 24, 8, torch.float32, False, True, True, id="B2-H4-Hkv2-N53-D24-Dv8-keypad-fp32-strided"),
    pytest.param(2, 2, 2, 61, 32, 32, torch.float16, True, True, False, id="B2-H2-N61-D32-keypad-causal-fp16"),
    pytest.param(1, 3, 1, 45, 16, 16, torch.bfloat16, True, False, True, id="B1-H3-MQA-N45-D16-causal-bf16-strided"),
]


@pytest.mark.parametrize("B, Hq, Hkv, N, D, Dv, dtype, causal, keypad, strided", CASES)
def test_importance_scores_kernel(B, Hq, Hkv, N, D, Dv, dtype, causal, keypad, strided):
    q, k, _ = _inputs(B, Hq, Hkv, N, D, Dv, dtype, DEV, strided)
    kvis = _key_visible(B, N, DEV) if keypad else None
    r, scale = 9, D ** -0.5
    mask = None if kvis is None else kvis[:, None, None, :]
    ref = importance_scores(q.double(), k.double(), visible_rows(mask, causal, N - r, N, N, q.device), scale, r)
    out = torch.full((B, Hkv, N), float("nan"), device=DEV)
    importance_scores_triton(q, k, kvis, causal, scale, r, out=out)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * (Hq // Hkv) * r, rtol=TOL[dtype])


@pytest.mark.parametrize("B, Hq, Hkv, N, D, Dv, dtype, causal, keypad, strided", CASES)
def test_aggregate_groups_kernel(B, Hq, Hkv, N, D, Dv, dtype, causal, keypad, strided):
    q, k, v = _inputs(B, Hq, Hkv, N, D, Dv, dtype, DEV, strided)
    scores = torch.rand(B, Hkv, N, device=DEV)
    _, nonfocus = split_focus(scores, N // 7)
    m = 5 if strided else 4
    ref = aggregate_groups(q.double(), k.double(), v.double(), nonfocus, D ** -0.5, m)
    G = ref.keys.shape[2]
    out = (torch.full((B, Hq, G, D), float("nan"), device=DEV, dtype=dtype),
           torch.full((B, Hq, G, Dv), float("nan"), device=DEV, dtype=dtype))
    kg, vg = aggregate_groups_triton(q, k, v, nonfocus, D ** -0.5, m, out=out)
    for name, got, want in (("K̄", kg, ref.keys), ("V̄", vg, ref.values)):
        torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype], msg=lambda s, name=name: f"{name}: {s}")


GPU_CASES = [
    pytest.param(2, 32, 8, 8192, 128, torch.bfloat16, id="B2-H32-Hkv8-N8192-D128-bf16"),
    pytest.param(1, 8, 1, 5003, 64, torch.float16, id="B1-H8-MQA-N5003-D64-fp16"),
    pytest.param(1, 4, 4, 4096, 256, torch.float32, id="B1-H4-N4096-D256-fp32"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B, Hq, Hkv, N, D, dtype", GPU_CASES)
def test_gpu_selection_kernels(B, Hq, Hkv, N, D, dtype):
    q, k, v = _inputs(B, Hq, Hkv, N, D, D, dtype, "cuda", True)
    r, scale = 64, D ** -0.5
    ref = importance_scores(q.float(), k.float(), visible_rows(None, True, N - r, N, N, q.device), scale, r)
    scores = importance_scores_triton(q, k, None, True, scale, r)
    torch.testing.assert_close(scores, ref, atol=TOL[dtype] * (Hq // Hkv) * r, rtol=TOL[dtype])
    _, nonfocus = split_focus(ref, N // 10)
    want = aggregate_groups(q.float(), k.float(), v.float(), nonfocus, scale, 16)
    kg, vg = aggregate_groups_triton(q, k, v, nonfocus, scale, 16)
    torch.testing.assert_close(kg.float(), want.keys, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    torch.testing.assert_close(vg.float(), want.values, atol=TOL[dtype] * 4, rtol=TOL[dtype])
