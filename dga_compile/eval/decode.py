"""``dga-compile eval MODEL --task decode``: generation from a DGA cache vs dense and equal-size eviction.

Per window of real text (``--seq-len`` prompt tokens, then ``--continuation`` more):

1. **One dense prefill** of the prompt. Its attention also compresses each layer's keys and
   values into a `dga_compile.cache.DGALayer` (the DGA cache, from the same q, k, v) and scores
   the prompt for SnapKV.
2. **Teacher forcing**: the continuation is fed one token per step, every method in its own batch
   row: *dense* (every token), *DGA* (its DGA layers: what ``generate(cache=DGACache(...))``
   reads), *SnapKV* (kvpress's SnapKVPress scoring: the last 64 prompt queries' attention,
   pooled over 5 tokens and averaged over each kv head's query heads; the best prompt tokens +
   a sliding window of the last w tokens, DGA's own window: with 64, as kvpress keeps, SnapKV
   measured far worse) and *StreamingLLM* (4 sinks + a sliding window). The two
   baselines keep, per layer and kv head, as many tokens as the DGA cache's mean size in bytes
   (its λ and empty slots included). Perplexity of the continuation, Δ vs dense.
3. **Greedy agreement**: from the same prefill each row generates ``--greedy`` tokens from its
   own predictions; agreement with dense position by position, and the first divergence.
4. **Passkey retrieval through ``generate()``** (``--passkey-depths``): a key hidden at each
   depth of a ``--seq-len``-token prompt of the text, asked for at the end, one batch (left
   padded); dense (DynamicCache) vs the DGA cache (``DGACache``, dense prefill).

All four share the model's weights; every row decodes one token per step. `evaluate_decode` is
the Python entry point; `add_arguments` / `run_cli` plug it into ``dga-compile eval``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import DGAConfig
from .report import write_text

__all__ = ["DecodeMethod", "DecodeResult", "evaluate_decode", "add_arguments", "run_cli", "passkey_prompts",
           "snapkv_scores", "NEEDLE", "QUESTION"]

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
SNAP_WINDOW, SNAP_KERNEL, SINKS = 64, 5, 4
METHODS = ("dense", "dga", "snapkv", "streaming")


@dataclasses.dataclass
class DecodeMethod:
    """One method's result, pooled over the windows. Bytes are means over the teacher-forced steps."""

    label: str
    kind: str
    cache_bytes: float
    cache_fraction: float            # cache_bytes / dense's
    ppl: float
    delta: float                     # ppl / dense − 1
    agreement: float                 # greedy tokens equal to dense's, position by position
    first_divergence: float          # mean index of the first greedy token that differs (G if none)
    per_window: list = dataclasses.field(default_factory=list)
    passkey: Optional[float] = None  # fraction retrieved (dense and DGA)


