"""GLM-4-9B-Chat on one 8-GPU host (the default mesh preset), with the paper's recipe
(glm_jax.config.paper_recipe) and the GLM-4 chat template.

Download THUDM/glm-4-9b-chat-hf (transformers' `glm` format) to checkpoints/glm-4-9b-chat (or
set model.init_checkpoint). `--config configs/glm4_9b.py:tpu_v5e_256` (or gpu1, tpu_v4_32)
picks another mesh.
"""

from ml_collections import ConfigDict

from glm_jax.config import default_config, mesh_preset, paper_recipe


def get_config(mesh: str = "gpu8") -> ConfigDict:
    config = paper_recipe(default_config())
    config.mesh = mesh_preset(mesh)
    config.model.init_checkpoint = "checkpoints/glm-4-9b-chat"
    config.data.template = "glm4"
    config.data.max_prompt_tokens = 2048
    return config
