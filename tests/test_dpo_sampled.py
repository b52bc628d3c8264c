"""DPO on pairs built by a reward model (paper 3.4): pair selection, the reward_pairs mode end to
end, the online step (ln 2 at the start, a zero update without pairs, the same on any mesh) and
online DPO raising a toy reward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import dpo_config
from flax import nnx

import glm_jax
from glm_jax.data import GLM4_TEMPLATE, Tokenizer, write_jsonl
from glm_jax.data.records import PromptExample, read_jsonl
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import batch_sharding, make_mesh, shard_state, to_device
from glm_jax.train.checkpoint import Checkpointer, save_model_config
from glm_jax.train.common import save_tokenizer
from glm_jax.train.dpo import (
    PAIRS_FILE,
    make_online_step,
    pairs_from_samples,
    reward_pairs,
    select_pairs,
    train_dpo,
)
from glm_jax.train.prompts import PromptDataset
from glm_jax.train.rollout import SamplingSettings, ScoredSamples, encode_prompts
from glm_jax.train.state import init_train_state, shardings_of

PROMPTS = [PromptExample(prompt=f"item {i}", task=["alpha", "beta"][i % 2])
           for i in range(24)]


def save_reward_workdir(path, model):
    """`model` as a reward-model workdir that `load_trained_model` reads back (with the
    tokenizer, which `load_reward_model` compares with the policy's)."""
    _, state = init_train_state(model, optax.identity())
    checkpointer = Checkpointer(path / "checkpoints")
    checkpointer.save(0, state)
    checkpointer.close()
    save_model_config(model.config, path)
    save_tokenizer(Tokenizer.tiny(), path)
    return path


def random_reward_model(seed=1, scale=30.0):
    """A random reward model; the head is scaled up so rewards of different responses differ
    by O(1) (the default init gives O(0.01))."""
    model = GlmRewardModel(tiny_config(), rngs=nnx.Rngs(seed))
    model.head_kernel[...] = model.head_kernel[...] * scale
    return model


def eos_reward_model():
    """A reward model whose score is +1 when the sequence ends on an EOS token, -1 otherwise.

    With every attention output and MLP down projection zeroed, the residual stream is the token
    embedding (the post norms of a zero vector are zero), so the score at the last token is
    a function of that token alone: norm(+-1 vector) . (1/d) = +-1.
    """
    config = tiny_config()
    model = GlmRewardModel(config, rngs=nnx.Rngs(0))
    layers = model.model.layers  # every layer's parameters, stacked
    layers.self_attn.o_kernel[...] = jnp.zeros_like(layers.self_attn.o_kernel[...])
    layers.mlp.down_kernel[...] = jnp.zeros_like(layers.mlp.down_kernel[...])
    sign = np.full((config.vocab_size, 1), -1.0, np.float32)
    sign[list(config.eos_token_id)] = 1.0
    model.model.embed_tokens[...] = jnp.asarray(sign * np.ones((1, config.hidden_size)))
    model.head_kernel[...] = jnp.full((config.hidden_size,), 1.0 / config.hidden_size)
    model.head_bias[...] = jnp.zeros(())
    return model


def sampled_config(tmp_path, reward_workdir, **dpo):
    config = dpo_config(tmp_path, **dpo)
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    config.dpo.update(prompt_file=str(tmp_path / "prompts.jsonl"),
                      reward_model=str(reward_workdir), eval_file="")
    return config


# ---------------------------------------------------------------------------------------------
# Pair selection.
# ---------------------------------------------------------------------------------------------

def test_select_pairs_matches_a_brute_force_choice():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(64, 5)).astype(np.float32)
    rewards[:8] = rewards[:8, :1]  # all samples alike: never a pair, whatever the margin
    candidates = rng.random((64, 5)) > 0.3
    for margin in (0.0, 0.5, 2.0):
        best, worst, valid = (np.asarray(x) for x in select_pairs(rewards, margin, candidates))
        for row, allowed in zip(range(64), candidates, strict=True):
            index = np.flatnonzero(allowed)
            if len(index) < 2:
                assert not valid[row]
                continue
            scores = rewards[row, index]
            assert rewards[row, best[row]] == scores.max()
            assert rewards[row, worst[row]] == scores.min()
            assert allowed[best[row]] and allowed[worst[row]]
            assert valid[row] == (scores.max() - scores.min() > margin)
        assert not valid[:8].any()


