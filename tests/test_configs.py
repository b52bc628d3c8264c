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
    for name in ("chatglm3_6b.py", "glm4_9b.py"):
        config = load_config(name)
        assert config.data.template == "checkpoint"  # the chat template the checkpoint ships
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


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("path,value,message", [
    ("ppo.minibatch_size", 0, "config.ppo.minibatch_size = 0: must be >= 1"),
    ("ppo.ppo_epochs", 0, "config.ppo.ppo_epochs = 0: must be >= 1"),
    ("sft.batch_size", 0, "config.sft.batch_size = 0: must be >= 1"),
    ("rsft.batch_size", 0, "config.rsft.batch_size = 0: must be >= 1"),
    ("rm.num_steps", 0, "config.rm.num_steps = 0: must be >= 1"),
    ("ppo.num_steps", -3, "config.ppo.num_steps = -3: must be >= 1"),
    ("sft.keep_checkpoints", 0, "config.sft.keep_checkpoints = 0: must be >= 1: 0 would keep "
                                "no checkpoint, so a restart would begin again at step 1"),
    ("rm.log_every", 0, "config.rm.log_every = 0: must be >= 1"),
    ("dpo.eval_every", -1, "config.dpo.eval_every = -1: must be >= 0 (0: at the end only)"),
    ("ppo.checkpoint_every", -5, "config.ppo.checkpoint_every = -5: must be >= 0"),
    ("rsft.num_samples", 0, "config.rsft.num_samples = 0: must be >= 1"),
    ("ppo.filter_samples", 1, "config.ppo.filter_samples = 1: must be 0 (no prompt filter) "
                              "or >= 2"),
    ("data.max_prompt_tokens", 0, "config.data.max_prompt_tokens = 0: must be >= 1"),
    ("data.max_response_tokens", 0, "config.data.max_response_tokens = 0: must be >= 1"),
    ("model.vocab_chunk", 0, "config.model.vocab_chunk = 0: must be >= 1"),
    ("ppo.sft_batch_size", 0, "config.ppo.sft_batch_size = 0: must be >= 1"),
    ("pipeline.eval_samples", 0, "config.pipeline.eval_samples = 0: must be >= 1"),
    ("pipeline.annotate_samples", 1, "config.pipeline.annotate_samples = 1: must be >= 2"),
    ("pipeline.num_rl_prompts", 0, "config.pipeline.num_rl_prompts = 0: must be >= 1"),
    ("pipeline.bucket_edges", "4,2", "config.pipeline.bucket_edges = '4,2': must be "
                                     "comma-separated integers >= 0 in increasing order"),
    ("sft.learning_rate", NAN, "config.sft.learning_rate = nan: must be finite and >= 0"),
    ("rm.learning_rate", INF, "config.rm.learning_rate = inf: must be finite and >= 0"),
    ("ppo.critic_learning_rate", -1e-4, "config.ppo.critic_learning_rate = -0.0001: must be "
                                        "finite and >= 0"),
    ("ppo.temperature", 0.0, "config.ppo.temperature = 0.0: must be finite and > 0"),
    ("dpo.top_p", 0.0, "config.dpo.top_p = 0.0: must be in (0, 1]"),
    ("rsft.top_p", 1.5, "config.rsft.top_p = 1.5: must be in (0, 1]"),
    ("ppo.top_k", -1, "config.ppo.top_k = -1: must be >= 0"),
    ("ppo.gamma", 1.5, "config.ppo.gamma = 1.5: must be in [0, 1]"),
    ("ppo.lam", NAN, "config.ppo.lam = nan: must be in [0, 1]"),
    ("ppo.clip_low", 1.0, "config.ppo.clip_low = 1.0: must be in (0, 1)"),
    ("ppo.clip_high", 0.0, "config.ppo.clip_high = 0.0: must be finite and > 0"),
    ("ppo.clip_value", -0.2, "config.ppo.clip_value = -0.2: must be finite and > 0"),
    ("dpo.beta", 0.0, "config.dpo.beta = 0.0: must be finite and > 0"),
    ("ppo.kl_coef", -0.1, "config.ppo.kl_coef = -0.1: must be finite and >= 0"),
    ("sft.weight_decay", -0.01, "config.sft.weight_decay = -0.01: must be finite and >= 0"),
    ("rm.max_grad_norm", NAN, "config.rm.max_grad_norm = nan: must be finite and >= 0 "
                              "(0 turns gradient clipping off)"),
    ("ppo.kl_horizon", 0, "config.ppo.kl_horizon = 0: must be finite and > 0"),
    ("mesh.fsdp", 0, "config.mesh.fsdp = 0: must be >= 1, or -1"),
    ("mesh.data", -2, "config.mesh.data = -2: must be >= 1, or -1"),
    ("data.truncation", "cut", "config.data.truncation = 'cut'; valid values: truncate, drop"),
    ("data.on_error", "ignore", "config.data.on_error = 'ignore'; valid values: raise, skip"),
    ("data.special_tokens", "keep", "config.data.special_tokens = 'keep'; valid values: "
                                    "plain, refuse"),
    ("data.template", "llama", "config.data.template = 'llama'; valid values: auto, "
                               "checkpoint, glm4, chatglm3"),
    ("model.remat", "some", "config.model.remat = 'some'; valid values: none, full, "
                            "save_dots"),
    ("model.attention", "flash", "config.model.attention = 'flash'; valid values: auto, "
                                 "dense, blockwise, xla, cudnn"),
    ("model.dtype", "fp16", "config.model.dtype = 'fp16'; valid values: float32, bfloat16, "
                            "float16"),
    ("model.frozen_dtype", "int8", "config.model.frozen_dtype = 'int8'; valid values: '' "
                                   "(unset), float32"),
    ("model.moment_dtype", "fp8", "config.model.moment_dtype = 'fp8'; valid values"),
    ("ppo.kl_kind", "k4", "config.ppo.kl_kind = 'k4'; valid values: k1, k2, k3"),
    ("sft.best_mode", "maximum", "config.sft.best_mode = 'maximum'; valid values: max, min"),
    ("dpo.mode", "ppo", "config.dpo.mode = 'ppo'; valid values: offline, reward_pairs, online"),
    ("ppo.critic_init", "random", "config.ppo.critic_init = 'random'; valid values: reward, "
                                  "policy"),
    ("on_damaged_checkpoint", "skip", "config.on_damaged_checkpoint = 'skip'; valid values: "
                                      "refuse, previous"),
])
def test_bad_size_or_choice_names_field_value_and_range(path, value, message):
    config = default_config()
    *sections, field = path.split(".")
    section = config
    for name in sections:
        section = section[name]
    section[field] = value
    with pytest.raises(ValueError) as error:
        validate_config(config)
    assert str(error.value).startswith(message), str(error.value)


