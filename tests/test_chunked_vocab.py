"""Chunked-vocabulary log-probs: the unchunked values and gradients, less memory, any sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from glm_jax.losses import chunked_token_logprobs, sft_loss, token_logprobs


def make_inputs(batch=3, length=37, embed=16, vocab=50, dtype=jnp.float32, seed=0):
    """Random hidden `[batch, length, embed]`, lm_head `[vocab, embed]`, tokens, weights."""
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, length, embed)), dtype)
    # std 0.5: logits of a few nats, so the softmax is neither flat nor one-hot.
    lm_head = jnp.asarray(rng.normal(size=(vocab, embed)) * 0.5, dtype)
    tokens = jnp.asarray(rng.randint(0, vocab, size=(batch, length)), jnp.int32)
    weights = jnp.asarray(rng.normal(size=(batch, length)), jnp.float32)
    return hidden, lm_head, tokens, weights


def reference_logits(hidden, lm_head):
    # How GlmForCausalLM.logits computes them.
    return jnp.einsum("ble,ve->blv", hidden, lm_head, preferred_element_type=jnp.float32)


def np_logprobs_entropy(hidden, lm_head, tokens):
    """Independent float64 numpy log-softmax: (logp[token], entropy)."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(lm_head, np.float64).T
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
    return picked, -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("length,chunk", [(32, 8), (37, 8), (37, 37), (37, 64), (1, 4)])
def test_values_match_unchunked_and_numpy(length, chunk):
    hidden, lm_head, tokens, _ = make_inputs(length=length)
    logps, entropy = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=chunk,
                                            with_entropy=True)
    assert logps.shape == entropy.shape == (3, length)
    assert logps.dtype == entropy.dtype == jnp.float32
    expected = token_logprobs(reference_logits(hidden, lm_head), tokens)
    np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)
    np_logps, np_entropy = np_logprobs_entropy(hidden, lm_head, tokens)
    np.testing.assert_allclose(logps, np_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, np_entropy, rtol=1e-5, atol=1e-5)
    only_logps = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=chunk)
    np.testing.assert_array_equal(only_logps, logps)


@pytest.mark.parametrize("chunk", [8, 37, 64])
def test_gradients_match_unchunked(chunk):
    hidden, lm_head, tokens, weights = make_inputs()

    def chunked(h, w):
        logps, entropy = chunked_token_logprobs(h, w, tokens, chunk_size=chunk,
                                                with_entropy=True)
        return jnp.sum(weights * logps) + 0.3 * jnp.sum(entropy)

    def unchunked(h, w):
        logp = jax.nn.log_softmax(reference_logits(h, w), axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.sum(weights * token_logprobs(reference_logits(h, w), tokens)) + 0.3 * jnp.sum(
            entropy)

    value, (g_hidden, g_head) = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, lm_head)
    ref_value, (r_hidden, r_head) = jax.value_and_grad(unchunked, argnums=(0, 1))(hidden,
                                                                                   lm_head)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert float(jnp.max(jnp.abs(r_head))) > 1e-2  # the gradient is not trivially zero
    np.testing.assert_allclose(g_hidden, r_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_head, r_head, rtol=1e-5, atol=1e-5)