@dataclasses.dataclass
class DecodeResult:
    model: str
    text: str
    seq_len: int
    continuation: int
    greedy: int
    windows: int
    config: dict
    methods: list
    passkey: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def snapkv_scores(q: Tensor, k: Tensor, window: int = SNAP_WINDOW, kernel: int = SNAP_KERNEL) -> Tensor:
    """kvpress SnapKVPress's token scores [B, Hkv, N − window]: the last ``window`` queries' causal
    attention over the earlier keys, averaged over the queries, pooled over ``kernel`` tokens and
    averaged over the query heads of each kv head. q [B, Hq, N, D], k [B, Hkv, N, D]."""
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    w = min(window, N - 1)
    logits = q[:, :, -w:].reshape(B, Hkv, -1, D) @ k.transpose(-1, -2) / math.sqrt(D)     # [B, Hkv, rep·w, N]
    pos = torch.arange(N, device=q.device)
    future = pos[None, :] > pos[N - w:, None]                                              # [w, N]
    att = logits.masked_fill(future.repeat(Hq // Hkv, 1), float("-inf")).softmax(-1)[..., :N - w]
    att = att.reshape(B, Hkv, Hq // Hkv, w, N - w).mean(3)
    pooled = F.avg_pool1d(att.reshape(-1, 1, N - w), kernel, stride=1, padding=kernel // 2).reshape(att.shape)
    return pooled.mean(2)


class _BufferLayer:
    """Dense keys/values of one layer in preallocated buffers (no per-step copy of the cache)."""

    def __init__(self, capacity: int):
        self.capacity, self.n, self.k = capacity, 0, None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape[:3] + v.shape[3:])
        n = k.shape[2]
        self.k[:, :, self.n:self.n + n], self.v[:, :, self.n:self.n + n] = k, v
        self.n += n
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


def _buffer_cache(num_layers: int, capacity: int):
    """A transformers `Cache` whose layers are `_BufferLayer`s (wrapped as DynamicLayers)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class Layer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self.buf = _BufferLayer(capacity)

        def update(self, key_states, value_states, *args, **kwargs):
            self.is_initialized = True
            self.keys, self.values = self.buf.update(key_states, value_states)
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.buf.k, self.buf.v = (t.repeat_interleave(repeats, 0) for t in (self.buf.k, self.buf.v))
            self.truncate(self.buf.n)

        def truncate(self, n: int) -> None:
            self.buf.n = n
            self.keys, self.values = self.buf.k[:, :, :n], self.buf.v[:, :, :n]

    return Cache(layers=[Layer() for _ in range(num_layers)])


class _Rows:
    """The batched decode of one window: the attention function every row's layers call."""

    def __init__(self, config: DGAConfig, n_prompt: int):
        self.config, self.n_prompt = config, n_prompt
        self.prefill = True
        self.dga: dict = {}                        # layer index -> its DGALayer
        self.scores: dict[int, Tensor] = {}
        self.keep: dict[int, Tensor] = {}          # SnapKV's prompt tokens per layer [Hkv, N]
        self.budget = 0                            # baseline tokens per (layer, kv head)

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                  **kwargs):
        L, scale = module.layer_idx, scaling or query.shape[-1] ** -0.5
        if self.prefill:
            from ..cache import DGALayer

            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
            layer = self.dga[L] = DGALayer(self.config, L)
            layer.update(key, value)
            layer.attend(query, None, scale, dense=lambda: out)
            self.scores[L] = snapkv_scores(query, key)
            return out.transpose(1, 2).contiguous(), None
        R, Hq, _, D = query.shape
        Hkv, T = key.shape[1], key.shape[2]
        keep = self._keep(L, T, key.device)                                                # [R, Hkv, T]
        logits = scale * query[:, :, 0].reshape(R, Hkv, -1, D) @ key.transpose(-1, -2)     # [R, Hkv, rep, T]
        p = logits.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1)
        out = (p @ value).reshape(R, Hq, 1, -1)
        r = METHODS.index("dga")
        layer = self.dga[L]
        layer.update(key[r:r + 1, :, -1:], value[r:r + 1, :, -1:])
        out[r] = layer.attend(query[r:r + 1], None, scale, dense=None)[0]
        return out.transpose(1, 2).contiguous(), None

    def _keep(self, L: int, T: int, device) -> Tensor:
        """Which keys rows dense, (dga: unused), snapkv, streaming attend to at query position T − 1."""
        pos = torch.arange(T, device=device)
        recent = pos > T - 1 - self.config.window
        snap = torch.zeros(self.keep[L].shape[0], T, dtype=torch.bool, device=device)
        snap[:, :self.n_prompt] = self.keep[L]
        stream = (pos < SINKS) | (pos > T - 1 - (self.budget - SINKS))
        full = torch.ones_like(snap)
        return torch.stack([full, full, snap | recent, stream.expand_as(snap)])

    def set_budget(self, n_cont: int) -> None:
        """Baseline budget = the DGA cache's mean bytes over the teacher-forced steps, in tokens."""
        layer = next(iter(self.dga.values()))
        k = layer.recent.keys
        token = (k.shape[-1] + layer.recent.values.shape[-1]) * k.element_size()
        slot = token + layer.recent.lam.element_size()
        slots = [sum(lay.slots_at(n) for lay in self.dga.values()) / len(self.dga)
                 for n in range(self.n_prompt + 1, self.n_prompt + n_cont)]
        self.budget = round(sum(slots) / len(slots) * slot / token)
        for L, s in self.scores.items():
            cand = s[0, :, :max(self.n_prompt - self.config.window, 0)]             # outside the first window
            top = cand.topk(min(max(self.budget - self.config.window, 0), cand.shape[-1]), dim=-1).indices
            self.keep[L] = torch.zeros(s.shape[1], self.n_prompt, dtype=torch.bool, device=s.device).scatter_(
                -1, top, True)


def _window(model, rows: _Rows, ids: Tensor, n_prompt: int, n_cont: int, n_greedy: int) -> dict:
    """Teacher forcing and greedy agreement on one window ``ids`` [1, n_prompt + n_cont]."""
    layers = model.config.num_hidden_layers
    cache = _buffer_cache(layers, n_prompt + max(n_cont, n_greedy) + 1)
    prompt, cont = ids[:, :n_prompt], ids[0, n_prompt:]
    rows.prefill = True
    with torch.no_grad():
        logits = model(input_ids=prompt, cache=cache, use_cache=True).logits[:, -1].float()
    rows.prefill = False
    rows.set_budget(n_cont)
    snapshot = copy.deepcopy(rows.dga)
    R = len(METHODS)
    cache.batch_repeat_interleave(R)
    nll, dga_bytes = [F.cross_entropy(logits, cont[:1]).repeat(R)], []
    with torch.no_grad():
        for t in range(n_cont - 1):
            out = model(input_ids=cont[t:t + 1].expand(R, 1), cache=cache, use_cache=True).logits[:, -1].float()
            nll.append(F.cross_entropy(out, cont[t + 1:t + 2].expand(R), reduction="none"))
            dga_bytes.append(sum(layer.nbytes() for layer in rows.dga.values()))
        rows.dga = snapshot
        for layer in cache.layers:
            layer.truncate(n_prompt)
        tokens, nxt = [], logits.argmax(-1).expand(R)
        for _ in range(n_greedy):
            tokens.append(nxt)
            nxt = model(input_ids=nxt[:, None], cache=cache, use_cache=True).logits[:, -1].argmax(-1)
    nll = torch.stack(nll, 1)                                                          # [R, n_cont]
    greedy = torch.stack(tokens, 1) if tokens else torch.zeros(R, 0, dtype=torch.long)
    first = next(iter(rows.dga.values()))
    token = first.recent.keys.shape[1] * (first.recent.keys.shape[-1] + first.recent.values.shape[-1]) \
        * first.recent.keys.element_size() * layers
    dense_bytes = token * (n_prompt + 1 + (n_cont - 2) / 2)
    sizes = [dense_bytes, sum(dga_bytes) / max(len(dga_bytes), 1), token * rows.budget, token * rows.budget]
    return {"nll": nll, "greedy": greedy, "bytes": sizes}


def _summaries(wins: list[dict], config: DGAConfig) -> list[DecodeMethod]:
    out = []
    labels = {"dense": "dense cache", "dga": f"DGA cache {config.budget()}",
              "snapkv": f"SnapKV (top + {config.window} recent), same bytes",
              "streaming": f"StreamingLLM ({SINKS} sinks + recent), same bytes"}
    dense_ppl = math.exp(torch.cat([w["nll"][0] for w in wins]).mean())
    for r, kind in enumerate(METHODS):
        ppl = math.exp(torch.cat([w["nll"][r] for w in wins]).mean())
        bytes_ = sum(w["bytes"][r] for w in wins) / len(wins)
        same = [(w["greedy"][r] == w["greedy"][0]).float() for w in wins]
        first = [float((s == 0).nonzero()[0, 0]) if (s == 0).any() else float(len(s)) for s in same]
        out.append(DecodeMethod(
            labels[kind], kind, bytes_, bytes_ / (sum(w["bytes"][0] for w in wins) / len(wins)), ppl,
            ppl / dense_ppl - 1, float(torch.cat(same).mean()) if same and same[0].numel() else float("nan"),
            sum(first) / len(first),
            [{"ppl": math.exp(w["nll"][r].mean()), "cache_bytes": w["bytes"][r]} for w in wins]))
    return out


def passkey_prompts(tokenizer, ids: Tensor, seq_len: int, depths: Sequence[float], seed: int = 0) -> list[tuple]:
    """One (prompt ids [≤ seq_len], key) per depth: a stretch of the text tokens ``ids`` [T] with
    `NEEDLE` inserted at that depth and `QUESTION` at the end (5-digit keys, seeded)."""
    rng = random.Random(seed)
    out = []
    question = tokenizer("\n" + QUESTION, add_special_tokens=False).input_ids
    for d in depths:
        key = str(rng.randrange(10000, 100000))
        needle = tokenizer("\n" + NEEDLE.format(key=key) + "\n", add_special_tokens=False).input_ids
        hay_len = seq_len - len(needle) - len(question)
        if hay_len < 16:
            raise ValueError(f"--seq-len {seq_len} leaves no room for the passkey text; use ≥ {seq_len - hay_len + 16}")
        start = rng.randrange(0, len(ids) - hay_len)
        hay = ids[start:start + hay_len].tolist()
        at = round(d * hay_len)
        out.append((torch.tensor(hay[:at] + needle + hay[at:] + question), key))
    return out


def _passkey(model, tokenizer, config: DGAConfig, prompts: list[tuple]) -> list[dict]:
    """Each prompt through ``model.generate()``, as one left-padded batch: dense, then the DGA cache."""
    from ..cache import DGACache
    from ..integrations.transformers import register_attention, sdpa

    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    width = max(len(p) for p, _ in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (p, _) in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    results = []
    for kind in ("dense", "dga"):
        if kind == "dense":
            model.set_attn_implementation("sdpa")
            extra = {}
        else:
            model.set_attn_implementation(register_attention("dga-eval-decode-passkey", sdpa))
            extra = {"cache": DGACache(config, model.config)}
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad,
                                 **extra)
        for b, (_, key) in enumerate(prompts):
            text = tokenizer.decode(gen[b, width:], skip_special_tokens=True)
            digits = re.search(r"\d+", text)
            results.append({"method": kind, "key": key, "generated": text,
                            "correct": bool(digits and digits.group() == key)})
    model.set_attn_implementation("sdpa")
    return results


def evaluate_decode(model_path: Union[str, Path], text: str, seq_len: int = 4096, continuation: int = 512,
                    greedy: int = 64, windows: int = 1, config: Optional[DGAConfig] = None,
                    passkey_depths: Sequence[float] = (0.25, 0.5, 0.75), progress: bool = True,
                    text_name: str = "text") -> DecodeResult:
    """The decode task (module docstring) on ``windows`` evenly spaced windows of ``text``."""
    from ..integrations.transformers import register_forward
    from ..models import load_model
    from .run import token_ids, window_starts

    cfg = config or DGAConfig()
    if continuation < 2 or greedy < 0:
        raise ValueError(f"continuation must be ≥ 2 and greedy ≥ 0 tokens, got {continuation} and {greedy}")
    loaded = load_model(model_path, tokenizer=True)
    if loaded.task != "causal-lm":
        raise ValueError(f"the decode task needs a causal LM; {model_path} is an {loaded.task}")
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = token_ids(tokenizer, text)
    span = seq_len + max(continuation, greedy)
    wins = []
    for w, start in enumerate(window_starts(len(ids), span, windows)):
        rows = _Rows(cfg, seq_len)
        model.set_attn_implementation(register_forward("dga-eval-decode", rows.attention))
        try:
            wins.append(_window(model, rows, ids[start:start + span][None], seq_len, continuation, greedy))
        finally:
            model.set_attn_implementation("sdpa")
        if progress:
            print(f"decode eval: window {w + 1} done", flush=True)
    methods = _summaries(wins, cfg)
    passkey = _passkey(model, tokenizer, cfg, passkey_prompts(tokenizer, ids, seq_len, passkey_depths)) \
        if passkey_depths else []
    for m in methods:
        found = [p["correct"] for p in passkey if p["method"] == m.kind]
        m.passkey = sum(found) / len(found) if found else None
    return DecodeResult(str(loaded.path), text_name, seq_len, continuation, greedy, len(wins),
                        dataclasses.asdict(cfg), methods, passkey)


def rich_table(result: DecodeResult):
    from rich.table import Table

    table = Table(title=f"{Path(result.model).name} on {result.text}: decode after {result.seq_len}-token prompts "
                        f"({result.windows} window(s), {result.continuation} teacher-forced, {result.greedy} greedy)")
    cols = ("method", "cache vs dense", "PPL continuation", "Δ vs dense", "greedy agreement", "first divergence",
            "passkey")
    for i, c in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for m in result.methods:
        table.add_row(m.label, f"{m.cache_fraction:.1%}", f"{m.ppl:.3f}", f"{m.delta:+.2%}", f"{m.agreement:.1%}",
                      f"{m.first_divergence:.0f}", "—" if m.passkey is None else f"{m.passkey:.0%}")
    return table


def save_json(result: DecodeResult, path: Union[str, Path]) -> Path:
    """Writes ``result`` as JSON, atomically (`report.write_text`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(result.to_json(), indent=1))


def add_arguments(p) -> None:
    """The decode task's flags on the ``eval`` parser."""
    g = p.add_argument_group("--task decode")
    g.add_argument("--continuation", type=int, default=512, help="teacher-forced tokens after each prompt (512)")
    g.add_argument("--greedy", type=int, default=64, help="greedy tokens compared with dense (64)")
    g.add_argument("--passkey-depths", default="0.25,0.5,0.75",
                   help="depths of the passkey prompts run through generate() ('' to skip)")


def run_cli(args, seq_len: int, config: DGAConfig, text: str, text_name: str, stem: str) -> None:
    """``dga-compile eval MODEL --task decode`` at one prompt length: table and STEM.json."""
    from rich.console import Console

    depths = [float(d) for d in args.passkey_depths.split(",") if d.strip()]
    result = evaluate_decode(args.model, text, seq_len, args.continuation, args.greedy, args.windows, config,
                             depths, not args.quiet, text_name)
    out = Console()
    out.print(rich_table(result))
    out.print(f"JSON: {save_json(result, stem + '.json')}")
