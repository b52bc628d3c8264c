"""The critic-free algorithms (GRPO, Dr. GRPO, RLOO, REINFORCE++) in the fused RL program:
their advantages inside the program against numpy, ratio 1 on the first minibatch, no critic
and (with a fixed KL coefficient of 0) no reference, the same iteration on any mesh, config
errors, and a tiny policy that learns a toy reward."""

import jax
import numpy as np
import pytest
from conftest import (
    RL_PROMPT_TOKENS,
    TokenCountReward,
    build_rl,
    ppo_config,
    rl_prompts,
    run_rl_iterations,
    single_device,
)

from glm_jax.config import validate_config
from glm_jax.sharding import MeshConfig, make_mesh
from glm_jax.train.rl import RLSettings

GROUP = 4
# One configuration per algorithm, so each program compiles once per mesh: 4 prompts x 4
# responses, minibatches of 8, k3 KL against the reference.
BASE = dict(batch_size=4, num_generations=GROUP, minibatch_size=8, kl_kind="k3",
            kl_coef=0.1)


def config_of(algorithm, **ppo):
    return ppo_config(algorithm=algorithm, **{**BASE, **ppo})


def grpo_numpy(scores, group, scale_by_std=True):
    groups = scores.reshape(-1, group).astype(np.float64)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    return centred.reshape(-1)


def rloo_numpy(scores, group):
    groups = scores.reshape(-1, group).astype(np.float64)
    others = (groups.sum(axis=1, keepdims=True) - groups) / (group - 1)
    return (groups - others).reshape(-1)


def scored(config, raw_scores, ref_reward=None):
    """The program's experience and stats for one rollout, with `raw_scores` `[N]` given (as
    rule rewards are)."""
    program, state, frozen = build_rl(single_device(), config)
    ids, mask = rl_prompts(config.ppo.batch_size)
    ref = np.zeros(len(ids), np.float32) if ref_reward is None else ref_reward
    batch = {"prompt_ids": ids, "prompt_mask": mask, "ref_reward": ref}
    rollout = jax.jit(program.rollout)(state, batch)
    experience, stats = jax.jit(program.score)(state, frozen, rollout, batch,
                                               np.asarray(raw_scores, np.float32))
    return jax.device_get((rollout, experience, stats))


@pytest.mark.parametrize("algorithm,scale_by_std", [("grpo", True), ("grpo", False),
                                                   ("rloo", True)])
def test_group_advantages_inside_the_program_match_numpy(algorithm, scale_by_std):
    # KL in the loss (GRPO's default) or coefficient 0: the scores alone decide.
    config = config_of(algorithm, scale_by_std=scale_by_std, kl_in="loss")
    rng = np.random.RandomState(0)
    raw = rng.normal(size=16).astype(np.float32)
    ref = rng.normal(size=4).astype(np.float32)  # eq. 5's baseline, one per prompt
    rollout, experience, stats = scored(config, raw, ref)
    scores = raw - np.repeat(ref, GROUP)
    expected = (grpo_numpy(scores, GROUP, scale_by_std) if algorithm == "grpo"
                else rloo_numpy(scores, GROUP))
    mask = rollout.response_mask
    np.testing.assert_allclose(experience.advantages,
                               np.where(mask, expected[:, None], 0.0), rtol=1e-4, atol=1e-5)
    assert experience.old_values is None and experience.returns is None
    assert experience.ref_logps is not None  # the KL is a loss term
    assert stats["reward_minus_reference"] == pytest.approx(scores.mean(), abs=1e-5)


def test_rollout_samples_num_generations_per_prompt_prompt_major():
    rollout, *_ = scored(config_of("grpo"), np.zeros(16))
    ids, _ = rl_prompts(4)
    np.testing.assert_array_equal(rollout.prompt_ids, np.repeat(ids, GROUP, axis=0))
    # Sampled, not copied: the responses to one prompt differ.
    assert len({tuple(row) for row in rollout.tokens[:GROUP]}) > 1


def test_equal_reward_groups_are_reported_and_optionally_masked():
    raw = np.arange(16, dtype=np.float32)
    raw[4:8] = 2.0  # prompt 1's four responses: equal rewards, no signal
    for mask_equal in (False, True):
        rollout, experience, stats = scored(config_of("rloo", mask_equal_groups=mask_equal),
                                            raw)
        assert stats["equal_reward_groups"] == pytest.approx(0.25)
        np.testing.assert_array_equal(experience.advantages[4:8], 0.0)
        kept = experience.response_mask
        np.testing.assert_array_equal(kept[4:8], False if mask_equal
                                      else rollout.response_mask[4:8])
        np.testing.assert_array_equal(kept[:4], rollout.response_mask[:4])


