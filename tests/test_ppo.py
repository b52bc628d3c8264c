"""The fused PPO iteration: the token contract (reward on EOS, never on padding), ratio 1 on
the first minibatch, zero KL against itself, which models change, the same iteration on any
mesh, and a tiny policy that learns a toy reward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    RL_PROMPT_TOKENS,
    RL_RESPONSE_TOKENS,
    TokenCountReward,
    ppo_config,
    rl_prompts,
    run_rl_iterations,
    single_device,
)
from flax import nnx

from glm_jax.data import GLM4_TEMPLATE, PromptExample, Tokenizer
from glm_jax.generation import GenerationOutput
from glm_jax.losses import kl_penalised_token_rewards, kl_penalty
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import MeshConfig, make_mesh
from glm_jax.train.rollout import encode_prompts, sequence

PROMPT_TOKENS, RESPONSE_TOKENS = RL_PROMPT_TOKENS, RL_RESPONSE_TOKENS
# One configuration for most tests, so its program compiles once per mesh: adaptive KL
# (k3, always >= 0) with a target below any real KL.
BASE = dict(kl_kind="k3", kl_coef=0.1, kl_target=1e-6, kl_horizon=10)
TOKENIZER = Tokenizer.tiny()


prompts = rl_prompts
run_iterations = run_rl_iterations


def test_reward_sits_on_the_eos_token():
    response_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    kl = np.full(response_mask.shape, 0.5, np.float32)
    scores = np.array([3.0, -2.0, 7.0], np.float32)
    rewards = np.asarray(kl_penalised_token_rewards(scores, kl, response_mask, jnp.float32(0.1)))
    expected = np.where(response_mask, -0.05, 0.0)
    expected[0, 2] += 3.0  # EOS at index 2
    expected[1, 4] += -2.0  # no EOS: the length limit's last token
    expected[2, 0] += 7.0
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)


def test_reward_model_reads_the_response_end_not_padding():
    """The score of a left-padded prompt + response + padding after its EOS equals the reward
    model's score of exactly the real tokens laid out contiguously (as in RM training)."""
    ids, mask = prompts(6, seed=1)
    rng = np.random.RandomState(0)
    tokens = rng.randint(10, 400, size=(6, RESPONSE_TOKENS)).astype(np.int32)
    response_mask = np.ones_like(tokens, bool)
    for row, eos_at in enumerate([0, 2, 5, RESPONSE_TOKENS - 1]):  # rows 4, 5: no EOS
        tokens[row, eos_at] = TOKENIZER.eos_token_ids[0]
        tokens[row, eos_at + 1:] = TOKENIZER.pad_token_id
        response_mask[row, eos_at + 1:] = False
    out = GenerationOutput(tokens=tokens, response_mask=response_mask,
                           logprobs=np.zeros(tokens.shape, np.float32),
                           ended_with_eos=response_mask.sum(1) < RESPONSE_TOKENS)
    seq_ids, seq_mask = (np.asarray(x) for x in sequence(ids, mask, out))
    packed_ids = np.full_like(seq_ids, TOKENIZER.pad_token_id)
    packed_mask = np.zeros_like(seq_mask)
    for row in range(len(ids)):
        real = seq_ids[row][seq_mask[row]]
        assert len(real) == mask[row].sum() + response_mask[row].sum()
        packed_ids[row, :len(real)], packed_mask[row, :len(real)] = real, True
    reward_model = GlmRewardModel(tiny_config(), rngs=nnx.Rngs(2))
    score = nnx.jit(lambda model, ids, mask: model(ids, mask))
    np.testing.assert_allclose(score(reward_model, seq_ids, seq_mask),
                               score(reward_model, packed_ids, packed_mask), atol=1e-5)


@pytest.fixture(scope="module")
def base_run():
    return run_iterations(single_device(), ppo_config(**BASE), 2)


