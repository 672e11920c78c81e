"""`evaluate`: accuracy of DGA and of equal-cost baselines against dense attention on real text.

Tasks: ``"perplexity"`` (causal LMs: perplexity over ``windows`` evenly spaced windows of
``seq_len`` tokens, on the whole window and on its last half, where long context matters),
``"passkey"`` (causal LMs: retrieval of a number hidden in the text, `passkey`), and, for
encoders, cosine similarity of mean-pooled last hidden states vs dense. Each DGA config is
followed by StreamingLLM, top-k + recent window and the per-head baseline at the attention
cost the DGA run measured (every score entry counted: `cost`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..config import DGAConfig
from ..models import LoadedModel, load_model
from .cost import CostMeter, recent_for_cost
from .methods import Method, attend_fn, register_method

__all__ = ["MethodResult", "EvalResult", "Evaluation", "evaluate", "token_ids", "token_windows", "window_starts",
           "BASELINES", "TASKS"]

#: The baselines measured after each DGA config, at its cost.
BASELINES = ("streaming", "topk", "perhead")
TASKS = ("perplexity", "passkey")


@dataclasses.dataclass
class MethodResult:
    """One method's accuracy and cost: ``ppl``/``ppl_last_half`` (perplexity), ``cosine``
    (encoder) or ``exact_match``/``answer_logprob`` (passkey)."""

    label: str
    kind: str
    params: dict
    cost: float               # score entries / dense, summed over all queries, heads, layers, every term
    keys_at_last: float       # mean keys scored by the last query (per head and layer)
    ppl: Optional[float] = None
    ppl_last_half: Optional[float] = None
    delta_last_half: Optional[float] = None   # ppl_last_half / dense − 1
    cosine: Optional[float] = None
    exact_match: Optional[float] = None       # passkey: share of trials whose greedy digits are the key
    answer_logprob: Optional[float] = None    # passkey: mean log p(key tokens), nats
    delta_logprob: Optional[float] = None     # passkey: answer_logprob − dense's
    cost_terms: dict = dataclasses.field(default_factory=dict)   # term -> entries / dense (they sum to cost)
    sites: list = dataclasses.field(default_factory=list)        # per attention site: what ran, why, cost
    per_window: list = dataclasses.field(default_factory=list)   # per window (per trial for passkey)


@dataclasses.dataclass
class EvalResult:
    model: str
    text: str
    seq_len: int
    windows: int              # windows (trials for passkey)
    task: str                 # "causal-lm" | "encoder" | "passkey"
    methods: list
    calibration: dict = dataclasses.field(default_factory=dict)  # what calibration measured (windows, heads)

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
    """A loaded model and its task (token windows or passkey trials); `run` measures one method
    against the dense run. ``loaded``: a `dga_compile.models.load_model` result (with its
    tokenizer) to reuse: several lengths, one model. ``between``: measure on the calibration
    windows instead (`calibration_windows`; ``dga-compile calibrate``)."""

    def __init__(self, model_path: Union[str, Path], text: str, seq_len: int = 2048, windows: int = 3,
                 progress: bool = True, text_name: str = "text", task: str = "perplexity", trials: int = 20,
                 seed: int = 0, loaded: Optional[LoadedModel] = None, between: bool = False):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        loaded = loaded or load_model(model_path, seq_len=seq_len, tokenizer=True)   # an HF directory or alias
        self.model, self.tokenizer, kind = loaded.model, loaded.tokenizer, loaded.task
        self.model_path, self.text_name, self.seq_len, self.progress = str(loaded.path), text_name, seq_len, progress
        self.text, self.num_windows = text, windows
        if task == "passkey":
            from .passkey import PasskeyTask, passkey_trials

            if kind != "causal-lm":
                raise ValueError(f"the passkey task needs a causal LM; {model_path} is an {kind}")
            ids = token_ids(self.tokenizer, text)
            avoid = [(s, s + seq_len) for s in window_starts(len(ids), seq_len, windows, between=True)]
            self.task = PasskeyTask(self.tokenizer, passkey_trials(self.tokenizer, ids, seq_len, trials, seed,
                                                                   avoid=avoid))
        else:
            self.task = (_Perplexity if kind == "causal-lm" else _Embedding)(token_windows(self.tokenizer, text,
                                                                                          seq_len, windows, between))
        self._locality: Optional[dict] = None
        self.reference = self._measure(Method("dense"))
        self.profiles = self.reference["profiles"]
        self.results = [self._summarise(Method("dense"), self.reference)]

    @property
    def causal(self) -> bool:
        return self.task.name != "encoder"

    def run(self, method: Method) -> MethodResult:
        res = self._summarise(method, self._measure(method))
        self.results.append(res)
        return res

    def calibration_windows(self) -> list[torch.Tensor]:
        """Windows of the text between the evaluation windows (never scored by the evaluation)."""
        return token_windows(self.tokenizer, self.text, self.seq_len, self.num_windows, between=True)

    def head_locality(self) -> dict:
        """`perhead.head_locality` on the calibration windows (measured once)."""
        from .perhead import head_locality

        if self._locality is None:
            self._locality = head_locality(self.model, self.calibration_windows())
        return self._locality

    def run_with_baselines(self, config: DGAConfig, baselines: Sequence[str] = BASELINES) -> list[MethodResult]:
        """DGA at ``config``, then each of ``baselines`` at the cost DGA measured (every entry
        counted); with ``config.dense_layers`` (or dense sites in ``config.plan``), StreamingLLM and
        top-k twice: with no dense layer, and with the same ones."""
        from .perhead import plan_for_cost

        dga = self.run(Method("dga", config))
        if not self.causal:
            return [dga]
        out = [dga]
        total = sum(p.dense for p in self.profiles.values())
        if config.plan is not None:
            config = config.replace(plan=None, dense_layers=(*config.dense_layers, *config.plan.dense_sites))
        for cfg in [config.replace(dense_layers=()), config] if config.dense_layers else [config]:
            if "streaming" in baselines:
                recent = recent_for_cost(dga.cost, self.profiles, dense_layers=cfg.dense_layers)
                out.append(self.run(Method("streaming", cfg, recent=recent)))
            if "topk" in baselines:
                fixed = sum(p.dense for layer, p in self.profiles.items() if layer in cfg.dense_layers)
                out.append(self.run(Method("topk", cfg, cost_target=(dga.cost * total - fixed) / max(total - fixed, 1.0))))
        if "perhead" in baselines:
            heads, recent = plan_for_cost(self.head_locality(), self.profiles, dga.cost)
            out.append(self.run(Method("perhead", config.replace(dense_layers=()), recent=recent, dense_heads=heads)))
        return out

    def run_configs(self, configs: Sequence[DGAConfig], baselines: Sequence[str] = BASELINES) -> None:
        """Each DGA config in turn, with its equal-cost ``baselines`` (causal LMs)."""
        for cfg in configs:
            self.run_with_baselines(cfg, baselines)

    def result(self) -> EvalResult:
        calibration = {"head_locality": [[*h, v] for h, v in self._locality.items()]} if self._locality else {}
        return EvalResult(self.model_path, self.text_name, self.seq_len, len(self.task.items),
                          "passkey" if self.task.name == "passkey" else self.task.name, list(self.results), calibration)

    def _measure(self, method: Method) -> dict:
        dense = attend_fn(Method("dense"), "dense_layers")
        self.model.set_attn_implementation(register_method(f"dga-eval-{method.kind}", attend_fn(method), dense,
                                                           method.config.dense_layers))
        outs = []
        try:
            with CostMeter() as meter:
                for item in _progress(self.task.items, method.label, self.progress):
                    with torch.no_grad():
                        outs.append(self.task.measure(self.model, item))
        finally:
            self.model.set_attn_implementation("sdpa")
        return {"outs": outs, "meter": meter, "profiles": meter.profiles()}

    def _summarise(self, method: Method, got: dict) -> MethodResult:
        meter = got["meter"]
        params = {"recent": method.recent, "sinks": method.sinks} if method.kind in ("streaming", "topk", "perhead") else {}
        if meter.recents:                            # top-k solved its window per call
            method = dataclasses.replace(method, recent=round(sum(meter.recents) / len(meter.recents)))
            params.update(recent=method.recent, cost_target=method.cost_target)
        if method.kind in ("dga", "topk"):
            params.update(dataclasses.asdict(method.config))
            params["plan"] = method.config.plan.to_json() if method.config.plan else None
        if method.kind == "perhead":
            params["dense_heads"] = sorted(method.dense_heads)
        res = MethodResult(method.label, method.kind, params, meter.fraction, meter.keys_at_last,
                           cost_terms=meter.breakdown, sites=meter.site_report())
        self.task.summarise(res, got["outs"], self.reference["outs"] if method.kind != "dense" else got["outs"])
        return res


def evaluate(model_path: Union[str, Path], text: str, seq_len: int = 2048, windows: int = 3,
             configs: Sequence[DGAConfig] = (DGAConfig(min_seq_len=0),), baselines: Sequence[str] = BASELINES,
             progress: bool = True, text_name: str = "text", task: str = "perplexity", trials: int = 20,
             seed: int = 0) -> EvalResult:
    """Runs dense, each DGA config and (causal LMs) each of ``baselines`` at each DGA config's
    measured cost; returns an `EvalResult`."""
    ev = Evaluation(model_path, text, seq_len, windows, progress, text_name, task, trials, seed)
    ev.run_configs(configs, baselines)
    return ev.result()


def _progress(items, label: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=f"{label:<45}", transient=True)


class _Perplexity:
    """Next-token NLL over each window; Δ on the last half."""

    name = "causal-lm"

    def __init__(self, windows):
        self.items = windows

    @staticmethod
    def measure(model, ids) -> torch.Tensor:
        """[N − 1] next-token negative log-likelihoods."""
        logits = model(input_ids=ids).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")

    @staticmethod
    def summarise(res: MethodResult, outs, ref) -> None:
        nll, ref_nll = torch.stack(outs), torch.stack(ref)       # [W, N − 1]
        half = nll.shape[1] // 2
        res.ppl, res.ppl_last_half = math.exp(nll.mean()), math.exp(nll[:, half:].mean())
        res.delta_last_half = res.ppl_last_half / math.exp(ref_nll[:, half:].mean()) - 1
        res.per_window = [{"ppl": math.exp(w.mean()), "ppl_last_half": math.exp(w[half:].mean())} for w in nll]


class _Embedding:
    """Cosine of the mean-pooled last hidden state vs dense (encoders)."""

    name = "encoder"

    def __init__(self, windows):
        self.items = windows

    @staticmethod
    def measure(model, ids) -> torch.Tensor:
        return model(input_ids=ids).last_hidden_state[0].mean(0)

    @staticmethod
    def summarise(res: MethodResult, outs, ref) -> None:
        cos = [float(torch.cosine_similarity(a, b, dim=0)) for a, b in zip(outs, ref)]
        res.cosine, res.per_window = sum(cos) / len(cos), cos
