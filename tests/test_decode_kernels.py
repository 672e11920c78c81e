"""Decode attention kernels (C++ CPU, Triton) against `decode_reference.slot_attention`."""

import pytest
import torch

from dga_compile.decode_op import decode_attention, native_available, resolve_decode_impl
from dga_compile.decode_reference import slot_attention

# (B, Hq, Hkv, n queries, packed slots, recent slots, D): odd sizes, GQA/MQA, empty packed run.
SHAPES = [
    pytest.param(1, 9, 3, 1, 700, 300, 64, id="B1-H9-KV3-n1-P700-R300-D64"),
    pytest.param(2, 4, 2, 3, 37, 11, 24, id="B2-H4-KV2-n3-P37-R11-D24"),
    pytest.param(1, 2, 1, 2, 0, 5, 8, id="B1-H2-KV1-n2-P0-R5-D8"),
    pytest.param(3, 8, 8, 1, 1000, 1, 100, id="B3-H8-KV8-n1-P1000-R1-D100"),
    pytest.param(2, 6, 1, 5, 129, 257, 33, id="B2-H6-KV1-n5-P129-R257-D33"),
]


def slots(B, Hq, Hkv, n, P, R, D, dtype=torch.float32, seed=0):
    """q and the two runs as strided views into larger buffers (as the cache holds them); λ of the
    packed run mixes 0, group biases and −inf; a few recent slots are −inf (focus, padding)."""
    g = torch.Generator().manual_seed(seed)

    def view(shape, rows, lo):
        return torch.randn(*shape[:2], rows + 13, *shape[3:], generator=g, dtype=torch.float64)[:, :, lo:lo + rows].to(dtype)

    pk, pv = view((B, Hkv, P, D), P, 5), view((B, Hkv, P, D), P, 5)
    rk, rv = view((B, Hkv, R, D), R, 3), view((B, Hkv, R, D), R, 3)
    pl = torch.randn(B, Hkv, P + 9, generator=g, dtype=torch.float64)[:, :, 4:4 + P]
    pl = pl.masked_fill(pl < -0.8, float("-inf")).to(torch.float32)
    rl = torch.zeros(B, Hkv, R + 2, dtype=torch.float64)[:, :, 1:1 + R]
    rl = rl.masked_fill(torch.rand(B, Hkv, R, generator=g) < 0.15, float("-inf")).to(torch.float32)
    rl[..., -n:] = 0.0                                    # the step's own tokens are real
    q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64).to(dtype)
    return q, pk, pv, pl, rk, rv, rl


def golden(q, pk, pv, pl, rk, rv, rl, scale):
    return slot_attention(*(t.double() for t in (q, pk, pv, pl, rk, rv, rl)), scale)


@pytest.mark.skipif(not native_available(), reason="C++ extension not built")
@pytest.mark.parametrize("B, Hq, Hkv, n, P, R, D", SHAPES)
def test_native_equals_reference(B, Hq, Hkv, n, P, R, D):
    args = slots(B, Hq, Hkv, n, P, R, D, seed=P + R)
    out = torch.full((B, Hq, n, D), float("nan"))          # poisoned: the kernel writes it whole
    torch.ops.dga_native.decode_attention_cpu(*args, out, 0.37)
    torch.testing.assert_close(out.double(), golden(*args, 0.37), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not native_available(), reason="C++ extension not built")
def test_native_row_without_slots_gives_zero():
    q, pk, pv, pl, rk, rv, rl = slots(1, 2, 1, 1, 20, 4, 8)
    pl.fill_(float("-inf"))
    rl.fill_(float("-inf"))
    out = torch.full((1, 2, 1, 8), float("nan"))
    torch.ops.dga_native.decode_attention_cpu(q, pk, pv, pl, rk, rv, rl, out, 0.5)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.skipif(not native_available(), reason="C++ extension not built")
def test_native_rejects_bad_inputs():
    q, pk, pv, pl, rk, rv, rl = slots(1, 2, 1, 2, 5, 4, 8)
    out = torch.empty(1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.dga_native.decode_attention_cpu(q.double(), pk, pv, pl, rk, rv, rl, out, 0.5)
    with pytest.raises(RuntimeError, match="want q"):
        torch.ops.dga_native.decode_attention_cpu(q, pk, pv, pl[:, :, :3], rk, rv, rl, out, 0.5)


def test_nonfinite_queries_propagate_as_in_sdpa():
    q, *rest = slots(1, 2, 1, 1, 30, 6, 8)
    q[0, 1, 0, 0] = float("nan")
    out = decode_attention(q, *rest, 0.5, "auto")
    assert out[0, 1].isnan().all() and out[0, 0].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_dispatch_picks_one_implementation(dtype):
    """"auto": native for float32 CPU caches when built, the PyTorch reference otherwise."""
    q, *rest = slots(1, 4, 2, 1, 10, 3, 8, dtype=dtype)
    tensors = (rest[0], rest[1], rest[3], rest[4])
    want = "native" if dtype == torch.float32 and native_available() else "reference"
    assert resolve_decode_impl("auto", q, tensors) == want
    assert resolve_decode_impl("reference", q, tensors) == "reference"
    q.requires_grad_()
    with torch.enable_grad():
        assert resolve_decode_impl("auto", q, tensors) == "reference"
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(decode_attention(q.detach(), *rest, 0.5, "auto").double(),
                               golden(q.detach(), *rest, 0.5), **tol)


def test_op_opcheck():
    args = slots(1, 4, 2, 2, 9, 5, 8)
    torch.library.opcheck(torch.ops.dga.decode_attention.default, (*args, 0.5, "reference"),
                          test_utils=("test_schema", "test_faketensor"))


triton_only = pytest.mark.skipif(not __import__("dga_compile.kernels", fromlist=["available"]).available(),
                                 reason="needs Triton (CUDA, or TRITON_INTERPRET=1)")


@triton_only
@pytest.mark.parametrize("split", [0, 16], ids=["split-auto", "split16"])
@pytest.mark.parametrize("B, Hq, Hkv, n, P, R, D", SHAPES[1:3] + SHAPES[4:])
def test_triton_equals_reference(B, Hq, Hkv, n, P, R, D, split):
    """Triton split-K kernel (the interpreter on CPU: fp32 dots) vs the float64 reference; tiny shapes."""
    from dga_compile.kernels.decode import triton_decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(device) for t in slots(B, Hq, Hkv, n, P, R, D, seed=P + 2 * R)]
    got = triton_decode_attention(*args, 0.37, split=split)
    torch.testing.assert_close(got.double().cpu(), golden(*(t.cpu() for t in args), 0.37), atol=2e-5, rtol=2e-5)


@triton_only
def test_triton_through_the_op_and_empty_rows():
    q, pk, pv, pl, rk, rv, rl = slots(1, 2, 1, 1, 20, 4, 8)
    pl.fill_(float("-inf"))
    rl.fill_(float("-inf"))
    out = decode_attention(q, pk, pv, pl, rk, rv, rl, 0.5, "triton")
    assert torch.equal(out, torch.zeros_like(out))
