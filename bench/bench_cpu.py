"""CPU benchmark: DGA (the public op, impl="auto") vs `F.scaled_dot_product_attention` (not a test).

Causal self-attention, B=1, H=8, D=64, fp32, no grad: "auto" runs the C++ kernel when it is built,
else the blocked PyTorch path (the table's "DGA path" column says which). For each N the two run interleaved in one
process (SDPA, DGA, SDPA, DGA, ...) and the medians are compared, so load from other processes
hits both alike. Peak memory is measured per (implementation, N) in a fresh subprocess: the
kernel's resident-set high-water mark is reset just before the call (``/proc/self/clear_refs``)
and read after it, so the number is the most memory the call held at once beyond the inputs
(tracemalloc does not see torch's allocations). Linux only; elsewhere the column reads "–".

    python bench/bench_cpu.py                 # N = 2K..16K, prints a table, writes bench/results/
    python bench/bench_cpu.py --sizes 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dga_compile import DGAConfig, dispatch, dynamic_group_attention

B, H, D = 1, 8, 64
RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return tuple(torch.randn(B, H, n, D, generator=gen) for _ in range(3))


def _runner(impl: str, cfg: DGAConfig):
    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return lambda q, k, v: dynamic_group_attention(q, k, v, is_causal=True, config=cfg)


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_pair(n: int, repeats: int, cfg: DGAConfig) -> tuple[float, float, str]:
    """Median seconds of SDPA and DGA at length n, interleaved, after one warm-up each, and the
    implementation the op's dispatch ran."""
    q, k, v = _inputs(n)
    sdpa, dga = _runner("sdpa", cfg), _runner("dga", cfg)
    times = {"sdpa": [], "dga": []}
    with torch.no_grad():
        with dispatch.recording() as ran:
            sdpa(q, k, v), dga(q, k, v)
        for _ in range(repeats):
            times["sdpa"].append(_timed(sdpa, q, k, v))
            times["dga"].append(_timed(dga, q, k, v))
    return statistics.median(times["sdpa"]), statistics.median(times["dga"]), ran[0]


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory_child(impl: str, n: int, window: int) -> float:
    """Run in a fresh process: MiB the call held at its peak beyond what was resident before it."""
    fn = _runner(impl, DGAConfig(window=window))
    with torch.no_grad():
        q, k, v = _inputs(n)
        fn(q[:, :, :64], k[:, :, :64], v[:, :, :64])   # load kernels and thread pools
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        before = _status_mib("VmRSS")
        fn(q, k, v)
    return _status_mib("VmHWM") - before


def peak_memory(impl: str, n: int, window: int, threads: int) -> float | None:
    cmd = [sys.executable, __file__, "--child", impl, str(n), "--window", str(window), "--threads", str(threads)]
    # Large blocks go straight to mmap and back to the OS on free, so RSS follows live memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return float(run.stdout.split()[-1]) if run.returncode == 0 else None


def machine() -> dict:
    model = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def to_markdown(res: dict) -> str:
    m, c = res["machine"], res["config"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"Python {m['python']}; load average {m['load_average_at_start'][0]:.1f} at start, "
             f"{m['load_average_at_end'][0]:.1f} at end.",
             f"Causal, fp32, B={B}, H={H}, D={D}, no grad; DGA γ={c['focus_ratio']}, m={c['group_size']}, "
             f"w={c['window']}, r={c['num_probe']}, β={c['group_bias']}; medians of {res['repeats']} interleaved runs.",
             "",
             "| N | DGA path | SDPA median (s) | DGA median (s) | SDPA/DGA | SDPA peak mem (MiB) | DGA peak mem (MiB) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        mem = lambda x: "–" if x is None else f"{x:.0f}"
        lines.append(f"| {r['n']} | {r['dga_path']} | {r['sdpa_s']:.3f} | {r['dga_s']:.3f} | {r['ratio']:.2f}× | "
                     f"{mem(r['sdpa_peak_mib'])} | {mem(r['dga_peak_mib'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=int, default=DGAConfig().window)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for cpu.json and cpu.md")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(peak_memory_child(args.child[0], int(args.child[1]), args.window))
        return

    from rich.console import Console
    from rich.table import Table

    cfg = DGAConfig(window=args.window)
    res = {"machine": machine(), "repeats": args.repeats,
           "config": {f: getattr(cfg, f) for f in ("focus_ratio", "group_size", "window", "num_probe", "group_bias")},
           "rows": []}
    for n in args.sizes:
        sdpa_s, dga_s, path = time_pair(n, args.repeats, cfg)
        mem = (None, None) if args.no_memory else tuple(peak_memory(i, n, args.window, args.threads) for i in ("sdpa", "dga"))
        res["rows"].append({"n": n, "dga_path": path, "sdpa_s": sdpa_s, "dga_s": dga_s, "ratio": sdpa_s / dga_s,
                            "sdpa_peak_mib": mem[0], "dga_peak_mib": mem[1]})
    res["machine"]["load_average_at_end"] = os.getloadavg()

    table = Table(title="Causal attention on CPU: DGA (impl='auto') vs SDPA")
    for col in ("N", "DGA path", "SDPA median s", "DGA median s", "SDPA/DGA", "SDPA peak MiB", "DGA peak MiB"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        mem = lambda x: "–" if x is None else f"{x:.0f}"
        table.add_row(str(r["n"]), r["dga_path"], f"{r['sdpa_s']:.3f}", f"{r['dga_s']:.3f}", f"{r['ratio']:.2f}×",
                      mem(r["sdpa_peak_mib"]), mem(r["dga_peak_mib"]))
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "cpu.md").write_text(to_markdown(res))
    print(f"wrote {args.out / 'cpu.json'} and {args.out / 'cpu.md'}")


if __name__ == "__main__":
    main()
