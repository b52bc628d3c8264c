"""Scanned layers, rematerialisation and the attention kernels inside the model: the same
logits, losses and gradients whichever way the program runs, and a stacked KV cache that
decodes like a full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.models import GlmConfig, GlmForCausalLM, KVCache
from glm_jax.train.sft import sft_batch_loss

CONFIG = GlmConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_chunk=5)


def batch():
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 96, (3, 13))
    mask = np.ones((3, 13), bool)
    mask[1, :4] = False  # left padding
    mask[2, 10:] = False  # right padding
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
            "loss_mask": jnp.asarray(mask & (np.arange(13) >= 5))}


def loss_and_grads(config):
    graphdef, params = nnx.split(GlmForCausalLM(config, rngs=nnx.Rngs(0)))
    data = batch()

    def loss(params):
        return sft_batch_loss(nnx.merge(graphdef, params), data)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("changes", [
    dict(scan_layers=False), dict(remat="full"), dict(remat="save_dots"),
    dict(scan_layers=False, remat="full"), dict(attention="blockwise"),
    dict(attention="xla"), dict(attention="blockwise", remat="full")])
def test_losses_and_gradients_equal_however_the_program_runs(changes):
    value, grads = loss_and_grads(CONFIG)
    other_value, other_grads = loss_and_grads(CONFIG.replace(**changes))
    np.testing.assert_allclose(other_value, value, rtol=1e-5)
    for (key, a), (_, b) in zip(nnx.to_flat_state(other_grads), nnx.to_flat_state(grads),
                                strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(key))


def test_layers_are_stacked_and_initialised_like_separate_layers():
    model = GlmForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    q = model.model.layers.self_attn.q_kernel
    assert q.shape == (3, 4, 8, 32)
    assert q.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", "embed")
    # Each layer drew its own weights.
    assert not np.allclose(q[...][0], q[...][1])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_stacked_cache_decodes_like_a_full_forward(scan_layers):
    config = CONFIG.replace(scan_layers=scan_layers)
    model = GlmForCausalLM(config, rngs=nnx.Rngs(1))
    data = batch()
    ids, mask = data["input_ids"], data["attention_mask"]
    full = model(ids, mask)
    cache = KVCache.init(config, 3, 13)
    if scan_layers:  # stacked like the parameters
        assert cache.keys.shape == (3, 3, 2, 8, 13) and cache.values.shape == (3, 3, 2, 13, 8)
    else:  # one array per layer, each updated in place
        assert [k.shape for k in cache.keys] == [(3, 2, 8, 13)] * 3
        assert [v.shape for v in cache.values] == [(3, 2, 13, 8)] * 3
    logits, cache = model(ids[:, :8], mask[:, :8], cache)
    steps = [logits]
    for t in range(8, 13):
        logits, cache = model(ids[:, t:t + 1], mask[:, t:t + 1], cache)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)


def test_unknown_remat_and_attention_are_refused():
    with pytest.raises(ValueError, match="remat = 'some'; choose one of"):
        CONFIG.replace(remat="some")
    with pytest.raises(ValueError, match="attention = 'flash'; choose one of auto, dense"):
        CONFIG.replace(attention="flash")
