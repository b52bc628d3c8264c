"""Policy-optimisation losses (paper 3.4) against independent numpy / torch re-derivations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm_jax import losses

# The tests call the jitted functions: one compile each is faster than op-by-op dispatch, and it
# checks that every loss traces (static arguments are the Python-level switches).
dpo_loss = jax.jit(losses.dpo_loss)
entropy_from_logits = jax.jit(losses.entropy_from_logits)
gae = jax.jit(losses.gae)
kl_penalty = jax.jit(losses.kl_penalty, static_argnames=("kind",))
masked_mean = jax.jit(losses.masked_mean, static_argnames=("axis",))
masked_var = jax.jit(losses.masked_var, static_argnames=("unbiased",))
masked_whiten = jax.jit(losses.masked_whiten, static_argnames=("shift_mean",))
ppo_policy_loss = jax.jit(losses.ppo_policy_loss)
ppo_value_loss = jax.jit(losses.ppo_value_loss)
sequence_logprobs = jax.jit(losses.sequence_logprobs)
sft_loss = jax.jit(losses.sft_loss)
token_logprobs = jax.jit(losses.token_logprobs)

LN2 = float(np.log(2.0))


# ------------------------------------------------------------------ numpy references (float64)

def np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_dpo(pc, pr, rc, rr, beta):
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    margin = chosen - rejected
    return np.mean(np.log1p(np.exp(-margin))), chosen, rejected


def np_kl(logps, ref, kind, clamp=10.0):
    log_ratio = np.clip(np.asarray(logps, np.float64) - ref, -clamp, clamp)
    if kind == "k1":
        out = log_ratio
    elif kind == "k2":
        out = 0.5 * log_ratio**2
    else:
        d = -log_ratio  # log(ref / pi)
        out = np.exp(d) - 1.0 - d
    return np.clip(out, -clamp, clamp)


def np_gae(rewards, values, mask, gamma, lam):
    """Explicit reversed Python loop per row; the response is mask[row, :T], T = mask.sum()."""
    adv, ret = np.zeros_like(rewards, np.float64), np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        T = int(mask[b].sum())
        assert mask[b, :T].all()  # the reference only handles the contiguous-from-0 contract
        last = 0.0
        for t in reversed(range(T)):
            next_value = values[b, t + 1] if t + 1 < T else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t]
    return adv, ret


def np_ppo_policy(logps, old, adv, mask, eps):
    ratio = np.exp(np.asarray(logps, np.float64) - old)
    loss_tok = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    m = mask.astype(bool)
    clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
    return loss_tok[m].sum() / m.sum(), clipped[m].mean(), ratio[m].mean()


def np_ppo_value(values, old, returns, mask, c):
    v_clip = old + np.clip(values - old, -c, c)
    a, b = (values - returns) ** 2, (v_clip - returns) ** 2
    m = mask.astype(bool)
    return (0.5 * np.maximum(a, b))[m].sum() / m.sum(), (b > a)[m].mean()


def np_entropy(logits, mask):
    logp = np_log_softmax(logits)
    p = np.exp(logp)
    ent = -np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0).sum(-1)
    return ent[mask.astype(bool)].mean()


def prefix_mask(lengths, length):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


# ------------------------------------------------------------------ SFT / log-probs

def test_sft_loss_matches_torch_cross_entropy():
    rng = np.random.RandomState(0)
    batch, length, vocab = 3, 7, 11
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
    targets = rng.randint(0, vocab, size=(batch, length))
    mask = prefix_mask([7, 2, 4], length)
    targets_ignored = np.where(mask, targets, -100)  # out-of-range at ignored positions
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits[mask]), torch.tensor(targets[mask]))
    got = sft_loss(jnp.asarray(logits), jnp.asarray(targets_ignored), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    # Global token average, not a mean of per-row means (rows have different lengths).
    per_row = [torch.nn.functional.cross_entropy(torch.tensor(logits[b][mask[b]]),
                                                 torch.tensor(targets[b][mask[b]]))
               for b in range(batch)]
    assert abs(float(got) - float(torch.stack(per_row).mean())) > 1e-3


def test_sft_loss_bf16_logits_and_empty_mask():
    rng = np.random.RandomState(1)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.randint(0, 5, size=(2, 3))
    mask = np.ones((2, 3), bool)
    got = sft_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected = -np.take_along_axis(np_log_softmax(bf), targets[..., None], -1).mean()
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    empty = sft_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 3), bool))
    assert float(empty) == 0.0


def test_token_and_sequence_logprobs_match_numpy():
    rng = np.random.RandomState(2)
    logits = rng.normal(size=(2, 5, 9)) * 4
    tokens = rng.randint(0, 9, size=(2, 5))
    mask = prefix_mask([5, 3], 5)
    tok = token_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens))
    expected = np.take_along_axis(np_log_softmax(logits), tokens[..., None], -1)[..., 0]
    assert tok.shape == (2, 5) and tok.dtype == jnp.float32
    np.testing.assert_allclose(tok, expected, rtol=1e-5, atol=1e-5)
    padded = np.where(mask, expected, 1e6)  # padding must not leak into the sum
    seq = sequence_logprobs(jnp.asarray(padded, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(seq, (expected * mask).sum(-1), rtol=1e-5)


# ------------------------------------------------------------------ DPO

def test_dpo_policy_equal_reference_is_ln2():
    logps = jnp.asarray([-12.5, -3.0, -40.25, -7.0])
    other = jnp.asarray([-1.0, -30.0, -2.5, -7.0])
    loss, chosen, rejected = dpo_loss(logps, other, logps, other, beta=0.1)
    assert abs(float(loss) - LN2) < 1e-6
    np.testing.assert_array_equal(chosen, 0.0)
    np.testing.assert_array_equal(rejected, 0.0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_matches_numpy(beta):
    rng = np.random.RandomState(3)
    pc, pr, rc, rr = (rng.normal(size=16) * 20 - 50 for _ in range(4))
    loss, chosen, rejected = dpo_loss(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)),
                                      beta=beta)
    np_loss, np_chosen, np_rejected = np_dpo(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(float(loss), np_loss, rtol=1e-5)
    np.testing.assert_allclose(chosen, np_chosen, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rejected, np_rejected, rtol=1e-4, atol=1e-4)


def test_dpo_gradient_sign():
    pc, pr, rc, rr = (jnp.asarray(v) for v in ([-5.0, -9.0], [-6.0, -4.0], [-5.5, -8.0],
                                                [-6.5, -4.5]))
    g_chosen, g_rejected = jax.grad(lambda c, r: dpo_loss(c, r, rc, rr, 0.1)[0],
                                    argnums=(0, 1))(pc, pr)
    assert (np.asarray(g_chosen) < 0).all()  # raising log pi(y_w) lowers the loss
    assert (np.asarray(g_rejected) > 0).all()  # raising log pi(y_l) raises it
    base = float(dpo_loss(pc, pr, rc, rr, 0.1)[0])
    assert float(dpo_loss(pc + 1.0, pr, rc, rr, 0.1)[0]) < base
    # Closed form: d/d pc_i = -beta * (1 - sigmoid(margin_i)) / n.
    margin = 0.1 * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(g_chosen, -0.1 * (1 - 1 / (1 + np.exp(-margin))) / 2, rtol=1e-5)


# ------------------------------------------------------------------ KL estimators

@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_numpy(kind):
    rng = np.random.RandomState(4)
    logps = rng.normal(size=(4, 6)) - 3
    ref = logps + rng.normal(size=(4, 6)) * 0.7
    got = kl_penalty(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32), kind)
    assert got.shape == (4, 6) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_kl(logps, ref, kind), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_zero_when_equal(kind):
    logps = jnp.asarray(np.random.RandomState(5).normal(size=(3, 5)) - 2, jnp.float32)
    np.testing.assert_array_equal(kl_penalty(logps, logps, kind), 0.0)


def test_kl_k3_nonnegative():
    rng = np.random.RandomState(6)
    logps = rng.normal(size=(64, 64)) * 5
    ref = rng.normal(size=(64, 64)) * 5
    k3 = np.asarray(kl_penalty(jnp.asarray(logps), jnp.asarray(ref), "k3"))
    assert (k3 >= 0).all() and np.isfinite(k3).all()
    assert (np.asarray(kl_penalty(jnp.asarray(logps), jnp.asarray(ref), "k1")) < 0).any()


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("log_ratio", [1000.0, -1000.0])
def test_kl_clamp_keeps_finite(kind, log_ratio):
    ref = jnp.zeros((2, 3))
    logps = jnp.full((2, 3), log_ratio)
    got = np.asarray(kl_penalty(logps, ref, kind, clamp=10.0))
    assert np.isfinite(got).all() and (np.abs(got) <= 10.0).all()
    np.testing.assert_allclose(got, np_kl(np.full((2, 3), log_ratio), 0.0, kind), rtol=1e-6)
    grads = jax.grad(lambda x: kl_penalty(x, ref, kind).sum())(logps)
    assert np.isfinite(np.asarray(grads)).all()


def test_kl_unknown_kind_raises():
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4")


# ------------------------------------------------------------------ masked statistics

def test_masked_mean_and_var_match_numpy():
    rng = np.random.RandomState(7)
    x = rng.normal(size=(4, 9)) * 3 + 1
    mask = prefix_mask([9, 1, 5, 0], 9)
    np.testing.assert_allclose(float(masked_mean(jnp.asarray(x), jnp.asarray(mask))),
                               x[mask].mean(), rtol=1e-5)
    row_means = masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=1)
    np.testing.assert_allclose(row_means[:3], [x[b][mask[b]].mean() for b in range(3)],
                               rtol=1e-5)
    assert float(row_means[3]) == 0.0  # empty row: 0, not NaN
    # NaN / inf in padding must not leak in (a multiply by the mask would give NaN).
    garbage = np.where(mask, x, np.nan)
    garbage[1, 3] = np.inf
    np.testing.assert_allclose(float(masked_mean(jnp.asarray(garbage), jnp.asarray(mask))),
                               x[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(masked_var(jnp.asarray(garbage), jnp.asarray(mask))),
                               x[mask].var(ddof=1), rtol=1e-5)
    for unbiased, ddof in ((True, 1), (False, 0)):
        np.testing.assert_allclose(
            float(masked_var(jnp.asarray(x), jnp.asarray(mask), unbiased=unbiased)),
            x[mask].var(ddof=ddof), rtol=1e-5)


def test_masked_whiten():
    rng = np.random.RandomState(8)
    x = rng.normal(size=(5, 8)) * 4 + 3
    mask = prefix_mask([8, 3, 6, 1, 5], 8)
    white = np.asarray(masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(white[mask].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(white[mask].std(ddof=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(white[~mask], 0.0)
    expected = (x[mask] - x[mask].mean()) / x[mask].std(ddof=1)
    np.testing.assert_allclose(white[mask], expected, rtol=1e-4, atol=1e-5)
    # Padding values must not change the statistics (trlx whitened over padding too).
    padded = np.where(mask, x, 1e6)
    white_padded = np.asarray(masked_whiten(jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(white_padded, white, rtol=1e-6, atol=1e-6)
    # shift_mean=False keeps the mean: only the scale changes.
    kept = np.asarray(masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(kept[mask], expected + x[mask].mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(kept[~mask], 0.0)


def test_masked_whiten_is_independent_of_sharding():
    devices = np.array(jax.devices())
    assert len(devices) == 8  # conftest forces 8 host devices: sharding must be exercised
    rng = np.random.RandomState(9)
    n = len(devices)
    x = rng.normal(size=(2 * n, 6)).astype(np.float32)
    mask = prefix_mask(rng.randint(0, 7, size=2 * n), 6)
    sharding = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    xs, ms = jax.device_put(x, sharding), jax.device_put(mask, sharding)
    whiten = jax.jit(masked_whiten)
    np.testing.assert_allclose(whiten(xs, ms), masked_whiten(jnp.asarray(x), jnp.asarray(mask)),
                               rtol=1e-5, atol=1e-6)
    adv = rng.normal(size=x.shape).astype(np.float32)
    loss_fn = jax.jit(lambda a, b, c, m: ppo_policy_loss(a, b, c, m, 0.2)[0])
    sharded = loss_fn(xs, jax.device_put(x * 0.9, sharding), jax.device_put(adv, sharding), ms)
    local = loss_fn(jnp.asarray(x), jnp.asarray(x * 0.9), jnp.asarray(adv), jnp.asarray(mask))
    np.testing.assert_allclose(float(sharded), float(local), rtol=1e-6)


# ------------------------------------------------------------------ GAE

@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_numpy_loop(gamma, lam):
    rng = np.random.RandomState(10)
    length = 9
    lengths = [9, 4, 1, 0, 7]  # a full row (no EOS inside), short rows, an empty row
    mask = prefix_mask(lengths, length)
    rewards = rng.normal(size=(5, length))
    values = rng.normal(size=(5, length))
    adv, ret = gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                   jnp.asarray(mask), gamma, lam)
    assert adv.shape == ret.shape == (5, length)
    assert adv.dtype == ret.dtype == jnp.float32
    np_adv, np_ret = np_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, np_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, np_ret, rtol=1e-5, atol=1e-5)


def test_gae_reward_to_go_and_zero_outside_mask():
    rng = np.random.RandomState(11)
    mask = prefix_mask([6, 3, 5], 6)
    rewards = rng.normal(size=(3, 6))
    # Garbage rewards and values on padding must not matter.
    rewards_garbage = np.where(mask, rewards, 1e6)
    values_garbage = np.where(mask, 0.0, -1e6)
    adv, ret = gae(jnp.asarray(rewards_garbage, jnp.float32),
                   jnp.asarray(values_garbage, jnp.float32), jnp.asarray(mask), 1.0, 1.0)
    masked_rewards = np.where(mask, rewards, 0.0)
    reward_to_go = np.cumsum(masked_rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(np.asarray(adv)[mask], reward_to_go[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, np.where(mask, reward_to_go, 0.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(adv)[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(ret)[~mask], 0.0)


def test_gae_terminal_value_is_zero():
    # Single token episode: A = r - V (no bootstrap from the next, masked-out, position).
    mask = jnp.asarray([[True, False]])
    adv, ret = gae(jnp.asarray([[2.0, 5.0]]), jnp.asarray([[0.5, 100.0]]), mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, [[1.5, 0.0]])
    np.testing.assert_allclose(ret, [[2.0, 0.0]])


# ------------------------------------------------------------------ PPO policy loss

def test_ppo_policy_ratio_one():
    rng = np.random.RandomState(12)
    logps = rng.normal(size=(4, 7)) - 3
    adv = rng.normal(size=(4, 7))
    mask = prefix_mask([7, 2, 5, 4], 7)
    loss, stats = ppo_policy_loss(jnp.asarray(logps, jnp.float32),
                                  jnp.asarray(logps, jnp.float32),
                                  jnp.asarray(adv, jnp.float32), jnp.asarray(mask), 0.2)
    np.testing.assert_allclose(float(loss), -adv[mask].mean(), rtol=1e-5)
    assert float(stats["clip_fraction"]) == 0.0
    assert float(stats["ratio_mean"]) == 1.0
    assert float(stats["approx_kl"]) == 0.0


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_ppo_policy_matches_numpy(eps):
    rng = np.random.RandomState(13)
    old = rng.normal(size=(6, 10)) - 3
    logps = old + rng.normal(size=(6, 10)) * 0.3
    adv = rng.normal(size=(6, 10))
    mask = prefix_mask([10, 3, 7, 1, 9, 5], 10)
    loss, stats = ppo_policy_loss(*(jnp.asarray(a, jnp.float32) for a in (logps, old, adv)),
                                  jnp.asarray(mask), eps)
    np_loss, np_clipfrac, np_ratio = np_ppo_policy(logps, old, adv, mask, eps)
    np.testing.assert_allclose(float(loss), np_loss, rtol=1e-5)
    assert 0 < np_clipfrac < 1  # the data exercises both branches
    np.testing.assert_allclose(float(stats["clip_fraction"]), np_clipfrac, rtol=1e-6)
    np.testing.assert_allclose(float(stats["ratio_mean"]), np_ratio, rtol=1e-5)
    log_ratio = (logps - old)[mask]
    np.testing.assert_allclose(float(stats["approx_kl"]),
                               np.mean(np.exp(log_ratio) - 1 - log_ratio), rtol=1e-4)


def test_ppo_policy_clipping_by_hand():
    eps = 0.2
    mask = jnp.ones((1, 1), bool)

    def run(ratio, advantage):
        logp = jnp.asarray([[np.log(ratio)]], jnp.float32)
        fn = lambda lp: ppo_policy_loss(lp, jnp.zeros((1, 1)),  # noqa: E731
                                        jnp.asarray([[advantage]]), mask, eps)
        (loss, stats), grad = jax.value_and_grad(fn, has_aux=True)(logp)
        return float(loss), float(stats["clip_fraction"]), float(grad[0, 0])

    # A > 0, ratio above 1 + eps: clipped, loss -A * (1 + eps), no gradient.
    loss, frac, grad = run(1.5, 2.0)
    assert loss == pytest.approx(-2.0 * 1.2, rel=1e-6) and frac == 1.0 and grad == 0.0
    # A < 0, ratio below 1 - eps: clipped, loss -A * (1 - eps), no gradient.
    loss, frac, grad = run(0.5, -2.0)
    assert loss == pytest.approx(2.0 * 0.8, rel=1e-6) and frac == 1.0 and grad == 0.0
    # A > 0, ratio below 1 - eps: not clipped (pessimistic bound keeps the unclipped term).
    loss, frac, grad = run(0.5, 2.0)
    assert loss == pytest.approx(-2.0 * 0.5, rel=1e-6) and frac == 0.0 and grad != 0.0
    # A < 0, ratio above 1 + eps: not clipped.
    loss, frac, grad = run(1.5, -2.0)
    assert loss == pytest.approx(2.0 * 1.5, rel=1e-6) and frac == 0.0 and grad != 0.0


def test_ppo_policy_invariant_to_padding_and_finite_on_huge_log_ratio():
    rng = np.random.RandomState(14)
    old = rng.normal(size=(3, 5)) - 2
    logps = old + rng.normal(size=(3, 5)) * 0.4
    adv = rng.normal(size=(3, 5))
    mask = prefix_mask([5, 2, 4], 5)
    args = [jnp.asarray(a, jnp.float32) for a in (logps, old, adv)]
    loss, stats = ppo_policy_loss(*args, jnp.asarray(mask), 0.2)
    policy_grad = jax.jit(jax.grad(lambda *a: losses.ppo_policy_loss(*a, 0.2)[0]))
    grad = policy_grad(*args, jnp.asarray(mask))

    def pad(a, value):
        # Garbage in the row's own padding and in 4 extra masked-out columns, NaN/inf included.
        garbage = rng.normal(size=(3, 9)) * 1e4
        garbage[0, 5], garbage[1, 3] = value, value
        return np.concatenate([np.where(mask, a, garbage[:, :5]), garbage[:, 5:]], axis=1)

    mask_p = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
    args_p = [jnp.asarray(pad(a, v), jnp.float32)
              for a, v in ((logps, np.nan), (old, -np.inf), (adv, np.inf))]
    loss_p, stats_p = ppo_policy_loss(*args_p, jnp.asarray(mask_p), 0.2)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    for key in stats:
        np.testing.assert_allclose(float(stats_p[key]), float(stats[key]), rtol=1e-6)
    grad_p = policy_grad(*args_p, jnp.asarray(mask_p))
    np.testing.assert_allclose(np.asarray(grad_p)[:, :5], grad, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_p)[~mask_p], 0.0)
    # A log-ratio of 1000 is clamped before exp: finite loss and stats.
    huge, huge_stats = ppo_policy_loss(jnp.full((1, 2), 1000.0), jnp.zeros((1, 2)),
                                       jnp.asarray([[-1.0, 1.0]]), jnp.ones((1, 2), bool), 0.2)
    assert np.isfinite(float(huge))
    assert all(np.isfinite(float(v)) for v in huge_stats.values())


# ------------------------------------------------------------------ PPO value loss

@pytest.mark.parametrize("clip_value", [0.2, 0.5])
def test_ppo_value_loss_matches_numpy(clip_value):
    rng = np.random.RandomState(15)
    old = rng.normal(size=(4, 8))
    values = old + rng.normal(size=(4, 8)) * 0.5
    returns = rng.normal(size=(4, 8))
    mask = prefix_mask([8, 2, 6, 5], 8)
    loss, stats = ppo_value_loss(*(jnp.asarray(a, jnp.float32) for a in (values, old, returns)),
                                 jnp.asarray(mask), clip_value)
    np_loss, np_frac = np_ppo_value(values, old, returns, mask, clip_value)
    np.testing.assert_allclose(float(loss), np_loss, rtol=1e-5)
    assert 0 < np_frac < 1
    np.testing.assert_allclose(float(stats["value_clip_fraction"]), np_frac, rtol=1e-6)
    # Padding garbage does not change it.
    padded = [jnp.asarray(np.where(mask, a, 1e6), jnp.float32) for a in (values, old, returns)]
    loss_p, _ = ppo_value_loss(*padded, jnp.asarray(mask), clip_value)
    np.testing.assert_allclose(float(loss_p), float(loss), rtol=1e-6)
    # NaN in padding reaches neither the loss nor the critic's gradient.
    value_grad = jax.jit(jax.grad(lambda *a: losses.ppo_value_loss(*a, clip_value)[0]))
    clean = value_grad(*(jnp.asarray(a, jnp.float32) for a in (values, old, returns)),
                       jnp.asarray(mask))
    nan_padded = [jnp.asarray(np.where(mask, a, np.nan), jnp.float32)
                  for a in (values, old, returns)]
    np.testing.assert_allclose(value_grad(*nan_padded, jnp.asarray(mask)), clean, rtol=1e-6)
    assert np.isfinite(float(ppo_value_loss(*nan_padded, jnp.asarray(mask), clip_value)[0]))


def test_ppo_value_loss_clip_by_hand():
    # old 0, new 1, return 2, c 0.2: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 1.62.
    loss, stats = ppo_value_loss(jnp.asarray([[1.0]]), jnp.asarray([[0.0]]), jnp.asarray([[2.0]]),
                                 jnp.ones((1, 1), bool), 0.2)
    assert float(loss) == pytest.approx(0.5 * 3.24, rel=1e-6)
    assert float(stats["value_clip_fraction"]) == 1.0


# ------------------------------------------------------------------ entropy

def test_entropy_matches_numpy():
    rng = np.random.RandomState(16)
    logits = rng.normal(size=(3, 5, 13)) * 3
    logits[0, 0, :4] = -np.inf  # banned tokens: p = 0 must give 0, not NaN
    mask = prefix_mask([5, 1, 3], 5)
    got = entropy_from_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np_entropy(logits, mask), rtol=1e-5)
    grad = jax.grad(lambda lg: entropy_from_logits(lg, jnp.asarray(mask)))(
        jnp.asarray(logits, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all()
    uniform = entropy_from_logits(jnp.zeros((1, 2, 13)), jnp.ones((1, 2), bool))
    np.testing.assert_allclose(float(uniform), np.log(13), rtol=1e-6)
