"""SmolLM2-135M prefill speed (not a test): one forward of N tokens of the Jargon File with SDPA,
DGA's defaults, and sinks + step 5′ (γ=0, 4 sinks, τ=0.8), each through ``attn_implementation``;
rounds interleave the three, the first is a warm-up, medians of the rest.

    python bench/bench_model_speed.py 8192 [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from dga_compile import DGAConfig
from dga_compile.eval.fetch import jargon_text, read_text, smollm2
from dga_compile.eval.run import token_windows
from dga_compile.integrations.transformers import register
from dga_compile.models import load_model

CONFIGS = {"sdpa": None, "dga-default": DGAConfig(min_seq_len=0),
           "dga-expand": DGAConfig(min_seq_len=0, focus_ratio=0.0, sinks=4, expand_mass=0.8)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("n", type=int, help="tokens per forward")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    loaded = load_model("smollm2", seq_len=args.n, tokenizer=True)
    ids = token_windows(loaded.tokenizer, read_text(jargon_text()), args.n, 1)[0]
    models = {}
    for name, cfg in CONFIGS.items():
        if cfg is not None:
            register(cfg, name=name)
        models[name] = AutoModelForCausalLM.from_pretrained(smollm2(), attn_implementation=name if cfg else "sdpa",
                                                            dtype=torch.float32).eval()
    times = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t[1:] or t) for name, t in times.items()}
    for name, t in med.items():
        print(f"N={args.n} {name:12s} {t:8.2f} s  {med['sdpa'] / t:5.2f}x vs SDPA")


if __name__ == "__main__":
    main()
