"""Reward model training and evaluation (paper 3.3, equations 1-2).

The backbone starts from an SFT (or pretrained) checkpoint with a scalar head read at the last
real token of prompt + response. Chosen and rejected sequences of a batch go through the model
in one forward pass; the step is one jitted, sharded program.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from glm_jax.config import validate_config
from glm_jax.data.datasets import PreferenceDataset, pad_batch, tokenize_record
from glm_jax.data.records import PreferencePair, SFTExample, read_jsonl
from glm_jax.losses import reward_model_loss
from glm_jax.models.heads import GlmRewardModel
from glm_jax.train import loop
from glm_jax.train.batched import map_batches
from glm_jax.train.common import (
    check_tokenizer_fits,
    mesh_from_config,
    model_from_config,
    template_from_config,
    tokenizer_from_config,
)
from glm_jax.train.loop import run_stage
from glm_jax.train.preflight import preflight
from glm_jax.train.state import (
    TrainState,
    init_train_state,
    optimizer_from_config,
    shardings_of,
)
from glm_jax.train.workdir import holds_workdir

Batch = Mapping[str, np.ndarray]


def pair_rewards(model: GlmRewardModel, batch: Mapping[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    """Rewards of chosen and rejected, `[batch]` each, from one forward pass over both.

    batch: `chosen_ids`, `chosen_mask`, `rejected_ids`, `rejected_mask`: `[batch, length]`.
    """
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    rewards = model(ids, mask)
    size = batch["chosen_ids"].shape[0]
    return rewards[:size], rewards[size:]


# Module-level jits keyed by the (static) graph: evaluations reuse one compiled program.
@partial(jax.jit, static_argnums=0)
def _pair_scores_jit(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array]:
    """`PairScores`' fields for the rows of `batch`, `[batch]` each."""
    chosen, rejected = pair_rewards(nnx.merge(graphdef, params), batch)
    return {"chosen": chosen, "rejected": rejected,
            "chosen_length": batch["chosen_mask"].sum(-1),
            "rejected_length": batch["rejected_mask"].sum(-1),
            "task_index": batch.get("task_index", jnp.full(chosen.shape, -1, jnp.int32))}


@partial(jax.jit, static_argnums=0)
def _rewards_jit(graphdef: nnx.GraphDef, params: Any, ids: jax.Array, mask: jax.Array):
    return nnx.merge(graphdef, params)(ids, mask)


