"""Regression tests for issue #13's op items: hostile or degenerate inputs to the op and `DGAConfig`.

Each case once gave a silent wrong answer or an unclear error:
- a NaN query row came out as 0 on the DGA path (SDPA gives NaN): non-finite q/k/v now
  propagate as docs/dga.md ("Contract") says, on every implementation;
- ``group_bias=inf`` was accepted (NaN outputs); ``min_seq_len=2**63`` / ``group_size=2**70``
  were accepted and then failed inside the op ("expected int, found int");
- ``is_causal="no"`` ran causal attention, ``config={}`` ran the default config, head dim 0 gave
  ZeroDivisionError and Hq = 0 a native RuntimeError.
"""

import math

import pytest
import torch

from dga_cases import TOL, qkv
from dga_compile import DGAConfig, _extension, dispatch, dynamic_group_attention, reference_attention
from dga_compile._validation import mask_4d
from dga_compile.blocked import blocked_attention
from dga_compile.config import INT64_MAX, MAX_GROUP_BIAS, MAX_GROUP_SIZE
from dga_compile.selection import select

#: Causal DGA at N = 48 with focus tokens, complete groups, raw tokens and a tail.
CFG = DGAConfig(focus_ratio=0.1, group_size=4, num_probe=8, window=4, group_bias=1.0, min_seq_len=0)
B, HQ, HKV, N, D = 1, 4, 2, 48, 8


def _triton(q, k, v, attn_mask, is_causal, scale, config):
    pytest.importorskip("triton")
    from dga_compile.kernels import available, triton_attention
    if not available():
        pytest.skip("no CUDA device and not TRITON_INTERPRET=1")
    return triton_attention(q, k, v, attn_mask, is_causal, scale, config)


def _public(q, k, v, attn_mask, is_causal, scale, config):
    return dynamic_group_attention(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa=True, config=config)


def _cpp(*args):
    if not _extension.available():
        pytest.skip("the C++ extension is not built")
    return _extension.cpp_attention(*args)


# The Triton interpreter warns about the NaN reductions these tests provoke on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

#: Every implementation, each called directly (blocked: its fast route without a mask, its loop with one).
IMPLS = {"reference": reference_attention, "blocked": blocked_attention, "cpp": _cpp, "triton": _triton,
         "public-auto": _public}


def _inputs(dtype=torch.float32):
    return qkv(B, HQ, HKV, N, N, D, dtype, seed=13)


