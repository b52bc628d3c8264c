"""Orbax checkpoints of a TrainState plus JSON-able extras (data iterator position, ...)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from glm_jax.models.glm import GlmConfig
from glm_jax.models.lora import (
    frozen_fingerprint,
    is_trained,
    join,
    stored_part,
    with_frozen_of,
)
from glm_jax.sharding import shard_state, state_shardings
from glm_jax.train.workdir import set_aside, write_file


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files are missing or cannot be read (not a config mismatch)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints under `directory`; saves are asynchronous and
    atomic (orbax writes to a temporary directory and renames it when complete, so an
    interrupted save is never taken as the latest). With `best_metric` (a name among the
    metrics passed to `save`, e.g. "eval_accuracy") the best checkpoint by it is kept too,
    highest or lowest by `best_mode` ("max" / "min")."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, best_metric: str = "",
                 best_mode: str = "max"):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        policies = ocp.checkpoint_managers
        options: dict[str, Any] = dict(max_to_keep=max_to_keep)
        if best_metric:
            if best_mode not in ("max", "min"):
                raise ValueError(f"best_mode = {best_mode!r}: expected 'max' or 'min'")
            options = dict(
                preservation_policy=policies.AnyPreservationPolicy([
                    policies.LatestN(n=max_to_keep),
                    policies.BestN(get_metric_fn=lambda m: m[best_metric],
                                   reverse=best_mode == "min", n=1,
                                   keep_checkpoints_without_metrics=False)]),
                best_fn=lambda m: m[best_metric], best_mode=best_mode)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(create=True, **options),
            item_names=("state", "extra"))

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None) -> None:
        """metrics: ranks the checkpoint when `best_metric` is set (None: unranked)."""
        if self.best_metric and metrics is not None and self.best_metric not in metrics:
            raise ValueError(f"best_metric {self.best_metric!r} is not among the metrics "
                             f"{sorted(metrics)}")
        ranked = metrics if self.best_metric else None
        # A LoRA run's checkpoint holds what it trains; of its frozen base only a fingerprint,
        # which a resume checks the base it is given against.
        fingerprint = frozen_fingerprint(state)
        extra = {**(extra or {}), **({FROZEN_BASE: fingerprint} if fingerprint else {})}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(stored_part(state)), extra=ocp.args.JsonSave(extra)),
            metrics=ranked, force=True)

    def best_step(self) -> int | None:
        """The step of the best checkpoint by `best_metric` (None without one)."""
        return self.manager.best_step() if self.best_metric else None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps with a complete (committed) checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto `target`'s structure, dtypes and shardings (which may be a different
        mesh than the one that saved). A checkpoint of another model or optimizer (other
        parameter names, shapes or dtypes) is a ValueError naming the first difference; one
        whose files are missing or cannot be read is CheckpointDamaged naming the step."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = self.directory / str(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, stored_part(target))
        try:
            stored = ocp.PyTreeCheckpointHandler().metadata(path / "state")
        except (OSError, ValueError) as e:
            raise CheckpointDamaged(step, f"{path} is damaged: {_abridged(e)}") from e
        difference = _first_difference(abstract, stored)
        if difference:
            raise ValueError(f"the checkpoint {path} was written by a run with a different "
                             f"model or optimizer config; use a new workdir, or the config "
                             f"that wrote it (config.json beside its checkpoints): "
                             f"{difference}")
        # The names, shapes and dtypes match: a failure to read now is missing or damaged
        # files (tensorstore's NOT_FOUND / OUT_OF_RANGE, a missing `extra` item, bad JSON).
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointDamaged(step, f"{path} is damaged: {_abridged(e)}") from e
        extra = dict(restored.extra or {})
        check_same_base(path, extra.get(FROZEN_BASE, []), frozen_fingerprint(target))
        return with_frozen_of(restored.state, target), extra

    def set_aside(self, step: int) -> Path:
        """Moves the checkpoint of `step` to `<step>.damaged` beside it (a name orbax does not
        take for a step), so it is kept but no longer the latest; returns its new path."""
        moved = set_aside(self.directory / str(step),
                          lambda n: f"{step}.damaged" + (f".{n}" if n > 1 else ""))
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


FROZEN_BASE = "frozen_base"  # the key of the base's fingerprint in a checkpoint's extras


def check_same_base(path: Path, stored: list[float], given: list[float]) -> None:
    """ValueError when the checkpoint at `path` trained its adapters on another frozen base
    than the one given to continue from (`lora.frozen_fingerprint`s: the sums of the absolute
    values of the frozen arrays, equal within bfloat16 rounding)."""
    if not stored and not given:
        return
    differ = len(stored) != len(given) or any(
        abs(a - b) > 1e-2 * max(abs(a), abs(b), 1e-6) for a, b in zip(stored, given,
                                                                        strict=True))
    if differ:
        raise ValueError(
            f"the checkpoint {path} holds low-rank adapters trained on another base model "
            f"than the one this run loaded (the sums of the frozen weights differ: "
            f"{len(stored)} arrays there, {len(given)} here): resume with the base it was "
            f"trained on (config.model.init_checkpoint and config.model.lora in the "
            f"config.json beside its checkpoints), or use a new workdir")


def _abridged(error: Exception) -> str:
    """The first line of an orbax / tensorstore error, without its long spec dump."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(" [tensorstore_spec=")[0][:400]


def _first_difference(abstract: Any, metadata: Any) -> str | None:
    """The first parameter whose name, shape or dtype differs between the restore target and
    the checkpoint's metadata, in words (None when they agree). Checked before reading, since
    orbax reports a mismatch for whichever array its concurrent reads happen to reach first."""
    tree = getattr(metadata, "tree", metadata)
    stored = {leaf.name: leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "name")}
    wanted = {".".join(ocp.tree.str_keypath(path)): leaf
              for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    for name, want in wanted.items():
        got = stored.get(name)
        if got is None:
            return f"{name} is not in the checkpoint"
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return (f"{name} is {got.dtype}{list(got.shape)} there and "
                    f"{want.dtype}{list(want.shape)} here")
    extra = sorted(set(stored) - set(wanted))
    return f"{extra[0]} is in the checkpoint but not in this config" if extra else None


def save_model_config(config: GlmConfig, workdir: str | Path) -> None:
    """Writes `workdir/model_config.json`, which `load_trained_model` rebuilds the model from."""
    write_file(Path(workdir) / "model_config.json",
               json.dumps(dataclasses.asdict(config), indent=2))


def load_model_config(workdir: str | Path) -> GlmConfig:
    path = Path(workdir) / "model_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a glm_jax training workdir?")
    fields = json.loads(path.read_text())
    for name in ("eos_token_id", "lora_targets"):  # JSON lists; the config is hashable
        if name in fields:
            fields[name] = tuple(fields[name])
    return GlmConfig(**fields)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def load_trained_model(workdir: str | Path, model_cls: type[nnx.Module],
                       mesh: Mesh | None = None, step: int | None = None,
                       overrides: dict[str, Any] | None = None) -> nnx.Module:
    """The `model_cls` trained in `workdir` (its latest checkpoint unless `step`), with
    parameters only (no optimizer state), sharded over `mesh` if given. `overrides` change
    fields of its model config: how it runs (remat, ...) and its dtypes (the parameters are
    cast to `param_dtype` as they are read). A LoRA run's checkpoint holds its adapters (and
    scalar head): the base comes from the run's own config (config.json: its
    model.init_checkpoint, or the tiny model of its seed) and must be the one they were
    trained on."""
    config = load_model_config(workdir).replace(**(overrides or {}))
    base = _lora_base(workdir, model_cls, config, mesh) if config.lora_rank else None
    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0))))
    if base is not None:
        params = nnx.split_state(params, is_trained, ...)[0]
    if mesh is not None:
        shardings = state_shardings(params, mesh)  # one NamedSharding per Variable
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, params, is_leaf=_is_variable)
    target = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        params, shardings, is_leaf=_is_variable)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
        restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
                partial_restore=True),
            extra=ocp.args.JsonRestore()))
    finally:
        checkpointer.close()
    params = restored.state["params"]
    if base is not None:
        params = join(params, base)
        check_same_base(checkpointer.directory / str(step),
                        (restored.extra or {}).get(FROZEN_BASE, []),
                        frozen_fingerprint(params))
    return nnx.merge(graphdef, params)


