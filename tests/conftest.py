"""Test setup: 8 forced CPU devices (set before jax is imported) and tiny reference checkpoints."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (the same tiny model and shapes) inside fresh jitted
# closures; a compilation cache shared by the session (and by the subprocesses the tests
# start, through the environment) compiles each program once.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "glm_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, pad_token_id=0, eos_token_id=[1])


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec: str):
    """A config file of configs/ as the scripts load it (`--config configs/x.py[:preset]`)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["prog", "--config", os.path.join(CONFIGS, spec)])
    return values.config


def make_hf_model(model_type: str = "glm", seed: int = 0, **overrides):
    """A tiny random transformers GlmForCausalLM / Glm4ForCausalLM, in eval mode.

    Weights are drawn with a larger std than transformers' init so that logits differ
    clearly between tokens and greedy decoding is not decided by float noise.
    """
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    config_cls, model_cls = ((GlmConfig, GlmForCausalLM) if model_type == "glm"
                             else (Glm4Config, Glm4ForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.25)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (model_type, **config overrides) -> (torch model, checkpoint dir), cached."""
    made = {}

    def make(model_type: str = "glm", **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in made:
            model = make_hf_model(model_type, **overrides)
            path = tmp_path_factory.mktemp(f"hf_{model_type}")
            model.save_pretrained(path)
            made[key] = (model, path)
        return made[key]

    return make


def hf_logits(model, input_ids, attention_mask=None):
    import torch

    with torch.no_grad():
        ids = torch.tensor(np.asarray(input_ids))
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(ids, attention_mask=mask).logits.numpy()
