"""Continued training through ``torch.compile(model, backend="dga")``: a short recipe.

The paper trains with DGA; as a drop-in, a pretrained model loses accuracy (docs/ACCURACY.md).
This recipe fine-tunes SmolLM2-135M (or any HF causal LM directory) on text through the DGA
backend, i.e. with DGA's forward and backward in every attention site, on windows that do not
overlap the evaluation windows of ``dga-compile eval --seq-len EVAL_LEN --windows 3``, and
saves an HF directory that ``dga-compile eval`` measures like any other model:

    python examples/finetune_dga.py --steps 30 --out /tmp/smollm2-dga
    python examples/finetune_dga.py --steps 30 --dense --out /tmp/smollm2-dense   # control: dense attention
    dga-compile eval /tmp/smollm2-dga --seq-len 4096 --windows 3 --no-baselines

The dense control (same windows, same order, Inductor without DGA) separates what training with
DGA buys from what adapting to the text buys; docs/ACCURACY.md has the measurements.
"""

import argparse
import time
from pathlib import Path

import torch

from dga_compile.backend import last_report
from dga_compile.eval.fetch import read_text
from dga_compile.eval.run import token_ids, window_starts
from dga_compile.models import load_model


def training_windows(num_tokens: int, seq_len: int, eval_len: int, eval_windows: int = 3) -> list[int]:
    """Start offsets of every whole ``seq_len`` window of a ``num_tokens`` text that overlaps none of
    the windows ``dga-compile eval --seq-len eval_len --windows eval_windows`` scores."""
    evals = window_starts(num_tokens, eval_len, eval_windows)
    free = [s for s in range(0, num_tokens - seq_len + 1, seq_len)
            if all(s + seq_len <= e or s >= e + eval_len for e in evals)]
    if not free:
        raise ValueError(f"no {seq_len}-token training window is left outside the evaluation windows of a "
                         f"{num_tokens}-token text; use a longer text or a smaller --seq-len")
    return free


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="HF causal-LM directory, or 'smollm2'")
    ap.add_argument("--text", help="UTF-8 text file (default: the Jargon File)")
    ap.add_argument("--out", required=True, help="new directory for the fine-tuned model (must not exist)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=2048, help="tokens per training sequence")
    ap.add_argument("--eval-len", type=int, default=4096, help="--seq-len of the evaluation to keep clear of")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--dense", action="store_true", help="control run: the same recipe with dense attention")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"--out {out} exists; fine-tuning writes a new directory and never overwrites one")

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, seq_len=args.seq_len, tokenizer=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    if loaded.task != "causal-lm":
        raise SystemExit(f"{args.model} is an encoder; this recipe trains causal LMs")
    ids = token_ids(tokenizer, read_text(args.text))
    starts = training_windows(len(ids), args.seq_len, args.eval_len)
    order = torch.randperm(len(starts)).tolist()
    print(f"{len(ids)} tokens, {len(starts)} training windows of {args.seq_len}; {args.steps} steps")

    model.train()
    compiled = torch.compile(model, backend="inductor" if args.dense else "dga",
                            options=None if args.dense else {"min_seq_len": 0})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    for step in range(args.steps):
        s = starts[order[step % len(order)]]
        x = ids[s:s + args.seq_len][None]
        t0 = time.perf_counter()
        loss = compiled(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step == 0 and not args.dense:
            print("rewrite:", last_report().summary())
        print(f"step {step + 1:>3}/{args.steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.1f} s",
              flush=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
