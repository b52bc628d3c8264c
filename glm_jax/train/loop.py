"""The training loop every stage shares: resume, jitted steps, metrics, evals, checkpoints.

Side effects (I/O, logging, checkpoints) live here, never inside the jitted step.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from glm_jax.models.convert import save_pretrained
from glm_jax.models.glm import lora_dropout_key
from glm_jax.models.lora import ADAPTER_DIR, partition, save_adapter, unpartition
from glm_jax.sharding import Batch, batch_sharding, to_device, to_host
from glm_jax.train.checkpoint import CheckpointDamaged, Checkpointer, save_model_config
from glm_jax.train.common import is_main_process, save_config, save_tokenizer
from glm_jax.train.metrics import MetricsWriter, recorded_metrics
from glm_jax.train.programs import compile_step, peak_flops
from glm_jax.train.state import TrainState

_HOST_ONLY = ("task_index", "pair_index", "prompt_index", "sft_task_index")
StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


def resume(checkpointer: Checkpointer, state: TrainState, batches: Iterator,
           on_damaged: str = "refuse") -> TrainState:
    """The newest readable checkpoint's state, with `batches` moved to its saved position; or
    `state` unchanged when there is no checkpoint yet.

    A damaged checkpoint (files missing or unreadable) newer than an intact one: with
    on_damaged "refuse", CheckpointDamaged naming both steps; with "previous", the damaged
    ones are moved aside (`Checkpointer.set_aside`, never deleted) and the run resumes from
    the intact one. No intact checkpoint at all is CheckpointDamaged either way."""
    damaged: list[CheckpointDamaged] = []
    for step in reversed(checkpointer.all_steps()):
        try:
            restored, extra = checkpointer.restore(state, step)
            break
        except CheckpointDamaged as e:
            damaged.append(e)
    else:
        if not damaged:
            return state
        raise CheckpointDamaged(damaged[0].step, (
            f"no checkpoint in {checkpointer.directory} can be read: "
            + "; ".join(map(str, damaged)) + ". Put back the missing files, or move "
            f"{checkpointer.directory} aside to start over from step 0"))
    if damaged and on_damaged != "previous":
        raise CheckpointDamaged(damaged[0].step, (
            "; ".join(map(str, damaged)) + f". The newest intact checkpoint is step {step}. "
            f"Put back the missing files, or set on_damaged_checkpoint='previous' (e.g. "
            f"--config.on_damaged_checkpoint=previous) to move the damaged "
            f"checkpoint{'s' if len(damaged) > 1 else ''} aside and resume from step {step}"))
    for error in damaged:
        print(f"{error}: moved it aside to {checkpointer.set_aside(error.step)} "
              f"(on_damaged_checkpoint='previous')", flush=True)
    batches.set_state(extra["data"])
    print(f"resumed from step {int(restored.step)} in {checkpointer.directory}")
    return restored


class _Abandoned(BaseException):
    """Raised by a Preemption's signal handler in `abandon` mode (a BaseException, so no
    `except Exception` on the way swallows it)."""


class Preemption:
    """While active, SIGTERM and SIGINT only set `requested`; the loop saves a checkpoint at
    the next step boundary and exits. A second SIGINT interrupts at once.

    abandon: what the block does, in words ("sampling the reference responses"), for work
    with no step boundary to stop at: the first signal then abandons the block at once
    (nothing of it is written), says so, and exits with SystemExit(0) as the loop does.
    With several processes every one must receive the signal (schedulers send it to all)."""

    def __init__(self, abandon: str = "") -> None:
        self.requested: str | None = None
        self.abandon = abandon
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.abandon:
            raise _Abandoned

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if exc_type is _Abandoned:
            print(f"{self.requested} asked to stop: abandoned {self.abandon}; nothing of it "
                  f"was written. Run the same command again to resume (it starts "
                  f"{self.abandon} over).", flush=True)
            raise SystemExit(0) from None

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes stop at the same step)."""
        flag = self.requested is not None
        if jax.process_count() > 1:
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point number in `tree` is finite: a bool scalar, one read of
    the arrays and no copy."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _last_good(checkpointer: Checkpointer) -> str:
    """Where the newest checkpoint is, in words (the saves in flight finished first)."""
    checkpointer.wait()
    step = checkpointer.latest_step()
    if step is None:
        return f"no checkpoint was written to {checkpointer.directory}"
    return f"the last good checkpoint, step {step} in {checkpointer.directory}, is intact"


