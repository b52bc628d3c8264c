"""Losses of the training programs, as pure functions over arrays (shapes in docstrings).

The paper's equations (ChatGLM-RLHF, sections 3.3-3.4) and the functions that compute them:

  eq. (1)  pairwise reward-model loss -log sigmoid(r_w - r_l)   `reward_pairwise_loss`
  eq. (2)  L2 prior r_w^2 + r_l^2 on the reward scale           `reward_l2_prior`
  (1) + l2_coef * (2), what reward-model training minimises     `reward_model_loss`
  eq. (4)  per-token reward: -beta * KL on every response token
           plus the sequence score on the last one              `kl_penalised_token_rewards`
           (per-token KL estimators k1/k2/k3: `kl_penalty`)
  eq. (5)  score minus the reference response's reward          `reference_relative_reward`
  eq. (6)  the SFT term of PPO: next-token NLL on supervised
           data, as a token mean (the paper writes a sum; the
           coefficient is the caller's)                         `sft_loss`
  eq. (7)  DPO over the valid preference pairs                  `dpo_loss`

PPO (eq. 3 with a critic): `gae`, `ppo_policy_loss`, `ppo_value_loss`, `entropy_from_logits`.
Critic-free estimators (not wired into a trainer yet), for `[num_prompts * G]` sequence rewards
laid out prompt-major (G = num_generations consecutive rows per prompt): `grpo_advantages`
(GRPO; `scale_by_std=False` is Dr. GRPO), `rloo_advantages`, `reinforce_pp_advantages`
(REINFORCE++), each with an optional eq. (5) baseline; `groups_without_signal` (DAPO dynamic
sampling without refilling); `clipped_policy_loss` (asymmetric clip-higher and the loss
aggregation modes of `aggregate_loss`); `kl_loss` (GRPO's k3 KL as a loss term);
`overlong_penalty` (DAPO's soft overlong punishment).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp


def reward_pairwise_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
    """Paper eq. (1): mean over the (global) batch of `-log sigmoid(r_chosen - r_rejected)`.

    chosen_rewards, rejected_rewards: `[batch]` float (computed in float32).
    Returns a float32 scalar; exactly ln 2 when the rewards are equal, stable at any margin.
    """
    _check_shapes("reward_pairwise_loss", chosen_rewards, rejected_rewards)
    return jnp.mean(-jax.nn.log_sigmoid(_f32(chosen_rewards) - _f32(rejected_rewards)))


def reward_l2_prior(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> jax.Array:
    """Paper eq. (2): mean over the (global) batch of `r_chosen^2 + r_rejected^2`.

    A zero-mean Gaussian prior on the scores that keeps their scale from drifting (trl's
    "center rewards" penalises `(r_chosen + r_rejected)^2` instead: a different objective).
    chosen_rewards, rejected_rewards: `[batch]` float. Returns a float32 scalar.
    """
    _check_shapes("reward_l2_prior", chosen_rewards, rejected_rewards)
    return jnp.mean(_f32(chosen_rewards) ** 2 + _f32(rejected_rewards) ** 2)


def reward_model_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array,
                      l2_coef: float = 0.0) -> jax.Array:
    """Reward-model loss: eq. (1) + l2_coef * eq. (2), averaged over the (global) batch.

    chosen_rewards, rejected_rewards: `[batch]`. Returns a float32 scalar.
    """
    return (reward_pairwise_loss(chosen_rewards, rejected_rewards)
            + l2_coef * reward_l2_prior(chosen_rewards, rejected_rewards))


# ---------------------------------------------------------------------------------------------
# Policy optimisation (paper 3.4): SFT regulariser (eq. 6), DPO (eq. 7), KL penalty (eq. 4-5),
# PPO with GAE. Token contract: a response's mask covers its tokens up to and including EOS and
# no padding. Every average runs over the whole array it is given, which under jit is the global
# batch, so the value does not depend on how the batch is sharded. Masked-out entries are
# replaced by 0 with `jnp.where` *before* any arithmetic: garbage (even NaN/inf) in padding can
# then reach neither the value nor the gradient (a multiply by the mask would let NaN through).
# ---------------------------------------------------------------------------------------------

KLKind = Literal["k1", "k2", "k3"]
_KL_KINDS = ("k1", "k2", "k3")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(jnp.bool_)


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
    """`x` with 0 where `mask` (broadcast) is false: padding enters no arithmetic after this."""
    return jnp.where(mask, x, 0.0)


def _check_shapes(name: str, *arrays: jax.Array) -> None:
    # Shapes are static under jit, so this costs nothing and catches silent broadcasting
    # (e.g. a `[batch]` array against `[batch, length]`).
    shapes = {jnp.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{name}: arguments must share one shape, got {sorted(shapes)}")


def _token_count(mask: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
    # max(count, 1): an empty mask gives 0 (the masked sum is 0), never 0/0 = NaN.
    return jnp.maximum(jnp.sum(mask, axis=axis, dtype=jnp.float32), 1.0)


def masked_mean(x: jax.Array, mask: jax.Array,
                axis: int | tuple[int, ...] | None = None) -> jax.Array:
    """Mean of `x` over the entries where `mask` is true.

    x: any shape, any float dtype (computed in float32). mask: same shape as `x`, bool (or 0/1).
    axis: None reduces everything (under jit: the whole global batch), else the given axes.
    Returns float32 with `axis` reduced; 0 where the mask selects nothing.
    """
    x, mask = _f32(x), _bool(mask)
    _check_shapes("masked_mean", x, mask)
    return jnp.sum(_masked(x, mask), axis=axis) / _token_count(mask, axis)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of `x` over the entries where `mask` is true (all of them, one scalar).

    x: any shape, float (computed in float32). mask: same shape as `x`, bool.
    unbiased: divide by `count - 1` (Bessel) instead of `count`; with a single masked entry the
    divisor is clamped to 1 (a jitted function cannot raise on a data-dependent count).
    Returns a float32 scalar.
    """
    x, mask = _f32(x), _bool(mask)
    x = _masked(x, mask)
    mean = masked_mean(x, mask)
    # Centre only the masked entries; padding never enters the sum of squares.
    centred = jnp.where(mask, x - mean, 0.0)
    count = jnp.sum(mask, dtype=jnp.float32)
    divisor = jnp.maximum(count - 1.0, 1.0) if unbiased else jnp.maximum(count, 1.0)
    return jnp.sum(centred**2) / divisor


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """Normalise `x` to mean 0, std 1 over the masked entries; unmasked entries become 0.

    Statistics come from the masked entries of the whole array (= the global batch under jit);
    trlx whitened over padding too. The variance is the unbiased one (Bessel), so the masked
    entries of the result have sample std (ddof=1) 1.

    x: any shape, float (computed in float32). mask: same shape as `x`, bool.
    shift_mean: if False the mean is added back (only rescale: keeps the sign of the advantages).
    eps: added to the variance before the square root.
    Returns float32, same shape as `x`.
    """
    x, mask = _f32(x), _bool(mask)
    # Zeroed first: a NaN in the padding would otherwise enter (x - mean) * rsqrt(var) and
    # the variance's gradient, and from there every real token's gradient.
    x = _masked(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Log-probability of each token under its (untempered) logits, in float32.

    logits: `[batch, length, vocab]`, any float dtype, already aligned with `tokens` (the
    caller shifts). tokens: `[batch, length]`, int, in `[0, vocab)`.
    Returns `[batch, length]` float32, `log_softmax(logits)[..., token]`.
    """
    logits = _f32(logits)  # bf16 log-probs make DPO/PPO ratios NaN-prone: always float32
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    # logit[token] - logsumexp(logits) == log_softmax gathered at token, without materialising
    # a second `[batch, length, vocab]` array.
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(token_logps: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of the masked per-token log-probs of each sequence: log pi(y|x).

    token_logps: `[batch, length]` float. mask: `[batch, length]` bool (the response tokens).
    Returns `[batch]` float32.
    """
    token_logps, mask = _f32(token_logps), _bool(mask)
    _check_shapes("sequence_logprobs", token_logps, mask)
    return jnp.sum(jnp.where(mask, token_logps, 0.0), axis=-1)


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood over the masked positions (paper eq. 6 term).

    logits: `[batch, length, vocab]`, any float dtype (log_softmax runs in float32), aligned
    with `targets` (position t predicts targets[t]; the caller shifts).
    targets: `[batch, length]` int; values at unmasked positions are ignored (may be -100).
    loss_mask: `[batch, length]` bool, true where the target counts.
    Returns a float32 scalar: sum of NLL / max(global count of masked tokens, 1).
    """
    loss_mask = _bool(loss_mask)
    _check_shapes("sft_loss", targets, loss_mask)
    # Ignored targets may be out of range (-100); gathering them would give NaN/garbage, and
    # NaN logits at ignored positions would reach the gradient through log_softmax.
    safe_targets = jnp.where(loss_mask, targets, 0)
    nll = -token_logprobs(_masked(_f32(logits), loss_mask[..., None]), safe_targets)
    return masked_mean(nll, loss_mask)


def dpo_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array,
             ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array, beta: float,
             valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPO loss, paper eq. (7), averaged over the valid preference pairs of the (global) batch.

    All four log-prob arguments: `[batch]` float (computed in float32), sequence log-probs
    log pi(y|x) of the chosen (y_w) / rejected (y_l) response under the policy / the frozen
    reference pi_0 (see `sequence_logprobs`). beta: the KL-strength temperature.
    valid: `[batch]` bool, the pairs that count (None: all of them). An invalid pair's
    log-probs are replaced by 0 before any arithmetic, so nothing of it (even NaN) reaches the
    value or the gradient, and a batch without a valid pair gives loss 0 with gradient 0.
    Returns (loss: float32 scalar, chosen_rewards: `[batch]` float32,
    rejected_rewards: `[batch]` float32); the rewards are the implicit rewards
    beta * (log pi - log pi_0), gradient-stopped (they are for logging), 0 on invalid pairs.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    valid = jnp.ones(jnp.shape(policy_chosen_logps), bool) if valid is None else _bool(valid)
    _check_shapes("dpo_loss", *logps, valid)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        _masked(_f32(x), valid) for x in logps)
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    # -log_sigmoid is softplus(-z): stable for any margin, and exactly ln 2 at z = 0.
    loss = masked_mean(-jax.nn.log_sigmoid(chosen - rejected), valid)
    return loss, jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, kind: KLKind,
               clamp: float = 10.0) -> jax.Array:
    """Per-token estimator of KL(pi || pi_ref) from tokens sampled from pi (paper eq. 4-5).

    logps, ref_logps: `[batch, length]` float (computed in float32), log-probs of the sampled
    tokens under the policy and the reference model.
    kind: "k1" = log r with log r = logps - ref_logps (unbiased, can be negative);
    "k2" = 0.5 * (log r)^2 (biased, low variance); "k3" = exp(-log r) - 1 + log r
    (Schulman's unbiased, low-variance, always >= 0 estimator).
    clamp: the log-ratio is clamped to [-clamp, clamp] before use (exp cannot overflow) and the
    result is clamped to [-clamp, clamp] as well.
    Returns `[batch, length]` float32; the caller masks it.
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; valid kinds: {_KL_KINDS}")
    _check_shapes("kl_penalty", logps, ref_logps)
    log_ratio = jnp.clip(_f32(logps) - _f32(ref_logps), -clamp, clamp)
    if kind == "k1":
        kl = log_ratio
    elif kind == "k2":
        kl = 0.5 * log_ratio**2
    else:
        # exp(d) - 1 - d with d = ref - logps; expm1 keeps precision for small d.
        neg = -log_ratio
        kl = jnp.expm1(neg) - neg
    return jnp.clip(kl, -clamp, clamp)


def _check_per_sequence(name: str, per_sequence: jax.Array, mask: jax.Array) -> None:
    # A `[batch]` array next to a `[batch, length]` mask: catch a transposed or token-level one.
    if jnp.shape(per_sequence) != jnp.shape(mask)[:1]:
        raise ValueError(f"{name}: a per-sequence argument has shape {jnp.shape(per_sequence)}, "
                         f"expected [batch] = {jnp.shape(mask)[:1]} (the mask is "
                         f"{jnp.shape(mask)})")


def _last_index(mask: jax.Array) -> jax.Array:
    """`[batch, length]` bool -> `[batch]` int32, the last true position of each row (-1 if
    none)."""
    slots = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask, slots, -1), axis=-1)


