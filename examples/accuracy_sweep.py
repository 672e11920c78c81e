"""The sweep behind docs/ACCURACY.md: SmolLM2-135M (fp32) on the Jargon File, dense vs DGA
settings vs equal-cost baselines. Writes JSON after every method (partial runs stay usable).

    python examples/accuracy_sweep.py --seq-len 2048 --windows 3 --only 0 1 2 3 4 5 6 7 8 9 --out docs/accuracy_2k.json
    python examples/accuracy_sweep.py --seq-len 4096 --windows 3 --only 0 7 5 10 8 --baselines --out docs/accuracy_4k.json
    python examples/accuracy_sweep.py --seq-len 4096 --windows 5 --only 13 7 12 11 --out docs/accuracy_4k_beta.json
"""

import argparse
import json

from dga_compile import DGAConfig
from dga_compile.eval import Method
from dga_compile.eval.fetch import read_text, smollm2
from dga_compile.eval.run import Evaluation

BASE = DGAConfig(min_seq_len=0, num_probe=64)      # the settings the sweeps started from (r = 64 until the 4K sweep)
#: (config, with equal-cost baselines?)
SWEEP = [
    (BASE, True),                                              # w=256, β=1, r=64
    (BASE.replace(window=0, group_bias=0.0), False),           # paper-faithful: no window, plain groups
    (BASE.replace(window=0), False),
    (BASE.replace(group_bias=0.0), False),
    (BASE.replace(window=128), False),
    (BASE.replace(window=512), True),
    (BASE.replace(num_probe=16), False),
    (BASE.replace(num_probe=128), False),                      # the defaults since the 4K sweep
    (BASE.replace(focus_ratio=0.2), True),                     # γ, m trade-off
    (BASE.replace(group_size=8), False),
    (BASE.replace(num_probe=128, window=512), False),
    (BASE.replace(num_probe=128, group_bias=0.0), False),
    (BASE.replace(num_probe=128, group_bias=0.5), False),
    (BASE.replace(num_probe=128, group_bias=0.25), True),      # the defaults since the β sweep
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--only", type=int, nargs="*", help="indices into SWEEP, run in this order")
    ap.add_argument("--baselines", action="store_true", help="equal-cost baselines after every setting")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ev = Evaluation(smollm2(), read_text(), args.seq_len, args.windows, progress=False,
                    text_name="jargon-text (Debian)")
    for idx in range(len(SWEEP)) if args.only is None else args.only:
        cfg, baselines = SWEEP[idx]
        ev.run_with_baselines(cfg) if baselines or args.baselines else ev.run(Method("dga", cfg))
        with open(args.out, "w") as f:
            json.dump(ev.result().to_json(), f, indent=1)
        for r in ev.results[-3:]:
            print(f"{r.label:<45} cost {r.cost:.3f} last {r.keys_at_last:.0f} ppl {r.ppl:.2f} "
                  f"last-half {r.ppl_last_half:.2f} Δ {r.delta_last_half:+.1%}", flush=True)


if __name__ == "__main__":
    main()
