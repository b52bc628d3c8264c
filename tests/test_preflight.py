"""The pre-flight: every program compiled abstractly before weights load, refused when it
cannot fit; the precision and remat knobs it names really lower the figure."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.config import default_config
from glm_jax.models import GlmConfig, GlmForCausalLM
from glm_jax.sharding import MeshConfig, make_mesh, shard_state
from glm_jax.train import preflight as preflight_module
from glm_jax.train.preflight import compile_program
from glm_jax.train.state import copy_params, init_opt_state, make_optimizer


def small_config(**model):
    config = default_config()
    config.model.tiny.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    config.model.update(model)
    config.data.max_prompt_tokens = config.data.max_response_tokens = 64
    return config


def test_a_program_that_cannot_fit_is_refused_before_any_weights_load(tmp_path, monkeypatch):
    from glm_jax.train.reward import train_reward_model

    # A checkpoint directory with a config but no weights: loading would fail on them, so a
    # MemoryError proves the check ran first.
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(dict(
        model_type="glm", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)))
    (tmp_path / "train.jsonl").write_text(json.dumps(dict(prompt="a", chosen="b",
                                                          rejected="c")) + "\n")
    config = small_config(init_checkpoint=str(checkpoint))
    config.data.tokenizer = ""
    config.rm.train_file = str(tmp_path / "train.jsonl")
    monkeypatch.setattr(preflight_module, "device_memory_limit", lambda device: 1024**2)
    monkeypatch.setattr("glm_jax.train.common.Tokenizer.from_dir",
                        lambda path: __import__("glm_jax").data.Tokenizer.tiny())
    with pytest.raises(MemoryError, match=r"reward model: the compiled program needs "
                                          r"[0-9.]+ GiB per device .*each device has 0\.001 "
                                          r"GiB; nothing was loaded\. Try config\.model\.remat"):
        train_reward_model(config, tmp_path / "rm")
    assert not (tmp_path / "rm" / "checkpoints").exists()


@pytest.mark.parametrize("program", ["sft", "rm", "dpo", "ppo"])
def test_full_remat_lowers_the_temporaries(program):
    mesh = make_mesh(MeshConfig(1, 8, 1))
    kept = compile_program(small_config(remat="none"), program, mesh).cost
    remat = compile_program(small_config(remat="full"), program, mesh).cost
    assert remat.temp_bytes < kept.temp_bytes
    assert remat.argument_bytes == kept.argument_bytes


def test_bfloat16_weights_and_moments_halve_the_arguments():
    mesh = make_mesh(MeshConfig(1, 8, 1))
    f32 = compile_program(small_config(), "ppo", mesh).cost
    frozen = compile_program(small_config(frozen_dtype="bfloat16"), "ppo", mesh).cost
    moments = compile_program(small_config(moment_dtype="bfloat16"), "rm", mesh).cost
    rm_f32 = compile_program(small_config(), "rm", mesh).cost
    # PPO holds 8 model-sized arrays (policy and critic with 2 moments each, reference,
    # reward model); the two frozen ones shrink to half: 7/8.
    assert 0.85 < frozen.argument_bytes / f32.argument_bytes < 0.9
    # Weights + 2 moments at 4 bytes -> weights at 4 + moments at 2: about 2/3.
    assert moments.argument_bytes < 0.75 * rm_f32.argument_bytes


def test_bfloat16_moments_and_frozen_copies_keep_their_placement():
    mesh = make_mesh(MeshConfig(1, 4, 2))
    config = GlmConfig(vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16)
    with jax.set_mesh(mesh):
        graphdef, params = nnx.split(GlmForCausalLM(config, rngs=nnx.Rngs(0)))
        params = shard_state(params, mesh)
        tx, _ = make_optimizer(learning_rate=1e-2, num_steps=10, moment_dtype="bfloat16")
        reference, _ = make_optimizer(learning_rate=1e-2, num_steps=10)
        opt_state = init_opt_state(tx, params)
        frozen = copy_params(params, "bfloat16")
    for leaf in jax.tree.leaves(opt_state):
        assert leaf.dtype in (jnp.bfloat16, jnp.int32)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(params), strict=True):
        assert a.dtype == jnp.bfloat16 and a.sharding == b.sharding
    # One update with bfloat16 moments is the float32 one up to the moments' rounding.
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
    updates, _ = tx.update(grads, opt_state, params)
    expected, _ = reference.update(grads, reference.init(params), params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2)


def test_the_rl_programs_hold_only_the_models_their_algorithm_uses():
    mesh = make_mesh(MeshConfig(1, 8, 1))

    def arguments(**ppo):
        config = small_config()
        config.ppo.update({"batch_size": 4, "minibatch_size": 8, "num_generations": 4, **ppo})
        return compile_program(config, "ppo", mesh).cost.argument_bytes

    ppo = arguments(algorithm="ppo", num_generations=2)
    grpo = arguments(algorithm="grpo")
    grpo_rule = arguments(algorithm="grpo", reward_rule="world_gold")
    grpo_no_kl = arguments(algorithm="grpo", reward_rule="world_gold", kl_coef=0.0)
    # Model-sized arrays: PPO 8 (policy and critic with 2 moments each, reference, reward
    # model); GRPO 5 (no critic); a rule drops the reward model (4); kl_coef 0 the reference
    # (3). The critic and reward model lack the LM head, so the ratios are approximate.
    assert grpo < 0.75 * ppo
    assert grpo_rule < grpo and grpo_no_kl < grpo_rule
    assert 0.55 < grpo_no_kl / grpo < 0.7
