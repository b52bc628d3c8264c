"""One compiled function mapped over a dataset in fixed-size batches: what the evaluations, the
reference log-probs and the samplers share.

Kept apart from sharding.py, which places arrays and knows nothing of datasets: this pads the
dataset's short last batch (`data.datasets.pad_batch`) and shows progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from glm_jax.data.datasets import pad_batch
from glm_jax.sharding import batch_sharding, global_to_device, to_host


def map_batches(fn: Callable[[dict[str, jax.Array]], Any],
                batches: Iterable[Mapping[str, np.ndarray]], *, batch_size: int, mesh: Mesh,
                desc: str, total: int | None = None) -> Any:
    """`fn` over every batch, its outputs brought to the host, padding rows dropped.

    batches: host arrays `[n, ...]` with n <= batch_size, every process holding each whole
      (a file every process reads). A batch may already be padded and mark its real rows with
      a bool `valid` `[n]`. Each is padded to `batch_size` rows (`pad_batch`: one compiled
      program serves every batch) and placed on `mesh`, its rows split over the data-parallel
      axes.
    fn: called once per batch, in order, under `jax.set_mesh(mesh)`, on the placed batch (every
      key of the host batch, and `valid` `[batch_size]` bool, False on the padding rows);
      typically a jitted function. Returns a pytree of arrays: a leaf with a row axis,
      `[batch_size, ...]`, or a scalar for the whole batch (e.g. a mean that `valid` masked).
      To scatter results by an index, return the batch's index entry with them.
    total: the number of batches, for the progress bar (default: `len(batches)` if defined).
    Returns the outputs' pytree: row leaves `[number of real rows, ...]` (the batches' real
      rows, in order), scalar leaves `[number of batches]`. Raises ValueError on no batch.
    """
    parts = []
    shardings = None
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, total=total):
        size = len(next(iter(batch.values())))
        real = np.asarray(batch.get("valid", np.ones(size, bool)), bool)
        padded = pad_batch({k: v for k, v in batch.items() if k != "valid"}, batch_size)
        padded["valid"][:size] = real
        shardings = shardings or batch_sharding(mesh, padded)
        with jax.set_mesh(mesh):
            out = to_host(fn(global_to_device(padded, shardings)))
        parts.append(jax.tree.map(lambda x, keep=padded["valid"]: x if x.ndim == 0 else x[keep],
                                  out))
    if not parts:
        raise ValueError(f"{desc}: no batch to run")
    return jax.tree.map(lambda *xs: np.stack(xs) if xs[0].ndim == 0 else np.concatenate(xs),
                        *parts)
