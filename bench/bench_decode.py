"""CPU decode benchmark: the DGA cache vs a dense KV cache, measured in the same process (not a test).

1. **attention alone**: one decode query with SmolLM2-135M's shapes (Hq=9, Hkv=3, D=64, fp32)
   over N cached tokens. Dense: `F.scaled_dot_product_attention` over the N keys (what HF's
   "sdpa" runs). DGA: ``torch.ops.dga.decode_attention`` over the compressed cache of the same
   N tokens (`dga_compile.decode_op`; the C++ kernel when built), and the DGA layer's whole
   step (append the token, form/complete blocks, attend).
2. **model decode step**: SmolLM2-135M, ms/token with a `DynamicCache` of N tokens vs a
   `DGACache` of N tokens (every layer filled from random keys, values and queries: the speed of
   a step does not depend on them, and a real 32K prefill takes hours on a small CPU). Both use
   one attention function (`register_attention(name, sdpa)`: SDPA prefill, the DGA cache read
   when one is linked).
3. **end to end** (``--e2e-len``): ``generate()`` of ``--e2e-tokens`` greedy tokens after a real
   prompt of the Jargon File: SDPA + DynamicCache vs SDPA prefill + DGACache.

Dense and DGA runs alternate and medians are compared, so load from other processes hits both
alike; each time is reported as wall time and as the CPU time this process used (the steadier
one on a shared machine). The bytes columns are what each cache holds. Writes
bench/results/decode.{json,md}.

    python bench/bench_decode.py                      # N = 4K 8K 16K 32K
    python bench/bench_decode.py --sizes 4096 --steps 4 --repeats 3 --e2e-len 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cpu import machine
from dga_compile import DGAConfig
from dga_compile.cache import DGACache, DGALayer, cache_nbytes
from dga_compile.decode_op import decode_attention, native_available

HQ, HKV, D = 9, 3, 64
RESULTS = Path(__file__).resolve().parent / "results"


def _clocks() -> tuple[float, float]:
    """(wall, CPU) seconds: on a loaded machine the CPU time this process used is the steadier of the two."""
    return time.perf_counter(), time.process_time()


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    w, c = _clocks()
    fn()
    w2, c2 = _clocks()
    return w2 - w, c2 - c


def _medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def _compressed_layer(n: int, cfg: DGAConfig, gen: torch.Generator, idx: int = 0) -> DGALayer:
    """A DGA layer after a prefill of n random tokens (compression from random q, k, v)."""
    layer = DGALayer(cfg, idx)
    layer.update(torch.randn(1, HKV, n, D, generator=gen), torch.randn(1, HKV, n, D, generator=gen))
    layer.attend(torch.randn(1, HQ, n, D, generator=gen), None, D ** -0.5, dense=lambda: None)
    return layer


def bench_attention(n: int, cfg: DGAConfig, repeats: int) -> dict:
    """Part 1 at context n: seconds per decode query, dense SDPA vs the DGA kernel and layer step."""
    gen = torch.Generator().manual_seed(n)
    k, v = torch.randn(1, HKV, n, D, generator=gen), torch.randn(1, HKV, n, D, generator=gen)
    q = torch.randn(1, HQ, 1, D, generator=gen)
    layer = _compressed_layer(n, cfg, gen)
    step_k, step_v = torch.randn(1, HKV, 1, D, generator=gen), torch.randn(1, HKV, 1, D, generator=gen)
    p, r = layer.packed, layer.recent

    def dense():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def kernel():
        decode_attention(q, p.keys, p.values, p.lam, r.keys, r.values, r.lam, D ** -0.5, cfg.impl)

    def step():
        layer.update(step_k, step_v)
        layer.attend(q, None, D ** -0.5, dense=None)

    times = {"dense": [], "kernel": [], "step": []}
    with torch.no_grad():
        for fn in (dense, kernel, step):
            fn()
        for _ in range(repeats):
            for name, fn in (("dense", dense), ("kernel", kernel), ("step", step)):
                times[name] += [_timed(fn) for _ in range(5)]
    (dw, dc), (kw, kc), (sw, sc) = (_medians(times[k_]) for k_ in ("dense", "kernel", "step"))
    dense_bytes = 2 * HKV * n * D * 4
    return {"n": n, "dense_ms": 1e3 * dw, "dga_kernel_ms": 1e3 * kw, "dga_step_ms": 1e3 * sw,
            "kernel_speedup": dw / kw, "step_speedup": dw / sw, "dense_cpu_ms": 1e3 * dc, "dga_kernel_cpu_ms": 1e3 * kc,
            "dga_step_cpu_ms": 1e3 * sc, "kernel_cpu_speedup": dc / kc, "step_cpu_speedup": dc / sc,
            "dense_bytes": dense_bytes, "dga_bytes": layer.nbytes(), "bytes_fraction": layer.nbytes() / dense_bytes}


def _model():
    from dga_compile.eval.fetch import smollm2
    from dga_compile.integrations.transformers import register_attention, sdpa
    from dga_compile.models import load_model

    model = load_model(smollm2()).model
    model.set_attn_implementation(register_attention("dga-bench-decode", sdpa))
    return model


def _filled_caches(model, n: int, cfg: DGAConfig):
    """(DynamicCache, DGACache) of n random tokens in every layer."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(n)
    dense, dga = DynamicCache(config=model.config), DGACache(cfg, model.config)
    for idx in range(model.config.num_hidden_layers):
        layer = _compressed_layer(n, cfg, gen, idx)
        dense.update(torch.randn(1, HKV, n, D, generator=gen), torch.randn(1, HKV, n, D, generator=gen), idx)
        dga.layers[idx] = layer
    return dense, dga


