"""End-to-end demo (`make demo`): DGA on a long random input, accuracy and speed vs SDPA."""

import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from dga_compile import DGAConfig, dynamic_group_attention


def _median_seconds(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    console = Console()
    torch.manual_seed(0)
    cfg = DGAConfig()
    table = Table(title=f"DGA vs SDPA — causal fp32, B=1 H=8 D=64, γ={cfg.focus_ratio} m={cfg.group_size} w={cfg.window}")
    for col in ("N", "max |err|", "rel. err", "SDPA s", "DGA s", "SDPA/DGA"):
        table.add_column(col, justify="right")
    for n in (2048, 4096):
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dga = dynamic_group_attention(q, k, v, is_causal=True, config=cfg)
        err = (dga - dense).abs()
        t_sdpa = _median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_dga = _median_seconds(lambda: dynamic_group_attention(q, k, v, is_causal=True, config=cfg))
        table.add_row(str(n), f"{err.max():.3g}", f"{err.norm() / dense.norm():.3g}", f"{t_sdpa:.3f}",
                      f"{t_dga:.3f}", f"{t_sdpa / t_dga:.2f}×")
    console.print(table)


if __name__ == "__main__":
    main()
