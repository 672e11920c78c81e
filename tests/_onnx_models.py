"""Tiny Llama-like and BERT-like models whose attention calls DGA, and ONNX Runtime helpers
(ONNX and CLI tests)."""

from __future__ import annotations

import copy
import pathlib
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

import dga_compile
import dga_compile.onnx as dga_onnx
from dga_compile import DGAConfig
from dga_compile.onnx._function import function_proto
from dga_compile.onnx._schema import node_attributes

#: DGA really applies at the test lengths (N ≥ 16) and differs from dense attention.
CONFIG = DGAConfig(focus_ratio=0.25, group_size=4, num_probe=8, window=8, min_seq_len=16)
VOCAB, DIM = 61, 32


class _Block(nn.Module):
    def __init__(self, hq: int, hkv: int, causal: bool, config: DGAConfig):
        super().__init__()
        self.hq, self.hkv, self.d, self.causal, self.config = hq, hkv, DIM // hq, causal, config
        self.q = nn.Linear(DIM, hq * self.d)
        self.kv = nn.Linear(DIM, 2 * hkv * self.d)
        self.o = nn.Linear(hq * self.d, DIM)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, mask=None):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        a = dga_compile.dynamic_group_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                enable_gqa=self.hq != self.hkv, config=self.config)
        x = x + self.o(a.transpose(1, 2).reshape(B, N, -1))
        return x + self.mlp(x)


class TinyLlama(nn.Module):
    """Causal decoder, GQA (4 query heads, 2 kv heads), input_ids -> logits."""

    def __init__(self, config: DGAConfig = CONFIG, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(_Block(4, 2, True, config) for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TinyBert(nn.Module):
    """Bidirectional encoder with a padding mask (additive, HF style): (input_ids, attention_mask) -> hidden."""

    def __init__(self, config: DGAConfig = CONFIG, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(512, DIM) * 0.1)
        self.blocks = nn.ModuleList(_Block(2, 2, False, config) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for b in self.blocks:
            x = b(x, mask)
        return x


def llama_inputs(batch: int, n: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, n), generator=g),)


def bert_inputs(batch: int, n: int, seed: int = 0) -> tuple:
    ids = llama_inputs(batch, n, seed)[0]
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, : n // 5] = 0  # left padding in the first sequence
    return ids, mask



def reference_twin(model: nn.Module) -> nn.Module:
    """A copy of a TinyLlama / TinyBert whose DGA runs `dga_compile.reference` (what the ONNX
    function and the native op are compared with; the eager default runs the C++ kernel they share)."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.config = block.config.replace(impl="reference")
    return twin


def run_poisoned(sess: ort.InferenceSession, feeds: dict, out_shape) -> np.ndarray:
    """The session's first output, float32 ``out_shape``, written into a NaN-filled host buffer
    (a row the kernel forgets to write stays NaN)."""
    out = np.full(tuple(out_shape), np.nan, dtype=np.float32)
    io = sess.io_binding()
    for name, arr in feeds.items():
        io.bind_cpu_input(name, np.ascontiguousarray(arr))
    io.bind_output(sess.get_outputs()[0].name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
    sess.run_with_iobinding(io)
    return out


_SUBPROCESS_RUN = """
import sys, numpy as np, onnxruntime as ort
model, level, feeds, out = sys.argv[1:5]
so = ort.SessionOptions()
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
so.intra_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
np.save(out, sess.run(None, dict(np.load(feeds)))[0])
"""

#: ONNX Runtime's graph optimisation levels, lowest first.
ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def run_isolated(model: pathlib.Path, level: str, feeds: dict, tmp: pathlib.Path) -> np.ndarray:
    """Runs ``model`` (function body, no custom-op library) at optimisation ``level`` in a child
    process, so that an ONNX Runtime crash fails one test instead of killing pytest."""
    np.savez(tmp / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_RUN, str(model), level, str(tmp / "feeds.npz"),
                           str(tmp / "out.npy")], capture_output=True, text=True, timeout=600)
    rc = proc.returncode
    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"status {rc}"
    assert rc == 0, f"ONNX Runtime at {level} ended with {how}: {proc.stderr[-2000:]}"
    return np.load(tmp / "out.npy")


# ---------------------------------------------------------------- one ai.dga node

def op_model(cfg: DGAConfig, is_causal: bool, scale: float, dtype=TensorProto.FLOAT, opset: int = dga_onnx.OPSET,
             shapes=None, attributes=None) -> onnx.ModelProto:
    """One DynamicGroupAttention node; symbolic shapes (B, H, N, D all dynamic) unless ``shapes``
    gives (q, k, v, mask) shapes; ``attributes`` replaces the node's attributes."""
    attrs = node_attributes(cfg, is_causal, scale) if attributes is None else attributes
    node = helper.make_node(dga_onnx.OP_TYPE, ["q", "k", "v", "mask"], ["out"], domain=dga_onnx.DOMAIN, **attrs)
    shapes = shapes or (["B", "Hq", "Nq", "D"], ["B", "Hkv", "Nk", "D"], ["B", "Hkv", "Nk", "Dv"], ["Bm", "Hm", "Nm", "Nkm"])
    inputs = [helper.make_tensor_value_info(n, t, sh) for n, t, sh in
              zip(["q", "k", "v", "mask"], [dtype] * 3 + [TensorProto.BOOL], shapes)]
    out = helper.make_tensor_value_info("out", dtype, [shapes[0][0], shapes[0][1], shapes[0][2], shapes[2][3]])
    model = helper.make_model(helper.make_graph([node], "dga", inputs, [out]), functions=[function_proto(opset)],
                              opset_imports=[helper.make_opsetid("", opset),
                                             helper.make_opsetid(dga_onnx.DOMAIN, dga_onnx.DOMAIN_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    return model


def op_feeds(q, k, v, mask) -> dict:
    """Feeds of `op_model`; no mask: the exporter's all-true [1, 1, 1, 1]."""
    return {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
            "mask": (torch.ones(1, 1, 1, 1, dtype=torch.bool) if mask is None else mask).numpy()}


def run_op(sess, q, k, v, mask):
    """The node's output (float32 models: into a NaN-poisoned buffer)."""
    feeds = op_feeds(q, k, v, mask)
    if q.dtype != torch.float32:
        return torch.from_numpy(sess.run(None, feeds)[0])
    return torch.from_numpy(run_poisoned(sess, feeds, (*q.shape[:3], v.shape[3])))


def op_session(model: onnx.ModelProto, native: bool = False) -> ort.InferenceSession:
    """One thread; with ``native``, the custom-op library registered (when built)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    lib = dga_onnx.native_library() if native else None
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def qkv(b, hq, hkv, nq, nk, d=16, dv=8, seed=0):
    """Random q [b, hq, nq, d], k [b, hkv, nk, d], v [b, hkv, nk, dv]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, nq, d, generator=g), torch.randn(b, hkv, nk, d, generator=g),
            torch.randn(b, hkv, nk, dv, generator=g))
