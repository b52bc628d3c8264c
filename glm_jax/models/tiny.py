"""The embedded tiny default: a small random GLM-4 model with the bundled tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from flax import nnx

from glm_jax.data.tokenizer import TINY_TOKENIZER_PATH, Tokenizer
from glm_jax.models.convert import save_pretrained
from glm_jax.models.glm import GlmConfig
from glm_jax.models.heads import GlmForCausalLM


def tiny_config(**overrides) -> GlmConfig:
    """A 2-layer GLM-4 shaped config over the bundled tokenizer's ids (vocab padded to 512)."""
    tokenizer = Tokenizer.tiny()
    fields = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  use_post_norms=True, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tuple(tokenizer.eos_token_ids), max_position_embeddings=2048)
    return GlmConfig(**{**fields, **overrides})


def write_tiny_checkpoint(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Writes a random tiny model and the bundled tokenizer as a Hugging Face directory."""
    model = GlmForCausalLM(tiny_config(**overrides), rngs=nnx.Rngs(seed))
    path = save_pretrained(model, path)
    shutil.copyfile(TINY_TOKENIZER_PATH, path / "tokenizer.json")
    return path