def test_pairs_from_samples_pairs_best_with_worst_above_the_margin():
    rng = np.random.default_rng(1)
    n, k, margin = 12, 4, 0.8
    rewards = rng.normal(size=(n, k)).astype(np.float32)
    texts = [[f"answer {i}.{j}" for j in range(k)] for i in range(n)]
    texts[3][int(np.argmax(rewards[3]))] = "  "  # an empty response is never paired
    samples = ScoredSamples(tokens=np.zeros((n, k, 2), np.int32),
                            response_mask=np.ones((n, k, 2), bool),
                            ended_with_eos=np.ones((n, k), bool), rewards=rewards)
    prompts = [PromptExample(prompt=f"q{i}", history=(("hi", "hello"),), task="t")
               for i in range(n)]
    pairs = pairs_from_samples(prompts, samples, texts, margin)
    by_prompt = {int(p.pair.id): p for p in pairs}
    for i in range(n):
        allowed = [j for j in range(k) if texts[i][j].strip()]
        gap = rewards[i, allowed].max() - rewards[i, allowed].min()
        assert (i in by_prompt) == (gap > margin), (i, gap)
        if i not in by_prompt:
            continue
        scored = by_prompt[i]
        assert scored.chosen_reward == rewards[i, allowed].max()
        assert scored.rejected_reward == rewards[i, allowed].min()
        assert scored.pair.chosen == texts[i][int(np.argmax(np.where(
            [bool(t.strip()) for t in texts[i]], rewards[i], -np.inf)))]
        assert scored.pair.prompt == f"q{i}" and scored.pair.history == (("hi", "hello"),)
        assert scored.to_json()["chosen_reward"] - scored.to_json()["rejected_reward"] > margin
    assert 0 < len(pairs) < n  # the margin drops some prompts and keeps others


# ---------------------------------------------------------------------------------------------
# Mode "reward_pairs" end to end.
# ---------------------------------------------------------------------------------------------

def test_reward_pairs_mode_writes_pairs_the_reward_model_prefers_and_trains(tmp_path):
    from glm_jax.train.common import mesh_from_config
    from glm_jax.train.reward import eval_batches, score_pairs

    reward_model = random_reward_model()
    config = sampled_config(tmp_path, save_reward_workdir(tmp_path / "rm", reward_model),
                            mode="reward_pairs", num_samples=4, pair_margin=1.0, batch_size=8,
                            num_steps=2, checkpoint_every=2, log_every=1000)
    workdir = tmp_path / "w"
    train_dpo(config, workdir)

    path = workdir / PAIRS_FILE
    pairs, _ = read_jsonl(path, "preference")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert 0 < len(pairs) <= len(PROMPTS)
    assert len({p.id for p in pairs}) == len(pairs)
    # Re-score the pairs as the DPO data pipeline tokenizes them.
    batches, _ = eval_batches(pairs, Tokenizer.tiny(), GLM4_TEMPLATE, config)
    graphdef, params = nnx.split(reward_model)
    scores = score_pairs(graphdef, params, batches, make_mesh((1, 1, 1), jax.devices()[:1]))
    assert np.all(scores.chosen >= scores.rejected + config.dpo.pair_margin)
    np.testing.assert_allclose(scores.chosen, [r["chosen_reward"] for r in records], atol=1e-4)
    np.testing.assert_allclose(scores.rejected, [r["rejected_reward"] for r in records],
                               atol=1e-4)
    for pair in pairs:
        prompt = PROMPTS[int(pair.id)]
        assert (pair.prompt, pair.task) == (prompt.prompt, prompt.task)

    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference
    assert (workdir / "hf" / "model.safetensors").exists()

    # A resumed run reuses the file instead of sampling again, even from another policy ...
    other = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(7))
    mesh = mesh_from_config(config)
    again = reward_pairs(config, workdir, other, Tokenizer.tiny(), GLM4_TEMPLATE, mesh)
    assert again == pairs
    # ... and refuses a file built with other settings.
    config.dpo.pair_margin = 0.1
    with pytest.raises(ValueError, match="pair_margin"):
        reward_pairs(config, workdir, other, Tokenizer.tiny(), GLM4_TEMPLATE, mesh)


