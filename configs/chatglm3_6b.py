"""ChatGLM3-6B, the paper's model family, on one 8-GPU host (the default mesh preset).

Download THUDM/chatglm3-6b to checkpoints/chatglm3-6b (or set model.init_checkpoint), then
run each stage from its SFT or RM workdir, e.g.

    python scripts/train_ppo.py --config configs/chatglm3_6b.py --workdir runs/ppo \
        --config.model.init_checkpoint=runs/sft/hf --config.ppo.reward_model=runs/rm \
        --config.ppo.prompt_file=prompts.jsonl

`--config configs/chatglm3_6b.py:tpu_v4_32` (or gpu1, tpu_v5e_256) picks another mesh.
The hyperparameters are the paper's (glm_jax.config.paper_recipe).
"""

from ml_collections import ConfigDict

from glm_jax.config import default_config, mesh_preset, paper_recipe


def get_config(mesh: str = "gpu8") -> ConfigDict:
    config = paper_recipe(default_config())
    config.mesh = mesh_preset(mesh)
    config.model.init_checkpoint = "checkpoints/chatglm3-6b"
    # The chat template of the checkpoint's tokenizer_config.json; "chatglm3" is glm_jax's own.
    config.data.template = "checkpoint"
    return config
