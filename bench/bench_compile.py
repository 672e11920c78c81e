"""Compile time of backend="dga" vs backend="inductor" on the same model (CPU).

Each measurement runs in a fresh process: "cold" with an empty Inductor cache dir, "warm" in a
second process that reuses that dir (Inductor's on-disk caches hit). The first call's time is
the compile time (the call itself is milliseconds); "run" is the median steady-state call.
Backends are interleaved and each number is a median over ``--repeats``.

    python bench/bench_compile.py [--repeats 3] [--layers 2] [--hidden 64] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time, torch, transformers as T
backend, layers, hidden, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
cfg = T.LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
model = T.LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 1000, (1, seq))
kw = {}
if backend == "dga":
    kw["options"] = dict(min_seq_len=0, group_size=16, window=32, num_probe=16)
compiled = torch.compile(model, backend=backend, **kw)
with torch.no_grad():
    t = time.perf_counter(); compiled(input_ids=ids); first = time.perf_counter() - t
    runs = []
    for _ in range(10):
        t = time.perf_counter(); compiled(input_ids=ids); runs.append(time.perf_counter() - t)
runs.sort()
print(json.dumps({"first": first, "run": runs[len(runs) // 2]}))
"""


def _measure(backend: str, cache: str, args) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", _CHILD, backend, str(args.layers), str(args.hidden), str(args.seq)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    rows = {b: {"cold": [], "warm": [], "run": []} for b in ("inductor", "dga")}
    for _ in range(args.repeats):
        for backend in rows:  # interleaved
            with tempfile.TemporaryDirectory(prefix="dga-bench-") as cache:
                cold = _measure(backend, cache, args)
                warm = _measure(backend, cache, args)
            rows[backend]["cold"].append(cold["first"])
            rows[backend]["warm"].append(warm["first"])
            rows[backend]["run"].append(warm["run"])
    med = {b: {k: statistics.median(v) for k, v in r.items()} for b, r in rows.items()}
    print(f"Llama {args.layers} layers, hidden {args.hidden}, seq {args.seq}, medians of {args.repeats}")
    print("| | inductor | dga | dga / inductor |\n|---|---|---|---|")
    for key, label in (("cold", "first call, empty cache (s)"), ("warm", "first call, warm cache (s)"),
                       ("run", "steady-state call (ms)")):
        scale = 1000 if key == "run" else 1
        i, d = med["inductor"][key] * scale, med["dga"][key] * scale
        print(f"| {label} | {i:.2f} | {d:.2f} | {d / i:.2f}× |")


if __name__ == "__main__":
    main()
