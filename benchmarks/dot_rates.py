"""How fast XLA's dot reads a decode step's weights: the rate the matmul floor rests on.

A decode step is a chain of `[batch, in] x [in, out]` dots whose kernels stream from memory
(163 MB per step at benchmarks/generate.py's shape, against a 32 MB L3). This times one such
dot, the LM head's `[batch, embed] x [embed, vocab]`, at batches 1, 8 and 64, in two forms:
the kernel an argument of the compiled program (as a model's weights are) and the kernel a
constant of it (known when XLA compiles, so its dot library can lay it out once). Beside them:
the argument form at batch 8 on a kernel small enough to stay in cache (the arithmetic rate),
a plain streaming read of the big kernel (the memory's rate), and PyTorch's `F.linear` at
batch 8 (transformers' dot). Each runs `--calls` times in one compiled loop whose carry
depends on each call's output (through its row maxima, which no algebra can skip); rounds
are interleaved and the best of each is reported.

    python benchmarks/dot_rates.py [--embed 512 --vocab 32768 --batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768, help="the streamed kernel's out")
    parser.add_argument("--cached-out", type=int, default=4096,
                        help="out of the kernel that stays in cache")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50, help="dots per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def xla_dot(kernel: jax.Array, batch: int, calls: int, constant: bool = False):
    """A compiled loop of `calls` dots `[batch, in] x kernel [in, out]`, each input made from
    the previous output; `kernel` an argument of the program, or (`constant`) baked into it."""

    def loop(rows, kernel):
        return jax.lax.fori_loop(
            0, calls, lambda _, r: r + 1e-9 * jnp.max(r @ kernel, axis=1, keepdims=True), rows)

    rows = jnp.full((batch, kernel.shape[0]), 0.01, kernel.dtype)
    if constant:
        program = jax.jit(lambda rows: loop(rows, kernel))
        return lambda: jax.block_until_ready(program(rows))
    program = jax.jit(loop)
    return lambda: jax.block_until_ready(program(rows, kernel))


def xla_read(kernel: jax.Array, calls: int):
    """A compiled loop of `calls` full reads of `kernel` (scaled by the carry, then summed)."""
    program = jax.jit(lambda scale, kernel: jax.lax.fori_loop(
        0, calls, lambda _, s: s + 1e-9 * jnp.sum(kernel * s), scale))
    return lambda: jax.block_until_ready(program(jnp.float32(1.0), kernel))


def torch_linear(kernel: np.ndarray, batch: int, calls: int):
    """`calls` chained `F.linear` calls on the same kernel, stored `[out, in]` as nn.Linear's."""
    weight = torch.from_numpy(np.ascontiguousarray(kernel.T))
    rows = torch.full((batch, kernel.shape[0]), 0.01)

    def run():
        carry = rows
        with torch.no_grad():
            for _ in range(calls):
                carry = carry + 1e-9 * torch.nn.functional.linear(carry, weight).amax(
                    1, keepdim=True)
        return carry

    return run


def main() -> None:
    args = parse_args()
    rng = np.random.default_rng(0)
    big = rng.standard_normal((args.embed, args.vocab), np.float32) * 0.02
    small = rng.standard_normal((args.embed, args.cached_out), np.float32) * 0.02
    big_jax, small_jax = jnp.asarray(big), jnp.asarray(small)

    # (label, batch, kernel, run): the kernel's bytes are read once per call.
    batches = sorted({1, args.batch, 64})
    rows = [(f"XLA dot, batch {b}", b, big, xla_dot(big_jax, b, args.calls))
            for b in batches]
    rows += [(f"XLA dot, batch {b}, constant kernel", b, big,
              xla_dot(big_jax, b, args.calls, constant=True)) for b in batches]
    rows += [(f"XLA dot, batch {args.batch}, in cache", args.batch, small,
              xla_dot(small_jax, args.batch, args.calls)),
             ("XLA streaming read", 0, big, xla_read(big_jax, args.calls)),
             (f"torch F.linear, batch {args.batch}", args.batch, big,
              torch_linear(big, args.batch, args.calls))]
    for _, _, _, run in rows:
        run()  # compile, warm up
    best = [float("inf")] * len(rows)
    for _ in range(args.repeats):
        for i, (_, _, _, run) in enumerate(rows):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], (time.perf_counter() - start) / args.calls)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); float32")
    print(f"{'':36s} {'kernel':>10s} {'ms/call':>8s} {'GB/s read':>10s} {'GFLOP/s':>8s}")
    for (label, batch, kernel, _), call_s in zip(rows, best, strict=True):
        gbps = kernel.nbytes / call_s / 1e9
        gflops = 2 * batch * kernel.size / call_s / 1e9
        shape = "x".join(map(str, kernel.shape))
        print(f"{label:36s} {shape:>10s} {call_s * 1e3:8.3f} {gbps:10.1f} "
              + (f"{gflops:8.1f}" if batch else f"{'':>8s}"))

    seconds = dict(zip([row[0] for row in rows], best, strict=True))
    argument = seconds[f"XLA dot, batch {args.batch}"]
    constant = seconds[f"XLA dot, batch {args.batch}, constant kernel"]
    print(f"batch {args.batch}: the dot on a kernel argument takes {argument / constant:.2f}x "
          f"its time on a constant one (XLA:CPU lays a dynamic kernel out at every call), and "
          f"{argument / seconds['XLA dot, batch 1']:.2f}x batch 1's")

if __name__ == "__main__":
    main()