def batch_tokens(batch: Batch) -> int:
    """Token positions a batch feeds the model: the sizes of its `*_ids` arrays."""
    return sum(int(np.size(v)) for k, v in batch.items() if k.endswith("_ids"))


def train_loop(state: TrainState, make_step: Callable[[dict[str, NamedSharding]], StepFn],
               batches: Iterator, *, mesh: Mesh, num_steps: int, checkpointer: Checkpointer,
               writer: MetricsWriter | None, desc: str,
               eval_fn: Callable[[TrainState], dict[str, Any]] | None = None,
               eval_every: int = 0, checkpoint_every: int = 0,
               max_nonfinite_steps: int = 10, tokens_per_step: int | None = None,
               flops_per_step: float | None = None, peak_flops: float | None = None,
               precompiled: Any = None, step_reads: tuple[str, ...] = ()
               ) -> tuple[TrainState, dict[str, Any]]:
    """Runs `state` from its step to `num_steps`.

    make_step: given the batch shardings, the jitted `(state, batch) -> (state, metrics)` (or
      a BoundStep); it is compiled ahead of time, and its memory needs are printed and
      checked against the device before the first step.
    batches: a resumable iterator of host batches (`get_state` / `set_state`) holding this
      process's rows; its `task_index` / `pair_index` / `prompt_index` entries are bookkeeping
      and are not fed to the step, except those named in `step_reads` (a step that computes
      rule rewards on the host reads `prompt_index`).
    eval_fn: `state -> {name: number, ...}` run every `eval_every` steps and at the end; its
      numbers are written prefixed `eval_`, and the last result is returned under "eval".
    Checkpoints (with the iterator position) every `checkpoint_every` steps and at the end.
    A step whose metrics report `skipped_nonfinite` left the state unchanged; more than
    `max_nonfinite_steps` of them in a row stop the run with FloatingPointError, as do a
    non-finite `learning_rate` metric and any NaN/Inf in the state after a step (checked every
    step, before anything is saved), naming the step and the last good checkpoint.
    SIGTERM / SIGINT: a checkpoint at the next step boundary, then SystemExit(0).
    Metrics added per step: `step_time` (seconds), `tokens_per_second` (`tokens_per_step`,
    default the batch's `*_ids` sizes over all processes), `tflops_per_second` (all devices;
    `flops_per_step`, default XLA's count of the compiled step) and, when `peak_flops` (per
    device) is known, `mfu`.
    precompiled: the pre-flight's compiled program, run when it matches the real arguments.
    Returns the final state and the last step's metrics.
    """
    step_fn, shardings = None, None
    last: dict[str, Any] = {}
    skipped_in_a_row = 0
    start = int(state.step)
    with Preemption() as preemption:
        for step in tqdm(range(start, num_steps), initial=start, total=num_steps, desc=desc,
                         unit="step", disable=not is_main_process()):
            batch = {k: v for k, v in next(batches).items()
                     if k not in _HOST_ONLY or k in step_reads}
            if shardings is None:  # every batch has the first one's shapes
                shardings = batch_sharding(mesh, batch, jax.process_count())
            device_batch = to_device(batch, shardings)
            if step_fn is None:
                with jax.set_mesh(mesh):
                    step_fn, cost = compile_step(make_step(shardings), state, device_batch,
                                                 desc, precompiled=precompiled)
                if tokens_per_step is None:
                    tokens_per_step = batch_tokens(batch) * jax.process_count()
                if flops_per_step is None:
                    flops_per_step = cost.flops * mesh.size if cost else 0.0
            began = time.perf_counter()
            with jax.set_mesh(mesh):
                state, metrics = step_fn(state, device_batch)
            last = {k: float(v) for k, v in metrics.items()}  # waits for the step
            last |= throughput(time.perf_counter() - began, tokens_per_step, flops_per_step,
                               peak_flops, mesh.size)
            done = step + 1
            if not math.isfinite(last.get("learning_rate", 0.0)):
                raise FloatingPointError(
                    f"{desc}: the learning rate of step {done} is {last['learning_rate']}: "
                    f"its update was skipped and nothing of it saved; "
                    f"{_last_good(checkpointer)}. Set a finite learning_rate (and "
                    f"warmup_steps, end_lr_ratio) in this stage's config section")
            # The host-side guard: whatever the step checked, non-finite parameters or
            # optimizer state are never saved or exported.
            if not bool(all_finite(state)):
                raise FloatingPointError(
                    f"{desc}: step {done} left NaN/Inf in the parameters or optimizer state "
                    f"(a non-finite update); nothing of it was saved; "
                    f"{_last_good(checkpointer)}. Lower the learning rate or check the data, "
                    f"then run again: it resumes from that checkpoint")
            skipped_in_a_row = skipped_in_a_row + 1 if last.get("skipped_nonfinite") else 0
            if skipped_in_a_row > max_nonfinite_steps:
                raise FloatingPointError(
                    f"{desc}: the loss, gradients or update were NaN/Inf for "
                    f"{skipped_in_a_row} steps in a row (up to step {done}; those updates "
                    f"were skipped, the parameters and checkpoints are from before them). "
                    f"Lower the learning rate or check the data; the limit is "
                    f"max_nonfinite_steps={max_nonfinite_steps}")
            if writer:
                writer.write(done, last)
            final = done == num_steps
            evaluated = None
            if eval_fn and ((eval_every and done % eval_every == 0) or final):
                last["eval"] = eval_fn(state)
                evaluated = {f"eval_{k}": v for k, v in last["eval"].items()
                             if isinstance(v, int | float)}
                if writer:
                    writer.write(done, evaluated)
            stop = preemption.agreed()
            if (checkpoint_every and done % checkpoint_every == 0) or final or stop:
                checkpointer.save(done, state, {"data": batches.get_state()}, evaluated)
            if stop and not final:
                checkpointer.wait()
                print(f"{desc}: {preemption.requested or 'another process'} asked to stop; "
                      f"saved the checkpoint of step {done} in {checkpointer.directory}. Run "
                      f"the same command again to resume.", flush=True)
                raise SystemExit(0)
    checkpointer.wait()
    return state, last