def test_sft_loss_of_a_model_matches_its_full_logits():
    """sft_batch_loss (hidden states, LM head in chunks of 4 positions) against the loss of
    the model's full logits: value, entropy and every parameter's gradient."""
    from flax import nnx

    from glm_jax.losses import entropy_from_logits
    from glm_jax.models import GlmConfig, GlmForCausalLM
    from glm_jax.train.sft import sft_batch_loss

    model = GlmForCausalLM(GlmConfig(vocab_size=64, vocab_chunk=4), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(3)
    ids = jnp.asarray(rng.randint(2, 64, (3, 11)))
    batch = {"input_ids": ids, "attention_mask": jnp.ones((3, 11), bool),
             "loss_mask": jnp.asarray(rng.rand(3, 11) < 0.6)}
    graphdef, params = nnx.split(model)

    def chunked(params):
        return sft_batch_loss(nnx.merge(graphdef, params), batch)

    def full(params):
        logits = nnx.merge(graphdef, params)(ids)[:, :-1]
        mask = batch["loss_mask"][:, 1:]
        # Masked targets out of range, as collators emit them: sft_loss must ignore them.
        targets = jnp.where(mask, ids[:, 1:], -100)
        return sft_loss(logits, targets, mask), {"entropy": entropy_from_logits(logits, mask)}

    (value, stats), grads = jax.value_and_grad(chunked, has_aux=True)(params)
    (ref_value, ref_stats), ref_grads = jax.value_and_grad(full, has_aux=True)(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(stats["entropy"], ref_stats["entropy"], rtol=1e-5)
    for (key, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads),
                                strict=True):
        np.testing.assert_allclose(g[...], r[...], rtol=1e-4, atol=1e-6, err_msg=str(key))


def test_bfloat16_matches_unchunked_bfloat16():
    hidden, lm_head, tokens, weights = make_inputs(length=40, embed=64, vocab=300,
                                                   dtype=jnp.bfloat16)

    def chunked(h, w):
        return jnp.sum(weights * chunked_token_logprobs(h, w, tokens, chunk_size=16))

    def unchunked(h, w):
        return jnp.sum(weights * token_logprobs(reference_logits(h, w), tokens))

    logps = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=16)
    assert logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, token_logprobs(reference_logits(hidden, lm_head), tokens),
                               rtol=1e-3, atol=1e-3)
    grads = jax.grad(chunked, argnums=(0, 1))(hidden, lm_head)
    ref_grads = jax.grad(unchunked, argnums=(0, 1))(hidden, lm_head)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == jnp.bfloat16
        grad, ref = np.asarray(grad, np.float32), np.asarray(ref, np.float32)
        # bf16 has an 8-bit mantissa (eps 2^-8); the lm_head gradient is summed over chunks
        # in bf16, a few roundings more than the single unchunked contraction.
        np.testing.assert_allclose(grad, ref, rtol=3e-2, atol=3e-2 * np.abs(ref).max())


def test_memory_is_below_one_logits_tensor():
    batch, length, embed, vocab, chunk = 4, 512, 64, 32768, 64
    logits_bytes = batch * length * vocab * 4
    hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32)
    lm_head = jax.ShapeDtypeStruct((vocab, embed), jnp.float32)
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def temp_bytes(logps_fn):
        def loss(h, w, t):
            logps, entropy = logps_fn(h, w, t)
            return jnp.sum(logps) + jnp.sum(entropy)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
            hidden, lm_head, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def unchunked(h, w, t):
        logits = reference_logits(h, w)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return token_logprobs(logits, t), -jnp.sum(jnp.exp(logp) * logp, axis=-1)

    chunked_bytes = temp_bytes(lambda h, w, t: chunked_token_logprobs(
        h, w, t, chunk_size=chunk, with_entropy=True))
    unchunked_bytes = temp_bytes(unchunked)
    print(f"temp bytes: chunked {chunked_bytes / 2**20:.1f} MiB, unchunked "
          f"{unchunked_bytes / 2**20:.1f} MiB, one logits tensor {logits_bytes / 2**20:.0f} MiB")
    assert unchunked_bytes > logits_bytes
    assert chunked_bytes < logits_bytes
    # Measured ~3 `[batch, chunk, vocab]` float32 buffers (97 MiB); without the checkpoint
    # the scan saves every chunk's softmax (865 MiB). Half a logits tensor is 4 chunks here.
    assert chunked_bytes < logits_bytes // 2


def test_sharded_over_vocab_matches_unsharded():
    hidden, lm_head, tokens, weights = make_inputs(batch=4, length=37, vocab=64, seed=3)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))

    def loss(h, w, t):
        logps, entropy = chunked_token_logprobs(h, w, t, chunk_size=8, with_entropy=True)
        return jnp.sum(weights * logps) + jnp.sum(entropy), (logps, entropy)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (ref_value, ref_out), ref_grads = fn(hidden, lm_head, tokens)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    (value, out), grads = fn(put(hidden, P("data", None, None)), put(lm_head, P("tensor", None)),
                             put(tokens, P("data", None)))
    assert grads[1].sharding.is_equivalent_to(NamedSharding(mesh, P("tensor", None)), 2)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, ref in zip((*out, *grads), (*ref_out, *ref_grads), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
