"""Random-weight models of real shapes, for speed work that needs no real weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Qwen2-1.5B's published shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960,
# vocab 151936, tied embeddings): the course report's model size.
QWEN2_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def save_random_model(out: Path, config: Any, tokenizer: Any) -> Path:
    """Save a model of ``config`` with random bf16 weights (seed 0) beside ``tokenizer``.

    The weights are drawn on the GPU when there is one, which is far quicker than the CPU for a
    model of 1.5B parameters (the GPU suite builds one inside its time budget).
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer.save_pretrained(out)
    return out


def build_random_qwen2_1_5b(out: Path, tokenizer_source: str) -> Path:
    """Save a random Qwen2-1.5B-shaped model with the given tokenizer (ids fit its vocab)."""
    if (out / "config.json").is_file():  # built already: no need to import transformers
        return out
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = Qwen2Config(
        **QWEN2_1_5B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    return save_random_model(out, config, tokenizer)
