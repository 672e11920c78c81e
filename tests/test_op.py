"""``torch.ops.dga.attention``: autograd, opcheck, dropout reproducibility, torch.compile."""

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from dga_cases import SMALL, TOL, make_mask, qkv
from dga_compile import DGAConfig, dynamic_group_attention, reference_attention
from dga_compile.blocked import blocked_attention
from dga_compile.ops import OpCall

#: A config under which a 16-token causal input has focus tokens, complete groups and raw ones.
TINY = DGAConfig(focus_ratio=0.25, group_size=3, num_probe=4, window=2, min_seq_len=0)


def _op_args(q, k, v, attn_mask=None, is_causal=False, cfg=TINY, impl="blocked", dropout_p=0.0, seed=None):
    """The op's positional arguments (scale 1/sqrt(D))."""
    return OpCall(q, k, v, attn_mask, dropout_p, seed, is_causal, 1.0 / math.sqrt(q.shape[-1]),
                  cfg.replace(impl=impl)).args()


def _grads(out, inputs, seed=0):
    """(out, dq, dk, dv) for a fixed random cotangent."""
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out.detach(), *torch.autograd.grad(out, inputs, cot))


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("mask", ["none", "pad_left"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq", [16, 7], ids=["Nq16", "Nq7-dense"])
@pytest.mark.parametrize("impl", ["blocked", "reference"])
def test_gradcheck_B2_H2_KV1_Nk16_D4(impl, nq, causal, mask):
    q, k, v = _leaves(*qkv(2, 2, 1, nq, 16, 4, seed=1))
    attn_mask = make_mask(mask, 2, 2, nq, 16)
    fn = lambda q, k, v: torch.ops.dga.attention(*_op_args(q, k, v, attn_mask, causal, impl=impl))
    full = (impl, nq, causal, mask) == ("blocked", 16, True, "pad_left")   # one full gradcheck, the rest fast
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=not full)


@pytest.mark.parametrize("mask", ["none", "pad_left", "bool", "additive_finfo"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_blocked_op_grads_match_reference_autograd_B2_H4_KV2_N150_D8(dtype, causal, mask):
    """The op's backward (blocked, recomputed) equals autograd through the reference."""
    inputs = qkv(2, 4, 2, 150, 150, 8, dtype, seed=2)
    attn_mask = make_mask(mask, 2, 4, 150, 150, dtype)
    a = _leaves(*inputs)
    got = _grads(torch.ops.dga.attention(*_op_args(*a, attn_mask, causal, SMALL)), a)
    b = _leaves(*inputs)
    want = _grads(reference_attention(*b, attn_mask, causal, None, SMALL), b)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["blocked", "reference", "auto"])   # auto: the C++ kernel forward where built
def test_opcheck(impl):
    q, k, v = qkv(2, 4, 2, 20, 20, 8, torch.float32, seed=3)
    mask = make_mask("pad_left", 2, 4, 20, 20)
    for args in (_op_args(q, k, v, None, True, impl=impl),
                 _op_args(*_leaves(q, k, v), mask, True, impl=impl),
                 _op_args(*_leaves(q, k, v), mask.float().log(), False, impl=impl)):
        torch.library.opcheck(torch.ops.dga.attention.default, args)
    grad_out = torch.randn(2, 4, 20, 8, generator=torch.Generator().manual_seed(3))
    torch.library.opcheck(torch.ops.dga.attention_backward.default,
                          (grad_out, *_op_args(q, k, v, mask, True, impl=impl)))


@pytest.mark.parametrize("impl", ["blocked", "reference"])
@pytest.mark.parametrize("cfg", [TINY, TINY.replace(min_seq_len=1024)], ids=["dga", "dense"])
def test_dropout_reproduced_in_backward(cfg, impl):
    """Dropout hits the final probabilities; the backward recomputes the forward with the
    saved seed, so the op's gradients equal autograd through the implementation rerun under
    ``manual_seed(seed)`` (what ``ops._forward`` does)."""
    inputs = qkv(1, 2, 1, 40, 40, 8, seed=4)
    seed = torch.tensor(1234)
    a = _leaves(*inputs)
    got = _grads(torch.ops.dga.attention(*_op_args(*a, None, True, cfg, impl, 0.3, seed)), a)
    b = _leaves(*inputs)
    fn = blocked_attention if impl == "blocked" else reference_attention
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        want = _grads(fn(*b, None, True, None, cfg, dropout_p=0.3), b)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64], msg=lambda m, name=name: f"{name}: {m}")
    no_dropout = torch.ops.dga.attention(*_op_args(*inputs, None, True, cfg, impl))
    assert (got[0] - no_dropout).abs().max() > 1e-2


def test_public_dropout_draws_a_new_mask_per_call():
    q, k, v = qkv(1, 2, 2, 40, 40, 8, seed=5)
    outs = [dynamic_group_attention(q, k, v, dropout_p=0.5, is_causal=True, config=TINY) for _ in range(2)]
    assert (outs[0] - outs[1]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager_B2_H4_KV2_N64_D8(backend):
    inputs = qkv(2, 4, 2, 64, 64, 8, torch.float32, seed=6)
    mask = make_mask("pad_left", 2, 4, 64, 64)

    def fn(q, k, v):
        return dynamic_group_attention(q, k, v, mask, is_causal=True, enable_gqa=True, config=SMALL) * 2

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    a, b = _leaves(*inputs), _leaves(*inputs)
    got = _grads(torch.compile(fn, fullgraph=True, backend=counter)(*a), a)
    assert counter.frame_count == 1
    assert torch.ops.dga.attention in {n.target for n in counter.graphs[0].graph.nodes}
    want = _grads(fn(*b), b)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float32], msg=lambda m, name=name: f"{name}: {m}")
