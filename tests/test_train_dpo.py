"""DPO end to end: the loss starts at ln 2, cached reference log-probs equal a full forward
pass, implicit rewards learn a separable preference, the same step on any mesh."""

import json

import jax
import numpy as np
import pytest
from conftest import LIMITS, dpo_config, separable_pairs
from flax import nnx

import glm_jax
from glm_jax.data import GLM4_TEMPLATE, PreferenceDataset, Tokenizer
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_state, to_device
from glm_jax.train.dpo import WithReference, make_train_step, reference_logps, train_dpo
from glm_jax.train.state import init_train_state, make_optimizer, shardings_of


def np_sequence_logps(model, ids, mask, response_mask):
    logits = np.asarray(model(ids, mask), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    out = []
    for row in range(len(ids)):
        positions = np.nonzero(response_mask[row])[0]
        out.append(sum(logp[row, t - 1, ids[row, t]] for t in positions))
    return np.array(out)


def test_reference_logps_equal_a_full_forward_pass():
    pairs = separable_pairs(10, seed=3)
    model = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    dataset = PreferenceDataset(pairs, Tokenizer.tiny(), GLM4_TEMPLATE, batch_size=4,
                                shuffle=False, num_epochs=1, drop_remainder=False, **LIMITS)
    graphdef, params = nnx.split(model)
    reference = reference_logps(graphdef, params, dataset, make_mesh((1, 1, 1),
                                                                     jax.devices()[:1]), 10, 4)
    full = PreferenceDataset(pairs, Tokenizer.tiny(), GLM4_TEMPLATE, batch_size=10,
                             shuffle=False, num_epochs=1, **LIMITS)[0]
    for column, name in enumerate(("chosen", "rejected")):
        expected = np_sequence_logps(model, full[f"{name}_ids"], full[f"{name}_mask"],
                                     full[f"{name}_response_mask"])
        np.testing.assert_allclose(reference[:, column], expected, rtol=1e-5)



def test_dpo_starts_at_ln2_and_learns_the_preference(tmp_path):
    config = dpo_config(tmp_path, num_steps=40, learning_rate=2e-3, beta=0.5, eval_every=40,
                        checkpoint_every=40, log_every=1000)
    final = train_dpo(config, tmp_path / "w")
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text()
               .splitlines()]
    first = records[0]
    assert first["step"] == 1
    assert first["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert final["eval"]["reward_accuracy"] > 0.9, final["eval"]
    assert (tmp_path / "w" / "hf" / "model.safetensors").exists()


def test_dpo_step_is_the_same_on_any_mesh():
    pairs = separable_pairs(16, seed=5)
    dataset = PreferenceDataset(pairs, Tokenizer.tiny(), GLM4_TEMPLATE, batch_size=8,
                                shuffle=False, **LIMITS)
    rng = np.random.RandomState(0)
    reference = rng.normal(size=(16, 2)).astype(np.float32) - 30.0
    batch = next(WithReference(iter(dataset), reference))
    batch = {k: v for k, v in batch.items() if k not in ("task_index", "pair_index")}

    def two_steps(mesh):
        graphdef, state = nnx.split(glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))
        model = nnx.merge(graphdef, shard_state(state, mesh))
        tx, schedule = make_optimizer(learning_rate=1e-3, num_steps=10)
        losses = []
        with jax.set_mesh(mesh):
            graphdef, train_state = init_train_state(model, tx)
            shardings = batch_sharding(mesh, batch)
            step = make_train_step(graphdef, tx, schedule, 0.1, 0.5, shardings_of(train_state),
                                   shardings)
            for _ in range(2):
                train_state, metrics = step(train_state, to_device(batch, shardings))
                losses.append(float(metrics["loss"]))
        return losses

    reference_losses = two_steps(make_mesh((1, 1, 1), jax.devices()[:1]))
    for shape in [(8, 1, 1), (2, 2, 2)]:
        np.testing.assert_allclose(two_steps(make_mesh(MeshConfig(*shape))), reference_losses,
                                   rtol=1e-5)


def test_missing_train_file(tmp_path):
    config = dpo_config(tmp_path)
    config.dpo.train_file = ""
    with pytest.raises(ValueError, match="config.dpo.train_file is empty"):
        train_dpo(config, tmp_path / "w")
