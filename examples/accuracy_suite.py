"""Every measurement docs/ACCURACY.md reports, rerun and written into it: ``make accuracy``.

Runs each entry of `ENTRIES` (model, task, length, windows or trials, DGA configs, baselines at
equal counted cost) that has no finished JSON in ``--out-dir`` yet, saving each entry's JSON and
plot after every config (an interrupted run resumes; ``--force`` starts over), then rewrites
the tables between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in ``--doc``. A full
run takes hours on 2 cores; ``--only`` picks entries, ``--windows`` / ``--trials`` shrink them:

    python examples/accuracy_suite.py                                  # everything (make accuracy)
    python examples/accuracy_suite.py --only smollm2-2k --windows 2 --out-dir /tmp/acc --doc /tmp/acc/ACCURACY.md
    python examples/accuracy_suite.py --docs-only                      # tables from the JSON present
"""

import argparse
import importlib.util
import shutil
from pathlib import Path

from dga_compile import DGAConfig
from dga_compile.eval.fetch import cache_dir, read_text
from dga_compile.eval.report import markdown_table
from dga_compile.eval.run import BASELINES, EvalResult
from dga_compile.eval.suite import Entry, Table, entry_tables, regenerate, run_suite, saved_result

ROOT = Path(__file__).resolve().parents[1]
ALL, NONE = BASELINES, ()
DEFAULTS = DGAConfig(min_seq_len=0)
BASE = DGAConfig(min_seq_len=0, num_probe=64, group_bias=1.0)   # where the sweeps started (r = 64, β = 1)
#: The DGA settings of the 2K / 4K sweeps (docs/ACCURACY.md)
SWEEP = [
    BASE,                                                      # 0: w=256, β=1, r=64
    BASE.replace(window=0, group_bias=0.0),                    # 1: paper-faithful: no window, plain groups
    BASE.replace(window=0),                                    # 2
    BASE.replace(group_bias=0.0),                              # 3
    BASE.replace(window=128),                                  # 4
    BASE.replace(window=512),                                  # 5
    BASE.replace(num_probe=16),                                # 6
    BASE.replace(num_probe=128),                               # 7: the defaults of the 4K sweep (β = 1)
    BASE.replace(focus_ratio=0.2),                             # 8: γ, m trade-off
    BASE.replace(group_size=8),                                # 9
    BASE.replace(num_probe=128, window=512),                   # 10
    BASE.replace(num_probe=128, group_bias=0.0),               # 11
    BASE.replace(num_probe=128, group_bias=0.5),               # 12
    DEFAULTS,                                                  # 13: the defaults since the β sweep (β = 0.25)
]
GEMMA3_SLIDING = tuple(i for i in range(18) if (i + 1) % 6)     # Gemma 3 270M: every 6th layer is global


def _finetuned(name: str, *args: str):
    """A model fine-tuned by examples/finetune_dga.py with ``args`` (trained once, kept in the cache)."""
    def model() -> Path:
        out = cache_dir() / "finetuned" / name
        if not (out / "config.json").exists():
            spec = importlib.util.spec_from_file_location("finetune_dga", ROOT / "examples" / "finetune_dga.py")
            recipe = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(recipe)
            shutil.rmtree(out, ignore_errors=True)
            recipe.main([*args, "--out", str(out)])
        return out
    return model


FINETUNE = {  # entry -> (row label, reference entry)
    "finetune-original": ("original (no training)", "finetune-original"),
    "finetune-dense-30": ("dense-trained, 30 steps, lr 2e-5", "finetune-dense-30"),
    "finetune-dga-30": ("DGA-trained, 30 steps, lr 2e-5", "finetune-dense-30"),
    "finetune-dense-60": ("dense-trained, 60 steps, lr 5e-5", "finetune-dense-60"),
    "finetune-dga-60": ("DGA-trained, 60 steps, lr 5e-5", "finetune-dense-60"),
}
_RECIPES = {"finetune-dense-30": ("--steps", "30", "--dense"), "finetune-dga-30": ("--steps", "30"),
            "finetune-dense-60": ("--steps", "60", "--lr", "5e-5", "--dense"),
            "finetune-dga-60": ("--steps", "60", "--lr", "5e-5")}

