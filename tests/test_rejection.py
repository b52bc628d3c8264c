"""Rejection sampling (best-of-N): the selection rule against a plain loop, and end to end with a
tiny policy and reward model: the winners are the best samples, their rewards re-score, a rerun
never resamples, and SFT on the winners makes them likelier."""

import json

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_sft_config
from flax import nnx

import glm_jax
from glm_jax.data import GLM4_TEMPLATE, SFTDataset, SFTExample, Tokenizer, write_jsonl
from glm_jax.data.records import PromptExample, read_jsonl
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import make_mesh
from glm_jax.train import rejection
from glm_jax.train.checkpoint import Checkpointer, load_trained_model, save_model_config
from glm_jax.train.common import save_tokenizer
from glm_jax.train.rejection import (
    SUMMARY_FILE,
    WINNERS_FILE,
    best_of_n,
    parse_min_reward,
    rejection_sample,
    train_rsft,
)
from glm_jax.train.rollout import ScoredSamples, encode_prompts, sample_prompts
from glm_jax.train.sft import evaluate_sft, sft_batch_loss
from glm_jax.train.state import init_train_state

TINY = dict(num_hidden_layers=1)
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "lemon", "green blue",
         "red", "a small dog", "sun"]


def random_samples(rng, n=64, num_samples=5, length=6):
    """Rewards on a coarse grid (so ties happen) and ~30% responses without EOS."""
    return ScoredSamples(
        tokens=rng.integers(0, 100, (n, num_samples, length)).astype(np.int32),
        response_mask=np.ones((n, num_samples, length), bool),
        ended_with_eos=rng.random((n, num_samples)) < 0.7,
        rewards=(rng.integers(-8, 8, (n, num_samples)) / 4).astype(np.float32))


@pytest.mark.parametrize("require_eos", [True, False])
@pytest.mark.parametrize("min_reward", [None, 0.5])
def test_best_of_n_matches_a_loop(require_eos, min_reward):
    rng = np.random.default_rng(0)
    samples = random_samples(rng)
    eligible = rng.random(samples.rewards.shape) < 0.8
    index, kept = best_of_n(samples, require_eos=require_eos, min_reward=min_reward,
                            eligible=eligible)
    for i, rewards in enumerate(samples.rewards):
        candidates = [j for j in range(len(rewards)) if eligible[i, j]
                      and (samples.ended_with_eos[i, j] or not require_eos)]
        if not candidates:
            assert not kept[i]
            continue
        best = max(candidates, key=lambda j: (rewards[j], -j))  # the first of equal rewards
        assert kept[i] == (min_reward is None or rewards[best] >= min_reward), i
        if kept[i]:
            assert index[i] == best, i
    # The data exercises each rule: somewhere the overall argmax has no EOS or is ineligible,
    # and min_reward drops some prompts that have candidates but not all.
    assert (samples.rewards.argmax(1) != index)[kept].any()
    if min_reward is not None:
        assert 0 < kept.sum() < len(best_of_n(samples, require_eos=require_eos,
                                              eligible=eligible)[1].nonzero()[0])


def test_best_of_n_without_options_is_the_argmax():
    samples = random_samples(np.random.default_rng(1))
    index, kept = best_of_n(samples, require_eos=False)
    assert kept.all()
    np.testing.assert_array_equal(index, samples.rewards.argmax(1))