def test_kl_is_zero_when_policy_equals_reference(base_run):
    history, *_ = base_run
    # The first iteration samples with the initial policy, which is the reference.
    assert history[0]["kl"] == 0.0
    assert history[1]["kl"] > 0.0
    logps = np.random.RandomState(0).normal(size=(3, 5)).astype(np.float32)
    for kind in ("k1", "k2", "k3"):
        assert np.all(np.asarray(kl_penalty(logps, logps, kind)) == 0.0)


def test_first_minibatch_ratio_is_one_and_only_trained_models_change(base_run):
    history, before, after, state = base_run
    for metrics in history:
        assert metrics["first_ratio_max_deviation"] <= 1e-6
        assert metrics["sampler_logp_diff"] < 1e-4  # generator and trainer agree
    assert int(state.step) == 2

    def changed(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b), strict=True))

    policy, critic, reference, reward = zip(before, after, strict=True)
    assert changed(*policy) and changed(*critic)
    assert not changed(*reference) and not changed(*reward)


def test_adaptive_kl_controller_moves_towards_the_target(base_run):
    history, *_ = base_run
    coefs = [h["kl_coef"] for h in history]
    step = 0.2 * 8 / 10  # the 20% error clip times batch_size / horizon
    assert coefs[0] == pytest.approx(0.1)
    # Iteration 0 has KL 0 < target: the coefficient shrinks by the clipped step.
    assert coefs[1] == pytest.approx(0.1 * (1 - step), rel=1e-6)
    final = float(base_run[3].kl_coef)  # iteration 1's KL >> target: it grows
    assert final == pytest.approx(coefs[1] * (1 + step), rel=1e-6)


KEYS = ["loss", "policy_loss", "value_loss", "reward", "kl", "entropy", "approx_kl",
        "explained_variance", "response_length"]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_same_iteration_on_any_mesh(base_run, shape):
    history, *_ = run_iterations(make_mesh(MeshConfig(*shape)), ppo_config(**BASE), 2)
    np.testing.assert_allclose([[h[k] for k in KEYS] for h in history],
                               [[h[k] for k in KEYS] for h in base_run[0]], rtol=2e-4,
                               atol=1e-5)


def test_step_by_step_equals_fused(base_run):
    split, *_ = run_iterations(single_device(), ppo_config(**BASE), 2, fused=False)
    np.testing.assert_allclose([[h[k] for k in KEYS] for h in split],
                               [[h[k] for k in KEYS] for h in base_run[0]], rtol=1e-4,
                               atol=1e-6)