def _not_an_anchor(q, k, v, mask, h):
    """A query row of head h that is neither a probe row nor the anchor of a group of its kv head,
    and is not a fully masked row under `_key_padding` (so only its own output depends on it)."""
    anchors = set(select(q, k, v, mask_4d(mask), True, D ** -0.5, CFG).anchors[0, h // (HQ // HKV)].tolist())
    return next(i for i in range(5, N - CFG.num_probe) if i not in anchors)


def _key_padding():
    """bool [B, 1, 1, N]: the first 3 keys hidden; with causality rows 0–2 see nothing."""
    vis = torch.ones(B, 1, 1, N, dtype=torch.bool)
    vis[..., :3] = False
    return vis


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "keypad-causal"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_finite_query_row_gives_that_row_only(impl, masked, bad):
    """As in SDPA: a non-finite query row i changes output row i and nothing else (row i is no
    anchor, so no group's K̄/V̄ depends on it). With every key's component 2 positive, q[i, 2] =
    NaN or +inf makes row i's logits NaN / +inf, so the row is NaN; −inf makes them all −inf, and
    SDPA (and so DGA) gives 0, as for a row with no candidate. Fully masked rows stay 0."""
    q, k, v = _inputs()
    k[..., 2] = k[..., 2].abs() + 0.1
    h = 1
    mask = _key_padding() if masked else None
    i = _not_an_anchor(q, k, v, mask, h)
    q[0, h, i, 2] = bad
    out = IMPLS[impl](q, k, v, mask, True, None, CFG)
    want = reference_attention(q, k, v, mask, True, None, CFG)
    if bad == -float("inf"):
        assert (out[0, h, i] == 0).all(), out[0, h, i]
    else:
        assert out[0, h, i].isnan().all(), f"row {i} hides the non-finite query: {out[0, h, i]}"
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, h, i] = False
    assert out[others].isfinite().all()
    torch.testing.assert_close(out[others], want[others], **TOL[torch.float32])
    if masked:
        assert (out[:, :, :3] == 0).all()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_finite_anchor_query_reaches_the_rows_using_its_group(impl):
    """A NaN query at a group's anchor makes that group's K̄/V̄ NaN (its softmax weights come from
    that query): its own row and the rows that use the group are NaN; other heads stay finite."""
    q, k, v = _inputs()
    h = 1
    sel = select(q, k, v, None, True, D ** -0.5, CFG)
    a = int(sel.anchors[0, h // (HQ // HKV), 0])                        # group 0: complete for i ≥ a + w
    q[0, h, a, 0] = float("nan")
    out = IMPLS[impl](q, k, v, None, True, None, CFG)
    assert out[0, h, a].isnan().all() and out[0, h, N - 1].isnan().all()
    assert out[:, [0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("tensor, bad", [("k", float("nan")), ("v", float("nan")), ("v", float("inf"))],
                         ids=["k-nan", "v-nan", "v-inf"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_non_finite_key_or_value_reaches_every_row_that_sees_it(impl, tensor, bad):
    """As in SDPA: a non-finite key or value j makes every row that sees j non-finite (here, under
    causality, rows ≥ j of the query heads reading its kv head: as a focus or raw key, or inside a
    complete group). The other kv head is untouched. Rows that do not see j may be NaN too, as in
    SDPA's own backends (0·NaN in P·V). (An infinite key is left out: as in SDPA, a row whose
    logit for it is −inf reads it as masked.)"""
    q, k, v = _inputs()
    j = 20
    (k if tensor == "k" else v)[0, 0, j, 1] = bad
    out = IMPLS[impl](q, k, v, None, True, None, CFG)
    assert not out[0, :2, j:].isfinite().all(-1).any(), "a row that sees the non-finite key/value is finite"
    assert out[0, 2:].isfinite().all()
    torch.testing.assert_close(out[0, 2:], reference_attention(q, k, v, None, True, None, CFG)[0, 2:],
                               **TOL[torch.float32])


@pytest.mark.parametrize("impl", ["reference", "blocked", "cpp", "public-auto"])
def test_non_finite_query_row_in_the_dense_fallback(impl):
    """Below min_seq_len the op is dense attention, where a NaN query row is that row's NaN too
    (the reference's dense branch turned it into 0)."""
    q, k, v = _inputs()
    q[0, 0, 7, 0] = float("nan")
    out = IMPLS[impl](q, k, v, None, True, None, CFG.replace(min_seq_len=1024))
    assert out[0, 0, 7].isnan().all() and out[0, :, :7].isfinite().all() and out[0, 1:].isfinite().all()


@pytest.mark.parametrize("field, value", [
    pytest.param("group_bias", math.inf, id="group_bias-inf"),
    pytest.param("group_bias", math.nan, id="group_bias-nan"),
    pytest.param("group_bias", MAX_GROUP_BIAS * 2, id="group_bias-2000"),
    pytest.param("min_seq_len", 2**63, id="min_seq_len-2**63"),
    pytest.param("group_size", 2**70, id="group_size-2**70"),
    pytest.param("group_size", MAX_GROUP_SIZE + 1, id="group_size-2**31"),
    pytest.param("num_probe", 2**64, id="num_probe-2**64"),
    pytest.param("window", -1, id="window-negative"),
    pytest.param("window", 4.0, id="window-float"),
    pytest.param("focus_ratio", math.inf, id="focus_ratio-inf"),
    pytest.param("sinks", -1, id="sinks-negative"),
    pytest.param("sinks", 2**63, id="sinks-2**63"),
    pytest.param("sinks", 1.5, id="sinks-float"),
    pytest.param("sinks", True, id="sinks-bool"),
    pytest.param("expand_mass", 1.0, id="expand_mass-1"),
    pytest.param("expand_mass", -0.1, id="expand_mass-negative"),
    pytest.param("expand_mass", math.nan, id="expand_mass-nan"),
    pytest.param("expand_mass", "0.8", id="expand_mass-str"),
    pytest.param("expand_bias", -1.0, id="expand_bias-negative"),
    pytest.param("expand_bias", math.inf, id="expand_bias-inf"),
    pytest.param("expand_bias", MAX_GROUP_BIAS * 2, id="expand_bias-2000"),
    pytest.param("query_block", 0, id="query_block-0"),
    pytest.param("query_block", 2**63, id="query_block-2**63"),
    pytest.param("query_block", 64.0, id="query_block-float"),
    pytest.param("expand_max", 0.0, id="expand_max-0"),
    pytest.param("expand_max", 1.5, id="expand_max-1.5"),
    pytest.param("expand_max", math.nan, id="expand_max-nan"),
])
def test_config_bounds(field, value):
    with pytest.raises(ValueError, match=rf"DGAConfig\.{field} must be .*got {value!r}"):
        DGAConfig(**{field: value})


@pytest.mark.parametrize("changes", [
    pytest.param(dict(min_seq_len=INT64_MAX), id="min_seq_len-max"),
    pytest.param(dict(group_size=MAX_GROUP_SIZE), id="group_size-max"),
    pytest.param(dict(num_probe=INT64_MAX), id="num_probe-max"),
    pytest.param(dict(window=INT64_MAX), id="window-max"),
    pytest.param(dict(group_bias=MAX_GROUP_BIAS), id="group_bias-max"),
    pytest.param(dict(sinks=INT64_MAX), id="sinks-max"),
    pytest.param(dict(expand_mass=0.999999, expand_bias=MAX_GROUP_BIAS, query_block=INT64_MAX), id="expand-max"),
    pytest.param(dict(expand_mass=0.5, expand_max=1e-300, query_block=1), id="expand_max-tiny"),
])
@pytest.mark.parametrize("impl", ["reference", "blocked", "cpp", "triton"])
def test_largest_accepted_values_run_on_every_implementation(impl, changes):
    """What `DGAConfig` accepts, every implementation computes: finite, and equal to the reference."""
    cfg = CFG.replace(**changes)
    q, k, v = _inputs()
    for causal in (False, True):
        out = dynamic_group_attention(q, k, v, None, 0.0, causal, None, enable_gqa=True, config=cfg.replace(impl=impl))
        assert out.isfinite().all()
        torch.testing.assert_close(out, reference_attention(q, k, v, None, causal, None, cfg), atol=1e-4, rtol=1e-4)


Q, K, V = qkv(1, 4, 2, 8, 8, 4, torch.float32)


@pytest.mark.parametrize("kwargs, error, parts", [
    pytest.param(dict(is_causal="no"), TypeError, ["is_causal must be a bool", "'no'"], id="is_causal-str"),
    pytest.param(dict(is_causal=1), TypeError, ["is_causal must be a bool", "int"], id="is_causal-int"),
    pytest.param(dict(is_causal=None), TypeError, ["is_causal must be a bool", "None"], id="is_causal-None"),
    pytest.param(dict(enable_gqa="yes"), TypeError, ["enable_gqa must be a bool", "'yes'"], id="enable_gqa-str"),
    pytest.param(dict(dropout_p="0.1"), TypeError, ["dropout_p must be a float", "'0.1'"], id="dropout_p-str"),
    pytest.param(dict(dropout_p=float("nan")), ValueError, ["dropout_p must be in [0, 1)", "nan"], id="dropout_p-nan"),
    pytest.param(dict(scale="x"), TypeError, ["scale must be a float or None", "'x'"], id="scale-str"),
    pytest.param(dict(scale=float("inf")), ValueError, ["scale must be a positive finite", "inf"], id="scale-inf"),
    pytest.param(dict(config={}), TypeError, ["config must be a DGAConfig or None, got dict"], id="config-dict"),
    pytest.param(dict(config="fast"), TypeError, ["config must be a DGAConfig or None, got str"], id="config-str"),
    pytest.param(dict(query=Q[..., :0], key=K[..., :0], value=V), ValueError, ["head dim D is 0", "(1, 4, 8, 0)"],
                 id="head-dim-0"),
    pytest.param(dict(value=V[..., :0]), ValueError, ["value head dim Dv is 0"], id="value-head-dim-0"),
    pytest.param(dict(query=Q[:, :0]), ValueError, ["query heads Hq is 0", "(1, 0, 8, 4)"], id="Hq-0"),
    pytest.param(dict(key=K[:, :0], value=V[:, :0]), ValueError, ["key/value heads Hkv is 0"], id="Hkv-0"),
])
def test_bad_arguments_raise_like_sdpa(kwargs, error, parts):
    args = dict(query=Q, key=K, value=V, enable_gqa=True) | kwargs
    with pytest.raises(error) as err:
        dynamic_group_attention(**args)
    for part in parts:
        assert part in str(err.value), f"{part!r} not in {str(err.value)!r}"


@pytest.mark.parametrize("fn", [reference_attention, blocked_attention], ids=["reference", "blocked"])
def test_implementations_reject_a_config_that_is_not_one(fn):
    with pytest.raises(TypeError, match="config must be a DGAConfig or None, got dict"):
        fn(Q, K, V, None, False, None, {})


def test_named_implementation_that_cannot_run_falls_back_once_with_nyi():
    """impl="cpp" with float64 (the kernel takes float32/16-bit): one NYI warning naming the reason
    and the fix, then what "auto" runs, with its answer."""
    q, k, v = qkv(1, 2, 2, 40, 40, 8, torch.float64)
    cfg = CFG.replace(impl="cpp")
    dispatch._warned.clear()
    with pytest.warns(RuntimeWarning, match=r"NYI: impl='cpp' cannot run this call: dtype torch.float64.*"
                                            r"running impl='blocked' instead") as seen, \
            dispatch.recording() as ran:
        out = dynamic_group_attention(q, k, v, is_causal=True, config=cfg)
        dynamic_group_attention(q, k, v, is_causal=True, config=cfg)
    assert ran == ["blocked", "blocked"] and len([w for w in seen if "NYI" in str(w.message)]) == 1
    torch.testing.assert_close(out, reference_attention(q, k, v, None, True, None, CFG), **TOL[torch.float64])
