"""XLA memory / FLOP analysis of compiled steps, the out-of-memory check before the first
step, the throughput metrics, and the optional Weights & Biases writer."""

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.sharding import make_mesh
from glm_jax.train.loop import throughput
from glm_jax.train.metrics import MetricsWriter
from glm_jax.train.programs import (
    GIB,
    BoundStep,
    StepCost,
    check_fits,
    compile_step,
    peak_flops,
    step_cost,
)


def matmul_step():
    mesh = make_mesh((8, 1, 1))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = jax.device_put(np.ones((256, 128), np.float32), rows)
    w = jax.device_put(np.ones((128, 64), np.float32), NamedSharding(mesh, PartitionSpec()))
    return jax.jit(lambda w, x: (w, x @ w)), w, x


def test_step_cost_counts_this_devices_share():
    step, w, x = matmul_step()
    cost = step_cost(step.lower(w, x).compile())
    assert cost.flops == 2 * 256 * 128 * 64 / 8  # the matmul of one device's 32 rows
    assert cost.argument_bytes == (128 * 64 + 32 * 128) * 4
    assert cost.bytes_needed >= cost.argument_bytes


class SmallDevice:
    device_kind = "test accelerator"

    def memory_stats(self):
        return {"bytes_limit": 1024}


def test_a_step_that_does_not_fit_stops_before_running(capsys):
    step, w, x = matmul_step()
    with pytest.raises(MemoryError, match=r"test: the compiled step needs 0\.000 GiB per "
                                          r"device .* each device has 0\.000 GiB.*config\.mesh"):
        compile_step(step, w, x, "test", device=SmallDevice())
    compiled, cost = compile_step(step, w, x, "test")  # CPU: no limit known
    assert "test: the compiled step needs" in capsys.readouterr().out
    np.testing.assert_array_equal(compiled(w, x)[1], np.full((256, 64), 128.0))
    check_fits(StepCost(2 * GIB, 0, 0, 0, 0, 0.0), "x", limit=3 * GIB)  # fits: no error


def test_bound_step_compiles_with_its_constants():
    step = jax.jit(lambda state, scale, batch: (state + 1, scale * batch))
    compiled, cost = compile_step(BoundStep(step, (jnp.float32(3.0),)), jnp.float32(0.0),
                                  jnp.ones(4), "bound")
    state, out = compiled(jnp.float32(0.0), jnp.ones(4))
    assert float(state) == 1.0 and out.tolist() == [3.0] * 4 and cost is not None


def test_throughput_and_mfu():
    metrics = throughput(2.0, 1000, 8e12, 1e12, num_devices=8)
    assert metrics == {"step_time": 2.0, "tokens_per_second": 500.0,
                       "tflops_per_second": 4.0, "mfu": 0.5}
    assert "mfu" not in throughput(2.0, 1000, 8e12, None, 8)
    assert peak_flops(jax.devices()[0]) is None  # CPU: unknown
    assert peak_flops(jax.devices()[0], override_tflops=100.0) == 1e14
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops(h100) == 989e12


def test_wandb_gets_every_scalar_and_resumes_the_same_run(tmp_path, monkeypatch):
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], False
            runs.append(self)

        def log(self, values, step):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.init = Run
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        writer = MetricsWriter(tmp_path, wandb=dict(project="p", name="rm"))
        writer.write(1, {"loss": 0.5, "note": "text"})
        writer.close()
    assert [r.kwargs["id"] for r in runs] == ["run123", "run123"]
    assert runs[0].kwargs["project"] == "p" and runs[0].kwargs["resume"] == "allow"
    assert runs[0].logged == [(1, {"loss": 0.5})] and runs[0].finished
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 0.5


def test_wandb_requested_but_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match="wandb_project is set but wandb is not installed"):
        MetricsWriter(tmp_path, wandb=dict(project="p"))
