"""Losses against independent numpy re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.losses import reward_l2_prior, reward_model_loss, reward_pairwise_loss


def np_reward_model_loss(chosen, rejected, l2_coef):
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    bradley_terry = np.log1p(np.exp(-(chosen - rejected)))  # -log sigmoid(c - r)
    return np.mean(bradley_terry + l2_coef * (chosen**2 + rejected**2))


@pytest.mark.parametrize("l2_coef", [0.0, 0.01, 0.5])
def test_reward_model_loss_matches_numpy(l2_coef):
    rng = np.random.RandomState(0)
    chosen, rejected = rng.normal(size=32) * 3, rng.normal(size=32) * 3
    loss = reward_model_loss(jnp.asarray(chosen), jnp.asarray(rejected), l2_coef)
    np.testing.assert_allclose(float(loss), np_reward_model_loss(chosen, rejected, l2_coef),
                               rtol=1e-6)


def test_reward_model_loss_gradient_matches_numpy():
    rng = np.random.RandomState(1)
    chosen, rejected, l2 = rng.normal(size=8), rng.normal(size=8), 0.1
    grad_c, grad_r = jax.grad(reward_model_loss, argnums=(0, 1))(
        jnp.asarray(chosen), jnp.asarray(rejected), l2)
    sigma = 1 / (1 + np.exp(-(chosen - rejected)))
    n = len(chosen)
    np.testing.assert_allclose(grad_c, (-(1 - sigma) + 2 * l2 * chosen) / n, rtol=1e-5)
    np.testing.assert_allclose(grad_r, ((1 - sigma) + 2 * l2 * rejected) / n, rtol=1e-5)


def test_reward_model_loss_is_stable_at_large_margins():
    loss = reward_model_loss(jnp.asarray([100.0, -100.0]), jnp.asarray([0.0, 0.0]))
    np.testing.assert_allclose(float(loss), (0.0 + 100.0) / 2, rtol=1e-6)
    assert float(reward_model_loss(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(np.log(2))


def test_eq1_pairwise_and_eq2_prior_are_the_two_terms_of_the_loss():
    rng = np.random.RandomState(2)
    chosen, rejected = rng.normal(size=16) * 2, rng.normal(size=16) * 2
    c, r = jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32)
    pairwise, prior = float(reward_pairwise_loss(c, r)), float(reward_l2_prior(c, r))
    np.testing.assert_allclose(pairwise, np.mean(np.log1p(np.exp(-(chosen - rejected)))),
                               rtol=1e-6)
    np.testing.assert_allclose(prior, np.mean(chosen**2 + rejected**2), rtol=1e-6)
    np.testing.assert_allclose(float(reward_model_loss(c, r, 0.3)), pairwise + 0.3 * prior,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="reward_pairwise_loss"):
        reward_pairwise_loss(c, r[:3])
