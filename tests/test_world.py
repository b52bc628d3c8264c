"""The synthetic world: gold quality against hand-graded responses, determinism, held-out
sets, and annotators whose ties, cycles and length bias the cleaning has to deal with."""

import math

import numpy as np
import pytest
from conftest import load_config

from glm_jax.data.cleaning import drop_cycles, drop_ties
from glm_jax.pipeline.world import (
    TASKS,
    WorldConfig,
    annotate,
    bayes_accuracy,
    capability_correct,
    capability_examples,
    correct_answer,
    demonstrate,
    gold_quality,
    make_prompt,
    make_world,
    preference_probability,
    task_of,
    wrong_answer,
)


@pytest.mark.parametrize("prompt,response,gold", [
    ("add 3 and 4", "7", 1.0),
    ("add 3 and 4", "the answer is 7", 0.8),  # right, with filler
    ("add 3 and 4", "8", 0.8 * 0.75 + 0.2),  # off by one: 1 - 1/4
    ("add 3 and 4", "9 ok", 0.8 * 0.5),
    ("add 3 and 4", "seven", 0.0),
    ("sort: d b a", "a b d", 1.0),
    ("sort: d b a", "a d b", 0.8 * (0.5 + 0.5 * 0.5) + 0.2),  # one of two steps in order
    ("sort: d b a", "a b", 0.8 * (0.5 * 2 / 3 + 0.5)),  # a letter dropped: not concise
    ("copy in capitals: bat", "BAT", 1.0),
    ("copy in capitals: bat", "BaT", 0.8 * 2 / 3 + 0.2),
    ("is 6 even? answer yes or no", "yes", 1.0),
    ("is 6 even? answer yes or no", "i think yes", 0.8),
    ("is 7 even? answer yes or no", "yes", 0.0),
    ("is 7 even? answer yes or no", "yes no", 0.0),  # both answers: no credit
])
def test_gold_quality_by_hand(prompt, response, gold):
    assert gold_quality(prompt, response) == pytest.approx(gold)


def test_tasks_and_answers():
    assert [task_of(p) for p in ("add 1 and 2", "sort: b a", "copy in capitals: kem",
                                 "is 10 even? answer yes or no")] == list(TASKS)
    assert correct_answer("sort: h c e") == "c e h" and correct_answer("add 39 and 39") == "78"
    with pytest.raises(ValueError, match="not a prompt of the synthetic tasks"):
        task_of("tell me a joke")
    identity = capability_examples()[0]
    assert capability_correct(identity, " " + identity.response + " ")
    assert not capability_correct(identity, "I am a model.")


def test_mistakes_are_wrong_and_half_the_sort_and_copy_ones_incomplete():
    rng = np.random.default_rng(0)
    for task in TASKS:
        prompts = [make_prompt(task, rng) for _ in range(300)]
        wrong = [wrong_answer(p, rng) for p in prompts]
        assert all(gold_quality(p, w) < 1 for p, w in zip(prompts, wrong, strict=True)), task
        shorter = np.mean([len(w) < len(correct_answer(p)) for p, w in zip(prompts, wrong,
                                                                             strict=True)])
        if task in ("sort", "copy"):
            assert 0.4 < shorter < 0.6, task
        else:  # only filler makes a demonstration longer or shorter in words
            assert all(len(w.split()) == 1 for w in wrong), task


@pytest.fixture(scope="module")
def world():
    return make_world(WorldConfig())


def test_world_is_deterministic_and_held_out(world):
    again = make_world(WorldConfig())
    assert again.sft == world.sft and again.preference_prompts == world.preference_prompts
    assert make_world(WorldConfig(seed=1)).sft != world.sft
    eval_prompts = {e.prompt for e in world.eval_prompts}
    sets = [world.sft, world.preference_prompts, world.test_preference_prompts,
            world.rl_prompts]
    seen = set().union(*({e.prompt for e in s if e.task in TASKS} for s in sets))
    assert len(seen) == sum(sum(e.task in TASKS for e in s) for s in sets)  # no repeats
    assert not eval_prompts & seen
    assert {e.task for e in world.eval_prompts} == set(TASKS)
    # The capability set is in the SFT data and nowhere else.
    capability = {e.prompt for e in world.capability}
    assert capability <= {e.prompt for e in world.sft}
    assert not capability & ({e.prompt for e in world.rl_prompts} | eval_prompts)


