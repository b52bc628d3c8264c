"""Direct preference optimisation on annotated pairs (paper 3.4, equation 7).

The reference policy is the initial (SFT) model, frozen: its sequence log-probs are computed
once for every pair before training and looked up by `pair_index`, so each step runs only the
policy. An optional SFT term on the chosen responses keeps the policy's capabilities.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from glm_jax.data.pipeline import PreferenceDataset
from glm_jax.data.records import PreferencePair, read_jsonl
from glm_jax.losses import dpo_loss, sequence_logprobs, token_logprobs
from glm_jax.models.heads import GlmForCausalLM
from glm_jax.train import loop
from glm_jax.train.common import (
    mesh_from_config,
    model_from_config,
    template_from_config,
    tokenizer_from_config,
)
from glm_jax.train.loop import batch_sharding, run_stage, to_device
from glm_jax.train.state import (
    TrainState,
    init_train_state,
    optimizer_from_config,
    shardings_of,
)

_PAIR_KEYS = ("chosen_ids", "chosen_mask", "chosen_response_mask", "rejected_ids",
              "rejected_mask", "rejected_response_mask")


def pair_logps(model: GlmForCausalLM, batch: Mapping[str, jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sequence log-probs of the chosen and rejected responses `[batch]` each (one forward
    pass over both), and the chosen responses' mean token NLL (the optional SFT term)."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    response = jnp.concatenate([batch["chosen_response_mask"],
                                batch["rejected_response_mask"]])[:, 1:]
    token_logps = token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:])  # token t+1 from t
    logps = sequence_logprobs(token_logps, response)
    size = batch["chosen_ids"].shape[0]
    chosen_tokens = response[:size]
    chosen_nll = -jnp.sum(jnp.where(chosen_tokens, token_logps[:size], 0.0)) / jnp.maximum(
        jnp.sum(chosen_tokens), 1)
    return logps[:size], logps[size:], chosen_nll


@partial(jax.jit, static_argnums=0)
def _pair_logps_jit(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]):
    chosen, rejected, _ = pair_logps(nnx.merge(graphdef, params), batch)
    return chosen, rejected


def reference_logps(graphdef: nnx.GraphDef, params: Any, dataset: PreferenceDataset, mesh,
                    num_pairs: int, batch_size: int) -> np.ndarray:
    """`[num_pairs, 2]` float32 (chosen, rejected) sequence log-probs under `params`, from one
    in-order pass over `dataset` (shuffle=False, num_epochs=1; a short last batch is padded
    to `batch_size` so every batch runs the same compiled program)."""
    out = np.full((num_pairs, 2), np.nan, np.float32)
    shardings = None
    for batch in tqdm(dataset, desc="reference log-probs", unit="batch", leave=False):
        size = len(batch["pair_index"])
        padded = {k: np.concatenate([batch[k], np.repeat(batch[k][:1], batch_size - size,
                                                         axis=0)])
                  for k in _PAIR_KEYS}
        shardings = shardings or batch_sharding(mesh, padded)
        with jax.set_mesh(mesh):
            chosen, rejected = _pair_logps_jit(graphdef, params, to_device(padded, shardings))
        out[batch["pair_index"], 0] = np.asarray(chosen)[:size]
        out[batch["pair_index"], 1] = np.asarray(rejected)[:size]
    return out


class WithReference:
    """Adds each pair's cached reference log-probs (`ref_chosen_logps`, `ref_rejected_logps`
    `[batch]`) to the batches of a resumable iterator; keeps its get_state / set_state."""

    def __init__(self, batches: Iterator, reference: np.ndarray):
        self.batches, self.reference = batches, reference

    def __iter__(self) -> WithReference:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.batches))
        index = batch["pair_index"]
        batch["ref_chosen_logps"] = self.reference[index, 0]
        batch["ref_rejected_logps"] = self.reference[index, 1]
        return batch

    def get_state(self) -> Any:
        return self.batches.get_state()

    def set_state(self, state: Any) -> None:
        self.batches.set_state(state)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, beta: float, sft_coef: float,
                    state_sharding: Any, batch_sharding: Any):
    """The jitted DPO step `(state, batch) -> (state, metrics)`; the batch carries the cached
    `ref_chosen_logps` / `ref_rejected_logps` `[batch]`."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array]):
        chosen, rejected, chosen_nll = pair_logps(nnx.merge(graphdef, params), batch)
        dpo, chosen_r, rejected_r = dpo_loss(chosen, rejected, batch["ref_chosen_logps"],
                                             batch["ref_rejected_logps"], beta)
        metrics = {"dpo_loss": dpo, "sft_nll": chosen_nll,
                   "reward_accuracy": jnp.mean((chosen_r > rejected_r).astype(jnp.float32)),
                   "reward_margin": jnp.mean(chosen_r - rejected_r),
                   "chosen_reward": jnp.mean(chosen_r), "rejected_reward": jnp.mean(rejected_r)}
        return dpo + sft_coef * chosen_nll, metrics

    return loop.make_train_step(loss_fn, tx, schedule, state_sharding, batch_sharding)