def test_reinforce_pp_normalises_the_kl_penalised_return_over_the_batch():
    rng = np.random.RandomState(1)
    raw = rng.normal(size=16).astype(np.float32)
    rollout, experience, stats = scored(config_of("reinforce_pp", gamma=1.0), raw)
    mask = rollout.response_mask
    adv = experience.advantages
    assert adv[mask].mean() == pytest.approx(0.0, abs=1e-5)
    assert adv[mask].std(ddof=1) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(adv[~mask], 0.0)
    # With gamma 1 the return at the first token is the score minus the whole sequence's
    # KL penalty; the first iteration's policy is the reference, so the KL is 0 and the
    # return is the score for every token of a sequence.
    assert stats["kl"] == 0.0
    first = adv[:, 0]
    order = np.argsort(raw)
    assert np.all(np.diff(first[order]) > 0)  # normalisation keeps the order of the scores


def test_group_algorithms_refuse_one_generation():
    config = config_of("grpo", num_generations=1, minibatch_size=4)
    with pytest.raises(ValueError, match="config.ppo.num_generations = 1: must be >= 2 "
                                         "with algorithm 'grpo' or 'rloo'"):
        validate_config(config)
    with pytest.raises(ValueError, match="needs num_generations >= 2"):
        RLSettings.from_config(config)
    config.ppo.algorithm = "reinforce_pp"  # its baseline is the batch: one response is fine
    validate_config(config)
    with pytest.raises(ValueError, match="config.ppo.algorithm = 'gpro'; valid values: ppo"):
        validate_config(config_of("gpro"))


@pytest.fixture(scope="module")
def grpo_run():
    return run_rl_iterations(single_device(), config_of("grpo", clip_high=0.28), 2)


def test_grpo_trains_only_the_policy_with_ratio_one_first(grpo_run):
    history, before, after, state = grpo_run
    for metrics in history:
        assert metrics["first_ratio_max_deviation"] <= 1e-6
        assert "value_loss" not in metrics and "kl_loss" in metrics
    assert state.critic_params is None and state.critic_opt_state is None

    def changed(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                          jax.tree.leaves(b), strict=True))

    policy, critic, reference, reward = zip(before, after, strict=True)
    assert changed(*policy)
    assert critic == (None, None)
    assert not changed(*reference) and not changed(*reward)
    # The first iteration samples with the reference itself: zero KL, then some.
    assert history[0]["kl"] == 0.0 and history[1]["kl"] > 0.0


def test_kl_coefficient_zero_runs_no_reference():
    program, state, frozen = build_rl(single_device(), config_of("grpo", kl_coef=0.0))
    assert set(frozen) == {"reward"}
    history, *_ = run_rl_iterations(single_device(), config_of("grpo", kl_coef=0.0), 1)
    assert "kl" not in history[0] and "kl_loss" not in history[0]


KEYS = ["loss", "policy_loss", "kl_loss", "reward", "kl", "entropy", "approx_kl",
        "clip_fraction", "equal_reward_groups", "response_length"]


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_same_grpo_iteration_on_any_mesh(grpo_run, shape):
    history, *_ = run_rl_iterations(make_mesh(MeshConfig(*shape)),
                                    config_of("grpo", clip_high=0.28), 2)
    np.testing.assert_allclose([[h[k] for k in KEYS] for h in history],
                               [[h[k] for k in KEYS] for h in grpo_run[0]], rtol=2e-4,
                               atol=1e-5)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_tiny_policy_raises_a_toy_reward(algorithm):
    # 64 of the 448 ids score: a random policy gets ~8 * 64 / 448 = 1.1 per response.
    config = config_of(algorithm, kl_coef=0.0, ppo_epochs=4, minibatch_size=8)
    history, *_ = run_rl_iterations(single_device(), config, 15,
                                    reward_model=TokenCountReward(100, 164, RL_PROMPT_TOKENS),
                                    learning_rate=3e-3)
    rewards = [h["reward"] for h in history]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 1.5, rewards


def test_train_grpo_end_to_end_resumes(tmp_path, capsys):
    import json

    from conftest import tiny_rm_config

    from glm_jax.data import PromptExample, write_jsonl
    from glm_jax.train.ppo import train_ppo
    from glm_jax.train.reward import train_reward_model

    train_reward_model(tiny_rm_config(tmp_path, num_steps=2, eval_every=0, checkpoint_every=2,
                                      eval_file=""), tmp_path / "rm")
    write_jsonl(tmp_path / "prompts.jsonl", [PromptExample(f"question {i}") for i in range(8)])
    config = config_of("grpo", prompt_file=str(tmp_path / "prompts.jsonl"),
                       reward_model=str(tmp_path / "rm"), num_steps=2, checkpoint_every=1,
                       reference_reward=False)
    config.data.max_prompt_tokens, config.data.max_response_tokens = RL_PROMPT_TOKENS, 8
    workdir = tmp_path / "grpo"
    train_ppo(config, workdir)
    config.ppo.num_steps = 3
    capsys.readouterr()
    train_ppo(config, workdir)
    assert "resumed from step 2" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward", "kl", "kl_loss", "equal_reward_groups", "clip_fraction"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert not any("value_loss" in m for m in metrics)
    assert (workdir / "hf" / "model.safetensors").exists()