def throughput(seconds: float, tokens: int, flops: float, peak_flops: float | None,
               num_devices: int) -> dict[str, float]:
    """Per-step speed metrics from the step's wall time; `flops` over all devices,
    `peak_flops` per device."""
    out = {"step_time": seconds, "tokens_per_second": tokens / seconds}
    if flops:
        out["tflops_per_second"] = flops / seconds / 1e12
        if peak_flops:
            out["mfu"] = flops / seconds / (peak_flops * num_devices)
    return out


def update_if_finite(finite: jax.Array, update: Callable[[], Any], previous: Any) -> Any:
    """`update()` when `finite` (a bool scalar), else `previous`: a NaN/Inf loss or gradient
    skips the update instead of poisoning the parameters and the optimizer moments. A
    `lax.cond`, not a select: XLA then writes the new parameters and moments in place, where
    a select holds both versions at once (5.4 GiB more per device for GLM-4-9B on 8 GPUs)."""
    return jax.lax.cond(finite, update, lambda: previous)


LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


def train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """The update every stage makes, as a pure function `(state, batch) -> (state, metrics)`:
    gradients of `loss_fn` `(params, batch) -> (loss, metrics)`, one optimizer step, skipped
    when the loss, the gradients or the learning rate are not finite. The metrics add `loss`,
    `grad_norm`, `learning_rate` and `skipped_nonfinite` to the loss function's. `state.step`
    is the schedule's step (the count of updates). With low-rank adapters in the parameters,
    only the trained part (`lora.partition`: adapters, scalar heads) gets gradients and
    optimizer state; the frozen base passes through; their dropout (if any) draws from a key
    of `state.step`."""

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        trained, frozen = partition(state.params)

        def objective(trained: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            return loss_fn(unpartition(trained, frozen), batch)

        # LoRA dropout (models with lora_dropout > 0): a key per update, from its count.
        with lora_dropout_key(jax.random.fold_in(jax.random.key(0), state.step)):
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trained,
                                                                                   batch)
        grad_norm = optax.tree.norm(grads)
        learning_rate = schedule(state.step)
        # A non-finite learning rate makes every update NaN with finite gradients: checked
        # here, before the update, since a check of the update itself would need the old and
        # new parameters at once.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(learning_rate)

        def update() -> tuple[Any, Any]:
            updates, opt_state = tx.update(grads, state.opt_state, trained)
            return optax.apply_updates(trained, updates), opt_state

        trained, opt_state = update_if_finite(finite, update, (trained, state.opt_state))
        metrics = {"loss": loss, **metrics, "grad_norm": grad_norm,
                   "learning_rate": learning_rate,
                   "skipped_nonfinite": 1 - finite.astype(jnp.int32)}
        return TrainState(step=state.step + 1, params=unpartition(trained, frozen),
                          opt_state=opt_state), metrics

    return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, state_sharding: Any, batch_sharding: Any
                    ) -> StepFn:
    """`train_step` jitted with explicit shardings, the state's buffers donated: the step of
    SFT, reward-model and DPO training."""
    return jax.jit(train_step(loss_fn, tx, schedule), in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)


