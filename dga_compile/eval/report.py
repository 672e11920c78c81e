"""Presenting an `EvalResult`: a rich table, a JSON file, a PNG plot, a Markdown table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Union

from .run import EvalResult, MethodResult

__all__ = ["WARN_INCREASE", "quality_warnings", "rich_table", "markdown_table", "markdown_window_table", "markdown_depth_table", "site_summary",
           "save_json", "load_json", "save_plot"]

_STYLE = {"dense": "o", "dga": "s", "streaming": "^", "topk": "v", "perhead": "D"}
_NAMES = {"dense": "dense", "dga": "DGA", "streaming": "StreamingLLM (sinks + recent)", "topk": "top-k + recent",
          "perhead": "per-head (dense or sinks + recent)"}


def _outside(r: MethodResult) -> str:
    """The share of the cost spent outside the attention itself (probes, aggregation, ...)."""
    return f"{sum(v for k, v in r.cost_terms.items() if k != 'attention'):.1%}" if r.cost_terms else "—"


#: A DGA row whose last-half perplexity rises more than this over dense gets a warning.
WARN_INCREASE = 0.05

_FIX = ("calibrate a plan that bounds the loss (`dga-compile calibrate MODEL --max-increase 2%`, then "
        "DGAConfig(plan=...)), or keep the worst layers dense (`--calibrate K`, DGAConfig(dense_layers=...))")


def quality_warnings(result: EvalResult) -> list[str]:
    """One line per DGA row that loses more than the warning threshold: perplexity above
    +`WARN_INCREASE` (causal LMs), or fewer passkeys retrieved than dense; each says what to do."""
    out = []
    dense = next((r for r in result.methods if r.kind == "dense"), None)
    for r in result.methods:
        if r.kind != "dga":
            continue
        if r.delta_last_half is not None and r.delta_last_half > WARN_INCREASE:
            out.append(f"{r.label}: last-half perplexity {r.delta_last_half:+.1%} over dense (more than "
                       f"+{WARN_INCREASE:.0%}): DGA's selection misses attention this model needs on this text; {_FIX}")
        if dense is not None and r.exact_match is not None and r.exact_match < dense.exact_match:
            out.append(f"{r.label}: retrieves {r.exact_match:.0%} of the passkeys, dense {dense.exact_match:.0%}: "
                       f"the needle is aggregated away; {_FIX}")
    return out


def _columns(result: EvalResult) -> list[tuple[str, callable]]:
    cols = [("method", lambda r: r.label), ("cost vs dense", lambda r: f"{r.cost:.1%}"),
            ("of it probes + aggregation", _outside), ("keys at last query", lambda r: f"{r.keys_at_last:.0f}")]
    if result.task == "causal-lm":
        cols += [("PPL whole", lambda r: f"{r.ppl:.2f}"), ("PPL last half", lambda r: f"{r.ppl_last_half:.2f}"),
                 ("Δ last half", lambda r: f"{r.delta_last_half:+.1%}")]
    elif result.task == "passkey":
        cols += [("exact match", lambda r: f"{r.exact_match:.0%}"),
                 ("log p(key)", lambda r: f"{r.answer_logprob:.2f}"),
                 ("Δ log p vs dense", lambda r: f"{r.delta_logprob:+.2f}")]
    else:
        cols += [("cosine vs dense", lambda r: f"{r.cosine:.5f}")]
    return cols


def _title(result: EvalResult) -> str:
    items = "passkey trial(s)" if result.task == "passkey" else "window(s)"
    return (f"{Path(result.model).name} on {result.text}: {result.windows} {items} of {result.seq_len} tokens "
            f"({result.task})")


def rich_table(result: EvalResult):
    """A `rich.table.Table` with one row per method."""
    from rich.table import Table

    table = Table(title=_title(result))
    cols = _columns(result)
    for i, (name, _) in enumerate(cols):
        table.add_column(name, justify="left" if i == 0 else "right")
    for r in result.methods:
        table.add_row(*(fmt(r) for _, fmt in cols))
    return table


def markdown_table(result: EvalResult) -> str:
    """One row per method, the columns of `rich_table`."""
    return _markdown(_columns(result), result.methods)


def _markdown(cols, rows) -> str:
    lines = ["| " + " | ".join(n for n, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown_window_table(result: EvalResult) -> str:
    """Perplexity: last-half PPL (Δ vs dense) per window, one row per method."""
    dense = result.methods[0].per_window
    cols = [("method", lambda r: r.label), ("cost vs dense", lambda r: f"{r.cost:.1%}")]
    for w in range(result.windows):
        cols.append((f"window {w + 1}", lambda r, w=w: f"{r.per_window[w]['ppl_last_half']:.2f} "
                     f"({r.per_window[w]['ppl_last_half'] / dense[w]['ppl_last_half'] - 1:+.1%})"))
    cols.append(("pooled", lambda r: f"{r.delta_last_half:+.1%}"))
    return _markdown(cols, result.methods)


def markdown_depth_table(result: EvalResult) -> str:
    """Passkey: exact-match share per needle depth, one row per method."""
    from .passkey import PasskeyTask

    depths = list(PasskeyTask.by_depth(result.methods[0]))
    cols = [("method", lambda r: r.label), ("cost vs dense", lambda r: f"{r.cost:.1%}")]
    cols += [(f"depth {d:.0%}", lambda r, d=d: f"{PasskeyTask.by_depth(r)[d]:.0%}") for d in depths]
    cols.append(("all", lambda r: f"{r.exact_match:.0%}"))
    return _markdown(cols, result.methods)


def site_summary(result: EvalResult) -> str:
    """Markdown lines, one per distinct site plan: where each method kind ran, and why not elsewhere."""
    lines, seen = [], set()
    for r in result.methods:
        if r.kind == "dense" or not r.sites:
            continue
        ran = [s for s in r.sites if s["ran"] == r.kind]
        other = [s for s in r.sites if s["ran"] != r.kind]
        sliding = [s for s in ran if s["sliding_window"]]
        text = f"{_NAMES[r.kind]} ran at {len(ran)} of {len(r.sites)} sites"
        if sliding:
            windows = sorted({s["sliding_window"] for s in sliding})
            text += f" ({len(sliding)} of them sliding-window layers, window {', '.join(map(str, windows))})"
        if other:
            reasons: dict[str, list] = {}
            for s in other:
                reasons.setdefault(f"{s['ran']}: {s['reason']}" if s["reason"] else s["ran"], []).append(s["layer"])
            text += "; " + "; ".join(f"layers {_layers(v)} {k}" for k, v in reasons.items())
        if (r.kind, text) not in seen:
            seen.add((r.kind, text))
            lines.append(f"- {r.label}: {text}" if other else f"- {_NAMES[r.kind]}: {text}")
    return "\n".join(lines)


def _layers(layers: list) -> str:
    return ",".join(str(x) for x in sorted(layers, key=lambda x: (x is None, x)))


def save_json(result: EvalResult, path: Union[str, Path]) -> Path:
    """Writes ``result`` as JSON (atomically: a reader never sees half a file)."""
    return write_text(path, json.dumps(result.to_json(), indent=1))


def write_text(path: Union[str, Path], text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file renamed into place (mode from the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_json(path: Union[str, Path]) -> EvalResult:
    """The `EvalResult` a `save_json` file holds."""
    data = json.loads(Path(path).read_text())
    data["methods"] = [MethodResult(**m) for m in data["methods"]]     # fields added later take their defaults
    return EvalResult(**{f.name: data[f.name] for f in dataclasses.fields(EvalResult) if f.name in data})


def save_plot(result: EvalResult, path: Union[str, Path]) -> Path:
    """PNG: accuracy (Δ PPL last half, passkey exact match, or 1 − cosine) vs attention cost,
    one line per method kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal, passkey = result.task == "causal-lm", result.task == "passkey"

    def accuracy(r: MethodResult) -> float:
        return r.delta_last_half if causal else r.exact_match if passkey else 1 - r.cosine

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("dga", "streaming", "topk", "perhead"):
        pts = sorted(((r.cost, accuracy(r), r) for r in result.methods if r.kind == kind), key=lambda p: p[:2])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_STYLE[kind], label=_NAMES[kind])
        for x, y, r in pts if kind == "dga" else ():
            c = r.params
            ax.annotate(f"γ={c['focus_ratio']:g} m={c['group_size']} w={c['window']} β={c['group_bias']:g} "
                        f"r={c['num_probe']}", (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.axhline(accuracy(result.methods[0]), color="gray", lw=1, ls="--", label="dense")
    ax.set_xlabel("attention cost: every score entry vs dense (probes and aggregation included)")
    ax.set_ylabel("Δ perplexity on the last half vs dense" if causal else
                  "passkey exact match" if passkey else "1 − cosine(pooled embedding, dense)")
    if causal:
        ax.set_yscale("symlog", linthresh=0.05)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(_title(result), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def calibration_table(errors: dict[int, float], dense: tuple[int, ...]):
    """A rich table of `calibrate.layer_errors`, worst first, marking the layers kept dense."""
    from rich.table import Table

    table = Table(title="Per-layer DGA error (attention output, last half of the rows; worst first)")
    for col in ("layer", "relative error", "kept dense"):
        table.add_column(col, justify="right")
    for layer in sorted(errors, key=errors.get, reverse=True):
        table.add_row(str(layer), f"{errors[layer]:.4f}", "yes" if layer in dense else "")
    return table
