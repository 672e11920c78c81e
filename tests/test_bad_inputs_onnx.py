"""Bad or unusual inputs to ONNX export and to the ai.dga op in ONNX Runtime (issue #13): each
gives a clear error or the behaviour a user of torch.onnx / ONNX Runtime expects."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dga_compile.onnx as dga_onnx
from dga_compile import DGAConfig
from dga_compile.onnx import native
from dga_compile.onnx._schema import node_attributes
from dga_compile.onnx.export import prepare

from _onnx_models import CONFIG, TinyLlama, llama_inputs, op_feeds, op_model, op_session, qkv, run_op

# ---------------------------------------------------------------- export


@pytest.fixture(scope="module")
def program():
    """A tiny model with DGA sites, traced and rewritten once (export of a program skips the trace)."""
    torch.manual_seed(0)
    return prepare(TinyLlama(layers=1).eval(), llama_inputs(2, 24))[0]


@pytest.mark.parametrize("umask", [0o027, pytest.param(0o022, marks=pytest.mark.slow), pytest.param(0o077, marks=pytest.mark.slow)],
                         ids=["umask027", "umask022", "umask077"])
def test_export_new_file_gets_the_umask_mode(program, tmp_path, umask):
    """Regression: exports came out 0600 whatever the umask (mkstemp's mode kept on rename)."""
    old = os.umask(umask)
    try:
        path = dga_onnx.export(program, (), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("mode", [0o640, pytest.param(0o644, marks=pytest.mark.slow), pytest.param(0o600, marks=pytest.mark.slow)],
                         ids=oct)
def test_export_overwrite_keeps_the_replaced_files_mode(program, tmp_path, mode):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    path.chmod(mode)
    dga_onnx.export(program, (), path)
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.stat().st_size > 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left behind


class _SdpaWithDropout(nn.Module):
    """Attention the way HF writes it: dropout_p follows the training flag."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1 if self.training else 0.0, is_causal=True)
        return out.transpose(1, 2).reshape(x.shape)


def test_export_in_training_mode_names_the_cause_and_the_fix(tmp_path):
    """Regression: the reason was buried under "file a PyTorch issue" from inside the exporter."""
    x = torch.randn(2, 40, 32)
    with pytest.raises(ValueError, match=r"dropout_p=0\.1.*training mode; call model\.eval\(\)") as err:
        dga_onnx.export(_SdpaWithDropout().train(), (x,), tmp_path / "m.onnx", config=DGAConfig(min_seq_len=0))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_export_hf_model_with_default_config_drops_the_kv_cache(tmp_path, caplog):
    """Regression: a default LlamaForCausalLM (use_cache=True) failed with "Found DynamicCache in
    output" from deep inside torch; it exports without the cache, and says so."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 64, (2, 40))
    with caplog.at_level(logging.INFO, logger="dga_compile.onnx"):
        path = dga_onnx.export(model, (ids,), tmp_path / "llama.onnx")
    assert "use_cache=False" in caplog.text and "KV cache" in caplog.text
    sess = dga_onnx.session(path, native=False)
    fresh = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(1))
    got = sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})[0]
    with torch.no_grad():
        want = model(fresh, use_cache=False).logits  # N < min_seq_len: DGA is exact dense attention
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- non-finite inputs (as SDPA)

N = 150  # two query blocks of the function body
CAUSAL_KINDS = ["none", "pad", "band"]  # the positional path (no mask, key padding) and the mask-reading one


def _mask(kind):
    """Bool [1, 1, N, N] or [1, 1, 1, N] with query rows 60..62 fully masked (those stay 0)."""
    if kind == "none":
        return None
    if kind == "pad":
        m = torch.ones(1, 1, 1, N, dtype=torch.bool)
        m[..., 140:] = False
        return m
    m = torch.ones(N, N, dtype=torch.bool).tril() & ~torch.ones(N, N, dtype=torch.bool).tril(-40)
    m[60:63] = False
    return m[None, None]


def _run(impl, q, k, v, mask, cfg):
    """The op's output by the function body (ORT CPU) or the native CUDA kernel (a GPU host)."""
    model = op_model(cfg, True, 0.3)
    if impl == "function":
        return run_op(op_session(model), q, k, v, mask)
    if "CUDAExecutionProvider" not in ort.get_available_providers() or native.library_path() is None:
        pytest.skip("needs onnxruntime-gpu and the native library built with nvcc")
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(native.library_path()))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    return torch.from_numpy(sess.run(None, op_feeds(q, k, v, mask))[0])


IMPLS = [pytest.param("function", id="function-body"),
         pytest.param("cuda", id="native-cuda", marks=pytest.mark.gpu)]
CONFIGS = [pytest.param(CONFIG, id="dga"), pytest.param(CONFIG.replace(min_seq_len=1000), id="dense")]


def _sees(mask, i, j):
    return j <= i and (mask is None or bool(mask[0, 0, min(i, mask.shape[2] - 1), j]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_nan_query_row_is_nan(kind, cfg, impl):
    """A NaN in q row i gives NaN in row i (SDPA), not 0; a fully masked row stays 0."""
    q, k, v = qkv(1, 2, 1, N, N, seed=21)
    q[0, 1, 70] = float("nan")
    q[0, 0, 61] = float("nan")  # fully masked in the band mask
    mask = _mask(kind)
    out = _run(impl, q, k, v, mask, cfg)
    assert out[0, 1, 70].isnan().all()
    if kind == "band":
        assert (out[0, :, 60:63] == 0).all()
    else:
        assert out[0, 0, 61].isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("tensor", ["k", "v"])
def test_nan_key_or_value_reaches_every_row_that_sees_it(tensor, kind, cfg, impl):
    """A NaN in k[j] or v[j] makes every row that sees j NaN (whether j is focus, raw or inside a
    group); rows that see no key stay 0. (Other rows may be NaN too, as in SDPA's math path: a
    zero probability times a NaN value, here also a NaN merged group.)"""
    q, k, v = qkv(1, 2, 1, N, N, seed=22)
    j = 30
    (k if tensor == "k" else v)[0, 0, j] = float("nan")
    mask = _mask(kind)
    out = _run(impl, q, k, v, mask, cfg)
    for i in range(N):
        row = out[0, :, i]
        if _sees(mask, i, j):
            assert row.isnan().all(), i
        elif kind == "band" and 60 <= i < 63:
            assert (row == 0).all(), i


# ---------------------------------------------------------------- the native op's attributes


@pytest.fixture(scope="module")
def library():
    path = native.library_path()
    if path is None:
        pytest.skip("native ai.dga library not built (dga-compile build-ort-op)")
    return path


@pytest.mark.parametrize("change,message", [
    pytest.param({"group_bias": float("inf")}, r"group_bias=inf finite >= 0", id="group_bias-inf"),
    pytest.param({"focus_ratio": float("nan")}, r"focus_ratio=nan in \[0,1\]", id="focus_ratio-nan"),
    pytest.param({"window": -1}, r"window=-1 >= 0", id="window-negative"),
])
def test_native_out_of_range_attribute_raises(library, change, message):
    model = op_model(DGAConfig(), True, 0.125, attributes=node_attributes(DGAConfig(), True, 0.125) | change)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    with pytest.raises(Exception, match=message):
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"q": np.zeros((1, 1, 4, 8), np.float32), "k": np.zeros((1, 1, 4, 8), np.float32),
                   "v": np.zeros((1, 1, 4, 8), np.float32), "mask": np.ones((1, 1, 1, 1), bool)})