def run_stage(config: ConfigDict, section: ConfigDict, workdir: Path, *, graphdef: Any,
              state: TrainState, make_step: Callable[[dict[str, NamedSharding]], StepFn],
              batches: Iterator, mesh: Mesh, model_config: Any, tokenizer: Any, desc: str,
              eval_fn: Callable[[TrainState], dict[str, Any]] | None = None,
              export_hf: bool = False, tokens_per_step: int | None = None,
              flops_per_step: float | None = None, precompiled: Any = None,
              step_reads: tuple[str, ...] = ()) -> dict[str, Any]:
    """What every stage does around its step: resume from `workdir/checkpoints`, record the
    resolved config, model config and tokenizer, run `train_loop` with the metrics writer,
    and (with `export_hf`) export the final model to `workdir/hf`. `section` is the stage's
    config section (num_steps, checkpoint_every, keep_checkpoints, log_every, and optionally
    eval_every, max_nonfinite_steps, best_metric, best_mode). `precompiled`: the stage's
    pre-flight (glm_jax.train.preflight), run instead of compiling when it matches.
    A damaged latest checkpoint is handled by config.on_damaged_checkpoint (`resume`). A
    workdir already at num_steps trains nothing and rewrites nothing (it exports only when
    the export is missing). Returns the last step's metrics."""
    best_metric = section.get("best_metric", "")
    if best_metric and eval_fn is None:
        raise ValueError(f"best_metric = {best_metric!r} ranks checkpoints by an eval metric, "
                         f"but this {desc} run has no evaluation (set its eval_file)")
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=section.keep_checkpoints,
                                best_metric=best_metric,
                                best_mode=section.get("best_mode", "max"))
    try:
        state = resume(checkpointer, state, batches,
                       config.get("on_damaged_checkpoint", "refuse"))
    except BaseException:
        checkpointer.close()
        raise
    main = is_main_process()
    if int(state.step) >= section.num_steps:
        checkpointer.close()
        return _nothing_to_train(workdir, int(state.step), section.num_steps, desc,
                                 graphdef=graphdef if export_hf else None, state=state,
                                 tokenizer=tokenizer)
    if main:
        save_config(config, workdir)
        save_model_config(model_config, workdir)
        save_tokenizer(tokenizer, workdir)
    writer = (MetricsWriter(workdir, print_every=section.log_every, resume_step=int(state.step),
                            wandb=wandb_settings(config, workdir))
              if main else None)
    try:
        state, last = train_loop(
            state, make_step, batches, mesh=mesh, num_steps=section.num_steps,
            checkpointer=checkpointer, writer=writer, desc=desc, eval_fn=eval_fn,
            eval_every=section.get("eval_every", 0), checkpoint_every=section.checkpoint_every,
            max_nonfinite_steps=section.get("max_nonfinite_steps", 10),
            tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
            peak_flops=peak_flops(mesh.devices.flat[0],
                                  config.get("metrics", {}).get("peak_tflops", 0.0)),
            precompiled=precompiled, step_reads=step_reads)
        if checkpointer.best_step() is not None:
            print(f"{desc}: best checkpoint by {best_metric} is step "
                  f"{checkpointer.best_step()} in {checkpointer.directory}")
    finally:
        checkpointer.close()
        if writer:
            writer.close()
    if export_hf:
        export(graphdef, state, workdir / "hf", tokenizer, desc)
    return last


