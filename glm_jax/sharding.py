"""Device mesh, logical-axis rules and the helpers that place arrays on the mesh.

Every parameter and key activation names its dimensions with *logical* axes ("embed", "heads",
...). One table, `LOGICAL_AXIS_RULES`, maps them to the three mesh axes ("data", "fsdp",
"tensor"), so changing the mesh shape in a config never needs a code change (t5x's
partitioning.py idea, kept to one small table).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: the batch is split over every data-parallel axis
    ("length", None),
    ("act_embed", None),  # activation hidden dim stays whole; the fsdp axis shards parameters only
    ("embed", "fsdp"),  # parameter hidden dim: ZeRO-3 style sharding over fsdp
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),  # norm scales are tiny; replicating them avoids an all-gather per layer
    ("cache_length", None),
    ("layers", None),  # stacked layers (scan): every device holds its shard of every layer
    ("lora_rank", None),  # a low-rank adapter's rank: a few dozen, replicated
)
_RULES = dict(LOGICAL_AXIS_RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes; at most one may be -1 (the rest)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{name} = {size}: each mesh axis must be >= 1, or -1 for "
                                 "'the remaining devices'")
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh.{free[0]} and mesh.{free[1]} are both -1: at most one mesh "
                             "axis may take the remaining devices")
        fixed = math.prod(size for size in sizes.values() if size != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh.{free[0]} = -1 cannot take the rest: {num_devices} devices are not "
                    f"divisible by the other axes' product {fixed} ({self._describe()})")
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh {self._describe()} needs {fixed} devices but there are "
                             f"{num_devices}: change mesh.data / mesh.fsdp / mesh.tensor "
                             "(or set one of them to -1)")
        return sizes["data"], sizes["fsdp"], sizes["tensor"]

    def _describe(self) -> str:
        return f"data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}"


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all of them).

    Axis types are Auto: XLA propagates shardings through the model, so model code never has to
    state the output sharding of a matmul over a sharded contracting dimension.
    """
    if not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> PartitionSpec:
    """PartitionSpec for `logical_axes` under `LOGICAL_AXIS_RULES`.

    With `shape` and `mesh`, a mesh axis is dropped from a dimension it does not divide (e.g. a
    batch of 2 on 8 data-parallel devices is replicated rather than rejected): activations of
    any batch size must run, while parameters are checked up front by `check_model_fits_mesh`.
    """
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        target = _RULES.get(name) if name is not None else None
        if target is not None and shape is not None and mesh is not None:
            axes = (target,) if isinstance(target, str) else target
            kept = []
            for axis in axes:
                size = mesh.shape[axis]
                if shape[i] % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
                    kept.append(axis)
            target = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
        spec.append(target)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, against the mesh set by `jax.set_mesh`.

    Without a mesh in context this is the identity, so the model also runs unsharded.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def _logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * len(variable.shape)
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings matching an nnx State, or any pytree holding Variables (an
    optimizer state, whose moments are Variables with their parameter's axes), abstract or
    concrete: a Variable is placed by its logical axes, any other leaf (a step count)
    replicated."""

    def sharding(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, logical_to_spec(_logical_axes_of(leaf)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: Mesh) -> Any:
    """Moves every array of an nnx State onto `mesh` by its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh))


def check_model_fits_mesh(config: Any, mesh: Mesh) -> None:
    """Raises ValueError naming the model config field that a mesh axis does not divide."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    for field, axis_name, axis_size in (
        ("num_attention_heads", "tensor", tensor),
        ("num_key_value_heads", "tensor", tensor),
        ("intermediate_size", "tensor", tensor),
        ("vocab_size", "tensor", tensor),
        ("hidden_size", "fsdp", fsdp),
    ):
        value = getattr(config, field)
        if value % axis_size:
            raise ValueError(f"model config {field} = {value} is not divisible by the mesh "
                             f"'{axis_name}' axis of size {axis_size}; choose a mesh whose "
                             f"{axis_name} size divides {field}")


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes of the addressable shards of every array in `tree`, per device."""
    totals: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + int(
                np.prod(shard.data.shape)) * shard.data.dtype.itemsize
    return totals


def _launched_as_several_processes() -> bool:
    """Whether the environment says this is one of several processes: JAX's own variables,
    a SLURM step with several tasks, a multi-host TPU slice, or Open MPI."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")
                or int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
    """Starts JAX's multi-controller runtime (`jax.distributed.initialize`) once, before any
    device is used. With `coordinator_address` ("host:port") the process count and id must be
    given too; without it JAX detects them on TPU pods, SLURM and Open MPI, or from
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. A plain single-machine
    run (none of those) stays one process."""
    if jax.distributed.is_initialized():
        return
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"config.distributed: coordinator_address={coordinator_address!r} needs "
                f"num_processes >= 1 and 0 <= process_id < num_processes (got "
                f"num_processes={num_processes}, process_id={process_id})")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif _launched_as_several_processes():
        jax.distributed.initialize()

# --- batch placement: host rows -> global arrays over the data-parallel axes, and back ------

Batch = Mapping[str, np.ndarray]


def batch_sharding(mesh: Mesh, batch: Batch, num_processes: int = 1
                   ) -> dict[str, NamedSharding]:
    """Rows of every batch array split over the data-parallel mesh axes. With
    `num_processes`, `batch` holds one process's rows of a global batch that many times
    larger."""
    return {key: NamedSharding(mesh, logical_to_spec(
                ("batch",) + (None,) * (value.ndim - 1),
                (value.shape[0] * num_processes, *value.shape[1:]), mesh))
            for key, value in batch.items()}


def to_device(batch: Batch, shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """A global array per key from this process's rows (one process: all rows)."""
    count = jax.process_count()
    return {key: jax.make_array_from_process_local_data(
                shardings[key], np.asarray(value),
                (np.shape(value)[0] * count, *np.shape(value)[1:]))
            for key, value in batch.items() if key in shardings}


def global_to_device(batch: Batch, shardings: Mapping[str, NamedSharding]
                     ) -> dict[str, jax.Array]:
    """A global array per key from a batch every process holds whole (evaluation and sampling
    loops over a file every process reads): each device takes its own slice."""
    return {key: jax.make_array_from_callback(np.shape(value), shardings[key],
                                              lambda index, value=value: np.asarray(value)[index])
            for key, value in batch.items() if key in shardings}


def to_host(tree: Any) -> Any:
    """Numpy copies of (possibly multi-process) global arrays, whole on every process."""
    def fetch(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)
