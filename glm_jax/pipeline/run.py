"""The whole ChatGLM-RLHF pipeline in miniature, stage by stage, in one work directory.

world -> sft -> annotate -> clean -> rm (+ rm_unbalanced) -> ppo (+ ppo_no_ref, ppo_no_sft)
-> grpo (+ grpo_gold) -> dpo -> evaluate -> report. Each stage is one of the library's
programs (train_sft, train_reward_model, train_ppo, train_dpo) run on a config derived from
the given one; the PPO stages compute their reference responses and prompt filter themselves
(paper 3.4). grpo is GRPO against the reward model, grpo_gold GRPO on the world's gold
quality as a rule reward (RLVR: the ground truth itself, a ceiling for the reward-model runs).

Each stage records the settings it is made with (`stage_settings`: the config fields it and
the stages whose outputs it reads depend on) in `WORKDIR/<stage>/settings.json` before it
runs, and `WORKDIR/<stage>/stage.json` when it is done. A rerun skips the stages done with the
same settings; when a begun stage's settings differ, it refuses before changing anything,
naming the first such stage and the fields; `force` redoes that stage and every stage after
it (or every stage, when none differs) and keeps the ones before it.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from glm_jax.config import validate_config
from glm_jax.data.cleaning import (
    balance_by_length,
    drop_cycles,
    drop_ties,
    length_bias_by_bucket,
    preference_stats,
    tokenizer_length,
)
from glm_jax.data.records import PreferencePair, SFTExample, read_jsonl, write_jsonl
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.pipeline import report
from glm_jax.pipeline.world import (
    WorldConfig,
    annotate,
    bayes_accuracy,
    capability_correct,
    gold_quality,
    make_world,
)
from glm_jax.train.workdir import holds_workdir, write_file

POLICIES = ("sft", "ppo", "ppo_no_ref", "ppo_no_sft", "grpo", "grpo_gold", "dpo")
SAMPLE_ROWS = 1024  # rows per compiled sampling call
# The GRPO stages' responses per prompt: they sample as many sequences per iteration as PPO,
# from this many times fewer prompts.
GRPO_GENERATIONS = 4
SETTINGS_FILE = "settings.json"

# What each stage depends on: the config fields (a section name stands for all its fields)
# it reads itself, and the stages whose outputs it reads; `stage_settings` adds theirs.
_WORLD_FIELDS = tuple(f"pipeline.{f}" for f in WorldConfig.__dataclass_fields__ if f != "seed")
_SAMPLING = ("ppo.temperature", "ppo.top_k", "ppo.top_p")  # annotation and evaluation sample
STAGE_DEPENDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "world": (("seed", *_WORLD_FIELDS), ()),
    "sft": (("seed", "model", "data", "sft"), ("world",)),
    "annotate": (("pipeline.annotate_samples", *_SAMPLING), ("world", "sft")),
    "clean": (("pipeline.bucket_edges",), ("annotate",)),
    "rm": (("rm",), ("clean",)),
    "rm_unbalanced": (("rm", "pipeline.ablation_steps"), ("clean",)),
    "ppo": (("ppo",), ("rm",)),
    "ppo_no_ref": (("ppo", "pipeline.ablation_steps"), ("rm",)),
    "ppo_no_sft": (("ppo", "pipeline.ablation_steps"), ("rm",)),
    "grpo": (("ppo",), ("rm",)),
    "grpo_gold": (("ppo",), ("sft",)),  # the world's prompts, the SFT policy; no reward model
    "dpo": (("dpo",), ("rm",)),
    "evaluate": (("pipeline.eval_samples", *_SAMPLING), ("ppo", "ppo_no_ref", "ppo_no_sft",
                                                         "grpo", "grpo_gold", "dpo")),
    "report": ((), ("rm_unbalanced", "evaluate")),
}
# Fields that do not change what a stage makes: how it runs (mesh, hosts, layer
# implementation, fused PPO program), where it logs, how often it saves or evaluates (the
# exports are the last step's weights, and the final evaluation runs whatever eval_every is),
# when it gives up, and the fields the pipeline sets itself (its own files).
RUNTIME_FIELDS = ("mesh", "distributed", "metrics", "on_damaged_checkpoint", "model.remat",
                  "model.scan_layers", "model.attention", "model.vocab_chunk", "ppo.fused",
                  "ppo.reference_cache")
RUNTIME_SECTION_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
                          "max_nonfinite_steps", "best_metric", "best_mode")
SET_BY_PIPELINE = ("sft.train_file", "sft.eval_file", "rm.train_file", "rm.eval_file",
                   "ppo.prompt_file", "ppo.reward_model", "ppo.sft_file", "dpo.mode",
                   "dpo.train_file", "dpo.eval_file", "dpo.prompt_file", "dpo.reward_model")


class SettingsChanged(ValueError):
    """A stage begun in the work directory was made with other settings than this run's."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(path: str, names: tuple[str, ...]) -> bool:
    return any(path == name or path.startswith(name + ".") for name in names)