def test_demonstrations_are_imperfect(world):
    gold = [gold_quality(e.prompt, e.response) for e in world.sft if e.task in TASKS]
    assert 0.5 < np.mean(gold) < 0.9 and np.mean(np.array(gold) == 1.0) < 0.7


def judge_demonstrations(prompts, config, seed=0):
    """The annotators' pairs over four demonstrations per prompt."""
    rng = np.random.default_rng(seed)
    candidates = [[demonstrate(p.prompt, rng, config.p_correct, config.p_verbose)
                   for _ in range(4)] for p in prompts]
    return annotate([p.prompt for p in prompts], candidates, config, rng)


def test_annotators_judge_two_distinct_candidates_or_three_in_a_cycle():
    config = WorldConfig(p_cycle=0.0, p_tie=0.0)
    rng = np.random.default_rng(0)
    prompts = ["add 3 and 4", "sort: b a", "copy in capitals: kem"]
    pairs = annotate(prompts, [["7", "7", " ", "8 ok"], ["a b", "a b"], ["KEM", "KM"]],
                     config, rng)
    assert [p.prompt for p in pairs] == ["add 3 and 4", "copy in capitals: kem"]
    assert {pairs[0].chosen, pairs[0].rejected} == {"7", "8 ok"}  # duplicates, blanks skipped
    cyclic = annotate(prompts[:1], [["7", "8", "9", "6"]], WorldConfig(p_cycle=1.0), rng)
    assert [(p.chosen, p.rejected) for p in cyclic] == [("7", "8"), ("8", "9"), ("9", "7")]
    with pytest.raises(ValueError):  # one candidate list per prompt
        annotate(prompts, [["7", "8"]], config, rng)


def test_annotators_are_noisy_biased_and_inconsistent(world):
    config = WorldConfig()
    pairs = judge_demonstrations(world.preference_prompts, config)
    assert sum(p.tie for p in pairs) > 20
    assert len(drop_cycles(drop_ties(pairs))) < len(drop_ties(pairs))  # cycles to remove
    judged = [p for p in pairs if not p.tie]
    longer = [len(p.chosen.split()) > len(p.rejected.split()) for p in judged
              if len(p.chosen.split()) != len(p.rejected.split())]
    assert np.mean(longer) > 0.55  # the length bias shows in the raw data
    better = [gold_quality(p.prompt, p.chosen) > gold_quality(p.prompt, p.rejected)
              for p in judged if gold_quality(p.prompt, p.chosen)
              != gold_quality(p.prompt, p.rejected)]
    assert 0.6 < np.mean(better) < 0.95  # quality shows, through noise
    ceiling = bayes_accuracy(drop_ties(judge_demonstrations(world.test_preference_prompts,
                                                             config)), config)
    assert 0.6 < ceiling < 0.95


def test_preference_probability_is_the_annotator_model():
    config = WorldConfig(quality_scale=6.0, length_bias=1.0)
    p = preference_probability("add 3 and 4", "7 ok", "7", config)
    assert p == pytest.approx(1 / (1 + math.exp(-(6.0 * (0.8 - 1.0) + 1.0))))
    assert p + preference_probability("add 3 and 4", "7", "7 ok", config) == pytest.approx(1.0)


def test_every_demonstration_fits_the_tiny_configs_response_limit(world):
    """A cut demonstration is learned cut: the identity answer was once 16 tokens against
    configs/tiny.py's 12, and no policy could ever answer it right."""
    from glm_jax.pipeline.run import check_responses_fit

    config = load_config("tiny.py")
    check_responses_fit(world.sft, config)
    config.data.max_response_tokens = 10
    with pytest.raises(ValueError, match=r"max_response_tokens = 10 cuts the world's identity "
                                         r"demonstration 'I am GLM tiny.' \(11 tokens"):
        check_responses_fit(world.capability, config)
