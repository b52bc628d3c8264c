"""The synthetic world of the embedded pipeline: prompt tasks with a hidden gold quality,
imperfect demonstrations, and simulated annotators who see quality only through noise and a
bias toward longer responses.

Everything is generated deterministically from a seed. Four tasks, each graded in [0, 1] by
`gold_quality(prompt, response)` from the prompt's text alone:

- add:    "add 347 and 2"               -> "349"     (closeness of the number)
- sort:   "sort: d b a"                 -> "a b d"   (right letters, in order)
- copy:   "copy in capitals: cat"       -> "CAT"     (character match)
- parity: "is 6 even? answer yes or no" -> "yes"     (right word)

In every task 0.2 of the grade is for answering with nothing else: filler such as "the answer
is 17" or "17 ok" lowers gold quality while making the response longer, which the annotators
like. The capability set (who the model is, a strict reply format) appears in the SFT data
only; `capability_correct` checks it exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Sequence

import numpy as np

from glm_jax.config import default_config
from glm_jax.data.records import PreferencePair, PromptExample, SFTExample

TASKS = ("add", "sort", "copy", "parity")
LETTERS = "abcdefghij"
CONSONANTS, VOWELS = "bdgkmst", "aeiou"
PREFIXES = ("the answer is ", "i think ", "well, ")
SUFFIXES = (" ok", " i think", " for sure")
# Capability set: SFT data only; a policy that forgets it fails these exactly. The answers
# fit configs/tiny.py's 12 response tokens (the identity one is 10 and EOS).
IDENTITY_PROMPTS = ("who are you?", "what is your name?", "introduce yourself.")
IDENTITY_ANSWER = "I am GLM tiny."
FORMAT_PROMPTS = tuple(f"reply with the word {w} only." for w in ("done", "ready", "yes"))
CONCISE_SHARE = 0.2


_DEFAULTS = default_config().pipeline  # the schema holds the world's defaults and meanings


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How the world is drawn: config.pipeline's world fields (documented in
    glm_jax.config.default_config, which holds their defaults) and the seed."""

    seed: int = 0
    num_sft: int = _DEFAULTS.num_sft
    num_capability_sft: int = _DEFAULTS.num_capability_sft
    num_preference_prompts: int = _DEFAULTS.num_preference_prompts
    num_test_preference_prompts: int = _DEFAULTS.num_test_preference_prompts
    num_rl_prompts: int = _DEFAULTS.num_rl_prompts
    num_eval_prompts_per_task: int = _DEFAULTS.num_eval_prompts_per_task
    p_correct: float = _DEFAULTS.p_correct
    p_verbose: float = _DEFAULTS.p_verbose
    quality_scale: float = _DEFAULTS.quality_scale
    length_bias: float = _DEFAULTS.length_bias
    tie_margin: float = _DEFAULTS.tie_margin
    p_tie: float = _DEFAULTS.p_tie
    p_cycle: float = _DEFAULTS.p_cycle


# --- prompts and gold quality -------------------------------------------------------------

def make_prompt(task: str, rng: np.random.Generator) -> str:
    if task == "add":  # a small number to a larger one: learnable by a 2-layer model
        return f"add {rng.integers(0, 1000)} and {rng.integers(1, 4)}"
    if task == "sort":
        letters = rng.choice(list(LETTERS), size=int(rng.integers(3, 5)), replace=False)
        return "sort: " + " ".join(letters)
    if task == "copy":  # a made-up word: consonant-vowel syllables, 3 to 5 letters
        alphabets = [CONSONANTS if i % 2 == 0 else VOWELS for i in range(rng.integers(3, 6))]
        word = "".join(a[rng.integers(len(a))] for a in alphabets)
        return f"copy in capitals: {word}"
    if task == "parity":
        return f"is {rng.integers(0, 5000)} even? answer yes or no"
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


def task_of(prompt: str) -> str:
    for task, pattern in _PATTERNS.items():
        if pattern.fullmatch(prompt):
            return task
    raise ValueError(f"{prompt!r} is not a prompt of the synthetic tasks {TASKS}")


_PATTERNS = {
    "add": re.compile(r"add (\d+) and (\d+)"),
    "sort": re.compile(r"sort: ([a-j](?: [a-j])*)"),
    "copy": re.compile(r"copy in capitals: ([a-z]+)"),
    "parity": re.compile(r"is (\d+) even\? answer yes or no"),
}