def export(graphdef: Any, state: TrainState, hf_dir: Path, tokenizer: Any, desc: str) -> None:
    """Writes the policy of `state` as a Hugging Face checkpoint to `hf_dir`, with the
    tokenizer; parameters with NaN/Inf are refused (FloatingPointError), whatever wrote them.
    A policy with low-rank adapters is written merged, and its adapters alone in PEFT's
    format beside it (`hf_dir`'s sibling `adapter`)."""
    if not bool(all_finite(state.params)):
        raise FloatingPointError(f"{desc}: the parameters of step {int(state.step)} hold "
                                 f"NaN/Inf; not exported to {hf_dir}. Resume from an earlier "
                                 f"checkpoint (move the later ones aside) with a lower "
                                 f"learning rate")
    # Several processes hold a shard each: gather (collectively), then one writes.
    params = state.params if jax.process_count() == 1 else to_host(state.params)
    if is_main_process():
        model = nnx.merge(graphdef, params)
        save_tokenizer(tokenizer, save_pretrained(model, hf_dir))
        if model.config.lora_rank:
            save_adapter(model, hf_dir.parent / ADAPTER_DIR)


def _nothing_to_train(workdir: Path, reached: int, num_steps: int, desc: str, *,
                      graphdef: Any, state: TrainState, tokenizer: Any) -> dict[str, Any]:
    """A rerun whose workdir already reached num_steps: says so and rewrites nothing; exports
    the reached step only when there is no export (with `graphdef`). Returns the metrics
    recorded for that step."""
    done = f"{desc}: {workdir / 'checkpoints'} already has step {reached} >= num_steps={num_steps}"
    hf_dir = workdir / "hf"
    if graphdef is not None and not (hf_dir / "config.json").exists():
        export(graphdef, state, hf_dir, tokenizer, desc)
        exported = f"; exported step {reached} to {hf_dir}, which was missing"
    elif graphdef is not None:
        exported = f"; the export {hf_dir} is of step {reached}"
    else:
        exported = ""
    print(f"{done}: nothing to train, nothing in {workdir} rewritten; raise num_steps to train "
          f"further{exported}", flush=True)
    return recorded_metrics(workdir, reached)


def wandb_settings(config: ConfigDict, workdir: Path) -> dict[str, Any] | None:
    """Weights & Biases run settings when config.metrics.wandb_project is set."""
    metrics = config.get("metrics", {})
    if not metrics.get("wandb_project"):
        return None
    return dict(project=metrics.wandb_project, entity=metrics.get("wandb_entity") or None,
                name=Path(workdir).name, config=config.to_dict())