def pair_metrics(chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
    """Accuracy, margin and score statistics of `[batch]` chosen / rejected rewards."""
    scores = jnp.concatenate([chosen, rejected])
    return {"accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "margin": jnp.mean(chosen - rejected),
            "chosen_reward": jnp.mean(chosen), "rejected_reward": jnp.mean(rejected),
            "score_mean": jnp.mean(scores), "score_std": jnp.std(scores)}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, l2_coef: float, state_sharding: Any,
                    batch_sharding: Any):
    """The jitted reward-model step `(state, batch) -> (state, metrics)`."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array]):
        chosen, rejected = pair_rewards(nnx.merge(graphdef, params), batch)
        return reward_model_loss(chosen, rejected, l2_coef), pair_metrics(chosen, rejected)

    return loop.make_train_step(loss_fn, tx, schedule, state_sharding, batch_sharding)


@dataclasses.dataclass
class PairScores:
    """Per-pair results of an evaluation: rewards, lengths in tokens and task index."""

    chosen: np.ndarray
    rejected: np.ndarray
    chosen_length: np.ndarray
    rejected_length: np.ndarray
    task_index: np.ndarray


def score_pairs(graphdef: nnx.GraphDef, params: Any, batches: Sequence[Batch], mesh: Mesh,
                desc: str = "evaluating") -> PairScores:
    """Runs the reward model over `batches` (all of one size; each may carry a bool `valid`
    `[batch]` marking padding rows of a short last batch) and collects per-pair rewards on
    the host."""
    return PairScores(**map_batches(partial(_pair_scores_jit, graphdef, params), batches,
                                    batch_size=len(batches[0]["chosen_ids"]), mesh=mesh,
                                    desc=desc))


def summarize_scores(scores: PairScores, task_names: list[str] | None = None
                     ) -> dict[str, Any]:
    """Pairwise accuracy, margin, score mean/std, score-length correlation (over all scored
    sequences, so it also reflects prompt and task lengths), `pair_length_correlation` (within
    pairs, where the prompt is shared: the uncentred correlation of the score difference with
    the response-length difference, unchanged by which response of a pair is called chosen)
    and `longer_preferred` (of the pairs whose responses differ in length, the fraction where
    the longer one scores higher: the length bias of the paper's 3.3); overall and per task
    (`task_names[i]` names task index i)."""

    def summary(sel: np.ndarray) -> dict[str, float]:
        chosen, rejected = scores.chosen[sel], scores.rejected[sel]
        all_scores = np.concatenate([chosen, rejected])
        lengths = np.concatenate([scores.chosen_length[sel], scores.rejected_length[sel]])
        corr = (float(np.corrcoef(all_scores, lengths)[0, 1])
                if len(all_scores) > 2 and all_scores.std() > 0 and lengths.std() > 0
                else float("nan"))
        # Within a pair the prompt is shared: the longer sequence has the longer response.
        length_diff = scores.chosen_length[sel] - scores.rejected_length[sel]
        unequal = length_diff != 0
        longer_scores_higher = np.where(length_diff > 0, chosen > rejected, rejected > chosen)
        score_diff = (chosen - rejected).astype(np.float64)
        norm = np.sqrt(np.sum(score_diff ** 2) * np.sum(length_diff.astype(np.float64) ** 2))
        pair_corr = float(np.sum(score_diff * length_diff) / norm) if norm > 0 else float("nan")
        return {"pairs": int(sel.sum()), "accuracy": float(np.mean(chosen > rejected)),
                "margin": float(np.mean(chosen - rejected)),
                "score_mean": float(all_scores.mean()), "score_std": float(all_scores.std()),
                "length_correlation": corr, "pair_length_correlation": pair_corr,
                "longer_preferred": (float(np.mean(longer_scores_higher[unequal]))
                                     if unequal.any() else float("nan"))}

    everything = np.ones(len(scores.chosen), bool)
    result: dict[str, Any] = summary(everything) if len(everything) else {"pairs": 0}
    tasks = {}
    for index in sorted(set(scores.task_index.tolist())):
        name = "(none)" if index < 0 else (task_names[index] if task_names else str(index))
        tasks[name] = summary(scores.task_index == index)
    result["per_task"] = tasks
    return result


def dataset_from_config(pairs: list[PreferencePair], tokenizer, template, config: ConfigDict,
                        **kwargs: Any) -> PreferenceDataset:
    data = config.data
    return PreferenceDataset(
        pairs, tokenizer, template, batch_size=config.rm.batch_size,
        max_prompt_tokens=data.max_prompt_tokens, max_response_tokens=data.max_response_tokens,
        truncation=data.truncation, special_tokens=data.special_tokens, **kwargs)


def eval_batches(pairs: list[PreferencePair], tokenizer, template, config: ConfigDict,
                 source: str = "the evaluation pairs"
                 ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """Every usable pair once, in order, as full batches (the last padded, real rows marked
    by `valid`), and the task names that `task_index` refers to. Prints the tokenization
    report; raises ValueError naming `source` when no pair is left."""
    dataset = dataset_from_config(pairs, tokenizer, template, config, shuffle=False,
                                  num_epochs=1, drop_remainder=False, source=source)
    print(f"{source}: {dataset.report}")
    return [pad_batch(batch, config.rm.batch_size) for batch in dataset], dataset.tasks


@holds_workdir
def train_reward_model(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the reward model of `config` in `workdir`, resuming from its latest checkpoint.

    Writes `metrics.jsonl` and TensorBoard events (per step: loss, accuracy, margin, score
    mean/std, grad norm, learning rate; every `rm.eval_every` steps the same on
    `rm.eval_file` prefixed `eval_`), orbax checkpoints, `model_config.json` and the
    tokenizer. Returns the last train and eval metrics.
    """
    validate_config(config)
    rm, data = config.rm, config.data
    if not rm.train_file:
        raise ValueError("config.rm.train_file is empty: set it to a preference JSONL file "
                         "(e.g. --config.rm.train_file=data/train.jsonl)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer = tokenizer_from_config(config)
    template = template_from_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    train_pairs, read_report = read_jsonl(rm.train_file, "preference", on_error=data.on_error,
                                          field="config.rm.train_file")
    read_report.print_skipped(rm.train_file)

    train_data = dataset_from_config(train_pairs, tokenizer, template, config, seed=config.seed,
                                     source=f"config.rm.train_file = {rm.train_file!r}",
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
    print(f"{rm.train_file}: {train_data.report}")
    train_iter = iter(train_data)
    eval_set = None
    if rm.eval_file:
        eval_pairs, _ = read_jsonl(rm.eval_file, "preference", on_error=data.on_error,
                                   field="config.rm.eval_file")
        eval_set = eval_batches(eval_pairs, tokenizer, template, config,
                                source=f"config.rm.eval_file = {rm.eval_file!r}")

    checked = preflight(config, "rm", mesh, "reward model")  # before any weights load
    model = model_from_config(config, "reward", mesh, role="reward")
    tx, schedule = optimizer_from_config(rm, config.model.moment_dtype)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, tx)
    model_config = model.config
    del model
    eval_fn = None
    if eval_set is not None:
        batches, task_names = eval_set

        def eval_fn(state: TrainState) -> dict[str, Any]:
            return summarize_scores(score_pairs(graphdef, state.params, batches, mesh),
                                    task_names)

    return run_stage(
        config, rm, workdir, graphdef=graphdef, state=state,
        make_step=lambda shardings: make_train_step(graphdef, tx, schedule, rm.l2_coef,
                                                    shardings_of(state), shardings),
        batches=train_iter, mesh=mesh, model_config=model_config, tokenizer=tokenizer,
        desc="reward model", eval_fn=eval_fn, precompiled=checked)


def _single_device_mesh() -> Mesh:
    from glm_jax.sharding import make_mesh

    return make_mesh((1, 1, 1), jax.devices()[:1])


def evaluate_pairs(model: GlmRewardModel, tokenizer, template, pairs: list[PreferencePair],
                   config: ConfigDict, mesh: Mesh | None = None) -> dict[str, Any]:
    """`summarize_scores` of `model` on `pairs` (tokenized as in training)."""
    batches, tasks = eval_batches(pairs, tokenizer, template, config)
    graphdef, params = nnx.split(model)
    return summarize_scores(score_pairs(graphdef, params, batches, mesh or _single_device_mesh()),
                            tasks)


def score_responses(model: GlmRewardModel, tokenizer, template, examples: list[SFTExample],
                    config: ConfigDict) -> dict[str, np.ndarray]:
    """Reward of each (prompt, response) example, tokenized and truncated as in training.

    Returns `score` `[n]` float32, `response_length` and `prompt_length` `[n]` (tokens, EOS
    included) and `task` `[n]` (str; "(none)" where missing).
    """
    data, batch_size = config.data, config.rm.batch_size
    max_length = data.max_prompt_tokens + data.max_response_tokens
    rows, prompt_lengths, response_lengths = [], [], []
    for example in examples:
        tokens = tokenize_record(example, tokenizer, template,
                                 max_prompt_tokens=data.max_prompt_tokens,
                                 max_response_tokens=data.max_response_tokens)
        rows.append(tokens["prompt"] + tokens["response"])
        prompt_lengths.append(len(tokens["prompt"]))
        response_lengths.append(len(tokens["response"]))

    graphdef, params = nnx.split(model)
    scores = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring", unit="batch",
                      leave=False):
        chunk = rows[start:start + batch_size]
        ids = np.full((batch_size, max_length), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((batch_size, max_length), bool)
        for i, row in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)] = row, True
        mask[len(chunk):, 0] = True  # padding rows of a short last batch: one dummy token
        scores.append(np.asarray(_rewards_jit(graphdef, params, ids, mask))[:len(chunk)])
    return {"score": np.concatenate(scores) if scores else np.zeros(0, np.float32),
            "prompt_length": np.asarray(prompt_lengths),
            "response_length": np.asarray(response_lengths),
            "task": np.asarray([e.task or "(none)" for e in examples])}