def correct_answer(prompt: str) -> str:
    task = task_of(prompt)
    groups = _PATTERNS[task].fullmatch(prompt).groups()
    if task == "add":
        return str(int(groups[0]) + int(groups[1]))
    if task == "sort":
        return " ".join(sorted(groups[0].split()))
    if task == "copy":
        return groups[0].upper()
    return "yes" if int(groups[0]) % 2 == 0 else "no"


def _content_score(task: str, prompt: str, content: str) -> float:
    """How right the core of the response is, in [0, 1]."""
    answer = correct_answer(prompt)
    if task == "add":
        numbers = re.findall(r"-?\d+", content)
        return max(0.0, 1.0 - abs(int(numbers[0]) - int(answer)) / 4) if numbers else 0.0
    if task == "sort":
        want = answer.split()
        got = [w for w in content.split() if len(w) == 1 and w in LETTERS]
        if not got:
            return 0.0
        overlap = len(set(got) & set(want)) / len(set(got) | set(want))
        in_order = (sum(a < b for a, b in zip(got, got[1:], strict=False)) / (len(got) - 1)
                    if len(got) > 1 else 0.0)
        return 0.5 * overlap + 0.5 * in_order * (len(got) == len(set(got)))
    if task == "copy":
        words = content.split()
        target = max(words, key=lambda w: difflib.SequenceMatcher(None, w, answer).ratio(),
                     default="")
        return difflib.SequenceMatcher(None, target, answer).ratio()
    words = content.lower().split()
    return 1.0 if answer in words and ({"yes", "no"} - {answer}).isdisjoint(words) else 0.0


def gold_quality(prompt: str, response: str) -> float:
    """The hidden ground truth in [0, 1]: 0.8 x how right the content is, plus 0.2 when the
    response is the answer alone (no filler)."""
    content = _content_score(task_of(prompt), prompt, response)
    concise = content > 0 and len(response.split()) == len(correct_answer(prompt).split())
    return (1 - CONCISE_SHARE) * content + CONCISE_SHARE * concise


def capability_examples() -> list[SFTExample]:
    return ([SFTExample(p, IDENTITY_ANSWER, task="identity") for p in IDENTITY_PROMPTS]
            + [SFTExample(p, p.split()[4], task="format") for p in FORMAT_PROMPTS])


def capability_correct(example: SFTExample, response: str) -> bool:
    return response.strip() == example.response


# --- the demonstrator ---------------------------------------------------------------------

def wrong_answer(prompt: str, rng: np.random.Generator) -> str:
    """A plausible mistake for the prompt's task. Half the sort and copy mistakes are
    incomplete (a letter short), so in the demonstrations the longer answer tends to be
    the better one even before filler."""
    task, answer = task_of(prompt), correct_answer(prompt)
    incomplete = rng.random() < 0.5
    if task == "add":
        return str(int(answer) + int(rng.choice([-3, -2, -1, 1, 2, 3])))
    if task == "sort":
        letters = answer.split()
        if incomplete:
            del letters[int(rng.integers(len(letters)))]
        else:
            i = int(rng.integers(len(letters) - 1))
            letters[i], letters[i + 1] = letters[i + 1], letters[i]
        return " ".join(letters)
    if task == "copy":
        chars = list(answer)
        i = int(rng.integers(len(chars)))
        if incomplete:
            del chars[i]
        else:
            others = LETTERS.replace(chars[i].lower(), "")
            chars[i] = (chars[i].lower() if rng.random() < 0.5
                        else others[rng.integers(len(others))].upper())
        return "".join(chars)
    # parity: the other word, or not the yes / no the prompt asks for
    other = "no" if answer == "yes" else "yes"
    return str(rng.choice([other, "maybe", "even" if answer == "yes" else "odd"]))


def demonstrate(prompt: str, rng: np.random.Generator, p_correct: float, p_verbose: float
                ) -> str:
    """An imperfect response: right with `p_correct`, with filler with `p_verbose`."""
    content = correct_answer(prompt) if rng.random() < p_correct else wrong_answer(prompt, rng)
    if rng.random() < p_verbose:
        if rng.random() < 0.5:
            return PREFIXES[rng.integers(len(PREFIXES))] + content
        return content + SUFFIXES[rng.integers(len(SUFFIXES))]
    return content


# --- the annotators -----------------------------------------------------------------------

