"""Presenting an `EvalResult`: a rich table, a JSON file, a PNG plot, a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from .run import EvalResult, MethodResult

__all__ = ["rich_table", "markdown_table", "save_json", "load_json", "save_plot"]

_STYLE = {"dense": "o", "dga": "s", "streaming": "^", "topk": "v"}
_NAMES = {"dense": "dense", "dga": "DGA", "streaming": "StreamingLLM (sinks + recent)", "topk": "top-k + recent"}


def _columns(result: EvalResult) -> list[tuple[str, callable]]:
    cols = [("method", lambda r: r.label), ("cost vs dense", lambda r: f"{r.cost:.1%}"),
            ("keys at last query", lambda r: f"{r.keys_at_last:.0f}")]
    if result.task == "causal-lm":
        cols += [("PPL whole", lambda r: f"{r.ppl:.2f}"), ("PPL last half", lambda r: f"{r.ppl_last_half:.2f}"),
                 ("Δ last half", lambda r: f"{r.delta_last_half:+.1%}")]
    else:
        cols += [("cosine vs dense", lambda r: f"{r.cosine:.5f}")]
    return cols


def _title(result: EvalResult) -> str:
    return (f"{Path(result.model).name} on {result.text}: {result.windows} window(s) of {result.seq_len} tokens "
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
    cols = _columns(result)
    lines = ["| " + " | ".join(n for n, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in result.methods]
    return "\n".join(lines)


def save_json(result: EvalResult, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.to_json(), indent=1))
    return path


def load_json(path: Union[str, Path]) -> EvalResult:
    """The `EvalResult` a `save_json` file holds."""
    data = json.loads(Path(path).read_text())
    data["methods"] = [MethodResult(**m) for m in data["methods"]]
    return EvalResult(**data)


def save_plot(result: EvalResult, path: Union[str, Path]) -> Path:
    """PNG: accuracy (Δ PPL last half, or 1 − cosine) vs attention cost, one line per method kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causal = result.task == "causal-lm"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in ("dga", "streaming", "topk"):
        pts = sorted(((r.cost, r.delta_last_half if causal else 1 - r.cosine, r) for r in result.methods
                      if r.kind == kind), key=lambda p: p[:2])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_STYLE[kind], label=_NAMES[kind],
                    ls="none" if kind == "dga" else "-")     # DGA points are different settings: no line
        for x, y, r in pts if kind == "dga" else ():
            c = r.params
            ax.annotate(f"γ={c['focus_ratio']:g} m={c['group_size']} w={c['window']} β={c['group_bias']:g} "
                        f"r={c['num_probe']}", (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.0, color="gray", lw=1, ls="--", label="dense")
    ax.set_xlabel("attention cost: score entries vs dense (summed over all queries)")
    ax.set_ylabel("Δ perplexity on the last half vs dense" if causal else "1 − cosine(pooled embedding, dense)")
    if causal:
        ax.set_yscale("symlog", linthresh=0.05)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(_title(result), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
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