# ---------------------------------------------------------------------------------------------
# Online DPO: one run on a (2, 2, 2) mesh, and its step compiled once on a single device.
# ---------------------------------------------------------------------------------------------

def online_config(tmp_path):
    config = sampled_config(tmp_path, save_reward_workdir(tmp_path / "rm", eos_reward_model()),
                            mode="online", num_samples=4, pair_margin=0.5, batch_size=16,
                            num_steps=24, learning_rate=3e-3, beta=0.5, warmup_steps=0,
                            checkpoint_every=12, log_every=1000)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    return config


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def online_run(tmp_path_factory):
    """24 steps of online DPO with a reward of +1 for responses that end with EOS, else -1."""
    tmp_path = tmp_path_factory.mktemp("online")
    config = online_config(tmp_path)
    workdir = tmp_path / "w"
    train_dpo(config, workdir)
    return config, workdir, read_metrics(workdir)


@pytest.fixture(scope="module")
def single_device_step(online_run):
    """The online run's step on a (1, 1, 1) mesh, compiled once, and a factory of its inputs
    for the first two steps: `fresh(reward_model) -> (graphdef, state, reference_params,
    reward_params, [prompts, prompts])`."""
    from glm_jax.train.common import model_from_config
    from glm_jax.train.state import optimizer_from_config

    config = online_run[0]
    dpo, data = config.dpo, config.data
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    tokenizer = Tokenizer.tiny()
    tx, schedule = optimizer_from_config(dpo)
    ids, mask = encode_prompts(PROMPTS, tokenizer, GLM4_TEMPLATE, data.max_prompt_tokens)
    prompts = iter(PromptDataset(ids, mask, batch_size=dpo.batch_size, seed=config.seed))
    prompts = [next(prompts) for _ in range(2)]
    shardings = batch_sharding(mesh, prompts[0])

    def fresh(reward_model):
        with jax.set_mesh(mesh):
            graphdef, state = init_train_state(model_from_config(config, "lm", mesh), tx)
            reference = jax.tree.map(jnp.copy, state.params)
        return (graphdef, state, reference, shard_state(nnx.split(reward_model)[1], mesh),
                [to_device(p, shardings) for p in prompts])

    graphdef, state, _, reward_params, _ = fresh(eos_reward_model())
    reward_graphdef = nnx.split(eos_reward_model())[0]
    settings = SamplingSettings.from_config(dpo, tokenizer, data.max_response_tokens)
    step = make_online_step(graphdef, reward_graphdef, settings, tx, schedule, beta=dpo.beta,
                            sft_coef=dpo.sft_coef, num_samples=dpo.num_samples,
                            margin=dpo.pair_margin, seed=config.seed, mesh=mesh,
                            state_sharding=shardings_of(state),
                            reward_sharding=shardings_of(reward_params),
                            prompt_sharding=shardings)

    def run(state, reference, reward_params, prompts):
        with jax.set_mesh(mesh):
            state, metrics = step(state, reference, reward_params, prompts)
        return state, {k: float(v) for k, v in metrics.items()}

    return run, fresh


