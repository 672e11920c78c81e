"""Tiny Llama-like and BERT-like models whose attention calls DGA (ONNX and CLI tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dga_compile
from dga_compile import DGAConfig

#: DGA really applies at the test lengths (N ≥ 16) and differs from dense attention.
CONFIG = DGAConfig(focus_ratio=0.25, group_size=4, num_probe=8, window=8, min_seq_len=16)
VOCAB, DIM = 61, 32


class _Block(nn.Module):
    def __init__(self, hq: int, hkv: int, causal: bool, config: DGAConfig):
        super().__init__()
        self.hq, self.hkv, self.d, self.causal, self.config = hq, hkv, DIM // hq, causal, config
        self.q = nn.Linear(DIM, hq * self.d)
        self.kv = nn.Linear(DIM, 2 * hkv * self.d)
        self.o = nn.Linear(hq * self.d, DIM)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, mask=None):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.hq, self.d).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4)
        a = dga_compile.dynamic_group_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                                enable_gqa=self.hq != self.hkv, config=self.config)
        x = x + self.o(a.transpose(1, 2).reshape(B, N, -1))
        return x + self.mlp(x)


class TinyLlama(nn.Module):
    """Causal decoder, GQA (4 query heads, 2 kv heads), input_ids -> logits."""

    def __init__(self, config: DGAConfig = CONFIG, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(_Block(4, 2, True, config) for _ in range(layers))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TinyBert(nn.Module):
    """Bidirectional encoder with a padding mask (additive, HF style): (input_ids, attention_mask) -> hidden."""

    def __init__(self, config: DGAConfig = CONFIG, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(512, DIM) * 0.1)
        self.blocks = nn.ModuleList(_Block(2, 2, False, config) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids) + self.pos[: input_ids.shape[1]]
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for b in self.blocks:
            x = b(x, mask)
        return x


def llama_inputs(batch: int, n: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (batch, n), generator=g),)


def bert_inputs(batch: int, n: int, seed: int = 0) -> tuple:
    ids = llama_inputs(batch, n, seed)[0]
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, : n // 5] = 0  # left padding in the first sequence
    return ids, mask


def dense(model: nn.Module) -> nn.Module:
    """The same model with exact attention (γ = 1)."""
    for b in model.blocks:
        b.config = b.config.replace(focus_ratio=1.0)
    return model
