"""glm_jax: JAX-native RLHF (reward model, PPO, DPO) for GLM-family models on a device mesh."""

from glm_jax.generation import GenerationOutput, generate
from glm_jax.models import (
    CheckpointError,
    GlmConfig,
    GlmForCausalLM,
    GlmRewardModel,
    GlmValueModel,
    KVCache,
    from_pretrained,
    save_pretrained,
)
from glm_jax.sharding import MeshConfig, make_mesh

__all__ = [
    "CheckpointError", "GenerationOutput", "GlmConfig", "GlmForCausalLM", "GlmRewardModel",
    "GlmValueModel", "KVCache", "MeshConfig", "from_pretrained", "generate", "make_mesh",
    "save_pretrained",
]
