"""The model files the CLI tests read: a .pt2 archive with example inputs, a pickled module, and a
Hugging Face Llama directory (no tokenizer)."""

from __future__ import annotations

import pathlib

import torch

from _onnx_models import TinyBert, TinyLlama, llama_inputs

#: The archive's sequence dim: ``Dim("n", min=2, max=MAX_N)``.
MAX_N = 4096
#: ``max_position_embeddings`` of the Hugging Face Llama.
HF_MAX_POSITIONS = 128


def build(d: pathlib.Path) -> pathlib.Path:
    """Writes ``llama.pt2``, ``bert.pt`` and ``hf-llama/`` into ``d``; returns ``d``."""
    import transformers

    torch.manual_seed(0)
    program = torch.export.export(TinyLlama(layers=1).eval(), llama_inputs(2, 24),
                                  dynamic_shapes=({1: torch.export.Dim("n", min=2, max=MAX_N)},))
    torch.export.save(program, d / "llama.pt2")
    torch.save(TinyBert(layers=1).eval(), d / "bert.pt")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=HF_MAX_POSITIONS)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf-llama")
    return d