def bench_model(model, n: int, cfg: DGAConfig, steps: int) -> dict:
    """Part 2 at context n: median ms per decode step, DynamicCache vs DGACache, alternating."""
    caches = dict(zip(("dense", "dga"), _filled_caches(model, n, cfg)))
    times = {"dense": [], "dga": []}
    tok = torch.tensor([[42]])
    with torch.no_grad():
        for step in range(steps + 1):
            for name, cache in caches.items():
                t = _timed(lambda c=cache: model(input_ids=tok, cache=c, use_cache=True))
                if step:                                         # the first step warms up
                    times[name].append(t)
    (dw, dc), (gw, gc) = _medians(times["dense"]), _medians(times["dga"])
    sizes = {k: cache_nbytes(c) for k, c in caches.items()}
    return {"n": n, "dense_ms": 1e3 * dw, "dga_ms": 1e3 * gw, "speedup": dw / gw, "dense_cpu_ms": 1e3 * dc,
            "dga_cpu_ms": 1e3 * gc, "cpu_speedup": dc / gc, "dense_bytes": sizes["dense"], "dga_bytes": sizes["dga"],
            "bytes_fraction": sizes["dga"] / sizes["dense"]}


def bench_end_to_end(model, n: int, tokens: int, cfg: DGAConfig) -> dict:
    """Part 3: prefill + greedy generation of ``tokens`` tokens after a real n-token prompt."""
    from transformers import DynamicCache

    from dga_compile.eval.fetch import read_text, smollm2
    from dga_compile.eval.run import token_ids
    from dga_compile.models import load_model

    ids = token_ids(load_model(smollm2(), tokenizer=True).tokenizer, read_text())[None, 1000:1000 + n]
    # generate() continues a cache that holds all but the last prompt token (it feeds that one first)
    out = {"n": n, "tokens": tokens}
    for name, make in (("dense", lambda: DynamicCache(config=model.config)), ("dga", lambda: DGACache(cfg, model.config))):
        cache = make()
        with torch.no_grad():
            prefill = _timed(lambda c=cache: model(input_ids=ids[:, :-1], cache=c, use_cache=True))[0]
            gen = _timed(lambda c=cache: model.generate(ids, cache=c, max_new_tokens=tokens, do_sample=False,
                                                        min_new_tokens=tokens))
        out[f"{name}_prefill_s"], out[f"{name}_ms_per_token"] = prefill, 1e3 * gen[0] / tokens
        out[f"{name}_cpu_ms_per_token"] = 1e3 * gen[1] / tokens
        out[f"{name}_bytes"] = cache_nbytes(cache)
    out["speedup_per_token"] = out["dense_ms_per_token"] / out["dga_ms_per_token"]
    return out