def test_online_step_starts_at_ln2_and_is_the_same_on_any_mesh(online_run, single_device_step):
    run, fresh = single_device_step
    _, state, reference, reward_params, prompts = fresh(eos_reward_model())
    single = []
    for batch in prompts:
        state, metrics = run(state, reference, reward_params, batch)
        single.append(metrics)
    first = single[0]
    assert 0 < first["pair_fraction"] <= 1
    assert first["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["score_chosen"] > first["score_rejected"] + 0.5
    assert first["grad_norm"] > 0
    # The (2, 2, 2) run of train_dpo: same prompts, same samples, same updates.
    sharded = online_run[2][:2]
    for name in ("loss", "dpo_loss", "grad_norm", "pair_fraction", "score_mean",
                 "response_length"):
        np.testing.assert_allclose([m[name] for m in sharded], [m[name] for m in single],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    # A difference of sequence log-probs in the hundreds: absolute, not relative, precision.
    np.testing.assert_allclose([m["reward_margin"] for m in sharded],
                               [m["reward_margin"] for m in single], atol=2e-5)


def test_online_step_without_a_valid_pair_is_a_zero_update(single_device_step):
    run, fresh = single_device_step
    # A reward model that scores every response alike: no prompt has a gap > margin (its
    # parameters are an argument of the step, so the compiled step serves here too).
    constant = eos_reward_model()
    constant.head_kernel[...] = jnp.zeros_like(constant.head_kernel[...])
    _, state, reference, reward_params, prompts = fresh(constant)
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = run(state, reference, reward_params, prompts[0])
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["pair_fraction"] == 0.0
    assert metrics["loss"] == 0.0 and metrics["dpo_loss"] == 0.0
    assert metrics["grad_norm"] == 0.0
    assert metrics["response_length"] > 0
    # Zero gradients give AdamW (without weight decay) a zero update.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    assert int(state.step) == 1


def test_online_dpo_raises_a_toy_reward(online_run):
    _, workdir, metrics = online_run
    assert [m["step"] for m in metrics] == list(range(1, 25))
    early = np.mean([m["score_mean"] for m in metrics[:4]])
    late = np.mean([m["score_mean"] for m in metrics[-4:]])
    assert late > early + 0.4, (early, late)
    assert (np.mean([m["eos_fraction"] for m in metrics[-4:]])
            > np.mean([m["eos_fraction"] for m in metrics[:4]]))
    assert (workdir / "hf" / "model.safetensors").exists()


def test_online_dpo_resumes_with_the_same_samples(online_run, tmp_path):
    import shutil

    config, workdir, metrics = online_run
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "24")  # resume from step 12
    train_dpo(config, copy)
    resumed = read_metrics(copy)
    assert [m["step"] for m in resumed] == list(range(1, 25))
    for name in ("loss", "score_mean", "response_length", "pair_fraction", "grad_norm"):
        np.testing.assert_allclose([m[name] for m in resumed[12:]],
                                   [m[name] for m in metrics[12:]], rtol=1e-6, err_msg=name)


def test_prompt_batches_resume_where_they_stopped():
    ids, mask = encode_prompts(PROMPTS, Tokenizer.tiny(), GLM4_TEMPLATE, 16)
    batches = iter(PromptDataset(ids, mask, batch_size=8, seed=3))
    for _ in range(2):
        next(batches)
    saved = batches.get_state()
    expected = [next(batches) for _ in range(4)]  # crosses an epoch boundary (3 per epoch)
    resumed = iter(PromptDataset(ids, mask, batch_size=8, seed=3))
    resumed.set_state(saved)
    for want in expected:
        got = next(resumed)
        assert got["prompt_ids"].shape == (8, 16) and got["prompt_mask"].dtype == bool
        np.testing.assert_array_equal(got["prompt_ids"], want["prompt_ids"])
    # Each epoch holds every prompt once.
    fresh = iter(PromptDataset(ids, mask, batch_size=8, seed=3))
    epoch = np.concatenate([next(fresh)["prompt_ids"] for _ in range(3)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, ids.tolist()))


# ---------------------------------------------------------------------------------------------
# Configuration errors.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("mode", "ppo", "config.dpo.mode = 'ppo'; valid values: offline, reward_pairs, online"),
    ("prompt_file", "", "config.dpo.prompt_file is empty"),
    ("reward_model", "", "config.dpo.reward_model is empty"),
    ("num_samples", 1, "config.dpo.num_samples = 1"),
    ("pair_margin", -1.0, "config.dpo.pair_margin = -1.0"),
])
def test_configuration_errors_name_the_field(tmp_path, field, value, message):
    config = sampled_config(tmp_path, tmp_path / "rm", mode="online")
    config.dpo[field] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        train_dpo(config, tmp_path / "w")


def test_online_dpo_with_lora_takes_the_policys_base_as_its_reference(tmp_path):
    """With adapters on the policy there is no reference copy: the step runs the base with
    the adapters off. At the start (B = 0) the policy is its base: the loss is ln 2."""
    config = online_config(tmp_path)
    config.dpo.update(num_steps=2, checkpoint_every=2)
    config.model.lora.update(rank=4, alpha=8.0, roles="policy")
    train_dpo(config, tmp_path / "w")
    metrics = read_metrics(tmp_path / "w")
    assert metrics[0]["dpo_loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    adapter = json.loads((tmp_path / "w" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
