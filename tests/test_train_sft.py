"""SFT end to end: the loss covers response tokens only, the model learns and generates what it
was taught from the exported checkpoint, the same step on any mesh, and exact resume."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TAUGHT, tiny_sft_config
from flax import nnx

import glm_jax
from glm_jax.data import GLM4_TEMPLATE, SFTDataset, Tokenizer
from glm_jax.generation import generate_text
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_state, to_device
from glm_jax.train.sft import make_train_step, sft_batch_loss, train_sft
from glm_jax.train.state import init_train_state, make_optimizer, shardings_of

ROOT = Path(__file__).resolve().parents[1]

def test_sft_loss_covers_only_response_targets():
    tokenizer = Tokenizer.tiny()
    batch = SFTDataset(TAUGHT, tokenizer, GLM4_TEMPLATE, batch_size=8, max_prompt_tokens=16,
                       max_response_tokens=8, shuffle=False)[0]
    model = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    loss, _ = sft_batch_loss(model, batch)
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll, count = 0.0, 0
    for row in range(8):
        for t in np.nonzero(batch["loss_mask"][row])[0]:  # each response token, EOS included
            nll -= logp[row, t - 1, batch["input_ids"][row, t]]
            count += 1
    assert count == sum(len(tokenizer.encode(e.response)) + 1 for e in TAUGHT)
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sft")
    config = tiny_sft_config(tmp_path, num_steps=120, learning_rate=3e-3, eval_every=60,
                             checkpoint_every=60, log_every=1000)
    return config, tmp_path / "w", train_sft(config, tmp_path / "w")


def test_sft_learns_and_the_exported_model_generates_it(trained):
    _, workdir, final = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < 0.1 < evals[0] * 20
    model = glm_jax.from_pretrained(workdir / "hf")
    texts = generate_text(model, Tokenizer.from_dir(workdir / "hf"),
                          [e.prompt for e in TAUGHT], max_new_tokens=8, temperature=0.0)
    assert texts == [e.response for e in TAUGHT]


def test_resume_gives_the_same_losses(tmp_path):
    config = tiny_sft_config(tmp_path, num_steps=6, checkpoint_every=3, log_every=1000)
    train_sft(config, tmp_path / "straight")
    config.sft.num_steps = 3
    train_sft(config, tmp_path / "resumed")
    # As if the first run had died after logging steps past its last checkpoint (step 3).
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    config.sft.num_steps = 6
    train_sft(config, tmp_path / "resumed")

    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")  # bit-identical
    assert len(losses(tmp_path / "straight")) == 6


def test_sft_step_is_the_same_on_any_mesh():
    batch = SFTDataset(TAUGHT, Tokenizer.tiny(), GLM4_TEMPLATE, batch_size=8,
                       max_prompt_tokens=16, max_response_tokens=8, shuffle=False)[0]
    batch = {k: v for k, v in batch.items() if k != "task_index"}

    def two_steps(mesh):
        graphdef, state = nnx.split(glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))
        model = nnx.merge(graphdef, shard_state(state, mesh))
        tx, schedule = make_optimizer(learning_rate=1e-3, num_steps=10)
        losses = []
        with jax.set_mesh(mesh):
            graphdef, train_state = init_train_state(model, tx)
            shardings = batch_sharding(mesh, batch)
            step = make_train_step(graphdef, tx, schedule, shardings_of(train_state), shardings)
            for _ in range(2):
                train_state, metrics = step(train_state, to_device(batch, shardings))
                losses.append(float(metrics["loss"]))
        return losses

    reference = two_steps(make_mesh((1, 1, 1), jax.devices()[:1]))
    for shape in [(8, 1, 1), (2, 2, 2)]:
        np.testing.assert_allclose(two_steps(make_mesh(MeshConfig(*shape))), reference,
                                   rtol=1e-5)


def test_missing_train_file(tmp_path):
    config = tiny_sft_config(tmp_path)
    config.sft.train_file = ""
    with pytest.raises(ValueError, match="config.sft.train_file is empty"):
        train_sft(config, tmp_path / "w")
