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
VALID = np.asarray([True, False, True])  # [batch]: the pairs that count (dpo_loss)


def _tokens(*arrays: jax.Array) -> jax.Array:
    return sum(jnp.sum(a) for a in jax.tree.leaves(arrays))


# name -> (shapes of the float inputs, function of (inputs, mask) -> scalar). Per-token
# outputs are summed with fixed weights so each position's gradient differs.
WEIGHTS = jnp.asarray(np.random.RandomState(0).normal(size=(BATCH, LENGTH)), jnp.float32)
TARGETS = jnp.asarray(np.random.RandomState(1).randint(0, VOCAB, (BATCH, LENGTH)))
SCORES = jnp.asarray([1.5, -0.5, 2.0])  # [batch] sequence rewards (no padding)
PAIR = (BATCH,)
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
    "dpo_loss_valid": ([PAIR] * 4, lambda pc, pr, rc, rr, m: losses.dpo_loss(
        pc, pr, rc, rr, 0.5, valid=jnp.asarray(VALID))[0]),
    "kl_penalised_token_rewards": ([TOKEN], lambda kl, m: jnp.sum(
        losses.kl_penalised_token_rewards(SCORES, kl, m, 0.1) * WEIGHTS)),
    "reinforce_pp_advantages": ([TOKEN], lambda kl, m: jnp.sum(
        losses.reinforce_pp_advantages(SCORES, kl, m, 0.1, gamma=0.9) * WEIGHTS)),
    "kl_loss": ([TOKEN, TOKEN], lambda lp, ref, m: losses.kl_loss(lp, ref, m, 0.5)),
    **{f"clipped_policy_loss_{mode}": ([TOKEN, TOKEN, TOKEN], lambda lp, old, adv, m, mode=mode:
        _tokens(losses.clipped_policy_loss(lp, old, adv, m, 0.2, 0.28, aggregation=mode)))
       for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")},
}


def _padding(shape: tuple[int, ...]) -> np.ndarray:
    """The padded (masked-out) entries of an input of `shape`: `[batch]` pairs, `[batch,
    length]` tokens, or `[batch, length, vocab]` logits."""
    if len(shape) == 1:
        return ~VALID
    return ~MASK if len(shape) == 2 else np.broadcast_to(~MASK[..., None], shape)


def _inputs(shapes: list[tuple[int, ...]], fill: float | None) -> list[np.ndarray]:
    """Random inputs; with `fill`, the padded positions hold it (cycling NaN / inf / -inf
    when fill is NaN), else 0."""
    rng = np.random.RandomState(2)
    out = []
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        pad = _padding(shape)
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
        real = ~_padding(grad.shape)
        np.testing.assert_allclose(grad[real], clean[real], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(grad[~real], 0.0)