def test_tiny_policy_raises_a_toy_reward():
    # 64 of the 448 ids score: a random policy gets ~8 * 64 / 448 = 1.1 per response.
    config = ppo_config(kl_coef=0.0, ppo_epochs=4)
    config.ppo.update(batch_size=16, minibatch_size=8)
    history, *_ = run_iterations(single_device(), config, 15,
                                 reward_model=TokenCountReward(100, 164, PROMPT_TOKENS),
                                 learning_rate=3e-3)
    rewards = [h["reward"] for h in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 2.0, rewards


def test_train_ppo_end_to_end_with_caches_and_resume(tmp_path, capsys):
    from conftest import tiny_rm_config

    from glm_jax.data import SFTExample, write_jsonl
    from glm_jax.train.checkpoint import load_trained_model
    from glm_jax.train.ppo import train_ppo
    from glm_jax.train.reward import train_reward_model

    rm_config = tiny_rm_config(tmp_path, num_steps=4, eval_every=0, checkpoint_every=4,
                               eval_file="")
    train_reward_model(rm_config, tmp_path / "rm")
    examples = [PromptExample(f"question {i}", task=["a", "b"][i % 2]) for i in range(12)]
    write_jsonl(tmp_path / "prompts.jsonl", examples)
    write_jsonl(tmp_path / "sft.jsonl", [SFTExample(f"name {i}", "apple") for i in range(8)])
    config = ppo_config(prompt_file=str(tmp_path / "prompts.jsonl"),
                        reward_model=str(tmp_path / "rm"), num_steps=2, checkpoint_every=1,
                        filter_samples=3, filter_min_variance=0.0,
                        sft_file=str(tmp_path / "sft.jsonl"), sft_coef=0.5, sft_batch_size=2)
    config.data.max_prompt_tokens, config.data.max_response_tokens = PROMPT_TOKENS, 8
    workdir = tmp_path / "ppo"
    train_ppo(config, workdir)

    # Reference responses: one per prompt, and the cached reward is the reward model's score
    # of prompt + response tokens.
    import json

    records = [json.loads(line) for line in
               (workdir / "reference_responses.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [e.prompt for e in examples]
    ids, mask = encode_prompts(examples, TOKENIZER, GLM4_TEMPLATE, PROMPT_TOKENS)
    length = PROMPT_TOKENS + 8
    rows = [list(ids[i][mask[i]]) + r["response_tokens"] for i, r in enumerate(records)]
    seq = np.full((len(rows), length), TOKENIZER.pad_token_id, np.int32)
    seq_mask = np.zeros(seq.shape, bool)
    for i, row in enumerate(rows):
        seq[i, :len(row)], seq_mask[i, :len(row)] = row, True
    reward_model = load_trained_model(tmp_path / "rm", GlmRewardModel)
    np.testing.assert_allclose([r["reward"] for r in records],
                               nnx.jit(lambda m, a, b: m(a, b))(reward_model, seq, seq_mask),
                               atol=1e-4)
    # The filter kept what its cached rewards say (min variance 0: everything).
    filtered = [json.loads(line) for line in
                (workdir / "prompt_filter.jsonl").read_text().splitlines()]
    assert len(filtered) == 12 and all(len(r["rewards"]) == 3 for r in filtered)

    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward", "reference_reward", "reward_minus_reference", "kl", "entropy",
                "clip_fraction", "approx_kl", "value_loss", "explained_variance",
                "response_length", "ended_with_eos", "sft_loss", "kl_coef"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert all(m["reward_minus_reference"] == pytest.approx(
        m["reward"] - m["reference_reward"], abs=1e-5) for m in metrics)
    assert (workdir / "hf" / "model.safetensors").exists()

    # A longer rerun resumes at iteration 2 and reuses both caches.
    capsys.readouterr()
    config.ppo.num_steps = 3
    train_ppo(config, workdir)
    out = capsys.readouterr().out
    assert "reference responses: reusing" in out and "prompt filter: reusing" in out
    assert "resumed from step 2" in out
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]


def test_train_ppo_bad_config(tmp_path):
    from glm_jax.train.ppo import train_ppo

    config = ppo_config()
    with pytest.raises(ValueError, match="config.ppo.prompt_file is empty"):
        train_ppo(config, tmp_path)
    config.ppo.update(prompt_file="p.jsonl", reward_model="rm", minibatch_size=3)
    with pytest.raises(ValueError, match="= 8 sequences per iteration is not a multiple of "
                                         "config.ppo.minibatch_size=3"):
        train_ppo(config, tmp_path)
    config.ppo.update(minibatch_size=4, sft_coef=0.1)
    with pytest.raises(ValueError, match="needs config.ppo.sft_file"):
        train_ppo(config, tmp_path)


def test_ppo_update_with_a_nan_learning_rate_leaves_the_parameters_finite():
    config = ppo_config()
    history, before, after, state = run_iterations(single_device(), config, 1,
                                                   learning_rate=float("nan"))
    settings = config.ppo
    assert history[0]["skipped_nonfinite"] == (settings.ppo_epochs * settings.batch_size
                                               // settings.minibatch_size)
    for a, b in zip(jax.tree.leaves(before[:2]), jax.tree.leaves(after[:2]), strict=True):
        np.testing.assert_array_equal(a, b)  # policy and critic untouched