def test_dpo_num_samples_needs_two_only_when_sampling():
    config = default_config()
    config.dpo.num_samples = 1
    validate_config(config)  # offline mode samples nothing
    config.dpo.mode = "online"
    with pytest.raises(ValueError, match=r"config\.dpo\.num_samples = 1: must be >= 2 in modes "
                                         r"reward_pairs and online: a pair needs two"):
        validate_config(config)


def test_the_edges_of_every_range_are_valid():
    config = default_config()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.sft.update(eval_every=0, checkpoint_every=0, keep_checkpoints=1, log_every=1,
                      max_grad_norm=0.0, learning_rate=0.0, weight_decay=0.0)
    config.ppo.update(filter_samples=2, top_p=1.0, top_k=0, gamma=1.0, lam=0.0, kl_coef=0.0,
                      temperature=1e-3)
    config.model.frozen_dtype = "bfloat16"
    config.pipeline.bucket_edges = "0,3"
    validate_config(config)
    config.ppo.filter_samples = 0
    validate_config(config)


def test_every_rule_names_a_schema_field():
    from glm_jax.config import _RULES, _choices

    schema = default_config()

    def leaves(section, prefix=""):  # every field's path, sections nested at any depth
        for key, value in section.items():
            if isinstance(value, ConfigDict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    paths = set(leaves(schema))
    for key in [*_RULES, *_choices()]:
        section, _, field = key.rpartition(".")
        if section == "*":
            assert any(p.endswith(f".{field}") for p in paths), key
        elif field == "*":
            assert isinstance(schema[section], ConfigDict), key
        else:
            assert key in paths, key
