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
from glm_jax.sharding import state_shardings


class Checkpointer:
    """Keeps the last `max_to_keep` checkpoints under `directory`; saves are asynchronous and
    atomic (orbax writes to a temporary directory and renames it when complete, so an
    interrupted save is never taken as the latest)."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "extra"))

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})),
            force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto `target`'s structure, dtypes and shardings (which may be a different
        mesh than the one that saved)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return restored.state, dict(restored.extra or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_model_config(config: GlmConfig, workdir: str | Path) -> None:
    """Writes `workdir/model_config.json`, which `load_trained_model` rebuilds the model from."""
    fields = dataclasses.asdict(config)
    (Path(workdir) / "model_config.json").write_text(json.dumps(fields, indent=2))


def load_model_config(workdir: str | Path) -> GlmConfig:
    path = Path(workdir) / "model_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a glm_jax training workdir?")
    fields = json.loads(path.read_text())
    fields["eos_token_id"] = tuple(fields["eos_token_id"])
    return GlmConfig(**fields)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def load_trained_model(workdir: str | Path, model_cls: type[nnx.Module],
                       mesh: Mesh | None = None, step: int | None = None) -> nnx.Module:
    """The `model_cls` trained in `workdir` (its latest checkpoint unless `step`), with
    parameters only (no optimizer state), sharded over `mesh` if given."""
    config = load_model_config(workdir)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0))))
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
                partial_restore=True)))
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, restored.state["params"])
