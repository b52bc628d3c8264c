"""A small model that still trains on a CPU in minutes: hidden 256, 4 layers, 8 heads.

    python scripts/train_sft.py --config configs/small.py --workdir runs/small_sft \
        --config.sft.train_file=sft.jsonl

A random model over the bundled tokenizer (no checkpoint needed); set
`model.init_checkpoint` to start from one. `--config configs/small.py:gpu1` picks a mesh preset.
"""

from ml_collections import ConfigDict

from glm_jax.config import default_config, mesh_preset


def get_config(mesh: str = "cpu") -> ConfigDict:
    config = default_config()
    config.mesh = mesh_preset(mesh)
    config.model.tiny = ConfigDict(dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32))
    config.data.max_prompt_tokens = 64
    config.data.max_response_tokens = 96
    for stage in (config.sft, config.rm, config.dpo):
        stage.num_steps = 500
        stage.batch_size = 32
        stage.eval_every = 100
        stage.checkpoint_every = 100
        stage.learning_rate = 3e-4
    config.dpo.learning_rate = 1e-5
    config.ppo.update(dict(num_steps=100, batch_size=32, minibatch_size=16,
                           learning_rate=1e-5, critic_learning_rate=3e-5))
    return config
