"""Reward-model training end to end: learns a separable preference, same loss on any mesh,
checkpoints that load back, and the scripts around it."""

import json

import jax
import numpy as np
import pytest
from conftest import separable_pairs, tiny_rm_config
from flax import nnx

from glm_jax.data.chat_template import GLM4_TEMPLATE
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.models.heads import GlmRewardModel
from glm_jax.sharding import MeshConfig, batch_sharding, make_mesh, to_device
from glm_jax.train.checkpoint import load_trained_model
from glm_jax.train.reward import make_train_step, pair_rewards, train_reward_model
from glm_jax.train.state import init_train_state, make_optimizer, shardings_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm")
    config = tiny_rm_config(tmp_path, num_steps=60, eval_every=30, checkpoint_every=30,
                            learning_rate=2e-3)
    workdir = tmp_path / "workdir"
    final = train_reward_model(config, workdir)
    return config, workdir, final


def test_reward_model_learns_a_separable_preference(trained):
    _, workdir, final = trained
    assert final["eval"]["accuracy"] > 0.9, final["eval"]
    assert final["eval"]["pairs"] == 64
    assert set(final["eval"]["per_task"]) == {"alpha", "beta"}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert np.mean([r["loss"] for r in train[-10:]]) < np.mean([r["loss"] for r in train[:10]])
    assert [r["step"] for r in records if "eval_accuracy" in r] == [30, 60]


def test_trained_model_loads_back_with_the_same_rewards(trained, tmp_path):
    config, workdir, final = trained
    model = load_trained_model(workdir, GlmRewardModel)
    tokenizer = Tokenizer.from_dir(workdir)
    from glm_jax.train.reward import eval_batches, score_pairs, summarize_scores

    pairs = separable_pairs(64, seed=1)
    batches, tasks = eval_batches(pairs, tokenizer, GLM4_TEMPLATE, config)
    graphdef, params = nnx.split(model)
    summary = summarize_scores(score_pairs(graphdef, params, batches, make_mesh((1, 1, 1),
                                                                                jax.devices()[:1])),
                               tasks)
    assert summary["accuracy"] == pytest.approx(final["eval"]["accuracy"])
    assert summary["margin"] == pytest.approx(final["eval"]["margin"], rel=1e-4)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_train_step_is_the_same_on_any_mesh(tmp_path, shape):
    from glm_jax.models.tiny import tiny_config

    config = tiny_rm_config(tmp_path)
    from glm_jax.train.reward import dataset_from_config

    dataset = dataset_from_config(separable_pairs(32, 0), Tokenizer.tiny(), GLM4_TEMPLATE,
                                  config, shuffle=False)
    batch = {k: v for k, v in dataset[0].items() if k != "task_index"}

    def two_steps(mesh):
        model = GlmRewardModel(tiny_config(), rngs=nnx.Rngs(0))
        from glm_jax.sharding import shard_state

        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, shard_state(state, mesh))
        tx, schedule = make_optimizer(learning_rate=1e-3, num_steps=10)
        with jax.set_mesh(mesh):
            graphdef, train_state = init_train_state(model, tx)
            shardings = batch_sharding(mesh, batch)
            step = make_train_step(graphdef, tx, schedule, 0.01, shardings_of(train_state),
                                   shardings)
            losses = []
            for _ in range(2):
                train_state, metrics = step(train_state, to_device(batch, shardings))
                losses.append(float(metrics["loss"]))
            rewards = pair_rewards(nnx.merge(graphdef, train_state.params),
                                   to_device(batch, shardings))
        return losses, np.asarray(rewards[0])

    ref_losses, ref_rewards = two_steps(make_mesh((1, 1, 1), jax.devices()[:1]))
    losses, rewards = two_steps(make_mesh(MeshConfig(*shape)))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(rewards, ref_rewards, atol=1e-5)


def test_missing_train_file_is_a_clear_error(tmp_path):
    config = tiny_rm_config(tmp_path)
    config.rm.train_file = ""
    with pytest.raises(ValueError, match="config.rm.train_file is empty"):
        train_reward_model(config, tmp_path / "w")


def test_summary_of_scores_by_hand():
    from glm_jax.train.reward import PairScores, summarize_scores

    scores = PairScores(
        chosen=np.array([2.0, 0.5, 1.0, 3.0], np.float32),
        rejected=np.array([1.0, 1.5, 1.0, 0.0], np.float32),
        chosen_length=np.array([10, 8, 6, 7]), rejected_length=np.array([8, 9, 6, 7]),
        task_index=np.array([0, 0, 1, 1]))
    summary = summarize_scores(scores, ["a", "b"])
    assert summary["accuracy"] == 0.5 and summary["margin"] == pytest.approx(0.75)
    # Pairs 0 and 1 differ in length: the longer scores higher in pair 0 (10 > 8, 2 > 1)
    # and in pair 1 (9 > 8, 1.5 > 0.5); pairs 2 and 3 have equal lengths.
    assert summary["longer_preferred"] == 1.0
    all_scores = np.array([2.0, 0.5, 1.0, 3.0, 1.0, 1.5, 1.0, 0.0])
    lengths = np.array([10, 8, 6, 7, 8, 9, 6, 7])
    assert summary["length_correlation"] == pytest.approx(np.corrcoef(all_scores, lengths)[0, 1])
    # Within pairs: score differences (1, -1, 0, 3) against length differences (2, -1, 0, 0).
    assert summary["pair_length_correlation"] == pytest.approx(3 / np.sqrt(11 * 5))
    assert summary["per_task"]["a"]["longer_preferred"] == 1.0
    assert np.isnan(summary["per_task"]["b"]["longer_preferred"])