def test_only_responses_that_survive_the_text_round_trip_are_trainable():
    tokenizer = Tokenizer.tiny()
    eos, pad = tokenizer.eos_token_ids[0], tokenizer.pad_token_id
    canonical = tokenizer.encode("hello world")
    by_char = [i for c in "hello world" for i in tokenizer.encode(c)]  # same text, other ids
    assert by_char != canonical
    rows = [canonical + [eos], by_char + [eos], tokenizer.encode("  ") + [eos], [eos]]
    length = max(map(len, rows))
    tokens = np.full((1, len(rows), length), pad, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for j, row in enumerate(rows):
        tokens[0, j, :len(row)], mask[0, j, :len(row)] = row, True
    samples = ScoredSamples(tokens=tokens, response_mask=mask,
                            ended_with_eos=np.ones((1, len(rows)), bool),
                            rewards=np.zeros((1, len(rows)), np.float32))
    texts = samples.texts(tokenizer, GLM4_TEMPLATE)
    assert texts[0][:2] == ["hello world"] * 2
    ok = rejection.trainable(samples, texts, [PromptExample("q")], tokenizer, GLM4_TEMPLATE)
    np.testing.assert_array_equal(ok, [[True, False, False, False]])


def test_parse_min_reward():
    assert parse_min_reward(None) is None and parse_min_reward("") is None
    assert parse_min_reward("-0.5") == -0.5 and parse_min_reward(2) == 2.0
    with pytest.raises(ValueError, match="config.rsft.min_reward"):
        parse_min_reward("high")


def save_reward_model_workdir(path, seed):
    """A random reward model saved as train_reward_model leaves its workdir (checkpoint of the
    TrainState, model config, tokenizer)."""
    model = GlmRewardModel(tiny_config(**TINY), rngs=nnx.Rngs(seed))
    _, state = init_train_state(model, optax.identity())
    checkpointer = Checkpointer(path / "checkpoints")
    checkpointer.save(0, state)
    checkpointer.wait()
    checkpointer.close()
    save_model_config(model.config, path)
    save_tokenizer(Tokenizer.tiny(), path)
    return path


def train_policy(examples, path, config, steps=30):
    """An initial policy that ends its responses with EOS and has several answers per prompt
    (so that its samples differ): full-batch SFT on one device, exported with its tokenizer."""
    tokenizer = Tokenizer.tiny()
    batch = SFTDataset(examples, tokenizer, GLM4_TEMPLATE, batch_size=len(examples),
                       max_prompt_tokens=config.data.max_prompt_tokens,
                       max_response_tokens=config.data.max_response_tokens, shuffle=False)[0]
    batch = {k: v for k, v in batch.items() if k != "task_index"}
    graphdef, params = nnx.split(glm_jax.GlmForCausalLM(tiny_config(**TINY), rngs=nnx.Rngs(0)))
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: sft_batch_loss(nnx.merge(graphdef, p), batch)[0])(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    save_tokenizer(tokenizer, glm_jax.save_pretrained(nnx.merge(graphdef, params), path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rsft")
    config = tiny_sft_config(tmp, num_steps=20, learning_rate=1e-3, eval_every=0,
                             checkpoint_every=0, log_every=1000)
    config.sft.eval_file = ""
    rng = np.random.default_rng(0)
    prompts = [PromptExample(prompt=f"name {i}", task=["a", "b"][i % 2]) for i in range(8)]
    train_policy([SFTExample(prompt=p.prompt, response=str(word), task=p.task)
                  for p in prompts for word in rng.choice(WORDS, 3, replace=False)],
                 tmp / "policy", config)
    write_jsonl(tmp / "prompts.jsonl", prompts)
    config.model.init_checkpoint = str(tmp / "policy")
    config.rsft.update(prompt_file=str(tmp / "prompts.jsonl"), num_samples=4, batch_size=16,
                       reward_model=str(save_reward_model_workdir(tmp / "rm", seed=1)))
    # Keep what the run sampled, to re-derive its choice.
    drawn = []

    def recording(*args, **kwargs):
        drawn.append(sample_prompts(*args, **kwargs))
        return drawn[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rejection, "sample_prompts", recording)
        result = train_rsft(config, tmp / "rsft")
    (samples,) = drawn
    return config, tmp / "rsft", result, samples


def test_winners_are_the_best_samples_and_rescore_the_same(run):
    config, workdir, result, samples = run
    tokenizer = Tokenizer.from_dir(config.model.init_checkpoint)
    prompts, _ = read_jsonl(config.rsft.prompt_file, "prompt")
    prompt_ids, prompt_mask = encode_prompts(prompts, tokenizer, GLM4_TEMPLATE,
                                             config.data.max_prompt_tokens)
    eos = tokenizer.eos_token_ids
    # Re-derived: a candidate ends with EOS and its text encodes back to its tokens.
    texts, ok = {}, np.zeros(samples.rewards.shape, bool)
    for (i, j), _ in np.ndenumerate(samples.rewards):
        tokens = samples.tokens[i, j][samples.response_mask[i, j]].tolist()
        body = [t for t in tokens if t not in eos]
        texts[i, j] = tokenizer.decode(body)
        ok[i, j] = (samples.ended_with_eos[i, j] and texts[i, j].strip() != ""
                    and tokenizer.encode(texts[i, j]) == body)
    best = np.where(ok, samples.rewards, -np.inf).argmax(1)
    kept = ok.any(1)
    assert kept.sum() >= 4 and ok.sum() > kept.sum()  # a real choice among several

    lines = [json.loads(line) for line in (workdir / WINNERS_FILE).read_text().splitlines()]
    assert [(w["prompt"], w.get("task")) for w in lines] == [
        (p.prompt, p.task) for p, k in zip(prompts, kept, strict=True) if k]
    # Re-scored from the written text, right-padded, on one device, in one batch.
    length = config.data.max_prompt_tokens + config.data.max_response_tokens
    ids, mask = np.zeros((len(lines), length), np.int32), np.zeros((len(lines), length), bool)
    for row, (winner, i) in enumerate(zip(lines, np.flatnonzero(kept), strict=True)):
        j = best[i]
        assert winner["response"] == texts[i, j]
        assert winner["reward"] == pytest.approx(samples.rewards[i][ok[i]].max(), abs=1e-4)
        np.testing.assert_allclose(winner["rewards"], samples.rewards[i], atol=1e-4)
        sampled_eos = samples.tokens[i, j][samples.response_mask[i, j]][-1]
        tokens = (prompt_ids[i][prompt_mask[i]].tolist() + tokenizer.encode(winner["response"])
                  + [int(sampled_eos)])
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, True
    graphdef, params = nnx.split(load_trained_model(config.rsft.reward_model, GlmRewardModel))
    scores = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))(params, ids, mask)
    np.testing.assert_allclose(scores, [w["reward"] for w in lines], atol=1e-4)

    summary = json.loads((workdir / SUMMARY_FILE).read_text())
    assert result["best_of_n"] == summary
    assert (summary["prompts"], summary["kept"]) == (len(prompts), int(kept.sum()))
    assert summary["mean_reward"] == pytest.approx(float(samples.rewards.mean()), abs=1e-5)
    winner_rewards = [w["reward"] for w in lines]
    assert summary["mean_best_reward"] == pytest.approx(np.mean(winner_rewards), abs=1e-5)
    # Against the samples the winners were chosen from (a no-EOS sample may score higher).
    assert np.mean(winner_rewards) >= samples.rewards[kept][ok[kept]].mean()


def test_sft_on_the_winners_makes_them_likelier(run):
    config, workdir, result, _ = run
    winners, _ = read_jsonl(workdir / WINNERS_FILE, "sft")
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    data = SFTDataset(winners, Tokenizer.tiny(), GLM4_TEMPLATE, batch_size=len(winners),
                      max_prompt_tokens=config.data.max_prompt_tokens,
                      max_response_tokens=config.data.max_response_tokens, shuffle=False,
                      num_epochs=1)

    def nll(checkpoint):
        graphdef, params = nnx.split(glm_jax.from_pretrained(checkpoint))
        return evaluate_sft(graphdef, params, data, mesh)["loss"]

    before, after = nll(config.model.init_checkpoint), nll(workdir / "sft" / "hf")
    assert after < before - 0.1, (before, after)
    assert "loss" in result and np.isfinite(result["loss"])


def test_a_rerun_reuses_the_winners(run, monkeypatch):
    config, workdir, *_ = run
    written = (workdir / WINNERS_FILE).read_text()

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rejection, "sample_prompts", no_sampling)
    examples = rejection_sample(config, workdir)
    assert [e.to_json() for e in examples] == [
        e.to_json() for e in read_jsonl(workdir / WINNERS_FILE, "sft")[0]]
    assert (workdir / WINNERS_FILE).read_text() == written
    changed = config.copy_and_resolve_references()
    changed.rsft.num_samples = 8
    with pytest.raises(ValueError, match=r"was built with other settings \(differing: "
                                         r"rsft.num_samples;"):
        rejection_sample(changed, workdir)


@pytest.mark.parametrize("field, value, error, match", [
    ("prompt_file", "", ValueError, "config.rsft.prompt_file is empty"),
    ("prompt_file", "nope.jsonl", FileNotFoundError, "config.rsft.prompt_file"),
    ("reward_model", "", ValueError, "config.rsft.reward_model is empty"),
    ("reward_model", "no/such/rm", FileNotFoundError, "config.rsft.reward_model"),
    ("min_reward", "high", ValueError, "config.rsft.min_reward"),
])
def test_config_errors_name_the_field(tmp_path, field, value, error, match):
    config = tiny_sft_config(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [PromptExample(prompt="hi")])
    save_reward_model_workdir(tmp_path / "rm", seed=0)
    config.rsft.update(prompt_file=str(tmp_path / "prompts.jsonl"),
                       reward_model=str(tmp_path / "rm"))
    config.rsft[field] = value
    with pytest.raises(error, match=match):
        train_rsft(config, tmp_path / "w")
