"""`evaluate`: accuracy of DGA and of equal-cost baselines against dense attention on real text.

Causal LMs: perplexity over ``windows`` evenly spaced windows of ``seq_len`` tokens, on the
whole window and on its last half (where long context matters). Encoders: cosine similarity of
mean-pooled last hidden states vs dense. Each DGA config is followed by StreamingLLM and
top-k + recent window at the attention cost the DGA run measured.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..config import DGAConfig
from ..integrations.transformers import register_attention
from ..models import load_model
from .methods import CostMeter, Method, attend_fn, recent_for_cost

__all__ = ["MethodResult", "EvalResult", "Evaluation", "evaluate", "token_ids", "token_windows", "window_starts"]


@dataclasses.dataclass
class MethodResult:
    """One method's accuracy and cost. ``ppl``/``ppl_last_half`` (causal) or ``cosine`` (encoder)."""

    label: str
    kind: str
    params: dict
    cost: float               # score entries / dense, summed over all queries, heads, layers
    keys_at_last: float       # mean keys scored by the last query (per head and layer)
    ppl: Optional[float] = None
    ppl_last_half: Optional[float] = None
    delta_last_half: Optional[float] = None   # ppl_last_half / dense − 1
    cosine: Optional[float] = None
    per_window: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EvalResult:
    model: str
    text: str
    seq_len: int
    windows: int
    task: str                 # "causal-lm" | "encoder"
    methods: list

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def token_windows(tokenizer, text: str, seq_len: int, windows: int, between: bool = False) -> list[torch.Tensor]:
    """``windows`` evenly spaced, non-overlapping [1, seq_len] token windows of ``text``; with
    ``between``, the windows halfway between those instead (one in the middle of the text when
    there is a single one): text the evaluation never scores, for calibration."""
    ids = token_ids(tokenizer, text)
    return [ids[s:s + seq_len][None] for s in window_starts(len(ids), seq_len, windows, between)]


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """[T] the token ids of ``text`` as the evaluation cuts its windows from (no special tokens)."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def window_starts(num_tokens: int, seq_len: int, windows: int, between: bool = False) -> list[int]:
    """Start offsets of the windows `token_windows` cuts from a text of ``num_tokens`` tokens."""
    if num_tokens < seq_len:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than seq_len={seq_len}; use a longer text or a "
                         "smaller --seq-len")
    n, span = min(windows, num_tokens // seq_len), num_tokens - seq_len
    starts = torch.linspace(0, span, n) if n > 1 else torch.zeros(1)
    if between:
        edges = starts if n > 1 else torch.tensor([0.0, float(span)])
        starts = (edges[:-1] + edges[1:]) / 2
    return starts.long().tolist()


class Evaluation:
    """A loaded model and its token windows; `run` measures one method against the dense run."""

    def __init__(self, model_path: Union[str, Path], text: str, seq_len: int = 2048, windows: int = 3,
                 progress: bool = True, text_name: str = "text"):
        loaded = load_model(model_path, seq_len=seq_len, tokenizer=True)  # an HF directory or alias
        self.model, self.tokenizer, self.task = loaded.model, loaded.tokenizer, loaded.task
        self.model_path, self.text_name, self.seq_len, self.progress = str(loaded.path), text_name, seq_len, progress
        self.windows = token_windows(self.tokenizer, text, seq_len, windows)
        self._run = _causal_nll if self.task == "causal-lm" else _pooled
        self.reference = self._measure(Method("dense"))
        self.results = [_summarise(Method("dense"), self.reference, self.reference, self.task)]

    def run(self, method: Method) -> MethodResult:
        res = _summarise(method, self._measure(method), self.reference, self.task)
        self.results.append(res)
        return res

    def run_with_baselines(self, config: DGAConfig) -> list[MethodResult]:
        """DGA at ``config``, then StreamingLLM and top-k + window at the cost DGA measured; with
        ``config.dense_layers``, each baseline twice: with no dense layer, and with the same ones."""
        dga = self.run(Method("dga", config))
        if self.task != "causal-lm":
            return [dga]
        out = [dga]
        configs = [config.replace(dense_layers=()), config] if config.dense_layers else [config]
        layers = getattr(self.model.config, "num_hidden_layers", 1)
        for base in (Method(kind, cfg) for cfg in configs for kind in ("streaming", "topk")):
            recent = recent_for_cost(base, dga.cost, self.seq_len, layers)
            out.append(self.run(dataclasses.replace(base, recent=recent)))
        return out

    def run_configs(self, configs: Sequence[DGAConfig], baselines: bool = True) -> None:
        """Each DGA config in turn, with its equal-cost baselines when ``baselines`` (causal LMs)."""
        for cfg in configs:
            self.run_with_baselines(cfg) if baselines else self.run(Method("dga", cfg))

    def result(self) -> EvalResult:
        return EvalResult(self.model_path, self.text_name, self.seq_len, len(self.windows), self.task,
                          list(self.results))

    def _measure(self, method: Method) -> dict:
        return _measure(self.model, method, self.windows, self._run, self.progress)


def evaluate(model_path: Union[str, Path], text: str, seq_len: int = 2048, windows: int = 3,
             configs: Sequence[DGAConfig] = (DGAConfig(min_seq_len=0),), baselines: bool = True,
             progress: bool = True, text_name: str = "text") -> EvalResult:
    """Runs dense, each DGA config and (``baselines``, causal LMs) StreamingLLM and top-k + window
    at each DGA config's measured cost; returns an `EvalResult`."""
    ev = Evaluation(model_path, text, seq_len, windows, progress, text_name)
    ev.run_configs(configs, baselines)
    return ev.result()


def _measure(model, method: Method, wins, run, progress: bool) -> dict:
    model.set_attn_implementation(register_attention(f"dga-eval-{method.kind}", attend_fn(method),
                                                     attend_fn(Method("dense")), method.config.dense_layers))
    outs = []
    try:
        with CostMeter() as meter:
            for ids in _progress(wins, method.label, progress):
                with torch.no_grad():
                    outs.append(run(model, ids))
    finally:
        model.set_attn_implementation("sdpa")
    return {"outs": outs, "cost": meter.fraction, "keys_at_last": meter.keys_at_last}


def _progress(items, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=f"{label:<45}", transient=True)


def _causal_nll(model, ids) -> torch.Tensor:
    """[N − 1] next-token negative log-likelihoods."""
    logits = model(input_ids=ids).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


def _pooled(model, ids) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state[0].mean(0)


def _summarise(method: Method, got: dict, ref: dict, task: str) -> MethodResult:
    params = {"recent": method.recent, "sinks": method.sinks} if method.kind in ("streaming", "topk") else {}
    if method.kind in ("dga", "topk"):
        params.update(dataclasses.asdict(method.config))
    res = MethodResult(method.label, method.kind, params, got["cost"], got["keys_at_last"])
    if task == "encoder":
        cos = [float(torch.cosine_similarity(a, b, dim=0)) for a, b in zip(got["outs"], ref["outs"])]
        res.cosine, res.per_window = sum(cos) / len(cos), cos
        return res
    nll, ref_nll = torch.stack(got["outs"]), torch.stack(ref["outs"])       # [W, N − 1]
    half = nll.shape[1] // 2
    res.ppl, res.ppl_last_half = math.exp(nll.mean()), math.exp(nll[:, half:].mean())
    res.delta_last_half = res.ppl_last_half / math.exp(ref_nll[:, half:].mean()) - 1
    res.per_window = [{"ppl": math.exp(w.mean()), "ppl_last_half": math.exp(w[half:].mean())} for w in nll]
    return res
