"""GLM-4-9B-Chat on one 8-GPU host (the default mesh preset), with the paper's recipe
(glm_jax.config.paper_recipe) and the checkpoint's own chat template.

Download THUDM/glm-4-9b-chat-hf (transformers' `glm` format, tokenizer.json) or
THUDM/glm-4-9b-chat (the original: tiktoken tokenizer.model) to checkpoints/glm-4-9b-chat (or
set model.init_checkpoint); the README's "Bring your own checkpoint and data" has the
commands. `--config configs/glm4_9b.py:tpu_v5e_256` (or gpu1, tpu_v4_32) picks another mesh.
"""

from ml_collections import ConfigDict

from glm_jax.config import default_config, mesh_preset, paper_recipe


def get_config(mesh: str = "gpu8") -> ConfigDict:
    config = paper_recipe(default_config())
    config.mesh = mesh_preset(mesh)
    config.model.init_checkpoint = "checkpoints/glm-4-9b-chat"
    # The chat template of the checkpoint's tokenizer_config.json; "glm4" is glm_jax's own.
    config.data.template = "checkpoint"
    config.data.max_prompt_tokens = 2048
    return config
