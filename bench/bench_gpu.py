"""GPU benchmark: DGA Triton kernels vs F.scaled_dot_product_attention (flash backend).

Part 1, the op: causal prefill (and forward+backward), bf16, B=1, H=32, Hkv=8, D=128, N = 4K … 128K. Per N: median
times (CUDA events, runs interleaved) of SDPA-flash and DGA, DGA's stage breakdown (scoring,
focus sort, aggregation, stream bounds, fused attention: is the sort a bottleneck?), TFLOP/s, and the FLOP bound of the config (dense
causal FLOPs / the FLOPs DGA's fused kernel performs: the largest speed-up equal TFLOP/s allow).
Part 2, end to end: prefill of a Llama-style ~0.5B model (random weights) at 16K and 32K,
dense (SDPA) vs ``torch.compile(backend="dga")``.

    python bench/bench_gpu.py [--ns 4096,8192,...] [--e2e-ns 16384,32768] [--skip-e2e] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dga_compile import DGAConfig
from dga_compile.kernels import pipeline
from dga_compile.kernels.aggregation import aggregate_groups_triton
from dga_compile.kernels.scoring import importance_scores_triton
from dga_compile.selection import num_focus, split_focus
from dga_compile.kernels.attention import block_m_for, fused_forward
from dga_compile.kernels.streams import plan_mask, prepare_streams

B, H, HKV, D = 1, 32, 8, 128


def _median_ms(fns: dict, reps: int) -> dict:
    """Median milliseconds per callable, runs interleaved so clock drift hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():                       # warm-up (compiles, autotunes)
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def _dga_flops(bounds: torch.Tensor, nq: int, block_m: int, rep: int, dim: int) -> float:
    """FLOPs of the fused kernel: 4·D per (query row, streamed key), counted from the stream bounds."""
    f_end, g_end, r_start, r_end = bounds.double().unbind(-1)       # [B, Hkv, NB]
    rows = torch.full((bounds.shape[2],), float(block_m), dtype=torch.float64, device=bounds.device)
    rows[-1] = nq - block_m * (bounds.shape[2] - 1)
    keys = f_end + g_end + (r_end - r_start)
    return float((keys * rows).sum()) * rep * 4 * dim


def bench_op(n: int, cfg: DGAConfig, reps: int) -> dict:
    torch.manual_seed(0)
    q = torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_full, v_full = (x.repeat_interleave(H // HKV, 1) for x in (k, v))   # flash wants Hq == Hkv
    scale = D ** -0.5
    plan = plan_mask(None, True, B, n, n)
    sel = pipeline._select_triton(q, k, v, plan, scale, cfg)
    block_m = block_m_for(D)
    st = prepare_streams(sel, plan, n, cfg.group_size, cfg.window, block_m, q.dtype)
    glogit = cfg.group_bias * math.log(cfg.group_size)
    scores, nf = importance_scores_triton(q, k, None, True, scale, cfg.num_probe), num_focus(cfg.focus_ratio, n)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    fns = {
        "sdpa_flash": sdpa,
        "dga": lambda: pipeline.triton_attention(q, k, v, None, True, scale, cfg),
        "dga_scoring": lambda: importance_scores_triton(q, k, None, True, scale, cfg.num_probe),
        "dga_focus_sort": lambda: split_focus(scores, nf),
        "dga_aggregation": lambda: aggregate_groups_triton(q, k, v, sel.nonfocus, scale, cfg.group_size),
        "dga_streams": lambda: prepare_streams(sel, plan, n, cfg.group_size, cfg.window, block_m, q.dtype),
        "dga_fused": lambda: fused_forward(q, st, causal=True, scale=scale, group_logit=glogit,
                                           group_size=cfg.group_size, window=cfg.window, block_m=block_m),
    }
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    full_leaves = [x.detach().requires_grad_() for x in (q, k_full, v_full)]
    grad_out = torch.randn_like(q)

    def sdpa_train():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(*full_leaves, is_causal=True).backward(grad_out)

    fns["sdpa_flash_fwd_bwd"] = sdpa_train
    fns["dga_fwd_bwd"] = lambda: pipeline.triton_attention(*leaves, None, True, scale, cfg).backward(grad_out)
    ms = _median_ms(fns, reps)
    dense_flops = 4 * B * H * D * n * (n + 1) / 2
    dga_flops = _dga_flops(st.bounds, n, block_m, H // HKV, D)
    return dict(N=n, **{f"{k}_ms": round(t, 3) for k, t in ms.items()},
                speedup=round(ms["sdpa_flash"] / ms["dga"], 3),
                train_speedup=round(ms["sdpa_flash_fwd_bwd"] / ms["dga_fwd_bwd"], 3),
                sdpa_tflops=round(dense_flops / ms["sdpa_flash"] / 1e9, 1),
                dga_fused_tflops=round(dga_flops / ms["dga_fused"] / 1e9, 1),
                flop_bound=round(dense_flops / dga_flops, 2))


def bench_e2e(n: int, reps: int) -> dict:
    """Llama-style ~0.5B (24 layers, hidden 1024, 16 heads / 4 kv heads, D=64), random weights, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=n,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
    dga = torch.compile(model, backend="dga")
    with torch.no_grad():
        ms = _median_ms({"dense": lambda: model(ids, logits_to_keep=1), "dga": lambda: dga(ids, logits_to_keep=1)},
                        reps)
    return dict(N=n, params_M=round(params / 1e6), dense_ms=round(ms["dense"], 1), dga_ms=round(ms["dga"], 1),
                speedup=round(ms["dense"] / ms["dga"], 3))


def _table(rows: list) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--e2e-ns", default="16384,32768")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device; the CPU benchmark is bench/bench_cpu.py")
    cfg = DGAConfig(min_seq_len=1024)
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · {cfg}")
    op = [bench_op(int(n), cfg, args.reps) for n in args.ns.split(",")]
    print(_table(op))
    e2e = [] if args.skip_e2e else [bench_e2e(int(n), max(3, args.reps // 3)) for n in args.e2e_ns.split(",")]
    if e2e:
        print(_table(e2e))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, op=op, e2e=e2e), f, indent=1)


if __name__ == "__main__":
    main()
