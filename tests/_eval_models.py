"""Tiny random HF models and a text for the evaluation's tests (built into a temp dir, no download)."""

import pytest
import torch
import transformers

TEXT = " ".join(f"the {w} of token {i % 13} went to {w}s and back" for i, w in
                enumerate(["hacker", "kludge", "foo", "bar", "daemon", "cruft"] * 20))


def _tokenizer_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=90, special_tokens=["[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def tiny_llama(path):
    """A 2-layer Llama (4 query / 2 kv heads) and a BPE tokenizer of `TEXT`, saved in ``path``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    _tokenizer_dir(path)
    return path


def tiny_bert(path):
    """A 2-layer BERT encoder and a BPE tokenizer of `TEXT`, saved in ``path``."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, initializer_range=0.5)
    transformers.BertModel(cfg).save_pretrained(path)
    _tokenizer_dir(path)
    return path


def tiny_gemma3(path):
    """A 3-layer Gemma 3: two sliding-window layers (window 16), then a global one, as Gemma 3 alternates."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        architectures=["Gemma3ForCausalLM"])
    transformers.Gemma3ForCausalLM(cfg).save_pretrained(path)
    _tokenizer_dir(path)
    return path


def fetched(fetcher):
    """``fetcher()`` (a real model or text from `dga_compile.eval.fetch`), or skip the test if it cannot be had."""
    from dga_compile.errors import FetchError

    try:
        return fetcher()
    except (FetchError, ImportError) as e:
        pytest.skip(f"cannot fetch: {e}")