def letter_e(prompt, response):
    """A toy verifiable reward: how many times the letter e occurs in the response."""
    return response.count("e")


def test_tiny_policy_raises_a_rule_reward_through_train_ppo(tmp_path):
    import json

    from glm_jax.data import PromptExample, write_jsonl
    from glm_jax.rewards import register
    from glm_jax.train.ppo import train_ppo

    register("test_letter_e")(letter_e)
    write_jsonl(tmp_path / "prompts.jsonl", [PromptExample(f"question {i}") for i in range(8)])
    # 57 of the 448 tiny tokens hold an "e": a random policy writes about one per response.
    config = config_of("grpo", prompt_file=str(tmp_path / "prompts.jsonl"),
                       reward_rule="test_letter_e", reference_reward=False, kl_coef=0.0,
                       ppo_epochs=4, learning_rate=3e-3, num_steps=15, checkpoint_every=100)
    config.data.max_prompt_tokens, config.data.max_response_tokens = RL_PROMPT_TOKENS, 8
    train_ppo(config, tmp_path / "rlvr")
    rewards = [json.loads(line)["reward"] for line in
               (tmp_path / "rlvr" / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 15
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 1.5, rewards


def test_rule_reward_errors_name_the_rule_and_the_response():
    from glm_jax.data import PromptExample
    from glm_jax.rewards import get_rule, score_texts

    with pytest.raises(ValueError, match="config.ppo.reward_rule = 'nope' is not a registered "
                                         "reward rule: give a registered rule \\(.*world_gold"):
        get_rule("nope")
    with pytest.raises(ValueError, match="'glm_jax.losses:nope': cannot load it"):
        get_rule("glm_jax.losses:nope")
    assert get_rule("test_critic_free:letter_e")(None, "eve") == 2  # module:function
    prompts = [PromptExample("p")]
    with pytest.raises(ValueError, match="reward rule 'r' returned nan for prompt 'p' with "
                                         "response 'x'"):
        score_texts(lambda p, t: float("nan"), "r", prompts, ["x"])
    with pytest.raises(ValueError, match="reward rule 'r' failed on prompt 'p' with response "
                                         "'x': KeyError"):
        score_texts(lambda p, t: {}[t], "r", prompts, ["x"])


def test_world_gold_rule_is_the_worlds_gold_quality():
    from glm_jax.data import PromptExample
    from glm_jax.pipeline.world import gold_quality
    from glm_jax.rewards import get_rule

    rule = get_rule("world_gold")
    prompt = PromptExample("add 2 and 3")
    assert rule(prompt, "5") == gold_quality("add 2 and 3", "5") == 1.0
    assert rule(prompt, "the answer is 7") == pytest.approx(gold_quality("add 2 and 3",
                                                                         "the answer is 7"))
    assert rule(prompt, "the answer is 7") < 1.0


def test_rule_rewards_score_the_reference_responses_and_the_prompt_filter(tmp_path):
    import json

    from glm_jax.data import PromptExample, write_jsonl
    from glm_jax.rewards import register
    from glm_jax.train.ppo import train_ppo

    register("test_letter_e")(letter_e)
    write_jsonl(tmp_path / "prompts.jsonl", [PromptExample(f"question {i}") for i in range(8)])
    config = config_of("rloo", prompt_file=str(tmp_path / "prompts.jsonl"),
                       reward_rule="test_letter_e", reference_reward=True, filter_samples=2,
                       filter_min_variance=0.0, num_steps=1, batch_size=8, num_generations=2)
    config.data.max_prompt_tokens, config.data.max_response_tokens = RL_PROMPT_TOKENS, 8
    train_ppo(config, tmp_path / "w")
    references = [json.loads(line) for line in
                  (tmp_path / "w" / "reference_responses.jsonl").read_text().splitlines()]
    assert len(references) == 8
    assert [r["reward"] for r in references] == [r["response"].count("e") for r in references]
    assert any(r["reward"] > 0 for r in references)
    filtered = [json.loads(line) for line in
                (tmp_path / "w" / "prompt_filter.jsonl").read_text().splitlines()]
    assert all(len(r["rewards"]) == 2 and all(float(v).is_integer() for v in r["rewards"])
               for r in filtered)
    # The one iteration's batch holds all 8 prompts: its reference reward is their mean.
    metrics = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
    expected = np.mean([r["reward"] for r in references])
    assert metrics["reference_reward"] == pytest.approx(expected, abs=1e-5)
