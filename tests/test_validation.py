"""Bad inputs raise ValueError naming the observed values; degenerate-but-valid inputs do not."""

import re

import pytest
import torch

from dga_cases import PATHS, SMALL, qkv
from dga_compile import DGAConfig, dynamic_group_attention

Q, K, V = qkv(1, 4, 2, 8, 8, 4, torch.float32)
_ALIBI = -torch.arange(8.0).expand(8, 8)


def _call(q=Q, k=K, v=V, enable_gqa=True, **kw):
    return lambda: dynamic_group_attention(q, k, v, enable_gqa=enable_gqa, **kw)


# (call, the message must contain these substrings: the observed value and what to do)
_BAD_CALLS = {
    "rank3-q": (_call(q=Q[0]), ["query must have shape [B, H, N, D]", "(4, 8, 4)"]),
    "rank5-v": (_call(v=V[None]), ["value must have shape", "(1, 1, 2, 8, 4)"]),
    "not-a-tensor": (_call(q=Q.numpy()), ["query must be a torch.Tensor", "ndarray"]),
    "Hq%Hkv": (_call(q=torch.randn(1, 6, 8, 4), k=torch.randn(1, 4, 8, 4), v=torch.randn(1, 4, 8, 4)),
               ["Hq=6", "Hkv=4", "multiple"]),
    "gqa-without-flag": (_call(enable_gqa=False), ["Hq=4", "Hkv=2", "enable_gqa=True"]),
    "dtype-mismatch": (_call(k=K.double()), ["torch.float32, torch.float64, torch.float32", "cast"]),
    "int-dtype": (_call(q=Q.long(), k=K.long(), v=V.long()), ["torch.int64"]),
    "device-mismatch": (_call(k=K.to("meta")), ["one device", "cpu, meta, cpu"]),
    "mask-device": (_call(attn_mask=torch.ones(8, 8, dtype=torch.bool, device="meta")),
                    ["attn_mask is on meta", ".to(q.device)"]),
    "mask-shape": (_call(attn_mask=torch.ones(8, 9, dtype=torch.bool)), ["(8, 9)", "[1, 4, 8, 8]"]),
    "mask-int": (_call(attn_mask=torch.ones(8, 8, dtype=torch.int64)), ["bool", "torch.int64"]),
    "batch": (_call(k=torch.randn(2, 2, 8, 4), v=torch.randn(2, 2, 8, 4)), ["batch sizes differ", "query 1, key 2"]),
    "head-dim": (_call(k=torch.randn(1, 2, 8, 5)), ["D=4", "D=5"]),
    "kv-length": (_call(v=torch.randn(1, 2, 9, 4)), ["(1, 2, 8, 4)", "(1, 2, 9, 4)"]),
    "dropout-1": (_call(dropout_p=1.0), ["dropout_p", "1.0"]),
    "scale-negative": (_call(scale=-1.0), ["scale", "-1.0"]),
    "alibi-dense": (_call(attn_mask=_ALIBI), ["ALiBi", "-1.0, -2.0"]),
    "alibi-dga": (_call(attn_mask=_ALIBI, config=SMALL), ["ALiBi", "-1.0, -2.0"]),
    "nan-mask": (_call(attn_mask=torch.full((8, 8), float("nan"))), ["nan"]),
    "focus_ratio<0": (lambda: DGAConfig(focus_ratio=-0.1), ["focus_ratio", "-0.1"]),
    "focus_ratio>1": (lambda: DGAConfig(focus_ratio=1.5), ["focus_ratio", "1.5"]),
    "group_size0": (lambda: DGAConfig(group_size=0), ["group_size", "got 0"]),
    "impl-config": (lambda: DGAConfig(impl="cuda"), ["'cuda'", "'blocked'"]),
    "dense_layers-negative": (lambda: DGAConfig(dense_layers=(3, -1)), ["dense_layers", "(3, -1)"]),
    "dense_layers-str": (lambda: DGAConfig(dense_layers="0,7"), ["dense_layers", "'0,7'"]),
    "impl-op": (lambda: torch.ops.dga.attention(Q, K, V, None, 0.0, None, False, 0.5, 0.1, 4, 4, 0, 1.0, 0, 0, 0.0, 1.0,
                                                64, 1.0, "bogus"),
                ["'bogus'"]),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_bad_input_raises_naming_the_value(name):
    call, parts = _BAD_CALLS[name]
    with pytest.raises(ValueError) as err:
        call()
    for part in parts:
        assert part in str(err.value), f"{part!r} not in {str(err.value)!r}"


@pytest.mark.parametrize("path", list(PATHS))
def test_alibi_raises_on_every_path(path):
    with pytest.raises(ValueError, match=re.escape("ALiBi")):
        PATHS[path](Q, K, V, _ALIBI, False, None, SMALL)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("path", list(PATHS))
def test_fully_masked_rows_give_zero(path, mask_dtype):
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[3] = False
    if mask_dtype != torch.bool:
        mask = torch.zeros(8, 8).masked_fill(~mask, float("-inf"))
    for cfg in (SMALL, SMALL.replace(min_seq_len=1024)):
        out = PATHS[path](Q, K, V, mask, False, None, cfg)
        assert not out.isnan().any()
        assert (out[:, :, 3] == 0).all() and (out[:, :, 4].abs() > 0).any()


def test_dense_layers_normalised():
    assert DGAConfig(dense_layers=[7, 0, 7]).dense_layers == (0, 7)
    assert DGAConfig(dense_layers=[7, 0]) == DGAConfig(dense_layers=(0, 7))
