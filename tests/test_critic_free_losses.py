"""The paper's equation functions (eq. 4, 5, 7 with a valid mask) and the critic-free pieces
(GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO) against plain-numpy derivations, on ragged masks
whose padding holds NaN."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax import losses

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
LENGTH = 7
LENGTHS = [7, 3, 0, 5, 1, 6]  # ragged, with an empty row (a dropped sequence)

# Jitted once each, with the Python-level switches static: checks that everything traces.
grpo_advantages = jax.jit(losses.grpo_advantages,
                          static_argnames=("num_generations", "scale_by_std"))
rloo_advantages = jax.jit(losses.rloo_advantages, static_argnames=("num_generations",))
reinforce_pp_advantages = jax.jit(losses.reinforce_pp_advantages)
groups_without_signal = jax.jit(losses.groups_without_signal,
                                static_argnames=("num_generations",))
clipped_policy_loss = jax.jit(losses.clipped_policy_loss,
                              static_argnames=("aggregation", "norm_length"))
kl_loss = jax.jit(losses.kl_loss, static_argnames=("kind", "aggregation", "norm_length"))
dpo_loss = jax.jit(losses.dpo_loss)
kl_penalised_token_rewards = jax.jit(losses.kl_penalised_token_rewards)


def prefix_mask(lengths, length=LENGTH):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def with_nan_padding(x, mask):
    """float32 array with NaN wherever `mask` is false: padding must never count."""
    return jnp.asarray(np.where(mask, x, np.nan), jnp.float32)


# ------------------------------------------------------------------ numpy references (float64)

def np_grpo(rewards, g, scale_by_std=True, eps=1e-6):
    groups = np.asarray(rewards, np.float64).reshape(-1, g)
    adv = groups - groups.mean(1, keepdims=True)
    if scale_by_std:
        adv = adv / (groups.std(1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def np_rloo(rewards, g):
    groups = np.asarray(rewards, np.float64).reshape(-1, g)
    out = np.zeros_like(groups)
    for p in range(groups.shape[0]):
        for i in range(g):
            others = [groups[p, j] for j in range(g) if j != i]
            out[p, i] = groups[p, i] - sum(others) / len(others)
    return out.reshape(-1)


def np_token_rewards(scores, kl, mask, coef):
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        out[b, :n] = -coef * kl[b, :n]
        if n:
            out[b, n - 1] += scores[b]
    return out


def np_reinforce_pp(scores, kl, mask, coef, gamma, eps=1e-8):
    rewards = np_token_rewards(scores, kl, mask, coef)
    returns = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        running = 0.0
        for t in reversed(range(int(mask[b].sum()))):
            running = rewards[b, t] + gamma * running
            returns[b, t] = running
    real = returns[mask]
    whitened = (returns - real.mean()) / np.sqrt(real.var(ddof=1) + eps)
    return np.where(mask, whitened, 0.0)


def np_aggregate(per_token, mask, mode, norm_length=None):
    rows = [per_token[b][mask[b]] for b in range(mask.shape[0]) if mask[b].any()]
    if mode == "token_mean":
        return np.concatenate(rows).mean()
    if mode == "seq_mean_token_mean":
        return np.mean([row.mean() for row in rows])
    return np.mean([row.sum() / (norm_length or mask.shape[1]) for row in rows])


def np_clipped(logps, old, adv, mask, low, high, mode, norm_length=None):
    ratio = np.exp(np.asarray(logps, np.float64) - old)
    per_token = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - low, 1 + high))
    return np_aggregate(np.where(mask, per_token, 0.0), mask, mode, norm_length)


def np_k3(logps, ref):
    d = np.asarray(ref, np.float64) - logps  # log(pi_ref / pi)
    return np.exp(d) - 1.0 - d


def policy_inputs(seed, lengths=LENGTHS):
    rng = np.random.RandomState(seed)
    mask = prefix_mask(lengths)
    logps = rng.normal(size=mask.shape) * 0.5 - 2.0
    old = logps + rng.normal(size=mask.shape) * 0.3  # ratios well outside [0.8, 1.28]
    adv = rng.normal(size=mask.shape)
    return logps, old, adv, mask


# ------------------------------------------------------------------ the paper's equations

def test_module_docstring_maps_each_equation_to_an_existing_function():
    rows = re.findall(r"^  eq\. \((\d)\)[^`]*`(\w+)`", losses.__doc__, flags=re.M)
    assert [eq for eq, _ in rows] == ["1", "2", "4", "5", "6", "7"]
    for _, name in rows:
        assert callable(getattr(losses, name)), name


def test_kl_penalised_token_rewards_eq4_matches_numpy_and_ignores_nan_padding():
    rng = np.random.RandomState(0)
    mask = prefix_mask(LENGTHS)
    kl = rng.normal(size=mask.shape)
    scores = rng.normal(size=len(LENGTHS)) * 3
    got = np.asarray(kl_penalised_token_rewards(jnp.asarray(scores, jnp.float32),
                                                with_nan_padding(kl, mask), mask, 0.05))
    np.testing.assert_allclose(got, np_token_rewards(scores, kl, mask, 0.05), rtol=1e-5,
                               atol=1e-6)
    assert (got[~mask] == 0.0).all()


def test_kl_penalised_token_rewards_names_a_token_level_score():
    mask = jnp.asarray(prefix_mask([3, 2]))
    with pytest.raises(ValueError, match=r"kl_penalised_token_rewards: .*shape \(2, 7\), "
                                         r"expected \[batch\] = \(2,\)"):
        losses.kl_penalised_token_rewards(jnp.zeros((2, 7)), jnp.zeros((2, 7)), mask, 0.1)


def test_reference_relative_reward_eq5():
    got = losses.reference_relative_reward(jnp.asarray([2.0, -1.0, 0.5]),
                                           jnp.asarray([1.5, -1.0, 3.0]))
    np.testing.assert_allclose(got, [0.5, 0.0, -2.5])
    with pytest.raises(ValueError, match="reference_relative_reward"):
        losses.reference_relative_reward(jnp.zeros(3), jnp.zeros(4))


def np_dpo(pc, pr, rc, rr, beta, valid):
    margin = beta * ((pc - rc) - (pr - rr))
    return np.mean(np.log1p(np.exp(-margin[valid])))


def test_dpo_eq7_valid_mask_matches_numpy_and_invalid_pairs_reach_nothing():
    rng = np.random.RandomState(1)
    valid = np.asarray([True, False, True, True, False])
    logps = [rng.normal(size=5) * 10 - 30 for _ in range(4)]
    # NaN in the invalid pairs (e.g. a pair whose response was truncated away).
    args = [with_nan_padding(x, valid) for x in logps]
    (loss, (chosen, rejected)), grads = jax.value_and_grad(
        lambda *a: (lambda out: (out[0], out[1:]))(dpo_loss(*a, 0.1, valid)),
        argnums=(0, 1), has_aux=True)(*args)
    np.testing.assert_allclose(float(loss), np_dpo(*logps, 0.1, valid), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chosen)[valid], 0.1 * (logps[0] - logps[2])[valid],
                               rtol=1e-4)
    assert (np.asarray(chosen)[~valid] == 0).all() and (np.asarray(rejected)[~valid] == 0).all()
    for grad in grads:
        assert np.isfinite(grad).all()
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
    # Only the valid pairs count: dropping the invalid ones gives the same loss.
    kept = [jnp.asarray(x[valid], jnp.float32) for x in logps]
    np.testing.assert_allclose(float(loss), float(dpo_loss(*kept, 0.1)[0]), rtol=1e-6)


def test_dpo_batch_without_a_valid_pair_gives_zero_loss_and_zero_gradient():
    args = [jnp.full((3,), np.nan, jnp.float32)] * 4
    loss, grads = jax.value_and_grad(lambda *a: dpo_loss(*a, 0.1, jnp.zeros(3, bool))[0],
                                     argnums=(0, 1))(*args)
    assert float(loss) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


# ------------------------------------------------------------------ group advantages

@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_matches_numpy_with_and_without_baseline(scale_by_std):
    rng = np.random.RandomState(2)
    rewards, baseline = rng.normal(size=12) * 2, rng.normal(size=12)
    got = grpo_advantages(jnp.asarray(rewards, jnp.float32), num_generations=4,
                          scale_by_std=scale_by_std)
    np.testing.assert_allclose(got, np_grpo(rewards, 4, scale_by_std), rtol=1e-4, atol=1e-5)
    got = grpo_advantages(jnp.asarray(rewards, jnp.float32), num_generations=4,
                          scale_by_std=scale_by_std, baseline=jnp.asarray(baseline))
    np.testing.assert_allclose(got, np_grpo(rewards - baseline, 4, scale_by_std), rtol=1e-4,
                               atol=1e-5)


def test_rloo_matches_numpy_with_and_without_baseline():
    rng = np.random.RandomState(3)
    rewards, baseline = rng.normal(size=15), rng.normal(size=15)
    got = rloo_advantages(jnp.asarray(rewards, jnp.float32), num_generations=3)
    np.testing.assert_allclose(got, np_rloo(rewards, 3), rtol=1e-5, atol=1e-6)
    got = rloo_advantages(jnp.asarray(rewards, jnp.float32), num_generations=3,
                          baseline=jnp.asarray(baseline))
    np.testing.assert_allclose(got, np_rloo(rewards - baseline, 3), rtol=1e-5, atol=1e-6)


def test_a_baseline_constant_per_prompt_cancels_in_group_estimators():
    rewards = jnp.asarray([1.0, 0.0, 2.0, 5.0, 4.0, 4.5])
    per_prompt = jnp.repeat(jnp.asarray([0.7, -3.0]), 3)
    for fn in (grpo_advantages, rloo_advantages):
        np.testing.assert_allclose(fn(rewards, num_generations=3, baseline=per_prompt),
                                   fn(rewards, num_generations=3), atol=1e-5)


def test_groups_of_equal_rewards_get_zero_advantage_and_are_reported():
    # In float32 the mean of three 0.1 (or -3.7) is not 0.1 (-3.7): without care the group
    # would get rounding noise / (0 + eps), a large advantage.
    rewards = jnp.asarray([0.1] * 3 + [1.0, 0.0, 1.0] + [-3.7] * 3 + [0.0, 0.0, 1.0])
    for adv in (grpo_advantages(rewards, num_generations=3),
                grpo_advantages(rewards, num_generations=3, scale_by_std=False),
                rloo_advantages(rewards, num_generations=3)):
        adv = np.asarray(adv)
        np.testing.assert_array_equal(adv[:3], 0.0)
        np.testing.assert_array_equal(adv[6:9], 0.0)
        assert (adv[3:6] != 0).all() and (adv[9:] != 0).all()
    fraction, keep = groups_without_signal(rewards, num_generations=3)
    assert float(fraction) == 0.5
    np.testing.assert_array_equal(keep, np.repeat([False, True, False, True], 3))
    # A tolerance turns a nearly flat group into a dropped one.
    fraction, keep = losses.groups_without_signal(jnp.asarray([1.0, 1.001, 0.0, 1.0]), 2,
                                                  atol=0.01)
    assert float(fraction) == 0.5
    np.testing.assert_array_equal(keep, [False, False, True, True])


def test_group_layout_errors_name_the_function_and_the_fix():
    with pytest.raises(ValueError, match=r"grpo_advantages: rewards of shape \(7,\) .*"
                                         r"num_generations=4.*batch of whole groups"):
        losses.grpo_advantages(jnp.zeros(7), 4)
    with pytest.raises(ValueError, match=r"groups_without_signal: .*num_generations=0"):
        losses.groups_without_signal(jnp.zeros(4), 0)
    with pytest.raises(ValueError, match=r"rloo_advantages: .*\(2, 4\)"):
        losses.rloo_advantages(jnp.zeros((2, 4)), 2)
    with pytest.raises(ValueError, match=r"rloo_advantages: num_generations=1.*>= 2"):
        losses.rloo_advantages(jnp.zeros(4), 1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_numpy_on_ragged_masks(gamma):
    rng = np.random.RandomState(4)
    mask = prefix_mask(LENGTHS)
    kl, scores, baseline = rng.normal(size=mask.shape), rng.normal(size=6), rng.normal(size=6)
    got = np.asarray(reinforce_pp_advantages(
        jnp.asarray(scores, jnp.float32), with_nan_padding(kl, mask), mask, 0.05, gamma,
        jnp.asarray(baseline, jnp.float32)))
    expected = np_reinforce_pp(scores - baseline, kl, mask, 0.05, gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert (got[~mask] == 0).all()


# ------------------------------------------------------------------ policy loss, KL, overlong

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_length", [None, 16])
def test_clip_higher_matches_numpy_per_aggregation(mode, norm_length):
    logps, old, adv, mask = policy_inputs(5)
    loss, stats = clipped_policy_loss(*(with_nan_padding(x, mask) for x in (logps, old, adv)),
                                      mask, 0.2, 0.28, aggregation=mode,
                                      norm_length=norm_length)
    expected = np_clipped(logps, old, adv, mask, 0.2, 0.28, mode, norm_length)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert 0 < float(stats["clip_fraction"]) < 1  # both branches are exercised


@pytest.mark.parametrize("mode", MODES)
def test_ratio_one_gives_minus_the_aggregated_advantage(mode):
    logps, _, adv, mask = policy_inputs(6)
    loss, stats = clipped_policy_loss(with_nan_padding(logps, mask),
                                      with_nan_padding(logps, mask),
                                      with_nan_padding(adv, mask), mask, 0.2, 0.28,
                                      aggregation=mode)
    np.testing.assert_allclose(float(loss), -np_aggregate(np.where(mask, adv, 0), mask, mode),
                               rtol=1e-5)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["ratio_mean"]) == 1.0


def test_symmetric_clip_equals_ppo_policy_loss():
    logps, old, adv, mask = policy_inputs(7)
    args = [with_nan_padding(x, mask) for x in (logps, old, adv)]
    ppo = jax.value_and_grad(lambda lp: losses.ppo_policy_loss(lp, *args[1:], mask, 0.2),
                             has_aux=True)(args[0])
    clip = jax.value_and_grad(lambda lp: losses.clipped_policy_loss(lp, *args[1:], mask, 0.2,
                                                                    0.2), has_aux=True)(args[0])
    (ppo_loss, ppo_stats), ppo_grad = ppo
    (clip_loss, clip_stats), clip_grad = clip
    assert float(ppo_loss) == float(clip_loss)
    assert jax.device_get(ppo_stats) == jax.device_get(clip_stats)
    np.testing.assert_array_equal(ppo_grad, clip_grad)
    np.testing.assert_allclose(float(ppo_loss),
                               np_clipped(logps, old, adv, mask, 0.2, 0.2, "token_mean"),
                               rtol=1e-5)


def test_clip_higher_by_hand():
    """A > 0 and ratio 1.25: inside [0.8, 1.28] (gradient flows), outside [0.8, 1.2] (none);
    A < 0 and ratio 0.75 is outside either: the low side stays at 1 - 0.2."""
    mask = jnp.ones((1, 2), bool)
    old, adv = jnp.zeros((1, 2)), jnp.asarray([[1.0, -1.0]])
    logps = jnp.log(jnp.asarray([[1.25, 0.75]]))

    def grad(high):
        return jax.grad(lambda lp: losses.clipped_policy_loss(lp, old, adv, mask, 0.2,
                                                              high)[0])(logps)

    np.testing.assert_allclose(grad(0.28), [[-1.25 / 2, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(grad(0.2), [[0.0, 0.0]])


@pytest.mark.parametrize("mode", MODES)
def test_kl_loss_k3_matches_numpy_and_coefficient_zero_is_zero(mode):
    logps, ref, _, mask = policy_inputs(8)
    args = [with_nan_padding(x, mask) for x in (logps, ref)]
    loss = kl_loss(*args, mask, 0.04, aggregation=mode)
    expected = 0.04 * np_aggregate(np.where(mask, np_k3(logps, ref), 0), mask, mode)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    zero, grad = jax.value_and_grad(lambda lp: losses.kl_loss(lp, args[1], mask, 0.0,
                                                              aggregation=mode))(args[0])
    assert float(zero) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_aggregation_arguments_are_checked():
    per_token, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="token_mean.*seq_mean_token_mean"):
        losses.aggregate_loss(per_token, mask, "seq_sum")
    with pytest.raises(ValueError, match="norm_length=0 must be a positive"):
        losses.aggregate_loss(per_token, mask, "seq_mean_token_sum_norm", norm_length=0)


def test_overlong_penalty_three_regions():
    lengths = jnp.asarray([0, 15, 16, 18, 20, 21, 100])
    got = losses.overlong_penalty(lengths, max_length=20, cache_length=5)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0], rtol=1e-6)
    assert got.dtype == jnp.float32
    for cache in (0, 21):
        with pytest.raises(ValueError, match=f"cache_length={cache} must be in"):
            losses.overlong_penalty(lengths, max_length=20, cache_length=cache)


def test_group_and_sequence_means_are_independent_of_sharding():
    devices = np.array(jax.devices())
    assert len(devices) == 8  # conftest forces 8 host devices
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    rng = np.random.RandomState(9)
    rewards = rng.normal(size=16).astype(np.float32)  # 4 groups of 4 across 8 devices
    np.testing.assert_allclose(
        grpo_advantages(jax.device_put(rewards, sharding), num_generations=4),
        grpo_advantages(jnp.asarray(rewards), num_generations=4), rtol=1e-6, atol=1e-6)
    logps, old, adv, mask = policy_inputs(10, lengths=rng.randint(0, LENGTH + 1, size=16))
    args = [np.where(mask, x, 0).astype(np.float32) for x in (logps, old, adv)] + [mask]
    for mode in MODES:
        sharded = clipped_policy_loss(*(jax.device_put(a, sharding) for a in args), 0.2, 0.28,
                                      aggregation=mode)[0]
        local = clipped_policy_loss(*map(jnp.asarray, args), 0.2, 0.28, aggregation=mode)[0]
        np.testing.assert_allclose(float(sharded), float(local), rtol=1e-6)
