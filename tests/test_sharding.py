"""Meshes: the same logits and gradients on every mesh shape, memory split, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import glm_jax
from glm_jax.models import GlmConfig, GlmForCausalLM, GlmValueModel
from glm_jax.sharding import (
    MeshConfig,
    bytes_per_device,
    check_model_fits_mesh,
    logical_to_spec,
    make_mesh,
    shard_state,
)

# Heads, kv heads, intermediate and vocab divisible by tensor=4; hidden by fsdp=8.
SHARDABLE = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8, intermediate_size=128)


def loss_and_grads(model, ids, mask):
    def loss(m):
        logp = jax.nn.log_softmax(m(ids, mask)[:, :-1])
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        value, grads = nnx.value_and_grad(loss)(m)
        return value, m(ids, mask), nnx.state(grads)

    return run(state)


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    _, path = hf_checkpoint("glm4", **SHARDABLE)
    ids = jnp.asarray(np.random.RandomState(0).randint(2, 128, (8, 12)))
    mask = jnp.ones(ids.shape, bool).at[:3, :4].set(False)  # some left padding
    value, logits, grads = loss_and_grads(glm_jax.from_pretrained(path), ids, mask)
    return path, ids, mask, value, logits, grads


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_logits_and_gradients_equal_on_every_mesh(reference, shape):
    path, ids, mask, value, logits, grads = reference
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = make_mesh(MeshConfig(*shape), devices)
    model = glm_jax.from_pretrained(path, mesh=mesh)
    with jax.set_mesh(mesh):
        v, lg, g = loss_and_grads(model, ids, mask)
    np.testing.assert_allclose(v, value, rtol=1e-5)
    np.testing.assert_allclose(lg, logits, atol=1e-4)
    for (key, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(grads), strict=True):
        np.testing.assert_allclose(a[...], b[...], atol=1e-5, rtol=1e-4, err_msg=str(key))
    # The parameters really are laid out by the rules table.
    q = model.model.layers.self_attn.q_kernel[...]
    assert q.sharding.spec == logical_to_spec(("layers", "heads", "head_dim", "embed"))
    assert len(q.sharding.device_set) == len(devices)


def test_fsdp_splits_parameter_bytes(reference):
    path = reference[0]
    model = glm_jax.from_pretrained(path, mesh=make_mesh(MeshConfig(1, 8, 1)))
    variables = [v for _, v in nnx.to_flat_state(nnx.state(model))]
    per_device = bytes_per_device([v[...] for v in variables])
    assert len(per_device) == 8
    total = sum(v[...].nbytes for v in variables)
    # Every parameter with an "embed" axis is split eight ways; norm scales and q/k/v biases
    # (6% of this tiny model, a rounding error of a real one) are replicated.
    expected = sum(v[...].nbytes // 8 if "embed" in v.get_metadata()["logical_axes"]
                   else v[...].nbytes for v in variables)
    assert set(per_device.values()) == {expected}
    assert expected < total / 8 * 1.07


def test_partition_specs_from_the_rules_table():
    assert logical_to_spec(("batch", "length", "act_embed")) == PartitionSpec(
        ("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    mesh = make_mesh(MeshConfig(2, 2, 2))
    # A batch of 2 cannot split four ways: keep the axes that divide it.
    assert logical_to_spec(("batch",), (2,), mesh) == PartitionSpec("data")
    assert logical_to_spec(("batch",), (3,), mesh) == PartitionSpec(None)
    with pytest.raises(KeyError, match="'nonsense'"):
        logical_to_spec(("nonsense",))


def test_mesh_resolves_minus_one():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert make_mesh(MeshConfig(data=-1, fsdp=1, tensor=4)).shape == {
        "data": 2, "fsdp": 1, "tensor": 4}


@pytest.mark.parametrize("config,message", [
    (MeshConfig(3, 1, 1), r"needs 3 devices but there are 8"),
    (MeshConfig(-1, -1, 2), r"mesh.data and mesh.fsdp are both -1"),
    (MeshConfig(3, -1, 1), r"mesh.fsdp = -1 cannot take the rest"),
    (MeshConfig(0, -1, 1), r"mesh.data = 0"),
])
def test_bad_mesh_is_rejected(config, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(config)


@pytest.mark.parametrize("overrides,field", [
    (dict(num_attention_heads=6, num_key_value_heads=2), "num_attention_heads = 6"),
    (dict(num_attention_heads=8, num_key_value_heads=2), "num_key_value_heads = 2"),
    (dict(num_attention_heads=8, num_key_value_heads=8, intermediate_size=98),
     "intermediate_size = 98"),
    (dict(num_attention_heads=8, num_key_value_heads=8, vocab_size=130), "vocab_size = 130"),
])
def test_model_that_does_not_divide_the_tensor_axis(overrides, field):
    config = glm_jax.GlmConfig(**overrides)
    with pytest.raises(ValueError, match=field + r".*'tensor' axis of size 4"):
        check_model_fits_mesh(config, make_mesh(MeshConfig(2, 1, 4)))


def test_from_pretrained_checks_the_mesh(hf_checkpoint):
    _, path = hf_checkpoint("glm")  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="num_key_value_heads = 2"):
        glm_jax.from_pretrained(path, mesh=make_mesh(MeshConfig(2, 1, 4)))


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)])
def test_optimizer_state_is_sharded_like_the_parameters(shape):
    from glm_jax.train.rl import RLSettings, make_rl
    from glm_jax.train.roles import Role, Roles
    from glm_jax.train.rollout import SamplingSettings
    from glm_jax.train.state import init_train_state, make_optimizer

    config = GlmConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=32)
    mesh = make_mesh(MeshConfig(*shape))
    optimizer = make_optimizer(learning_rate=1e-3, num_steps=10)
    tx = optimizer[0]
    with jax.set_mesh(mesh):
        model = GlmForCausalLM(config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        model = nnx.merge(graphdef, shard_state(params, mesh))
        _, state = init_train_state(model, tx)
        graphdef, critic_params = nnx.split(GlmValueModel(config, rngs=nnx.Rngs(1)))
        critic = Role(graphdef, shard_state(critic_params, mesh), config)
        roles = Roles(Role.of(model), reference=Role.of(model), critic=critic,
                      reward=Role.of(model))
        _, ppo_state, _ = make_rl(RLSettings(seed=0), roles, SamplingSettings(4, (1,), 0),
                                  {"policy": optimizer, "critic": optimizer})
    for opt_state in (state.opt_state, ppo_state.opt_state, ppo_state.critic_opt_state):
        leaves = jax.tree.leaves(opt_state)
        total = sum(leaf.nbytes for leaf in leaves)
        per_device = bytes_per_device(leaves)
        assert len(per_device) == 8
        # Adam's two moments, each split over fsdp x tensor = 8 devices like its parameter;
        # replicated they would be 8x this.
        assert max(per_device.values()) <= 1.05 * total / 8
    mu = state.opt_state[1][0].mu
    assert (mu["model"]["layers"]["self_attn"]["q_kernel"][...].sharding.spec
            == logical_to_spec(("layers", "heads", "head_dim", "embed")))