def preference_probability(prompt: str, a: str, b: str, config: WorldConfig) -> float:
    """P(annotator prefers `a` to `b`): gold quality seen through noise, plus a pull toward
    the longer response."""
    logit = (config.quality_scale * (gold_quality(prompt, a) - gold_quality(prompt, b))
             + config.length_bias * (len(a.split()) - len(b.split())))
    return 1.0 / (1.0 + math.exp(-logit))


def annotate(prompts: Sequence[str], candidates: Sequence[Sequence[str]], config: WorldConfig,
             rng: np.random.Generator) -> list[PreferencePair]:
    """Annotators judge two of each prompt's candidate responses (in the pipeline, the SFT
    model's samples: paper 3.1), the first two distinct non-empty ones; a `p_cycle` share of
    the prompts with three such candidates get them judged in a cycle (A > B, B > C, C > A),
    and near-equal pairs are ties with `p_tie`. Prompts without two distinct candidates give
    no pair."""
    pairs = []
    for index, (prompt, responses) in enumerate(zip(prompts, candidates, strict=True)):
        task = task_of(prompt)
        distinct = list(dict.fromkeys(r for r in responses if r.strip()))
        if rng.random() < config.p_cycle and len(distinct) >= 3:
            a, b, c = distinct[:3]  # a cyclic judgement the cleaning must remove
            pairs += [PreferencePair(prompt, x, y, task=task, id=f"{index}.{k}")
                      for k, (x, y) in enumerate(((a, b), (b, c), (c, a)))]
            continue
        if len(distinct) < 2:
            continue
        a, b = distinct[:2]
        gap = abs(gold_quality(prompt, a) - gold_quality(prompt, b))
        tie = gap < config.tie_margin and rng.random() < config.p_tie
        if rng.random() >= preference_probability(prompt, a, b, config):
            a, b = b, a
        pairs.append(PreferencePair(prompt, a, b, task=task, tie=tie, id=str(index)))
    return pairs


def bayes_accuracy(pairs: Sequence[PreferencePair], config: WorldConfig) -> float:
    """Accuracy on `pairs` of the Bayes-optimal predictor of the annotators' labels (it
    knows their noise and length bias): the ceiling any reward model can reach."""
    hits = [preference_probability(p.prompt, p.chosen, p.rejected, config) > 0.5
            for p in pairs]
    return float(np.mean(hits)) if hits else math.nan


# --- the data sets ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class World:
    sft: list[SFTExample]  # imperfect demonstrations + the capability set
    preference_prompts: list[PromptExample]  # for the annotators (`annotate`)
    test_preference_prompts: list[PromptExample]  # held out: the reward model's test pairs
    rl_prompts: list[PromptExample]
    eval_prompts: list[PromptExample]  # num_eval_prompts_per_task of each task, held out
    capability: list[SFTExample]


def make_world(config: WorldConfig) -> World:
    """Draws every data set from `config.seed`; prompts never repeat across the sets."""
    rng = np.random.default_rng(config.seed)
    used: set[str] = set()

    def prompts(count: int, tasks: Sequence[str] = TASKS) -> list[str]:
        out = []
        while len(out) < count:
            task = tasks[len(out) % len(tasks)]
            for _ in range(1000):
                prompt = make_prompt(task, rng)
                if prompt not in used:
                    break
            else:
                raise ValueError(f"the synthetic world has too few distinct {task!r} "
                                 f"prompts for the sizes asked: lower config.pipeline.num_*")
            used.add(prompt)
            out.append(prompt)
        return out

    def examples(count: int) -> list[PromptExample]:
        return [PromptExample(p, task=task_of(p)) for p in prompts(count)]

    eval_prompts = examples(config.num_eval_prompts_per_task * len(TASKS))
    sft = [SFTExample(p, demonstrate(p, rng, config.p_correct, config.p_verbose),
                      task=task_of(p)) for p in prompts(config.num_sft)]
    capability = capability_examples()
    sft += [capability[i % len(capability)] for i in range(config.num_capability_sft)]
    sft = [sft[i] for i in rng.permutation(len(sft))]
    return World(sft=sft, preference_prompts=examples(config.num_preference_prompts),
                 test_preference_prompts=examples(config.num_test_preference_prompts),
                 rl_prompts=examples(config.num_rl_prompts), eval_prompts=eval_prompts,
                 capability=capability)
