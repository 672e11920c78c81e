"""ONNX Runtime (CPU): DGA as the native custom op and as its ONNX function body vs ORT's own dense attention.

B=1, H=8, D=64, causal, float32, default DGAConfig; N from --sizes. Every method runs in this
process, interleaved round by round; the table reports medians and ratios to ORT dense
attention (ONNX ``Attention``, opset 23). The function body is the same ``ai.dga`` node run
without the custom-op library (ORT inlines the function the exporter attaches). torch SDPA is
timed alongside as an anchor.

    python bench/bench_ort.py [--sizes 2048 4096 8192] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from dga_compile.config import DGAConfig
from dga_compile.onnx import DOMAIN, DOMAIN_VERSION, OP_TYPE, OPSET, native
from dga_compile.onnx._schema import node_attributes
from dga_compile.onnx.export import with_function
from dga_compile.reference import reference_attention

B, H, D = 1, 8, 64


def _session(node, opsets, threads: int, custom_library=None, function=False, initializers=()) -> ort.InferenceSession:
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, H, None, D]) for n in "qkv"]
    graph = helper.make_graph([node], "attention", inputs,
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    if function:
        model = with_function(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if custom_library is not None:
        so.register_custom_ops_library(str(custom_library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def dense_session(scale: float, threads: int) -> ort.InferenceSession:
    """ONNX Attention (opset 23), causal: ORT's own CPU attention kernel."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["out"], is_causal=1, scale=scale)
    return _session(node, [("", 23)], threads)


def dga_session(cfg: DGAConfig, scale: float, threads: int, library=None) -> ort.InferenceSession:
    """One ai.dga node as the exporter writes it (an all-true [1, 1, 1, 1] mask for "no mask"):
    the native kernel with ``library``, else the exporter's ONNX function body."""
    node = helper.make_node(OP_TYPE, ["q", "k", "v", "no_mask"], ["out"], domain=DOMAIN,
                            **node_attributes(cfg, True, scale))
    no_mask = helper.make_tensor("no_mask", TensorProto.BOOL, [1, 1, 1, 1], [True])
    return _session(node, [("", OPSET), (DOMAIN, DOMAIN_VERSION)], threads, library, function=library is None,
                    initializers=[no_mask])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(n: int, repeats: int, threads: int, library, cfg: DGAConfig) -> dict:
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for _ in range(3))
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy())
    scale = 1.0 / math.sqrt(D)
    dense, dga = dense_session(scale, threads), dga_session(cfg, scale, threads, library)
    body = dga_session(cfg, scale, threads)
    methods = {
        "ort_dense": lambda: dense.run(None, feeds),
        "ort_native": lambda: dga.run(None, feeds),
        "ort_function": lambda: body.run(None, feeds),
        "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    for fn in methods.values():  # warm-up
        fn()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    row = {name: statistics.median(t) for name, t in times.items()}
    out = torch.from_numpy(dga.run(None, feeds)[0])
    dense_out = torch.from_numpy(dense.run(None, feeds)[0])
    row["dense_err"] = float((dense_out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max())
    if n <= 2048:  # the dense reference builds an N×N matrix per head
        ref = reference_attention(q, k, v, is_causal=True, scale=scale, config=cfg)
        row["native_err"] = float((out - ref).abs().max())
        row["function_err"] = float((torch.from_numpy(body.run(None, feeds)[0]) - ref).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (and torch threads)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    library = native.build_library()
    cfg = DGAConfig()
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, {cfg}")
    print("| N | ORT dense (Attention-23) ms | native op ms | dense / native | function body ms | dense / function "
          "| torch SDPA ms | max err vs reference (native, function) |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        r = bench_size(n, args.repeats, args.threads, library, cfg)
        err = f"{r['native_err']:.1e}, {r['function_err']:.1e}" if "native_err" in r else "(not computed)"
        print(f"| {n} | {r['ort_dense'] * 1e3:.0f} | {r['ort_native'] * 1e3:.0f} | "
              f"{r['ort_dense'] / r['ort_native']:.2f}× | {r['ort_function'] * 1e3:.0f} | "
              f"{r['ort_dense'] / r['ort_function']:.2f}× | {r['torch_sdpa'] * 1e3:.0f} | {err} |", flush=True)


if __name__ == "__main__":
    main()
