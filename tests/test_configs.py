"""Config files, mesh presets, and the errors a misspelled or mistyped field gets."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_config
from ml_collections import ConfigDict

from glm_jax.config import MESH_PRESETS, default_config, mesh_preset, validate_config
from glm_jax.models.tiny import tiny_config
from glm_jax.train.common import mesh_from_config, model_from_config
from glm_jax.train.reward import train_reward_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_validates(name):
    assert {"tiny.py", "small.py", "chatglm3_6b.py", "glm4_9b.py"} <= set(CONFIG_FILES)
    validate_config(load_config(name))


@pytest.mark.parametrize("preset,chips", [("gpu1", 1), ("gpu8", 8), ("tpu_v4_32", 16),
                                          ("tpu_v5e_256", 256)])
def test_mesh_presets(preset, chips):
    for name in ("chatglm3_6b.py", "glm4_9b.py"):
        mesh = load_config(f"{name}:{preset}").mesh
        assert math.prod(mesh.values()) == chips and dict(mesh) == MESH_PRESETS[preset]
    with pytest.raises(ValueError, match="unknown mesh preset 'tpu_v9'.*gpu8"):
        mesh_preset("tpu_v9")


def test_large_configs_follow_the_paper():
    for name, template in (("chatglm3_6b.py", "chatglm3"), ("glm4_9b.py", "glm4")):
        config = load_config(name)
        assert config.data.template == template
        assert config.model.init_checkpoint  # never a silent random model
        assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
        assert config.ppo.learning_rate == config.ppo.critic_learning_rate == 1e-6
        assert not config.ppo.whiten_rewards and not config.ppo.whiten_advantages


def test_small_config_builds_its_model_on_the_cpu_mesh():
    config = load_config("small.py")
    mesh = mesh_from_config(config)
    assert mesh.shape["fsdp"] == 8
    model = model_from_config(config, "lm", mesh)
    assert model.config == tiny_config(**config.model.tiny)
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 4


def test_unknown_field_names_the_closest_ones():
    config = default_config()
    config.ppo.kl_coeff = 0.05
    with pytest.raises(ValueError, match=r"config\.ppo\.kl_coeff is not a field of "
                                         r"config\.ppo; did you mean kl_coef"):
        validate_config(config)
    config = default_config()
    config.rmm = ConfigDict(dict(num_steps=3))
    with pytest.raises(ValueError, match=r"config\.rmm .*did you mean rm\b"):
        validate_config(config)
    config = default_config()
    config.model.tiny.hiden_size = 32
    with pytest.raises(ValueError, match=r"config\.model\.tiny\.hiden_size is not a model "
                                         r"config field; did you mean hidden_size"):
        validate_config(config)


@pytest.mark.parametrize("section,field,value,expected", [
    ("rm", "num_steps", 2.5, "int"), ("ppo", "fused", "yes", "bool"),
    ("dpo", "beta", "0.1", r"int or float"), ("data", "template", 4, "str"),
    ("sft", "batch_size", True, "int")])
def test_wrong_type_names_field_and_type(section, field, value, expected):
    config = default_config().to_dict()
    config[section][field] = value  # a config file written from scratch, not via overrides
    with pytest.raises(TypeError, match=rf"config\.{section}\.{field} = .* expected {expected}"):
        validate_config(ConfigDict(config))


def test_union_field_takes_a_number_or_empty():
    config = default_config()
    config.rsft.min_reward = ""
    validate_config(config)
    other = default_config().to_dict()
    other["rsft"]["min_reward"] = 0.5
    validate_config(ConfigDict(other))


def test_section_replaced_by_a_value():
    config = default_config().to_dict()
    config["ppo"] = 3
    with pytest.raises(TypeError, match=r"config\.ppo must be a section"):
        validate_config(ConfigDict(config))


def test_training_refuses_a_misspelled_field_before_writing(tmp_path):
    config = default_config()
    config.rm.lerning_rate = 1e-3
    with pytest.raises(ValueError, match="did you mean learning_rate"):
        train_reward_model(config, tmp_path / "rm")
    assert not (tmp_path / "rm").exists()


def test_script_misspelled_override_is_one_line(tmp_path):
    for override, expected in [
            ("--config.rm.num_stepz=3",
             "config.rm.num_stepz is not a field of config.rm; did you mean num_steps"),
            ("--config.rmm.num_steps=3", "config.rmm is not a field of config; did you mean rm")]:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_rm.py"), "--workdir",
             str(tmp_path / "rm"), "--config", str(ROOT / "configs" / "tiny.py"), override],
            capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode != 0
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "rm").exists()
