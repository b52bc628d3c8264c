"""Rule rewards ("verifiable" rewards, RLVR): a Python function of (prompt record, response
text) -> float, registered by name and chosen by `config.ppo.reward_rule` instead of a reward
model. The RL stage computes them on the host between its rollout and update programs.

Built in:
  world_gold  the synthetic world's hidden gold quality in [0, 1] (glm_jax.pipeline.world):
              the embedded pipeline's RLVR setting, against which the reward model is judged

Register your own with `@register("name")`, or give `module.path:function` in the config.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

from glm_jax.data.records import PromptExample

RewardRule = Callable[[PromptExample, str], float]
_REGISTRY: dict[str, RewardRule] = {}


def register(name: str) -> Callable[[RewardRule], RewardRule]:
    """Decorator: makes `rule` choosable as `config.ppo.reward_rule = name`."""
    def add(rule: RewardRule) -> RewardRule:
        _REGISTRY[name] = rule
        return rule

    return add


def registered() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_rule(name: str, field: str = "config.ppo.reward_rule") -> RewardRule:
    """The rule registered as `name`, or the function `module.path:function`; config `field`
    names it in errors."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    hint = (f"give a registered rule ({', '.join(registered())}) or 'module.path:function' "
            "(a function of (PromptExample, response text) -> float)")
    module_name, colon, attribute = name.partition(":")
    if not colon:
        raise ValueError(f"{field} = {name!r} is not a registered reward rule: {hint}")
    try:
        rule = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field} = {name!r}: cannot load it ({e}); {hint}") from e
    if not callable(rule):
        raise ValueError(f"{field} = {name!r} is a {type(rule).__name__}, not a function; "
                         f"{hint}")
    return rule


def score_texts(rule: RewardRule, name: str, prompts: Sequence[PromptExample],
                texts: Sequence[str]) -> np.ndarray:
    """`[n]` float32: `rule(prompts[i], texts[i])`. A rule that raises or returns something
    other than a finite number is named with the prompt and response it failed on."""
    out = np.empty(len(texts), np.float32)
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        try:
            value = float(rule(prompt, text))
        except Exception as e:  # the user's code: say where it failed, keep the cause
            raise ValueError(f"reward rule {name!r} failed on prompt {prompt.prompt!r} with "
                             f"response {text!r}: {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise ValueError(f"reward rule {name!r} returned {value} for prompt "
                             f"{prompt.prompt!r} with response {text!r}: rewards must be "
                             "finite numbers")
        out[i] = value
    return out


@register("world_gold")
def world_gold(prompt: PromptExample, response: str) -> float:
    """The synthetic world's gold quality of `response` to `prompt` (a world prompt)."""
    from glm_jax.pipeline.world import gold_quality

    return gold_quality(prompt.prompt, response)
