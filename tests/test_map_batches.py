"""train.batched.map_batches against plain numpy: padding rows dropped, rows in dataset order,
per-batch scalars stacked, on a (2, 2, 2) mesh and on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.sharding import make_mesh
from glm_jax.train.batched import map_batches

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


@jax.jit
def rows_and_batch(batch):
    """Per row: x @ W + 1, the row's index; per batch: the sum of x over the real rows."""
    x, valid = batch["x"], batch["valid"]
    return ({"y": x @ W + 1, "index": batch["index"]},
            jnp.sum(jnp.where(valid[:, None], x, 0.0)))


def batches_of(x, index, size):
    return [{"x": x[i:i + size], "index": index[i:i + size]} for i in range(0, len(x), size)]


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 1)])
def test_rows_in_order_without_padding_and_batch_scalars(mesh_shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(21, 3)).astype(np.float32)
    index = rng.permutation(21).astype(np.int32)  # the dataset's order is not sorted
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    batches = batches_of(x, index, 8)  # 8, 8 and a short last batch of 5
    seen = []

    def fn(batch):
        seen.append(np.asarray(batch["valid"]).tolist())
        return rows_and_batch(batch)

    rows, sums = map_batches(fn, batches, batch_size=8, mesh=make_mesh(mesh_shape, devices),
                             desc="test")
    np.testing.assert_allclose(rows["y"], x @ W + 1, atol=1e-5)
    np.testing.assert_array_equal(rows["index"], index)
    # One call per batch, each of 8 rows; the padding rows of the last one marked invalid ...
    assert seen == [[True] * 8, [True] * 8, [True] * 5 + [False] * 3]
    # ... so a per-batch value masked by `valid` counts the real rows only.
    np.testing.assert_allclose(sums, [x[0:8].sum(), x[8:16].sum(), x[16:].sum()], rtol=1e-5)


def test_a_batch_already_padded_keeps_its_real_rows():
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    valid = np.array([True, True, False, True, False, False, True, False])
    batch = {"x": np.concatenate([x, np.ones((8, 1), np.float32)], 1),
             "index": np.arange(8, dtype=np.int32), "valid": valid}

    rows, sums = map_batches(rows_and_batch, [batch, batch], batch_size=8,
                             mesh=make_mesh((2, 2, 2)), desc="test")
    np.testing.assert_array_equal(rows["index"], np.tile(np.flatnonzero(valid), 2))
    np.testing.assert_allclose(rows["y"], np.tile(batch["x"][valid] @ W + 1, (2, 1)),
                               atol=1e-5)
    np.testing.assert_allclose(sums, [batch["x"][valid].sum()] * 2)


def test_no_batch_is_an_error():
    with pytest.raises(ValueError, match="empty set: no batch to run"):
        map_batches(rows_and_batch, [], batch_size=8, mesh=make_mesh((1, 1, 1),
                                                                     jax.devices()[:1]),
                    desc="empty set")
