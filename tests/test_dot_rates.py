"""benchmarks/dot_rates.py times the dots it says it does: each form computes the chained
loop a numpy re-derivation gives, so no call is hoisted out or skipped."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dot_rates():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import dot_rates
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return dot_rates


def test_each_timed_loop_computes_every_call(dot_rates):
    # Large entries: each call's 1e-9 step moves the carry by ~1%, so a skipped call shows.
    kernel = np.random.default_rng(0).standard_normal((16, 48), np.float32) * 1e6
    batch, calls = 3, 4
    rows = np.full((batch, 16), 0.01, np.float32)
    for _ in range(calls):  # the carry moves by each call's row maxima
        rows = rows + np.float32(1e-9) * (rows @ kernel).max(axis=1, keepdims=True)
    one_call = 0.01 + 1e-9 * (np.full((batch, 16), 0.01) @ kernel).max(axis=1, keepdims=True)
    assert np.abs(rows / one_call - 1).max() > 0.01
    for constant in (False, True):
        out = dot_rates.xla_dot(jnp.asarray(kernel), batch, calls, constant=constant)()
        np.testing.assert_allclose(np.asarray(out), rows, rtol=1e-6)
    linear = dot_rates.torch_linear(kernel, batch, calls)().numpy()
    np.testing.assert_allclose(linear, rows, rtol=1e-6)
    total = dot_rates.xla_read(jnp.asarray(kernel), calls)()
    scale = np.float32(1.0)
    for _ in range(calls):
        scale = scale + np.float32(1e-9) * (kernel * scale).sum()
    np.testing.assert_allclose(float(total), scale, rtol=1e-6)