def _dataset(pairs: list[PreferencePair], tokenizer, template, config: ConfigDict,
             **kwargs: Any) -> PreferenceDataset:
    data = config.data
    return PreferenceDataset(pairs, tokenizer, template, batch_size=config.dpo.batch_size,
                             max_prompt_tokens=data.max_prompt_tokens,
                             max_response_tokens=data.max_response_tokens,
                             truncation=data.truncation, **kwargs)


def implicit_reward_accuracy(graphdef: nnx.GraphDef, params: Any, dataset: PreferenceDataset,
                             reference: np.ndarray, beta: float, mesh) -> dict[str, float]:
    """Accuracy and mean margin of the implicit rewards beta * (log pi - log pi_ref)."""
    policy = reference_logps(graphdef, params, dataset, mesh, len(reference),
                             dataset.batch_size)
    rewards = beta * (policy - reference)
    return {"reward_accuracy": float(np.mean(rewards[:, 0] > rewards[:, 1])),
            "reward_margin": float(np.mean(rewards[:, 0] - rewards[:, 1]))}


def train_dpo(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """DPO of the policy in `config` on `dpo.train_file` (reference: the initial model), in
    `workdir`, resuming from its latest checkpoint; exports the policy to `workdir/hf`."""
    dpo, data = config.dpo, config.data
    if not dpo.train_file:
        raise ValueError("config.dpo.train_file is empty: set it to a preference JSONL file "
                         "(e.g. --config.dpo.train_file=data/pairs.jsonl)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer, template = tokenizer_from_config(config), template_from_config(config)
    pairs, _ = read_jsonl(dpo.train_file, "preference", on_error=data.on_error)
    train_data = _dataset(pairs, tokenizer, template, config, seed=config.seed,
                          process_index=jax.process_index(), process_count=jax.process_count())
    print(f"{dpo.train_file}: {train_data.report}")

    model = model_from_config(config, "lm", mesh)
    model_config = model.config
    graphdef, initial_params = nnx.split(model)
    in_order = _dataset(pairs, tokenizer, template, config, shuffle=False, num_epochs=1,
                        drop_remainder=False)
    reference = reference_logps(graphdef, initial_params, in_order, mesh,
                                train_data.report.num_kept, dpo.batch_size)
    eval_fn = None
    if dpo.eval_file:
        eval_pairs, _ = read_jsonl(dpo.eval_file, "preference", on_error=data.on_error)
        eval_data = _dataset(eval_pairs, tokenizer, template, config, shuffle=False,
                             num_epochs=1, drop_remainder=False)
        eval_reference = reference_logps(graphdef, initial_params, eval_data, mesh,
                                         eval_data.report.num_kept, dpo.batch_size)

        def eval_fn(state: TrainState) -> dict[str, Any]:
            return implicit_reward_accuracy(graphdef, state.params, eval_data, eval_reference,
                                            dpo.beta, mesh)

    tx, schedule = optimizer_from_config(dpo)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, tx)
    del model, initial_params
    batches = WithReference(iter(train_data), reference)
    return run_stage(
        config, dpo, workdir, graphdef=graphdef, state=state,
        make_step=lambda shardings: make_train_step(graphdef, tx, schedule, dpo.beta,
                                                    dpo.sft_coef, shardings_of(state),
                                                    shardings),
        batches=batches, mesh=mesh, model_config=model_config, tokenizer=tokenizer,
        desc="DPO", eval_fn=eval_fn, export_hf=True)