def _lora_base(workdir: str | Path, model_cls: type[nnx.Module], config: GlmConfig,
               mesh: Mesh | None) -> nnx.State:
    """The frozen base of a LoRA run in `workdir` (without adapters or head), in `config`'s
    dtypes: its config.json's model.init_checkpoint, or the tiny model of its seed."""
    from glm_jax.models.convert import HEADS, from_pretrained
    from glm_jax.train.common import RUNTIME_FIELDS, load_config

    run = load_config(workdir)
    head = next(name for name, cls in HEADS.items() if cls is model_cls)
    base_config = config.without_lora()
    if run.model.init_checkpoint:
        keep = ("dtype", "param_dtype", *RUNTIME_FIELDS)
        model = from_pretrained(run.model.init_checkpoint, mesh=mesh, head=head, seed=run.seed,
                                **{f: getattr(base_config, f) for f in keep})
        state = nnx.state(model)
    else:  # drawn in the trained dtype, then cast, as the run made it
        drawn = base_config.replace(param_dtype=run.model.param_dtype)
        state = nnx.state(model_cls(drawn, rngs=nnx.Rngs(run.seed)))
        state = jax.tree.map(lambda x: x.astype(base_config.param_dtype), state)
        state = state if mesh is None else shard_state(state, mesh)
    return nnx.split_state(state, is_trained, ...)[1]
