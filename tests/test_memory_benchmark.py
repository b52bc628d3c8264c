"""benchmarks/memory.py's JSON rows, at a real model's width cut to two layers (the benchmark
itself compiles every layer; tests never do)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_json_rows_have_the_documented_keys_and_consistent_figures():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--models", "chatglm3_6b",
         "--programs", "rm", "--layers", "2", "--tokens", "256", "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=True)
    rows = json.loads(out.stdout)
    assert [list(row) for row in rows] == [[
        "model", "program", "mesh", "layers", "batch", "tokens", "argument_gib", "temp_gib",
        "total_gib", "compile_s"]]
    row = rows[0]
    assert (row["model"], row["program"], row["mesh"], row["layers"], row["batch"],
            row["tokens"]) == ("chatglm3_6b", "rm", "1,8,1", 2, 8, 256)
    # ChatGLM3-6B's width, 2 layers, a reward head: float32 weights and two Adam moments,
    # split 8 ways (ZeRO-3), plus the batch; nothing replicated but norms and biases.
    h, m, v, q, kv = 4096, 13696, 65024, 32 * 128, 2 * 128
    layer = h * (q + 2 * kv) + (q + 2 * kv) + q * h + 3 * h * m + 2 * h
    params = v * h + 2 * layer + h + h + 1
    expected = 3 * params * 4 / 8 / 1024**3
    assert abs(row["argument_gib"] - expected) / expected < 0.02
    assert row["total_gib"] >= row["argument_gib"] + row["temp_gib"] - 0.002


def test_cpu_upcasts_are_the_float32_copies_of_bfloat16_arguments():
    """A bfloat16 weight multiplied in a loop: XLA:CPU converts it to float32 once, before
    the loop; the benchmark's column is that copy's size (and nothing for float32 weights)."""
    import jax
    import jax.numpy as jnp

    saved = dict(os.environ)  # the benchmark sets its XLA flags as it is imported
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from memory import cpu_upcast_bytes
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        os.environ.clear()
        os.environ.update(saved)

    def loop(w, x):
        return jax.lax.fori_loop(0, 4, lambda i, x: jnp.tanh(x @ w)[:, :256], x)

    for dtype, expected in ((jnp.bfloat16, 256 * 512 * 4), (jnp.float32, 0)):
        w = jax.ShapeDtypeStruct((256, 512), dtype)
        x = jax.ShapeDtypeStruct((8, 256), dtype)
        assert cpu_upcast_bytes(jax.jit(loop).lower(w, x).compile()) == expected, dtype
