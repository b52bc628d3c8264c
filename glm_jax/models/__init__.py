"""GLM models, their heads, and checkpoint conversion."""

from glm_jax.models.convert import CheckpointError, from_pretrained, save_pretrained
from glm_jax.models.glm import GlmConfig, GlmModel, KVCache
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel, GlmValueModel

__all__ = [
    "CheckpointError", "GlmConfig", "GlmForCausalLM", "GlmModel", "GlmRewardModel",
    "GlmValueModel", "KVCache", "from_pretrained", "save_pretrained",
]
