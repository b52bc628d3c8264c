"""Where a decode step's time goes: XLA's own profiler over `glm_jax.generation.sample`.

One generation (greedy unless `--temperature`; no EOS, so every row decodes every step) is
traced with `jax.profiler`; each executed XLA op (a fusion, a copy, a dot) is one event,
named as in the compiled HLO, whose `op_name` metadata carries the model's named scopes
(`projections`, `mlp`, `attention`, `cache_write`, `norm`, `rotary`, `lm_head`,
`log_softmax`, `sampling`). Ops inside the decode `while` body are summed per category and
divided by the number of decode steps:

  weight matmuls    the q/k/v/o and MLP projections' dots (the floor any generator pays)
  LM head           the `[batch, embed] x [vocab, embed]` dot
  attention         scores, softmax and values over the cache
  cache writes      the new keys and values written into the cache
  norms, rotary     RMSNorm and the rotary embedding
  MLP elementwise   SwiGLU's activation and product, the residual adds
  log-softmax       the sampled token's log-prob
  sampling          the token choice (argmax when greedy, else the two-level draw)
  copies            XLA copy ops
  loop, other       the while loop's bookkeeping (token/mask/log-prob writes, EOS check)

    python benchmarks/decode_profile.py [--hidden 512 --layers 8 --batch 8 --new-tokens 128]

The shapes default to benchmarks/generate.py's. Profiling adds per-op overhead, so the
step time here is a little above the unprofiled one; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from decode_shapes import add_shape_arguments
from flax import nnx

from glm_jax.generation import sample
from glm_jax.models.heads import GlmForCausalLM
from glm_jax.models.tiny import tiny_config

# (category, test on an op's HLO `op_name` and instruction name), first match wins.
CATEGORIES = (
    ("weight matmuls", lambda op, name: "dot_general" in op and ("projections" in op
                                                                 or "mlp" in op)),
    ("LM head", lambda op, name: "lm_head" in op),
    ("attention", lambda op, name: "attention" in op),
    ("cache writes", lambda op, name: "cache_write" in op),
    ("norms, rotary", lambda op, name: "/norm" in op or "rotary" in op),
    ("MLP elementwise", lambda op, name: "mlp" in op),
    ("log-softmax", lambda op, name: "log_softmax" in op),
    ("sampling", lambda op, name: "sampling" in op),
    ("copies", lambda op, name: name.startswith("copy")),
    ("loop, other", lambda op, name: True),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)  # benchmarks/generate.py's too
    parser.add_argument("--scan-layers", action="store_true",
                        help="scanned layers (default unrolled, as generate.py times)")
    return parser.parse_args()


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its `op_name` metadata ("" without), over every computation."""
    names = {}
    for line in hlo_text.splitlines():
        match = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if match:
            op = re.search(r'op_name="([^"]*)"', line)
            names[match.group(1)] = op.group(1) if op else ""
    return names


def category(op: str, name: str) -> str:
    return next(label for label, test in CATEGORIES if test(op, name))


def profile(args: argparse.Namespace) -> dict[str, float]:
    config = tiny_config(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, scan_layers=args.scan_layers)
    graphdef, state = nnx.split(GlmForCausalLM(config, rngs=nnx.Rngs(0)))
    prompts = jnp.asarray(np.random.RandomState(0).randint(2, args.vocab,
                                                           (args.batch, args.prompt_length)))

    def generate(state, prompts):
        return sample(nnx.merge(graphdef, state), prompts, jnp.ones_like(prompts, bool),
                      jax.random.key(0), max_new_tokens=args.new_tokens,
                      temperature=args.temperature,
                      eos_token_ids=(args.vocab + 1,), pad_token_id=0).tokens

    compiled = jax.jit(generate).lower(state, prompts).compile()
    names = op_names(compiled.as_text())
    jax.block_until_ready(compiled(state, prompts))  # warm-up
    began = time.perf_counter()
    jax.block_until_ready(compiled(state, prompts))
    unprofiled = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        jax.block_until_ready(compiled(state, prompts))
        jax.profiler.stop_trace()
        path = next(Path(directory).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(path))
    seconds: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                op = names.get(event.name)
                if op is None or "/while/body/" not in op and not op.endswith("/while/body"):
                    continue  # not an op of the decode loop (the prefill, the runtime)
                seconds[category(op, event.name)] += event.duration_ns * 1e-9
    steps = args.new_tokens
    choice = f"temperature {args.temperature}" if args.temperature else "greedy"
    print(f"model: hidden {args.hidden}, {args.layers} layers "
          f"({'scanned' if args.scan_layers else 'unrolled'}), {args.heads} heads / "
          f"{args.kv_heads} kv heads, vocab {args.vocab}; batch {args.batch}, prompt "
          f"{args.prompt_length}, {steps} new tokens, "
          f"{choice}; jax {jax.__version__} "
          f"({jax.devices()[0].platform})")
    print(f"whole generation unprofiled: {unprofiled * 1e3:.1f} ms "
          f"({unprofiled / steps * 1e3:.2f} ms per decode step, prefill included)")
    total = sum(seconds.values())
    print("\n| part of a decode step | ms per step | share |")
    print("|---|---|---|")
    for label, _ in CATEGORIES:
        print(f"| {label} | {seconds[label] / steps * 1e3:.3f} | "
              f"{seconds[label] / total:.1%} |")
    print(f"| **decode step (ops timed)** | {total / steps * 1e3:.3f} | 100% |")
    return {label: seconds[label] / steps for label, _ in CATEGORIES}


if __name__ == "__main__":
    profile(parse_args())
