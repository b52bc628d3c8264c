"""LoRA in the training stages: only the adapters (and a scalar head) change, checkpoints hold
only them, resume is bit-identical, the exports compute what the adapted model does, and the
objectives go up."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    dpo_config,
    recorded_losses,
    straight_and_resumed,
    tiny_rm_config,
    tiny_sft_config,
)
from flax import nnx

import glm_jax
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel
from glm_jax.models.lora import load_adapter
from glm_jax.sharding import make_mesh
from glm_jax.train.checkpoint import load_trained_model
from glm_jax.train.common import model_from_config
from glm_jax.train.dpo import train_dpo
from glm_jax.train.reward import train_reward_model
from glm_jax.train.sft import train_sft


def with_lora(config, rank=4, targets="q,k,v,o,gate,up,down", roles="sft,reward,policy,critic"):
    config.model.lora.update(rank=rank, alpha=2.0 * rank, targets=targets, roles=roles)
    return config


def stored_names(workdir, step):
    """The parameter names in a checkpoint's metadata (what it holds)."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(workdir / "checkpoints" / str(step) /
                                                      "state")
    tree = getattr(metadata, "tree", metadata)
    return {leaf.name.removesuffix(".value") for leaf in jax.tree.leaves(tree)
            if hasattr(leaf, "name")}


def flat(module_or_state):
    state = module_or_state if isinstance(module_or_state, nnx.State) else \
        nnx.state(module_or_state)
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora_sft")
    config = with_lora(tiny_sft_config(tmp_path, num_steps=40, learning_rate=1e-2,
                                       eval_every=20, checkpoint_every=20, log_every=1000))
    config.model.frozen_dtype = "bfloat16"
    train_sft(config, tmp_path / "w")
    return config, tmp_path / "w"


def test_lora_sft_trains_only_the_adapters(lora_sft):
    config, workdir = lora_sft
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    # The tiny random model's LM head and norms are frozen: its logits stay within a few
    # nats of uniform whatever the adapters do, so the loss goes down, not to zero.
    assert evals[-1] < evals[0] - 0.2, evals
    # The checkpoint holds the adapters (their optimizer moments too), no base weight.
    names = stored_names(workdir, 40)
    params = {n for n in names if n.startswith("params.")}
    assert params and all("_lora_" in n for n in params), sorted(params)[:5]
    assert not any("embed_tokens" in n or "_kernel" in n.split(".")[-1] for n in names)
    # Only the adapters moved: the merged export minus the initial weights is B A.
    initial = flat(model_from_config(config, "lm", make_mesh(), role="sft"))
    trained = load_trained_model(workdir, GlmForCausalLM, overrides={"param_dtype": "bfloat16"})
    after = flat(trained)
    for name, value in initial.items():
        if "_lora_" not in name:  # the frozen base, stored in bfloat16, equal to it
            np.testing.assert_array_equal(after[name], value, err_msg=name)
            assert after[name].dtype == np.dtype("bfloat16"), name
    assert any(np.abs(after[n] - initial[n]).max() > 1e-3 for n in initial if "_lora_b" in n)


def test_lora_sft_exports_the_merged_model_and_a_peft_adapter(lora_sft):
    _, workdir = lora_sft
    trained = load_trained_model(workdir, GlmForCausalLM, overrides={"param_dtype": "bfloat16"})
    ids = np.random.RandomState(0).randint(2, 100, (2, 9))
    expected = np.asarray(trained(ids))
    merged = glm_jax.from_pretrained(workdir / "hf")
    assert merged.config.lora_rank == 0
    np.testing.assert_allclose(np.asarray(merged(ids)), expected, atol=2e-4)
    adapter_dir = workdir / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    # The adapter onto the base it was trained on (here in float32) gives the trained model.
    config, _ = lora_sft
    plain = type(config)(config.to_dict())
    plain.model.lora.rank = 0
    again = load_adapter(adapter_dir, model_from_config(plain, "lm", make_mesh()))
    np.testing.assert_allclose(np.asarray(again(ids)),
                               np.asarray(load_trained_model(workdir, GlmForCausalLM)(ids)),
                               atol=1e-5)


