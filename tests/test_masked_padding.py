"""Every masked function of glm_jax.losses keeps padding out of both value and gradient: with
NaN, +inf and -inf written into the masked-out positions, the value and the gradients on the
real tokens equal those of clean (zero) padding, and every gradient is finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax import losses

BATCH, LENGTH, VOCAB = 3, 6, 7
MASK = np.arange(LENGTH)[None, :] < np.asarray([6, 2, 4])[:, None]  # [batch, length]


def _tokens(*arrays: jax.Array) -> jax.Array:
    return sum(jnp.sum(a) for a in jax.tree.leaves(arrays))


# name -> (shapes of the float inputs, function of (inputs, mask) -> scalar). Per-token
# outputs are summed with fixed weights so each position's gradient differs.
WEIGHTS = jnp.asarray(np.random.RandomState(0).normal(size=(BATCH, LENGTH)), jnp.float32)
TARGETS = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (BATCH, LENGTH)))
TOKEN = (BATCH, LENGTH)
LOGITS = (BATCH, LENGTH, VOCAB)
CASES = {
    "masked_mean": ([TOKEN], lambda x, m: losses.masked_mean(x, m)),
    "masked_mean_axis": ([TOKEN], lambda x, m: jnp.sum(losses.masked_mean(x, m, axis=1))),
    "masked_var": ([TOKEN], lambda x, m: losses.masked_var(x, m)),
    "masked_whiten": ([TOKEN], lambda x, m: jnp.sum(losses.masked_whiten(x, m) * WEIGHTS)),
    "masked_whiten_no_shift": ([TOKEN], lambda x, m: jnp.sum(
        losses.masked_whiten(x, m, shift_mean=False) * WEIGHTS)),
    "sequence_logprobs": ([TOKEN], lambda x, m: jnp.sum(losses.sequence_logprobs(x, m))),
    "sft_loss": ([LOGITS], lambda x, m: losses.sft_loss(x, TARGETS, m)),
    "gae": ([TOKEN, TOKEN], lambda r, v, m: _tokens(
        *(out * WEIGHTS for out in losses.gae(r, v, m, gamma=0.9, lam=0.8)))),
    "ppo_policy_loss": ([TOKEN, TOKEN, TOKEN], lambda lp, old, adv, m: _tokens(
        losses.ppo_policy_loss(lp, old, adv, m, clip_ratio=0.2))),
    "ppo_value_loss": ([TOKEN, TOKEN, TOKEN], lambda v, old, ret, m: _tokens(
        losses.ppo_value_loss(v, old, ret, m, clip_value=0.2))),
    "entropy_from_logits": ([LOGITS], lambda x, m: losses.entropy_from_logits(x, m)),
}


def _inputs(shapes: list[tuple[int, ...]], fill: float | None) -> list[np.ndarray]:
    """Random inputs; with `fill`, the padded positions hold it (cycling NaN / inf / -inf
    when fill is NaN), else 0."""
    rng = np.random.RandomState(2)
    out = []
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        pad = ~MASK if len(shape) == 2 else np.broadcast_to(~MASK[..., None], shape)
        if fill is None:
            x[pad] = 0.0
        else:
            garbage = np.resize(np.asarray([np.nan, np.inf, -np.inf], np.float32),
                                int(pad.sum()))
            x[pad] = garbage
        out.append(x)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_garbage_in_the_padding_reaches_neither_value_nor_gradient(name):
    shapes, fn = CASES[name]
    mask = jnp.asarray(MASK)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda *xs: fn(*xs, mask), argnums=tuple(range(len(shapes)))))
    clean_value, clean_grads = value_and_grad(*map(jnp.asarray, _inputs(shapes, None)))
    value, grads = value_and_grad(*map(jnp.asarray, _inputs(shapes, np.nan)))
    assert np.isfinite(float(clean_value)) and float(clean_value) != 0.0
    np.testing.assert_allclose(float(value), float(clean_value), rtol=1e-6)
    for grad, clean in zip(grads, clean_grads, strict=True):
        grad, clean = np.asarray(grad), np.asarray(clean)
        assert np.isfinite(grad).all(), f"{name}: non-finite gradient {grad}"
        real = MASK if grad.ndim == 2 else np.broadcast_to(MASK[..., None], grad.shape)
        np.testing.assert_allclose(grad[real], clean[real], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(grad[~real], 0.0)
