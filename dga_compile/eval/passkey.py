"""Passkey retrieval: a random 5–7 digit number hidden in real text, asked for at the end.

Each trial's prompt is ``seq_len`` tokens: a stretch of the text (the haystack) with the needle
sentence inserted at a depth (10 % … 90 % of the haystack, cycled over the trials, at the start
of a line near it) and the question at the end. Trials are seeded and reproducible. A trial is
scored twice, both after one prefill of the prompt without its last token (where DGA and the
baselines run; the KV cache then holds the exact keys and values of that forward):

- **exact match**: ``model.generate()`` continues greedily from that cache; the first run of
  digits it writes must be the key (decode steps have Nq ≠ Nk: dense for every method);
- **log-likelihood** of the key's tokens, teacher-forced from the same cache (dense, as decode).

Perplexity can hide a method that forgets a single far token; retrieval shows it.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
from typing import Sequence

import torch
from torch import Tensor

from .cost import CostMeter

__all__ = ["Trial", "PasskeyTask", "passkey_trials", "run_trial", "DEPTHS", "NEEDLE", "QUESTION"]

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
_SNAP = 64          # tokens searched after the depth for a line start


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt: ``ids`` [1, seq_len] (prefix tokens, haystack with the needle, question);
    ``key`` the digits asked for, ``answer_ids`` [A] the tokens of " " + key; the needle starts
    at token ``position``, at ``depth`` of the haystack; ``start`` is the haystack's offset in the text."""

    ids: Tensor
    key: str
    answer_ids: Tensor
    depth: float
    position: int
    start: int


def passkey_trials(tokenizer, ids: Tensor, seq_len: int, count: int, seed: int = 0,
                   depths: Sequence[float] = DEPTHS, avoid: Sequence[tuple[int, int]] = ()) -> list[Trial]:
    """``count`` trials of ``seq_len`` tokens cut from the text tokens ``ids`` [T] (haystacks
    never overlap the token ranges [a, b) in ``avoid``, e.g. calibration windows)."""
    if count < 1:
        raise ValueError(f"the passkey task needs at least one trial, got trials={count}")
    rng = random.Random(seed)
    prefix = tokenizer("", add_special_tokens=True).input_ids          # BOS where the model expects one
    question = _encode(tokenizer, "\n" + QUESTION)
    out = []
    for t in range(count):
        digits = rng.randint(5, 7)
        key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        needle = _encode(tokenizer, NEEDLE.format(key=key) + "\n")
        hay_len = seq_len - len(prefix) - len(needle) - len(question)
        if hay_len < 16:
            raise ValueError(f"seq_len={seq_len} leaves {hay_len} tokens of text around the passkey; use --seq-len ≥ "
                             f"{seq_len - hay_len + 16}")
        start = _haystack_start(rng, len(ids), hay_len, avoid)
        hay = ids[start:start + hay_len].tolist()
        depth = depths[t % len(depths)]
        pos = _line_start(tokenizer, hay, round(depth * hay_len))
        prompt = prefix + hay[:pos] + needle + hay[pos:] + question
        out.append(Trial(torch.tensor([prompt]), key, torch.tensor(_encode(tokenizer, " " + key)), depth,
                         len(prefix) + pos, start))
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _haystack_start(rng: random.Random, num_tokens: int, length: int, avoid) -> int:
    free = [s for s in range(0, num_tokens - length + 1, 64) if all(s + length <= a or s >= b for a, b in avoid)]
    if not free:
        raise ValueError(f"the text has {num_tokens} tokens: no {length}-token haystack avoids the calibration windows "
                         f"{list(avoid)}; use a longer text or a smaller --seq-len")
    return rng.choice(free)


def _line_start(tokenizer, hay: list[int], pos: int) -> int:
    """The first position in pos..pos + 64 that follows a newline (pos itself if none)."""
    for p in range(max(pos, 1), min(pos + _SNAP, len(hay))):
        if "\n" in tokenizer.decode(hay[p - 1:p]):
            return p
    return pos


def run_trial(model, tokenizer, trial: Trial) -> dict:
    """{"generated", "correct", "logprob"} for one trial (see the module docstring); metered
    (`CostMeter`) only for the prefill."""
    ids = trial.ids
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        with CostMeter.paused():
            forced = torch.cat([ids[:, -1:], trial.answer_ids[None]], 1)
            logits = model(input_ids=forced, cache=copy.deepcopy(prefill.cache), use_cache=True).logits[0, :-1].float()
            logprob = float(logits.log_softmax(-1).gather(1, trial.answer_ids[:, None]).sum())
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), cache=prefill.cache,
                                 max_new_tokens=len(trial.answer_ids) + 3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    digits = re.search(r"\d+", text)
    return {"generated": text, "correct": bool(digits and digits.group() == trial.key), "logprob": logprob}


class PasskeyTask:
    """The evaluation task over ``trials`` (`run.Evaluation` with ``task="passkey"``)."""

    name = "passkey"

    def __init__(self, tokenizer, trials: list[Trial]):
        self.tokenizer, self.items = tokenizer, trials

    def measure(self, model, trial: Trial) -> dict:
        return run_trial(model, self.tokenizer, trial)

    def summarise(self, res, outs: list[dict], ref: list[dict]) -> None:
        """Fills ``res`` (a `run.MethodResult`): exact-match share, mean log p(key), per trial."""
        res.exact_match = sum(o["correct"] for o in outs) / len(outs)
        res.answer_logprob = sum(o["logprob"] for o in outs) / len(outs)
        res.delta_logprob = res.answer_logprob - sum(o["logprob"] for o in ref) / len(ref)
        res.per_window = [{"depth": t.depth, "key": t.key, "position": t.position, "start": t.start, **o}
                          for t, o in zip(self.items, outs)]

    @staticmethod
    def by_depth(res) -> dict[float, float]:
        """{depth: exact-match share} of a passkey `run.MethodResult`."""
        hits: dict[float, list[bool]] = {}
        for t in res.per_window:
            hits.setdefault(t["depth"], []).append(t["correct"])
        return {d: sum(h) / len(h) for d, h in sorted(hits.items())}