ENTRIES = [
    Entry("smollm2-2k", "smollm2", 2048, tuple((SWEEP[i], ALL if i in (0, 5, 8, 13) else NONE)
                                               for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13))),
    Entry("smollm2-4k", "smollm2", 4096, tuple((SWEEP[i], ALL) for i in (0, 7, 5, 10, 8)) + ((SWEEP[11], NONE),)),
    Entry("smollm2-4k-beta", "smollm2", 4096, ((DEFAULTS, ALL), (SWEEP[7], NONE), (SWEEP[12], NONE), (SWEEP[11], NONE),
                                               (DEFAULTS.replace(window=512), ALL)), windows=5),
    Entry("smollm2-8k", "smollm2", 8192, ((DEFAULTS, ALL), (DEFAULTS.replace(window=512), ALL)), windows=5),
    Entry("smollm2-4k-dense-layers-b1", "smollm2", 4096, ((SWEEP[7], ALL), (SWEEP[10], ALL)), calibrate=5),
    Entry("smollm2-4k-dense-layers", "smollm2", 4096, ((DEFAULTS, ALL),), calibrate=5),
    Entry("smollm2-passkey-4k", "smollm2", 4096, ((DEFAULTS, ALL),), task="passkey"),
    Entry("smollm2-passkey-8k", "smollm2", 8192, ((DEFAULTS, ALL),), task="passkey"),
    Entry("gemma3-2k", "gemma3", 2048, ((DEFAULTS, ALL), (DEFAULTS.replace(dense_layers=GEMMA3_SLIDING), ALL)),
          windows=5),
    Entry("gemma3-passkey-4k", "gemma3", 4096, ((DEFAULTS, ALL),), task="passkey"),
    *(Entry(name, "smollm2" if name == "finetune-original" else _finetuned(name, *_RECIPES[name]), 4096,
            ((DEFAULTS, NONE),)) for name in FINETUNE),
    Entry("minilm-256", "minilm", 256, ((BASE, NONE), (BASE.replace(group_size=4), NONE),
                                        (BASE.replace(focus_ratio=0.25), NONE)), windows=4),
]


def _combined(*names: str):
    """One table of several entries that share their dense reference (its row once)."""
    def build(results):
        first = results[names[0]]
        methods = first.methods + [m for n in names[1:] for m in results[n].methods[1:]]
        return markdown_table(EvalResult(first.model, first.text, first.seq_len, first.windows, first.task, methods))
    return build


def _finetune_table(results) -> str:
    rows = ["| model | attention | cost vs dense | PPL whole | PPL last half | Δ last half vs reference |",
            "|---|---|---|---|---|---|"]
    for name, (label, ref) in FINETUNE.items():
        ref_ppl = results[ref].methods[0].ppl_last_half
        for r in results[name].methods:
            rows.append(f"| {label} | {'dense' if r.kind == 'dense' else 'DGA (defaults)'} | {r.cost:.1%} | "
                        f"{r.ppl:.2f} | {r.ppl_last_half:.2f} | {r.ppl_last_half / ref_ppl - 1:+.1%} |")
    return "\n".join(rows)


TABLES = [
    *entry_tables("smollm2-2k", ("methods", "windows")),
    *entry_tables("smollm2-4k", ("methods", "windows")),
    *entry_tables("smollm2-4k-beta", ("methods", "windows")),
    *entry_tables("smollm2-8k", ("methods", "windows")),
    Table("smollm2-4k-dense-layers", _combined("smollm2-4k-dense-layers-b1", "smollm2-4k-dense-layers"),
          ("smollm2-4k-dense-layers-b1", "smollm2-4k-dense-layers")),
    *entry_tables("smollm2-passkey-4k", ("methods", "depths")),
    *entry_tables("smollm2-passkey-8k", ("methods", "depths")),
    *entry_tables("gemma3-2k", ("methods", "windows", "sites")),
    *entry_tables("gemma3-passkey-4k", ("methods", "depths", "sites")),
    Table("finetune", _finetune_table, tuple(FINETUNE)),
    *entry_tables("minilm-256"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="entries to run (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="list the entries and exit")
    ap.add_argument("--force", action="store_true", help="rerun entries that are already finished")
    ap.add_argument("--windows", type=int, help="windows per perplexity entry instead of each entry's own")
    ap.add_argument("--trials", type=int, help="trials per passkey entry instead of each entry's own (20)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "accuracy", help="JSON and plots (default "
                    "docs/accuracy)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "ACCURACY.md",
                    help="document whose marked tables are rewritten (created from docs/ACCURACY.md if missing)")
    ap.add_argument("--docs-only", action="store_true", help="run nothing: rewrite the tables from the JSON present")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    names = [e.name for e in ENTRIES]
    if args.list:
        print("\n".join(f"{e.name}: {e.model if isinstance(e.model, str) else 'fine-tuned smollm2'}, {e.task}, "
                        f"{e.seq_len} tokens, {len(e.runs)} config(s)" for e in ENTRIES))
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        raise SystemExit(f"unknown entries {unknown}; the suite has {names}")
    entries = [e.scaled(args.windows, args.trials) for e in ENTRIES if not args.only or e.name in args.only]
    results = {} if args.docs_only else run_suite(entries, args.out_dir, read_text(), "jargon-text (Debian)",
                                                  args.force, args.progress)
    if not args.doc.exists():
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / "docs" / "ACCURACY.md", args.doc)
    done = {r: saved_result(args.out_dir, r) for r in names} | results
    written = regenerate(args.doc, TABLES, {k: v for k, v in done.items() if v is not None}, args.out_dir)
    print(f"{args.doc}: rewrote {', '.join(written) or 'no table'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