def test_lora_sft_resume_is_bit_identical(tmp_path):
    config = with_lora(tiny_sft_config(tmp_path, log_every=1000, eval_file=""))
    straight_and_resumed(train_sft, config, "sft", tmp_path, steps=6)


def test_resuming_adapters_on_another_base_is_refused(tmp_path):
    config = with_lora(tiny_sft_config(tmp_path, num_steps=2, checkpoint_every=2,
                                       log_every=1000, eval_file=""))
    train_sft(config, tmp_path / "w")
    config.sft.num_steps, config.seed = 4, 1  # another seed: another tiny base
    with pytest.raises(ValueError, match=r"adapters trained on another base model"):
        train_sft(config, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ["2"]


def test_lora_reward_model_trains_adapters_and_head_and_loads_back(tmp_path):
    config = with_lora(tiny_rm_config(tmp_path, num_steps=60, learning_rate=5e-3,
                                      eval_every=0, log_every=1000), rank=8)
    metrics = train_reward_model(config, tmp_path / "rm")
    assert metrics["eval"]["accuracy"] >= 0.9, metrics["eval"]
    names = {n for n in stored_names(tmp_path / "rm", 60) if n.startswith("params.")}
    assert {"params.head_kernel", "params.head_bias"} <= names
    assert all("_lora_" in n or "head_" in n for n in names)
    # Loaded back (base from the run's config), frozen in bfloat16 as PPO loads it.
    model = load_trained_model(tmp_path / "rm", GlmRewardModel,
                               overrides={"param_dtype": "bfloat16"})
    assert model.config.lora_rank == 8
    full = load_trained_model(tmp_path / "rm", GlmRewardModel)
    ids = np.random.RandomState(1).randint(2, 100, (3, 12))
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(full(ids)), atol=0.05)


def test_lora_dpo_raises_the_implicit_reward_accuracy(tmp_path):
    config = with_lora(dpo_config(tmp_path, num_steps=30, learning_rate=5e-3, eval_every=0,
                                  log_every=1000))
    metrics = train_dpo(config, tmp_path / "dpo")
    assert metrics["eval"]["reward_accuracy"] >= 0.9, metrics["eval"]
    names = {n for n in stored_names(tmp_path / "dpo", 30) if n.startswith("params.")}
    assert names and all("_lora_" in n for n in names)


@pytest.mark.parametrize("field,value,message", [
    ("targets", "q,qkv", r"config.model.lora.targets = 'q,qkv': must be comma-separated names "
                         r"among q, k, v, o, gate, up, down"),
    ("roles", "policy,referee", r"config.model.lora.roles = 'policy,referee'"),
    ("dropout", 1.0, r"config.model.lora.dropout = 1.0: must be in \[0, 1\)"),
    ("rank", -1, r"config.model.lora.rank = -1: must be >= 0"),
])
def test_lora_config_errors_name_the_field(tmp_path, field, value, message):
    from glm_jax.config import validate_config

    config = tiny_sft_config(tmp_path)
    config.model.lora[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_lora_dropout_trains_on_dropped_inputs_and_resumes_bit_identically(tmp_path):
    """With dropout the training losses differ from the run without (the adapters read a
    dropped input), the evaluation does not drop (the same eval loss from the same weights),
    and a resumed run drops what the uninterrupted one did."""
    losses = {}
    for rate in (0.0, 0.3):
        config = with_lora(tiny_sft_config(tmp_path, num_steps=4, checkpoint_every=2,
                                           log_every=1000, eval_file="", learning_rate=1e-2))
        config.model.lora.dropout = rate
        train_sft(config, tmp_path / f"straight{rate}")
        losses[rate] = recorded_losses(tmp_path / f"straight{rate}")
    # Step 1: B = 0, the adapters add nothing whatever their input; later steps differ.
    assert losses[0.3][0] == losses[0.0][0] and losses[0.3][2:] != losses[0.0][2:]
    config.sft.num_steps = 2
    train_sft(config, tmp_path / "resumed")
    config.sft.num_steps = 4
    train_sft(config, tmp_path / "resumed")
    assert recorded_losses(tmp_path / "resumed") == losses[0.3]