def to_markdown(res: dict) -> str:
    m, c = res["machine"], res["config"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
             f"load average {m['load_average_at_start'][0]:.1f} at start, {m['load_average_at_end'][0]:.1f} at end "
             f"(other processes: ratios are from one run, dense and DGA alternating). C++ decode kernel: "
             f"{'yes' if res['native'] else 'no (PyTorch path)'}.",
             f"DGA γ={c['focus_ratio']}, m={c['group_size']}, w={c['window']}, r={c['num_probe']}, β={c['group_bias']}.",
             "", "Attention alone (one decode query, Hq=9, Hkv=3, D=64, fp32):", "",
             "| N | dense SDPA ms (CPU ms) | DGA kernel ms (CPU ms) | kernel speedup wall (CPU) | DGA layer step ms "
             "(CPU ms) | step speedup wall (CPU) | cache vs dense |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["attention"]:
        lines.append(f"| {r['n']} | {r['dense_ms']:.3f} ({r['dense_cpu_ms']:.3f}) | {r['dga_kernel_ms']:.3f} "
                     f"({r['dga_kernel_cpu_ms']:.3f}) | {r['kernel_speedup']:.2f}× ({r['kernel_cpu_speedup']:.2f}×) | "
                     f"{r['dga_step_ms']:.3f} ({r['dga_step_cpu_ms']:.3f}) | {r['step_speedup']:.2f}× "
                     f"({r['step_cpu_speedup']:.2f}×) | {r['bytes_fraction']:.1%} |")
    if res["model"]:
        lines += ["", "SmolLM2-135M decode step (30 layers, caches of N random tokens):", "",
                  "| N | DynamicCache ms/token (CPU ms) | DGACache ms/token (CPU ms) | speedup wall (CPU) | cache MiB "
                  "dense | DGA | DGA vs dense |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["model"]:
            lines.append(f"| {r['n']} | {r['dense_ms']:.1f} ({r['dense_cpu_ms']:.1f}) | {r['dga_ms']:.1f} "
                         f"({r['dga_cpu_ms']:.1f}) | {r['speedup']:.2f}× ({r['cpu_speedup']:.2f}×) | "
                         f"{r['dense_bytes'] / 2**20:.0f} | {r['dga_bytes'] / 2**20:.0f} | {r['bytes_fraction']:.1%} |")
    if res.get("end_to_end"):
        e = res["end_to_end"]
        lines += ["", f"End to end: {e['n']}-token prompt + {e['tokens']} greedy tokens with generate():", "",
                  "| cache | prefill (s) | ms/token (CPU ms) | cache MiB |", "|---|---:|---:|---:|",
                  f"| DynamicCache | {e['dense_prefill_s']:.1f} | {e['dense_ms_per_token']:.1f} "
                  f"({e['dense_cpu_ms_per_token']:.1f}) | {e['dense_bytes'] / 2**20:.0f} |",
                  f"| DGACache | {e['dga_prefill_s']:.1f} | {e['dga_ms_per_token']:.1f} ({e['dga_cpu_ms_per_token']:.1f}) | "
                  f"{e['dga_bytes'] / 2**20:.0f} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=5, help="alternating rounds of part 1")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per cache in part 2 (0: skip)")
    p.add_argument("--e2e-len", type=int, default=4096, help="prompt tokens of part 3 (0: skip)")
    p.add_argument("--e2e-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for decode.json and decode.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rich.console import Console

    cfg = DGAConfig()
    res = {"machine": machine(), "native": native_available(), "repeats": args.repeats, "steps": args.steps,
           "config": {f: getattr(cfg, f) for f in ("focus_ratio", "group_size", "window", "num_probe", "group_bias")},
           "attention": [bench_attention(n, cfg, args.repeats) for n in args.sizes], "model": []}
    if args.steps or args.e2e_len:
        model = _model()
        res["model"] = [bench_model(model, n, cfg, args.steps) for n in args.sizes] if args.steps else []
        if args.e2e_len:
            res["end_to_end"] = bench_end_to_end(model, args.e2e_len, args.e2e_tokens, cfg)
    res["machine"]["load_average_at_end"] = os.getloadavg()
    md = to_markdown(res)
    Console().print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "decode.md").write_text(md)
    print(f"wrote {args.out / 'decode.json'} and {args.out / 'decode.md'}")


if __name__ == "__main__":
    main()