def run_eval_cli(config: ConfigDict, workdir: str | Path, *, pairs: str | None = None,
                 output: str | None = None, responses: str | None = None,
                 scores_output: str | None = None) -> dict[str, Any]:
    """What scripts/eval_rm.py does: evaluate on `pairs` and/or score `responses`."""
    validate_config(config)
    from glm_jax.data.records import write_jsonl
    from glm_jax.data.tokenizer import Tokenizer
    from glm_jax.models.convert import require_kind
    from glm_jax.train.checkpoint import load_trained_model

    if not pairs and not responses:
        raise ValueError("nothing to do: give --pairs and/or --responses")
    if responses and not scores_output:
        raise ValueError("--responses needs --scores_output (where to write the scores)")
    require_kind(workdir, "reward", "--workdir")
    model = load_trained_model(workdir, GlmRewardModel)
    tokenizer = Tokenizer.from_dir(workdir)
    template = template_from_config(config, tokenizer)
    summary: dict[str, Any] = {}
    if pairs:
        records, _ = read_jsonl(pairs, "preference", on_error=config.data.on_error,
                                field="--pairs")
        summary = evaluate_pairs(model, tokenizer, template, records, config)
        if output:
            Path(output).write_text(json.dumps(summary, indent=2))
    if responses:
        examples, _ = read_jsonl(responses, "sft", on_error=config.data.on_error,
                                 field="--responses")
        scored = score_responses(model, tokenizer, template, examples, config)
        write_jsonl(scores_output, [{**example.to_json(), "score": float(score)}
                                    for example, score in zip(examples, scored["score"],
                                                              strict=True)])
        summary["scored_responses"] = len(examples)
    return summary
