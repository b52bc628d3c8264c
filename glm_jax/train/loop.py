"""The training loop every stage shares: resume, jitted steps, metrics, evals, checkpoints.

Side effects (I/O, logging, checkpoints) live here, never inside the jitted step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from glm_jax.models.convert import save_pretrained
from glm_jax.sharding import logical_to_spec
from glm_jax.train.checkpoint import Checkpointer, save_model_config
from glm_jax.train.common import is_main_process, save_config, save_tokenizer
from glm_jax.train.metrics import MetricsWriter
from glm_jax.train.state import TrainState

Batch = Mapping[str, np.ndarray]
_HOST_ONLY = ("task_index", "pair_index", "prompt_index", "sft_task_index")
StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def batch_sharding(mesh: Mesh, batch: Batch) -> dict[str, NamedSharding]:
    """Rows of every batch array split over the data-parallel mesh axes."""
    return {key: NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (value.ndim - 1),
                                                     value.shape, mesh))
            for key, value in batch.items()}


def to_device(batch: Batch, shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """A global array per key from this process's rows (one process: all rows)."""
    return {key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
            for key, value in batch.items() if key in shardings}


def resume(checkpointer: Checkpointer, state: TrainState, batches: Iterator
           ) -> TrainState:
    """The latest checkpoint's state, with `batches` moved to its saved position; or `state`
    unchanged when there is no checkpoint yet."""
    if checkpointer.latest_step() is None:
        return state
    state, extra = checkpointer.restore(state)
    batches.set_state(extra["data"])
    print(f"resumed from step {int(state.step)} in {checkpointer.manager.directory}")
    return state


def train_loop(state: TrainState, make_step: Callable[[dict[str, NamedSharding]], StepFn],
               batches: Iterator, *, mesh: Mesh, num_steps: int, checkpointer: Checkpointer,
               writer: MetricsWriter | None, desc: str,
               eval_fn: Callable[[TrainState], dict[str, Any]] | None = None,
               eval_every: int = 0, checkpoint_every: int = 0,
               max_nonfinite_steps: int = 10) -> tuple[TrainState, dict[str, Any]]:
    """Runs `state` from its step to `num_steps`.

    make_step: given the batch shardings, the jitted `(state, batch) -> (state, metrics)`.
    batches: a resumable iterator of host batches (`get_state` / `set_state`); its
      `task_index` / `pair_index` entries are bookkeeping and are not fed to the step.
    eval_fn: `state -> {name: number, ...}` run every `eval_every` steps and at the end; its
      numbers are written prefixed `eval_`, and the last result is returned under "eval".
    Checkpoints (with the iterator position) every `checkpoint_every` steps and at the end.
    A step whose metrics report `skipped_nonfinite` left the state unchanged; more than
    `max_nonfinite_steps` of them in a row stop the run with FloatingPointError.
    Returns the final state and the last step's metrics.
    """
    step_fn, shardings = None, None
    last: dict[str, Any] = {}
    skipped_in_a_row = 0
    start = int(state.step)
    for step in tqdm(range(start, num_steps), initial=start, total=num_steps, desc=desc,
                     unit="step"):
        batch = {k: v for k, v in next(batches).items() if k not in _HOST_ONLY}
        if step_fn is None:
            shardings = batch_sharding(mesh, batch)
            step_fn = make_step(shardings)
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, to_device(batch, shardings))
        done = step + 1
        last = {k: float(v) for k, v in metrics.items()}
        skipped_in_a_row = skipped_in_a_row + 1 if last.get("skipped_nonfinite") else 0
        if skipped_in_a_row > max_nonfinite_steps:
            raise FloatingPointError(
                f"{desc}: the loss or gradients were NaN/Inf for {skipped_in_a_row} steps in "
                f"a row (up to step {done}; those updates were skipped, the parameters and "
                f"checkpoints are from before them). Lower the learning rate or check the "
                f"data; the limit is max_nonfinite_steps={max_nonfinite_steps}")
        if writer:
            writer.write(done, last)
        final = done == num_steps
        if eval_fn and ((eval_every and done % eval_every == 0) or final):
            last["eval"] = eval_fn(state)
            if writer:
                writer.write(done, {f"eval_{k}": v for k, v in last["eval"].items()
                                    if isinstance(v, int | float)})
        if (checkpoint_every and done % checkpoint_every == 0) or final:
            checkpointer.save(done, state, {"data": batches.get_state()})
    checkpointer.wait()
    return state, last


def keep_if_finite(finite: jax.Array, updated: Any, previous: Any) -> Any:
    """`updated` where `finite` (a bool scalar), else `previous`: a NaN/Inf loss or gradient
    skips the update instead of poisoning the parameters and the optimizer moments."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)


LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, state_sharding: Any, batch_sharding: Any
                    ) -> StepFn:
    """The jitted step every stage uses: `(state, batch) -> (state, metrics)`.

    loss_fn: `(params, batch) -> (loss, metrics)`; the step adds `loss`, `grad_norm` and
    `learning_rate` to the metrics. The state's buffers are donated.
    """

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = keep_if_finite(finite, (params, opt_state),
                                           (state.params, state.opt_state))
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step),
                   "skipped_nonfinite": 1 - finite.astype(jnp.int32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)


def run_stage(config: ConfigDict, section: ConfigDict, workdir: Path, *, graphdef: Any,
              state: TrainState, make_step: Callable[[dict[str, NamedSharding]], StepFn],
              batches: Iterator, mesh: Mesh, model_config: Any, tokenizer: Any, desc: str,
              eval_fn: Callable[[TrainState], dict[str, Any]] | None = None,
              export_hf: bool = False) -> dict[str, Any]:
    """What every stage does around its step: resume from `workdir/checkpoints`, record the
    resolved config, model config and tokenizer, run `train_loop` with the metrics writer,
    and (with `export_hf`) export the final model to `workdir/hf`. `section` is the stage's
    config section (num_steps, checkpoint_every, keep_checkpoints, log_every, and optionally
    eval_every).
    Returns the last step's metrics."""
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=section.keep_checkpoints)
    state = resume(checkpointer, state, batches)
    main = is_main_process()
    if main:
        save_config(config, workdir)
        save_model_config(model_config, workdir)
        save_tokenizer(tokenizer, workdir)
    writer = (MetricsWriter(workdir, print_every=section.log_every, resume_step=int(state.step))
              if main else None)
    try:
        state, last = train_loop(
            state, make_step, batches, mesh=mesh, num_steps=section.num_steps,
            checkpointer=checkpointer, writer=writer, desc=desc, eval_fn=eval_fn,
            eval_every=section.get("eval_every", 0), checkpoint_every=section.checkpoint_every,
            max_nonfinite_steps=section.get("max_nonfinite_steps", 10))
    finally:
        checkpointer.close()
        if writer:
            writer.close()
    if export_hf and main:
        hf_dir = save_pretrained(nnx.merge(graphdef, state.params), workdir / "hf")
        save_tokenizer(tokenizer, hf_dir)
    return last
