"""Tiny random models built locally, for fast engine tests and benchmarks; nothing is ever fetched.

Each builder writes a complete transformers directory (config, safetensors weights, a real tokenizer borrowed
from a built-in model) into ``dest`` and returns it. Weights come from a fixed seed, so outputs repeat.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

SEED = 1234


def build_tiny_causal_lm(dest: Path, tokenizer_dir: Path, *, context_window: int = 256) -> Path:
    """A 2-layer Llama (~1.6 M parameters, mostly the 49k-token embedding) with SmolLM2's tokenizer and chat
    template. ``tokenizer_dir`` is the prepared ``smollm2-135m-instruct`` directory."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_window,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform next-token distributions, where greedy picks flip on float
    # noise between batch compositions. At 0.3 (tied embeddings) greedy clearly prefers repeating the last
    # token, while sampling at temperature 1 still spreads over many tokens, so seeds visibly matter.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.3)
    return _save(model, tokenizer, dest)


def build_tiny_encoder(dest: Path, tokenizer_dir: Path, *, context_window: int = 128) -> Path:
    """A 2-layer BERT encoder with MiniLM's tokenizer; ``tokenizer_dir`` is the prepared ``all-minilm-l6-v2``."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(SEED)
    return _save(BertModel(_bert_config(tokenizer, context_window)), tokenizer, dest)


def build_tiny_classifier(
    dest: Path, tokenizer_dir: Path, *, labels: tuple[str, ...] = ("negative", "neutral", "positive")
) -> Path:
    """A 2-layer BERT sequence classifier over ``labels`` with MiniLM's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = _bert_config(tokenizer, 128)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(SEED)
    return _save(BertForSequenceClassification(config), tokenizer, dest)


def _bert_config(tokenizer: object, context_window: int) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=context_window,
        pad_token_id=0,
    )


def _save(model: torch.nn.Module, tokenizer: object, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)  # type: ignore[operator]
    tokenizer.save_pretrained(dest)  # type: ignore[attr-defined]
    return dest