def kl_penalised_token_rewards(scores: jax.Array, kl: jax.Array, response_mask: jax.Array,
                               kl_coef: float | jax.Array) -> jax.Array:
    """Paper eq. (4) per token: -kl_coef * kl on every response token, plus the sequence score
    on the last response token (the EOS, or the length limit's last token); 0 on padding.

    scores: `[batch]` float, the sequence reward r (eq. 5's `reference_relative_reward` or the
    raw reward-model score). kl: `[batch, length]` float, a per-token KL estimate
    (`kl_penalty`). response_mask: `[batch, length]` bool. kl_coef: beta (a scalar).
    Returns `[batch, length]` float32; a row with an empty mask is all 0.
    """
    _check_shapes("kl_penalised_token_rewards", kl, response_mask)
    _check_per_sequence("kl_penalised_token_rewards", scores, response_mask)
    mask = _bool(response_mask)
    on_last = jnp.arange(mask.shape[1])[None, :] == _last_index(mask)[:, None]
    rewards = -kl_coef * _masked(_f32(kl), mask) + jnp.where(on_last, _f32(scores)[:, None], 0.0)
    return _masked(rewards, mask)


def reference_relative_reward(scores: jax.Array, reference_rewards: jax.Array) -> jax.Array:
    """Paper eq. (5)'s baseline: the score of each response minus the reward of the reference
    response to the same prompt (generated once by the initial policy).

    scores, reference_rewards: `[batch]` float. Returns `[batch]` float32.
    """
    _check_shapes("reference_relative_reward", scores, reference_rewards)
    return _f32(scores) - _f32(reference_rewards)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens.

    rewards: `[batch, length]` float, the per-token reward (KL penalty on every token, score on
    the EOS token). values: `[batch, length]` float, the critic's V(s_t). mask: `[batch,
    length]` bool, the response tokens (a contiguous run, normally from position 0 to EOS
    inclusive, possibly the whole row). gamma: discount. lam: GAE lambda.
    The value after the last masked token is 0 (the episode ends at EOS, or at the length
    limit: truncated rows are not bootstrapped, the config decides their penalty instead).
    Returns (advantages, returns), both `[batch, length]` float32; 0 outside the mask, and
    returns = advantages + values on the mask.
    """
    _check_shapes("gae", rewards, values, mask)
    mask = _bool(mask)
    rewards = jnp.where(mask, _f32(rewards), 0.0)
    values = jnp.where(mask, _f32(values), 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        reward, value, live = xs
        delta = reward + gamma * next_value - value
        adv = delta + gamma * lam * next_adv
        # Outside the mask the episode has ended: reset the carry so the last masked token
        # sees next value 0 and next advantage 0 (also right for several runs in one row).
        adv = jnp.where(live, adv, 0.0)
        return (jnp.where(live, value, 0.0), adv), adv

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    # Scan over time (axis 1 -> leading axis), from the last position to the first.
    _, adv_t = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns


Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(per_token: jax.Array, mask: jax.Array,
                   aggregation: Aggregation = "token_mean",
                   norm_length: int | None = None) -> jax.Array:
    """Reduce a per-token loss to a scalar over the masked tokens of the whole (global) batch.

    per_token: `[batch, length]` float (computed in float32). mask: `[batch, length]` bool.
    aggregation: "token_mean": sum over all masked tokens / their count (DAPO: every token
    weighs the same); "seq_mean_token_mean": each sequence's masked token mean, then the mean
    over the sequences (GRPO: every sequence weighs the same); "seq_mean_token_sum_norm": each
    sequence's masked token sum / `norm_length`, then the mean over the sequences (Dr. GRPO: a
    constant divisor, so no length bias). The sequence means run over the rows with at least
    one masked token: a dropped row (all-false mask) does not dilute the loss.
    norm_length: the constant divisor of "seq_mean_token_sum_norm" (e.g. the max response
    length), a positive int; None: `length`, the padded response length.
    Returns a float32 scalar; 0 when the mask selects nothing.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {AGGREGATIONS}")
    if norm_length is not None and norm_length <= 0:
        raise ValueError(f"aggregate_loss: norm_length={norm_length} must be a positive "
                         "number of tokens (e.g. the max response length), or None")
    per_token, mask = _f32(per_token), _bool(mask)
    _check_shapes("aggregate_loss", per_token, mask)
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq_mean_token_mean":
        per_sequence = masked_mean(per_token, mask, axis=1)
    else:
        per_sequence = jnp.sum(_masked(per_token, mask), axis=1) / (norm_length or mask.shape[1])
    return masked_mean(per_sequence, jnp.any(mask, axis=1))


def clipped_policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                        mask: jax.Array, clip_low: float, clip_high: float,
                        aggregation: Aggregation = "token_mean",
                        norm_length: int | None = None, log_ratio_clamp: float = 20.0
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient surrogate with the ratio clipped to [1 - clip_low, 1 + clip_high].

    clip_low == clip_high is PPO's symmetric clip (`ppo_policy_loss`); clip_high > clip_low is
    DAPO's clip-higher (more room for raising unlikely tokens).
    logps: `[batch, length]` float, log-probs of the taken tokens under the current policy
    (differentiated). old_logps: `[batch, length]` float, the same under the sampling policy.
    advantages: `[batch, length]` float (a per-sequence `[batch]` advantage, as from
    `grpo_advantages`, broadcast with `jnp.broadcast_to(adv[:, None], mask.shape)`).
    mask: `[batch, length]` bool, the response tokens.
    aggregation, norm_length: how the per-token losses become a scalar (`aggregate_loss`).
    log_ratio_clamp: the log-ratio is clamped to [-c, c] before exp (no overflow to inf).
    Returns (loss: float32 scalar, stats) with float32 scalar stats, gradient-stopped, all
    token means: `clip_fraction` (masked fraction of tokens where the clipped branch is the
    larger loss), `approx_kl` (masked mean of the k3 estimator (ratio - 1) - log ratio:
    unbiased for KL(pi_old || pi) on tokens sampled from pi_old, always >= 0), `ratio_mean`.
    """
    _check_shapes("clipped_policy_loss", logps, old_logps, advantages, mask)
    mask = _bool(mask)
    logps = jnp.where(mask, _f32(logps), 0.0)
    old_logps = jnp.where(mask, _f32(old_logps), 0.0)
    advantages = jnp.where(mask, _f32(advantages), 0.0)

    log_ratio = jnp.clip(logps - old_logps, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    # Pessimistic bound: the larger loss. It is `clipped` exactly when the ratio has left the
    # trust region in the direction the advantage pushes it (A > 0 and ratio > 1 + clip_high,
    # or A < 0 and ratio < 1 - clip_low); there the gradient is 0.
    loss = aggregate_loss(jnp.maximum(unclipped, clipped), mask, aggregation, norm_length)

    stats = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, jax.lax.stop_gradient(stats)


def ppo_policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array,
                    mask: jax.Array, clip_ratio: float,
                    log_ratio_clamp: float = 20.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate: `clipped_policy_loss` with the symmetric clip
    [1 - clip_ratio, 1 + clip_ratio], averaged over the global count of response tokens.

    logps, old_logps, advantages: `[batch, length]` float; mask: `[batch, length]` bool (see
    `clipped_policy_loss`). Returns (loss: float32 scalar, stats: `clip_fraction`,
    `approx_kl`, `ratio_mean`, float32 scalars, gradient-stopped).
    """
    return clipped_policy_loss(logps, old_logps, advantages, mask, clip_ratio, clip_ratio,
                               log_ratio_clamp=log_ratio_clamp)


def ppo_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
                   mask: jax.Array,
                   clip_value: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss, averaged over the global count of response tokens.

    values: `[batch, length]` float, the critic's current predictions (differentiated).
    old_values: `[batch, length]` float, the predictions made at rollout time.
    returns: `[batch, length]` float, the GAE returns. mask: `[batch, length]` bool.
    clip_value: c; the new prediction may move at most c from the old one before clipping.
    Per token 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = old + clip(v - old, -c, c).
    Returns (loss: float32 scalar, stats) with `value_clip_fraction` (masked fraction of tokens
    where the clipped branch is the larger loss), a gradient-stopped float32 scalar.
    """
    _check_shapes("ppo_value_loss", values, old_values, returns, mask)
    mask = _bool(mask)
    values = jnp.where(mask, _f32(values), 0.0)
    old_values = jnp.where(mask, _f32(old_values), 0.0)
    returns = jnp.where(mask, _f32(returns), 0.0)

    v_clipped = old_values + jnp.clip(values - old_values, -clip_value, clip_value)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = masked_mean(0.5 * jnp.maximum(unclipped, clipped), mask)
    stats = {"value_clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask)}
    return loss, jax.lax.stop_gradient(stats)


def entropy_from_logits(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean of the per-token entropy of the softmax over `logits`, in float32.

    logits: `[batch, length, vocab]`, any float dtype; -inf entries (banned tokens) are fine.
    mask: `[batch, length]` bool, the tokens to average over.
    Returns a float32 scalar (nats).
    """
    _check_shapes("entropy_from_logits", logits[..., 0], mask)
    logits = _masked(_f32(logits), _bool(mask)[..., None])
    logp = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(logp)
    # A -inf logit has p = 0 and logp = -inf: 0 * -inf would be NaN (also in the gradient), so
    # zero logp there first; the term's limit p*log p -> 0 is the right value.
    safe_logp = jnp.where(probs > 0, logp, 0.0)
    entropy = -jnp.sum(probs * safe_logp, axis=-1)
    return masked_mean(entropy, mask)


# ---------------------------------------------------------------------------------------------
# Critic-free policy optimisation (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO). The sampler draws
# G = num_generations responses per prompt; sequence rewards are `[num_prompts * G]` laid out
# prompt-major (a prompt's G responses are consecutive rows), so a group is a reshape of the
# whole (global) array. `baseline` is eq. (5)'s reference reward, `[batch]`, subtracted first;
# one value per prompt cancels in a group's centring (GRPO, RLOO) but not across prompts
# (REINFORCE++'s batch normalisation).
# ---------------------------------------------------------------------------------------------


def _groups(name: str, rewards: jax.Array, num_generations: int,
            baseline: jax.Array | None) -> jax.Array:
    """`[num_prompts * G]` rewards (minus the baseline) -> `[num_prompts, G]` float32."""
    if (jnp.ndim(rewards) != 1 or num_generations < 1
            or jnp.shape(rewards)[0] % num_generations):
        raise ValueError(f"{name}: rewards of shape {jnp.shape(rewards)} are not "
                         f"[num_prompts * num_generations] with num_generations="
                         f"{num_generations}; give a positive num_generations and a batch of "
                         "whole groups (each prompt's responses on consecutive rows)")
    rewards = _f32(rewards) if baseline is None else reference_relative_reward(rewards, baseline)
    return rewards.reshape(-1, num_generations)


def _no_signal(groups: jax.Array, atol: float = 0.0) -> jax.Array:
    """`[num_prompts, G]` -> `[num_prompts]` bool, true where all G rewards are equal."""
    return jnp.max(groups, axis=1) - jnp.min(groups, axis=1) <= atol


def grpo_advantages(rewards: jax.Array, num_generations: int, scale_by_std: bool = True,
                    eps: float = 1e-6, baseline: jax.Array | None = None) -> jax.Array:
    """GRPO's group-relative advantage: (r - mean of its group) / (std of its group + eps).

    rewards: `[num_prompts * G]` float, sequence rewards, prompt-major. num_generations: G.
    scale_by_std: False gives Dr. GRPO (no division by the std, which over-weights groups of
    nearly equal rewards). eps: added to the std. The std is the unbiased one (ddof=1, as
    torch.std in GRPO's reference implementations); for G = 1 the divisor is clamped to 1.
    baseline: optional `[num_prompts * G]` reward to subtract first (eq. 5).
    A group of equal rewards gets exactly 0 (not rounding noise divided by eps).
    Returns `[num_prompts * G]` float32, one advantage per sequence (broadcast it over the
    response tokens for `clipped_policy_loss`).
    """
    groups = _groups("grpo_advantages", rewards, num_generations, baseline)
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if scale_by_std:
        var = jnp.sum(centred**2, axis=1, keepdims=True) / max(num_generations - 1, 1)
        centred = centred / (jnp.sqrt(var) + eps)
    # A group mean of equal floats can differ from them in the last bit.
    return jnp.where(_no_signal(groups)[:, None], 0.0, centred).reshape(-1)


def rloo_advantages(rewards: jax.Array, num_generations: int,
                    baseline: jax.Array | None = None) -> jax.Array:
    """RLOO's leave-one-out advantage: r minus the mean of the other G - 1 rewards of its group.

    rewards: `[num_prompts * G]` float, sequence rewards, prompt-major. num_generations: G >= 2.
    baseline: optional `[num_prompts * G]` reward to subtract first (eq. 5).
    A group of equal rewards gets exactly 0. Returns `[num_prompts * G]` float32.
    """
    if num_generations < 2:
        raise ValueError(f"rloo_advantages: num_generations={num_generations}, but the "
                         "leave-one-out baseline needs at least 2 responses per prompt; "
                         "sample num_generations >= 2")
    groups = _groups("rloo_advantages", rewards, num_generations, baseline)
    others = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (num_generations - 1)
    return jnp.where(_no_signal(groups)[:, None], 0.0, groups - others).reshape(-1)


def reinforce_pp_advantages(scores: jax.Array, kl: jax.Array, response_mask: jax.Array,
                            kl_coef: float | jax.Array, gamma: float = 1.0,
                            baseline: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
    """REINFORCE++: the discounted reward-to-go of eq. (4)'s per-token KL-penalised reward,
    normalised to mean 0, std 1 over all response tokens of the (global) batch.

    scores: `[batch]` float, sequence rewards. kl: `[batch, length]` float, a per-token KL
    estimate (`kl_penalty`). response_mask: `[batch, length]` bool. kl_coef: beta.
    gamma: discount of the reward-to-go. baseline: optional `[batch]` reward to subtract from
    the scores first (eq. 5). eps: added to the variance before the square root.
    Returns `[batch, length]` float32 token advantages, 0 outside the mask.
    """
    if baseline is not None:
        scores = reference_relative_reward(scores, baseline)
    rewards = kl_penalised_token_rewards(scores, kl, response_mask, kl_coef)
    # GAE with V = 0 and lambda = 1 is exactly the discounted reward-to-go.
    returns, _ = gae(rewards, jnp.zeros_like(rewards), response_mask, gamma, 1.0)
    return masked_whiten(returns, response_mask, eps=eps)


def groups_without_signal(rewards: jax.Array, num_generations: int,
                          atol: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """The groups whose G rewards are all equal (within `atol`): their group-relative advantage
    is 0, so they only dilute the batch. DAPO's dynamic sampling drops them (here without
    refilling the batch: the caller ANDs `keep` into the response mask).

    rewards: `[num_prompts * G]` float, prompt-major. num_generations: G. atol: max - min at or
    below which a group counts as equal.
    Returns (fraction: float32 scalar, the fraction of groups without signal; keep:
    `[num_prompts * G]` bool, false on every row of such a group).
    """
    no_signal = _no_signal(_groups("groups_without_signal", rewards, num_generations, None), atol)
    return jnp.mean(no_signal.astype(jnp.float32)), jnp.repeat(~no_signal, num_generations)


def kl_loss(logps: jax.Array, ref_logps: jax.Array, mask: jax.Array, coef: float | jax.Array,
            kind: KLKind = "k3", aggregation: Aggregation = "token_mean",
            norm_length: int | None = None) -> jax.Array:
    """KL(pi || pi_ref) as a loss term (GRPO), instead of a penalty inside the reward.

    logps: `[batch, length]` float, log-probs of the sampled tokens under the policy
    (differentiated). ref_logps: `[batch, length]` float, the same under the reference.
    mask: `[batch, length]` bool. coef: the coefficient (0 allowed: the term is 0).
    kind: the estimator (`kl_penalty`); GRPO uses "k3". aggregation, norm_length: as
    `aggregate_loss`. Returns a float32 scalar, coef * the aggregated masked estimate.
    """
    _check_shapes("kl_loss", logps, ref_logps, mask)
    mask = _bool(mask)
    # Zeroed before the estimator: its exp would turn padding garbage into a NaN gradient.
    kl = kl_penalty(_masked(_f32(logps), mask), _masked(_f32(ref_logps), mask), kind)
    return coef * aggregate_loss(kl, mask, aggregation, norm_length)


def overlong_penalty(lengths: jax.Array, max_length: int, cache_length: int) -> jax.Array:
    """DAPO's soft overlong punishment, added to the sequence reward.

    For a response of L tokens: 0 if L <= max_length - cache_length; a linear ramp
    (max_length - cache_length - L) / cache_length from 0 to -1 inside the buffer
    (max_length - cache_length < L <= max_length); -1 beyond max_length.
    lengths: `[batch]` int or float, response lengths in tokens. max_length: L_max.
    cache_length: L_cache, the buffer, in (0, max_length].
    Returns `[batch]` float32.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong_penalty: cache_length={cache_length} must be in "
                         f"(0, max_length={max_length}]: the penalty ramps from 0 to -1 over "
                         "the last cache_length tokens before max_length")
    lengths = _f32(lengths)
    start = max_length - cache_length
    ramp = jnp.where(lengths <= start, 0.0, (start - lengths) / cache_length)
    return jnp.where(lengths > max_length, -1.0, ramp)


# ---------------------------------------------------------------------------------------------
# Chunked-vocabulary log-probs. GLM-4's vocabulary (151,552) makes `[batch, length, vocab]`
# float32 logits the largest array of a training step (8 x 2048 tokens: 9.3 GiB), so these
# functions take the final hidden states and the LM head kernel and compute the logits of
# `chunk_size` positions at a time. Each chunk body is rematerialised (`jax.checkpoint`): the
# backward pass recomputes a chunk's logits instead of saving them, so either pass holds only a
# few `[batch, chunk, vocab]` buffers (a scan without the checkpoint would save all of them).
# ---------------------------------------------------------------------------------------------


def _chunk_logprobs(hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array,
                    with_entropy: bool) -> tuple[jax.Array, jax.Array | None]:
    """One chunk: hidden `[batch, chunk, embed]`, tokens `[batch, chunk]` -> `[batch, chunk]`
    float32 log-probs (and entropies, else None)."""
    # The same contraction as GlmForCausalLM.logits, so the values match the unchunked model.
    logits = jnp.einsum("bce,ve->bcv", hidden, lm_head, preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    # A gather, as token_logprobs: XLA partitions it over a vocab-sharded head (masked local
    # gather + all-reduce, no all-gather), and on CPU it keeps fewer chunk-sized temporaries
    # than a one-hot select (measured: 3 vs 6 `[batch, chunk, vocab]` buffers with entropy).
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    if not with_entropy:
        return picked - logz, None
    logp = logits - logz[..., None]
    # Logits are finite, so logp is finite and p * logp never forms 0 * -inf (NaN).
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return picked - logz, entropy


def chunked_token_logprobs(hidden: jax.Array, lm_head: jax.Array, tokens: jax.Array, *,
                           chunk_size: int = 256, with_entropy: bool = False
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """`token_logprobs(hidden @ lm_head.T, tokens)` without materialising the logits.

    hidden: `[batch, length, embed]`, the compute dtype (e.g. bfloat16 or float32), the final
    (normed) hidden states aligned with `tokens` (position t scores tokens[t]; the caller
    shifts). lm_head: `[vocab, embed]` kernel (output-major, as GlmForCausalLM.lm_head), already
    cast to the compute dtype by the caller. tokens: `[batch, length]` int in `[0, vocab)`.
    chunk_size: positions per chunk; the length is padded to a multiple of it (the padding is
    computed on and dropped). Temporaries: a few `[batch, chunk_size, vocab]` float32 arrays
    (3 measured on XLA:CPU) plus, in the backward, the `lm_head` gradient accumulator.
    with_entropy: also return the per-token entropy of the softmax (nats).
    Returns `[batch, length]` float32 log pi(token), or (logps, entropy) both `[batch, length]`
    float32. Differentiable w.r.t. `hidden` and `lm_head`.
    """
    batch, length, embed = hidden.shape
    if tokens.shape != (batch, length):
        raise ValueError(f"chunked_token_logprobs: tokens {tokens.shape} do not match hidden "
                         f"{hidden.shape[:2]}")
    if lm_head.ndim != 2 or lm_head.shape[1] != embed:
        raise ValueError(f"chunked_token_logprobs: lm_head {lm_head.shape} is not [vocab, "
                         f"{embed}]")
    chunk = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    tokens = tokens.astype(jnp.int32)
    if pad:
        # Zero hidden states give finite (zero) logits and token 0 is valid: padding is harmless.
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    # Chunks on the leading axis for scan: [num_chunks, batch, chunk, ...].
    hidden_c = hidden.reshape(batch, num_chunks, chunk, embed).swapaxes(0, 1)
    tokens_c = tokens.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    # Without the checkpoint, scan's backward would keep every chunk's logits (softmax) as
    # residuals: the full logits tensor again, just stacked.
    body = jax.checkpoint(lambda h, t: _chunk_logprobs(h, lm_head, t, with_entropy))
    _, (logps_c, entropy_c) = jax.lax.scan(lambda c, xs: (c, body(*xs)), None,
                                           (hidden_c, tokens_c))

    def unchunk(x: jax.Array) -> jax.Array:
        return x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]

    if not with_entropy:
        return unchunk(logps_c)
    return unchunk(logps_c), unchunk(entropy_c)
