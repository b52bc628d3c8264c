"""The embedded tiny default: a 2-layer GLM-4-shaped model on CPU, every stage's settings.

Its fields, defaults and the comments on them are in glm_jax/config.py (`default_config`),
the schema every config is checked against. Use with any script: `--config configs/tiny.py`,
overriding fields on the command line, e.g. `--config.rm.num_steps=50 --config.mesh.fsdp=8`;
`--config configs/tiny.py:gpu1` picks a mesh preset (glm_jax.config.MESH_PRESETS).
"""

from ml_collections import ConfigDict

from glm_jax.config import default_config, mesh_preset


def get_config(mesh: str = "") -> ConfigDict:
    config = default_config()
    if mesh:
        config.mesh = mesh_preset(mesh)
    return config