def stage_settings(config: ConfigDict, stage: str) -> dict[str, Any]:
    """The config fields `stage`'s outputs depend on (its own and those of every stage whose
    outputs it reads), as dotted paths to JSON values; runtime-only fields are left out."""
    fields: set[str] = set()
    todo = [stage]
    while todo:
        own, inputs = STAGE_DEPENDS[todo.pop()]
        fields.update(own)
        todo += inputs
    flat = _flatten(json.loads(config.to_json_best_effort()))
    return {path: value for path, value in sorted(flat.items())
            if _under(path, tuple(fields)) and not _under(path, RUNTIME_FIELDS)
            and path not in SET_BY_PIPELINE
            and path.rsplit(".", 1)[-1] not in RUNTIME_SECTION_FIELDS}


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each field whose value differs (`(unset)` where missing)."""
    def shown(settings: dict[str, Any], path: str) -> str:
        return repr(settings[path]) if path in settings else "(unset)"

    unset = object()  # compared by value: 1 and 1.0 (a float field set to 1) are the same
    return [f"{path}: {shown(recorded, path)} -> {shown(current, path)}"
            for path in sorted(recorded.keys() | current.keys())
            if recorded.get(path, unset) != current.get(path, unset)]


def world_config(config: ConfigDict) -> WorldConfig:
    fields = {f: config.pipeline[f] for f in WorldConfig.__dataclass_fields__
              if f in config.pipeline}
    return WorldConfig(**{**fields, "seed": config.seed})


def derive(config: ConfigDict, **updates: Any) -> ConfigDict:
    """A copy of `config` with dotted-path updates, e.g. derive(c, **{"ppo.sft_coef": 0.0})."""
    out = ConfigDict(config.to_dict())
    for path, value in updates.items():
        *sections, field = path.split(".")
        target = out
        for section in sections:
            target = target[section]
        target[field] = value
    return out


def check_responses_fit(examples: list[SFTExample], config: ConfigDict) -> None:
    """Raise if config.data.max_response_tokens would cut a demonstration: the SFT model
    would learn the cut answer, and a capability answer could then never be right."""
    from glm_jax.train.common import tokenizer_from_config

    tokenizer, limit = tokenizer_from_config(config), config.data.max_response_tokens
    for example in examples:
        num_tokens = len(tokenizer.encode(example.response)) + 1  # + EOS
        if num_tokens > limit:
            raise ValueError(
                f"config.data.max_response_tokens = {limit} cuts the world's {example.task} "
                f"demonstration {example.response!r} ({num_tokens} tokens with EOS): raise it "
                "to at least that")


class Pipeline:
    """The stages over one work directory; `run` executes the ones not done yet."""

    def __init__(self, config: ConfigDict, workdir: str | Path, *, force: bool = False):
        validate_config(config)
        sequences = config.ppo.batch_size * config.ppo.num_generations
        if sequences % GRPO_GENERATIONS:
            raise ValueError(
                f"config.ppo.batch_size x num_generations = {sequences} sequences per PPO "
                f"iteration: the GRPO stages sample as many, {GRPO_GENERATIONS} per prompt, so "
                f"it must be a multiple of {GRPO_GENERATIONS}")
        self.config, self.workdir, self.force = config, Path(workdir), force
        self.data = self.workdir / "data"
        self.results: dict[str, Any] = {}

    def path(self, *parts: str) -> str:
        return str(self.workdir.joinpath(*parts))

    # --- stages ---------------------------------------------------------------------------

    def world(self) -> dict[str, Any]:
        world = make_world(world_config(self.config))
        check_responses_fit(world.sft, self.config)
        self.data.mkdir(parents=True, exist_ok=True)
        files = {"sft": world.sft, "preference_prompts": world.preference_prompts,
                 "preference_test_prompts": world.test_preference_prompts,
                 "rl_prompts": world.rl_prompts, "eval_prompts": world.eval_prompts,
                 "capability": world.capability}
        for name, records in files.items():
            write_jsonl(self.data / f"{name}.jsonl", records)
        return {name: len(records) for name, records in files.items()}

    def sft(self) -> dict[str, Any]:
        from glm_jax.train.sft import train_sft

        config = derive(self.config, **{"sft.train_file": str(self.data / "sft.jsonl"),
                                        "sft.eval_file": ""})
        return _numbers(train_sft(config, self.path("sft")))

    def annotate(self) -> dict[str, Any]:
        """The annotators judge the SFT model's responses (paper 3.1: two outputs of the SFT
        model per prompt): `pipeline.annotate_samples` sampled per preference prompt with
        PPO's rollout settings, of which `world.annotate` compares the first distinct ones."""
        import glm_jax
        from glm_jax.train.common import runtime_overrides

        hf = self.path("sft", "hf")
        model = glm_jax.from_pretrained(hf, **runtime_overrides(self.config))
        tokenizer = Tokenizer.from_dir(hf)
        samples, world = self.config.pipeline.annotate_samples, world_config(self.config)
        rng = np.random.default_rng([self.config.seed, 1])
        counts = {}
        for name, raw in (("preference", "preferences_raw"),
                          ("preference_test", "preferences_test_raw")):
            prompts = [p.prompt for p in read_jsonl(self.data / f"{name}_prompts.jsonl",
                                                    "prompt")[0]]
            sampled = self._sample(model, tokenizer, prompts, samples, f"sampling {name} "
                                   "responses")
            pairs = annotate(prompts, [sampled[i:i + samples]
                                       for i in range(0, len(sampled), samples)], world, rng)
            write_jsonl(self.data / f"{raw}.jsonl", pairs)
            counts[name] = {"prompts": len(prompts), "pairs": len(pairs)}
        return counts

    def _sample(self, model: Any, tokenizer: Tokenizer, prompts: list[str], samples: int,
                desc: str) -> list[str]:
        """`samples` consecutive responses to each prompt, with PPO's rollout settings (the
        same random numbers for every model), `SAMPLE_ROWS` rows per compiled call."""
        from glm_jax.generation import generate_text
        from glm_jax.train.common import template_from_config

        ppo, rows = self.config.ppo, [p for p in prompts for _ in range(samples)]
        template = template_from_config(self.config, tokenizer)
        out: list[str] = []
        for start in tqdm(range(0, len(rows), SAMPLE_ROWS), desc=desc, unit="batch",
                          leave=False):
            out += generate_text(model, tokenizer, rows[start:start + SAMPLE_ROWS],
                                 template=template,
                                 max_new_tokens=self.config.data.max_response_tokens,
                                 temperature=ppo.temperature, top_k=ppo.top_k,
                                 top_p=ppo.top_p, rng=self.config.seed + start)
        return out

    def clean(self) -> dict[str, Any]:
        length = tokenizer_length(Tokenizer.from_dir(self.path("sft", "hf")))
        edges = [int(x) for x in self.config.pipeline.bucket_edges.split(",")]
        raw = _pairs(self.data / "preferences_raw.jsonl")
        steps = [{"step": "raw", **preference_stats(raw, length)}]
        no_ties = drop_ties(raw)
        steps.append({"step": "drop_ties", **preference_stats(no_ties, length)})
        consistent = drop_cycles(no_ties)
        steps.append({"step": "drop_cycles", **preference_stats(consistent, length)})
        balanced = balance_by_length(consistent, edges, self.config.seed, token_length=length)
        steps.append({"step": "balance_by_length", **preference_stats(balanced, length)})
        test = drop_cycles(drop_ties(_pairs(self.data / "preferences_test_raw.jsonl")))
        write_jsonl(self.data / "preferences_balanced.jsonl", balanced)
        write_jsonl(self.data / "preferences_unbalanced.jsonl", consistent)
        write_jsonl(self.data / "preferences_test.jsonl", test)
        test_buckets = length_bias_by_bucket(test, edges, length)
        unequal = sum(b["count"] for b in test_buckets)  # every pair of unequal lengths
        return {"steps": steps,
                "longer_wins_before": length_bias_by_bucket(consistent, edges, length),
                "longer_wins_after": length_bias_by_bucket(balanced, edges, length),
                "test_pairs": len(test),
                "test_longer_wins": (sum(b["count"] * b["longer_wins"] for b in test_buckets
                                         if b["count"]) / unequal
                                     if unequal else float("nan")),
                "bayes_accuracy_test": bayes_accuracy(test, world_config(self.config)),
                "bayes_accuracy_train": bayes_accuracy(consistent,
                                                       world_config(self.config))}

    def _ablation(self, section: str) -> dict[str, Any]:
        """The ablation runs' length: `pipeline.ablation_steps`, or the main run's when 0."""
        steps = self.config.pipeline.ablation_steps
        return {f"{section}.num_steps": steps} if steps else {}

    def _reward_model(self, name: str, train_file: str, **updates: Any) -> dict[str, Any]:
        from glm_jax.train.reward import train_reward_model

        config = derive(self.config, **{
            "model.init_checkpoint": self.path("sft", "hf"),
            "rm.train_file": str(self.data / train_file),
            "rm.eval_file": str(self.data / "preferences_test.jsonl"), **updates})
        last = train_reward_model(config, self.path(name))
        train, test = self._rm_summaries(name, (train_file, "preferences_test.jsonl"))
        del train["longer_scored_higher"]  # the verdicts resample the test pairs only
        return {"train": train, "test": test,
                "last_step": _numbers({k: v for k, v in last.items() if k != "eval"})}

    def _rm_summaries(self, name: str, pairs_files: tuple[str, ...]) -> list[dict[str, Any]]:
        """Accuracy, length preference, ... of the trained reward model `name` on each file,
        and per pair `longer_scored_higher`: 1 where the longer response scores higher, 0
        where the shorter does, None for responses of equal length (what the report's
        length-balancing verdict resamples)."""
        import jax
        from flax import nnx

        from glm_jax.models.heads import GlmRewardModel
        from glm_jax.sharding import make_mesh
        from glm_jax.train.checkpoint import load_trained_model
        from glm_jax.train.common import runtime_overrides, template_from_config
        from glm_jax.train.reward import eval_batches, score_pairs, summarize_scores

        model = load_trained_model(self.path(name), GlmRewardModel,
                                   overrides=runtime_overrides(self.config))
        graphdef, params = nnx.split(model)
        mesh = make_mesh((1, 1, 1), jax.devices()[:1])
        tokenizer = Tokenizer.from_dir(self.path(name))
        template = template_from_config(self.config, tokenizer)
        out = []
        for file in pairs_files:
            batches, tasks = eval_batches(_pairs(self.data / file), tokenizer, template,
                                          self.config)
            scores = score_pairs(graphdef, params, batches, mesh)
            longer = np.sign(scores.chosen_length - scores.rejected_length)
            higher = np.sign(scores.chosen - scores.rejected)
            out.append({**_numbers(summarize_scores(scores, tasks)), "longer_scored_higher": [
                None if side == 0 else float(side == best)
                for side, best in zip(longer, higher, strict=True)]})
        return out

    def rm(self) -> dict[str, Any]:
        return self._reward_model("rm", "preferences_balanced.jsonl")

    def rm_unbalanced(self) -> dict[str, Any]:
        return self._reward_model("rm_unbalanced", "preferences_unbalanced.jsonl",
                                  **self._ablation("rm"))

    def _ppo(self, name: str, **updates: Any) -> dict[str, Any]:
        from glm_jax.train.ppo import train_ppo

        config = derive(self.config, **{
            "model.init_checkpoint": self.path("sft", "hf"),
            "ppo.prompt_file": str(self.data / "rl_prompts.jsonl"),
            "ppo.reward_model": self.path("rm"),
            "ppo.sft_file": str(self.data / "sft.jsonl"), **updates})
        last = train_ppo(config, self.path(name))
        return {"last_step": _numbers(last), "prompts": last.get("prompts")}

    def ppo(self) -> dict[str, Any]:
        return self._ppo("ppo")

    def ppo_no_ref(self) -> dict[str, Any]:
        return self._ppo("ppo_no_ref", **{"ppo.reference_reward": False},
                         **self._ablation("ppo"))

    def ppo_no_sft(self) -> dict[str, Any]:
        return self._ppo("ppo_no_sft", **{"ppo.sft_coef": 0.0}, **self._ablation("ppo"))

    def _grpo(self, name: str, **updates: Any) -> dict[str, Any]:
        """GRPO with PPO's settings otherwise (prompts, iterations, SFT loss, KL coefficient):
        as many sequences per iteration, `GRPO_GENERATIONS` per prompt, and the KL against
        the reference policy as GRPO's k3 loss term."""
        ppo = self.config.ppo
        return self._ppo(name, **{
            "ppo.algorithm": "grpo", "ppo.num_generations": GRPO_GENERATIONS,
            "ppo.batch_size": ppo.batch_size * ppo.num_generations // GRPO_GENERATIONS,
            "ppo.kl_kind": "k3", "ppo.kl_in": "loss", **updates})

    def grpo(self) -> dict[str, Any]:
        """Against the reward model, with PPO's prompt filter and reference reward (the same
        for a prompt's responses, so GRPO's group baseline cancels it; it is logged as in
        PPO's runs)."""
        return self._grpo("grpo")

    def grpo_gold(self) -> dict[str, Any]:
        """On the world's gold quality as the reward (`glm_jax.rewards.world_gold`, in [0, 1]),
        no reward model: the ceiling of what optimising the reward model's stand-in could
        reach. No reference reward (GRPO's group baseline cancels it) and no prompt filter: it
        trains on every RL prompt."""
        return self._grpo("grpo_gold", **{"ppo.reward_rule": "world_gold",
                                          "ppo.reward_model": "", "ppo.reference_reward": False,
                                          "ppo.filter_samples": 0})

    def dpo(self) -> dict[str, Any]:
        from glm_jax.train.dpo import train_dpo

        config = derive(self.config, **{
            "model.init_checkpoint": self.path("sft", "hf"), "dpo.mode": "reward_pairs",
            "dpo.prompt_file": str(self.data / "rl_prompts.jsonl"),
            "dpo.reward_model": self.path("rm"),
            "dpo.eval_file": str(self.data / "preferences_test.jsonl")})
        last = train_dpo(config, self.path("dpo"))
        return {"last_step": _numbers({k: v for k, v in last.items() if k != "eval"}),
                "eval": _numbers(last.get("eval", {}))}

    def evaluate(self) -> dict[str, Any]:
        """Every policy's responses to the held-out prompts, `pipeline.eval_samples` sampled
        per prompt with PPO's rollout settings (what RLHF trains) plus the greedy one, with
        their gold quality, lengths and reward-model scores; and its greedy answers to the
        capability set."""
        import glm_jax
        from glm_jax.generation import generate_text
        from glm_jax.models.heads import GlmRewardModel
        from glm_jax.train.checkpoint import load_trained_model
        from glm_jax.train.common import runtime_overrides, template_from_config
        from glm_jax.train.reward import score_responses

        prompts, _ = read_jsonl(self.data / "eval_prompts.jsonl", "prompt")
        capability, _ = read_jsonl(self.data / "capability.jsonl", "sft")
        reward_model = load_trained_model(self.path("rm"), GlmRewardModel,
                                          overrides=runtime_overrides(self.config))
        samples = self.config.pipeline.eval_samples
        limit = self.config.data.max_response_tokens
        texts = [p.prompt for p in prompts]
        repeated = [p for p in prompts for _ in range(samples)]
        out: dict[str, Any] = {}
        for name in tqdm(POLICIES, desc="evaluating policies", unit="policy", leave=False):
            hf = self.path(name, "hf")
            model = glm_jax.from_pretrained(hf, **runtime_overrides(self.config))
            tokenizer = Tokenizer.from_dir(hf)
            template = template_from_config(self.config, tokenizer)
            respond = functools.partial(generate_text, model, tokenizer, template=template,
                                        max_new_tokens=limit, temperature=0.0)
            greedy = respond(texts)
            sampled = self._sample(model, tokenizer, texts, samples, f"sampling {name}")
            answers = respond([c.prompt for c in capability])
            scores = score_responses(
                reward_model, tokenizer, template,
                [SFTExample(p.prompt, t or " ", task=p.task)
                 for p, t in zip(repeated, sampled, strict=True)], self.config)["score"]
            rows = []
            for i, prompt in enumerate(prompts):
                responses = sampled[i * samples:(i + 1) * samples]
                rows.append({
                    "prompt": prompt.prompt, "task": prompt.task, "responses": responses,
                    "gold": float(np.mean([gold_quality(prompt.prompt, t) for t in responses])),
                    "tokens": float(np.mean([len(tokenizer.encode(t)) for t in responses])),
                    "reward": float(np.mean(scores[i * samples:(i + 1) * samples])),
                    "greedy_response": greedy[i],
                    "greedy_gold": gold_quality(prompt.prompt, greedy[i])})
            (self.workdir / "evaluate").mkdir(parents=True, exist_ok=True)
            write_jsonl(self.workdir / "evaluate" / f"{name}.jsonl", rows)
            out[name] = {"rows": rows, "capability": [
                {"prompt": c.prompt, "expected": c.response, "response": a,
                 "correct": capability_correct(c, a)} for c, a in zip(capability, answers,
                                                                      strict=True)]}
        return out

    def report(self) -> dict[str, Any]:
        return report.write_report(self.workdir, self.results, self.config)

    # --- driver ---------------------------------------------------------------------------

    STAGES = ("world", "sft", "annotate", "clean", "rm", "rm_unbalanced", "ppo", "ppo_no_ref",
              "ppo_no_sft", "grpo", "grpo_gold", "dpo", "evaluate", "report")

    def changed_stage(self) -> tuple[str, str] | None:
        """The first stage begun in the work directory whose recorded settings are not this
        config's (or were never recorded), with what differs; None when every begun stage
        matches."""
        for stage in self.STAGES:
            directory = self.workdir / stage
            if not directory.is_dir():
                continue
            recorded = directory / SETTINGS_FILE
            try:
                settings = json.loads(recorded.read_text())
            except FileNotFoundError:
                return stage, (f"{directory} has no {SETTINGS_FILE}: it was made by a glm_jax "
                               "from before the pipeline recorded each stage's settings, so "
                               "whether it matches this config cannot be told")
            except ValueError as e:
                return stage, f"{recorded} cannot be read ({e})"
            differences = settings_differences(settings, stage_settings(self.config, stage))
            if differences:
                return stage, (f"{directory} was made with other settings than this run's: "
                               f"{'; '.join(differences)} (recorded in {recorded})")
        return None

    def run(self) -> dict[str, Any]:
        changed = self.changed_stage()
        if changed and not self.force:
            stage, why = changed
            kept = self.STAGES[:self.STAGES.index(stage)]
            raise SettingsChanged(
                f"{why}. Nothing was changed. Rerun with --force to redo {stage} and every "
                f"stage after it" + (f" (keeping {', '.join(kept)})" if kept else "")
                + f", use another --workdir than {self.workdir}, or go back to the recorded "
                "values")
        redo = (self.STAGES.index(changed[0]) if changed
                else 0 if self.force else len(self.STAGES))
        if redo < len(self.STAGES):
            print(f"[pipeline] --force: redoing {', '.join(self.STAGES[redo:])}"
                  + (f"; keeping {', '.join(self.STAGES[:redo])}" if redo else ""), flush=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_file(self.workdir / "config.json", self.config.to_json_best_effort(indent=2))
        started = time.time()
        timings = {}
        bar = tqdm(self.STAGES, desc="pipeline", unit="stage")
        for index, stage in enumerate(bar):
            bar.set_postfix_str(stage)
            marker = self.workdir / stage / "stage.json"
            if index >= redo:
                # Removed only now: a forced run that fails keeps every stage it had not
                # reached (their settings say what they were made with).
                shutil.rmtree(self.workdir / stage, ignore_errors=True)
            elif marker.exists():
                self.results[stage] = json.loads(marker.read_text())
                print(f"[pipeline] {stage}: done before, skipped (same settings; {marker})")
                continue
            print(f"\n[pipeline] {stage}: running", flush=True)
            marker.parent.mkdir(parents=True, exist_ok=True)
            write_file(marker.with_name(SETTINGS_FILE),
                       json.dumps(stage_settings(self.config, stage), indent=1))
            began = time.time()
            stage_fn: Callable[[], dict[str, Any]] = getattr(self, stage)
            result = stage_fn()
            timings[stage] = time.time() - began
            self.results[stage] = result
            write_file(marker, json.dumps(result, indent=1, default=_json_default))
            print(f"[pipeline] {stage}: done in {timings[stage]:.0f} s", flush=True)
        summary = self.results["report"]
        print(f"\n[pipeline] finished in {time.time() - started:.0f} s. Outputs in "
              f"{self.workdir}:\n  report: {summary['markdown']}\n  data: {self.data}\n"
              + "".join(f"  {name}: {self.workdir / name}\n" for name in
                        ("sft", "rm", "rm_unbalanced", *POLICIES[1:])))
        return summary


def _pairs(path: Path) -> list[PreferencePair]:
    return read_jsonl(path, "preference")[0]


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a metrics dict (numbers and nested dicts of them)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = _numbers(value)
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


@holds_workdir
def run_pipeline(config: ConfigDict, workdir: str | Path, *, force: bool = False
                 ) -> dict[str, Any]:
    """Runs every stage not done yet in `workdir` and writes the report; returns its summary
    (paths of the Markdown / JSON / PNG files and the findings)."""
    return Pipeline(config, workdir, force=force).run()
