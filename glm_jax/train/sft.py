"""Supervised fine-tuning: next-token loss on the response tokens only (paper 3.1 / 3.4).

With `config.sft.packing`, each training row holds several whole examples (`PackedSFTDataset`)
that the model keeps apart with segment ids: the loss is the unpacked one, with less padding.

The final model is also exported as a Hugging Face directory (`workdir/hf`), which the reward
model, PPO and DPO take as `config.model.init_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from glm_jax.config import validate_config
from glm_jax.data.datasets import PackedSFTDataset, SFTDataset
from glm_jax.data.records import SFTExample, read_jsonl
from glm_jax.losses import masked_mean
from glm_jax.models.heads import GlmForCausalLM
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


def sft_batch_loss(model: GlmForCausalLM, batch: Mapping[str, jax.Array]
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token NLL over the response tokens of `batch` (`input_ids`,
    `attention_mask`, `loss_mask`, optional `segment_ids` of packed rows: `[batch, length]`),
    and logging stats."""
    segment_ids = batch.get("segment_ids")
    hidden, _ = model.model(batch["input_ids"], batch["attention_mask"],
                            segment_ids=segment_ids)
    # Position t predicts token t + 1: the loss covers targets inside the response.
    loss_mask = batch["loss_mask"][:, 1:]
    if segment_ids is not None:
        # The last token of a packed example (its EOS) predicts nothing: the next token
        # starts another example.
        loss_mask = loss_mask & (segment_ids[:, 1:] == segment_ids[:, :-1])
    # Targets outside the loss (padding, the prompt) only need to be valid ids.
    targets = jnp.where(loss_mask, batch["input_ids"][:, 1:], 0)
    logps, entropy = model.token_logprobs(hidden[:, :-1], targets, with_entropy=True)
    loss = masked_mean(-logps, loss_mask)
    stats = {"entropy": masked_mean(entropy, loss_mask), "response_tokens": loss_mask.sum()}
    return loss, stats


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, state_sharding: Any, batch_sharding: Any):
    """The jitted SFT step `(state, batch) -> (state, metrics)`."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array]):
        return sft_batch_loss(nnx.merge(graphdef, params), batch)

    return loop.make_train_step(loss_fn, tx, schedule, state_sharding, batch_sharding)


def sft_dataset(examples: list[SFTExample], tokenizer, template, config: ConfigDict,
                packing: bool = False, **kwargs: Any) -> SFTDataset:
    """The SFT batches of `examples` by `config`; `packing`: several examples per row."""
    data = config.data
    dataset_cls = PackedSFTDataset if packing else SFTDataset
    return dataset_cls(examples, tokenizer, template, batch_size=config.sft.batch_size,
                       max_prompt_tokens=data.max_prompt_tokens,
                       max_response_tokens=data.max_response_tokens,
                       truncation=data.truncation, special_tokens=data.special_tokens,
                       **kwargs)


@partial(jax.jit, static_argnums=0)
def _eval_loss_jit(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, jax.Array]):
    # Padding rows (`valid` False) repeat a real row: no loss on them.
    batch = {**batch, "loss_mask": batch["loss_mask"] & batch["valid"][:, None]}
    return sft_batch_loss(nnx.merge(graphdef, params), batch)


def evaluate_sft(graphdef: nnx.GraphDef, params: Any, dataset: SFTDataset, mesh,
                 source: str = "the evaluation set") -> dict[str, float]:
    """Token-weighted response NLL (and perplexity) over every example of `dataset` (build it
    with `num_epochs=1, drop_remainder=False`: a short last batch is padded with rows that
    count for nothing). Raises ValueError naming `source` when there is no response token."""
    loss, stats = map_batches(partial(_eval_loss_jit, graphdef, params), dataset,
                              batch_size=dataset.batch_size, mesh=mesh, desc="evaluating")
    counts = stats["response_tokens"]  # `[num_batches]`, as `loss` (each batch's mean)
    tokens = int(counts.sum())
    if not tokens:
        raise ValueError(f"{source}: no response token to evaluate on; give it examples "
                         "with responses")
    nll = sum(float(x) * int(n) for x, n in zip(loss, counts, strict=True)) / tokens
    return {"loss": nll, "perplexity": float(np.exp(nll)), "response_tokens": tokens}


@holds_workdir
def train_sft(config: ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Fine-tunes the language model of `config` on `sft.train_file` in `workdir` (resuming
    from its latest checkpoint), then exports it to `workdir/hf`. Returns the last metrics."""
    validate_config(config)
    sft, data = config.sft, config.data
    if not sft.train_file:
        raise ValueError("config.sft.train_file is empty: set it to an SFT JSONL file "
                         "(e.g. --config.sft.train_file=data/sft.jsonl)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh_from_config(config)
    tokenizer = tokenizer_from_config(config)
    template = template_from_config(config, tokenizer)
    check_tokenizer_fits(config, tokenizer)  # before the pre-flight and any weights
    examples, read_report = read_jsonl(sft.train_file, "sft", on_error=data.on_error,
                                       field="config.sft.train_file")
    read_report.print_skipped(sft.train_file)
    packing = sft.get("packing", False)
    train_data = sft_dataset(examples, tokenizer, template, config, packing=packing,
                             source=f"config.sft.train_file = {sft.train_file!r}",
                             seed=config.seed, process_index=jax.process_index(),
                             process_count=jax.process_count())
    print(f"{sft.train_file}: {train_data.report}")
    if packing:
        print(f"{sft.train_file}: {train_data.packing_report}")
    train_iter = iter(train_data)
    eval_data = None
    if sft.eval_file:
        # Unpacked: the eval set and its numbers stay the same whatever the training rows.
        eval_examples, _ = read_jsonl(sft.eval_file, "sft", on_error=data.on_error,
                                      field="config.sft.eval_file")
        eval_source = f"config.sft.eval_file = {sft.eval_file!r}"
        eval_data = sft_dataset(eval_examples, tokenizer, template, config, shuffle=False,
                                num_epochs=1, drop_remainder=False, source=eval_source)
        print(f"{sft.eval_file}: {eval_data.report}")

    checked = preflight(config, "sft", mesh, "SFT")  # before any weights load
    model = model_from_config(config, "lm", mesh, role="sft")
    model_config = model.config
    tx, schedule = optimizer_from_config(sft, config.model.moment_dtype)
    with jax.set_mesh(mesh):
        graphdef, state = init_train_state(model, tx)
    del model
    eval_fn = None
    if eval_data is not None:

        def eval_fn(state: TrainState) -> dict[str, Any]:
            return evaluate_sft(graphdef, state.params, eval_data, mesh, eval_source)

    return run_stage(
        config, sft, workdir, graphdef=graphdef, state=state,
        make_step=lambda shardings: make_train_step(graphdef, tx, schedule,
                                                    shardings_of(state), shardings),
        batches=train_iter, mesh=mesh, model_config=model_config, tokenizer=tokenizer,
        desc="SFT", eval_fn=eval_fn, export_hf=True, precompiled=checked)
