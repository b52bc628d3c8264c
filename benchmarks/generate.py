"""New tokens per second: glm_jax.generate against transformers' GlmForCausalLM.generate.

Same random weights, same prompts, greedy (or `--temperature T`: sampled from the whole
vocabulary), both on the same device (jax's default backend; torch on CUDA when it has one),
one run, timed in interleaved rounds; the ratios are what to compare (absolute figures depend
on the machine and its load).

    python benchmarks/generate.py [--hidden 512 --layers 8 --batch 8 --new-tokens 128]
    python benchmarks/generate.py --lora 16     # LoRA decoding: low-rank products vs merged
    # On a GPU (jax[cuda]): a ~1.2B GLM-4 shape in bfloat16, batch 64, 512 new tokens
    python benchmarks/generate.py --dtype bfloat16 --hidden 2048 --layers 12 --heads 16 \
        --kv-heads 2 --vocab 151552 --batch 64 --prompt-length 64 --new-tokens 512

With `--lora R`, the model also gets rank-R adapters (random, nonzero) on q, k, v, o, gate,
up and down, and two ways of decoding with them are timed: the adapters applied as low-rank
products at every step (`B (A x)` beside `W x`), and merged into the kernels once before
the loop (`W + s B A`, the merge timed with it, as a rollout would pay it every iteration).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from decode_shapes import add_shape_arguments
from flax import nnx
from transformers import GlmConfig, GlmForCausalLM

import glm_jax


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing rounds; the best of each is reported")
    parser.add_argument("--lora", type=int, default=0, help="adapter rank (0: none)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and compute of both models")
    return parser.parse_args()


def lora_decoding(model, prompts: np.ndarray, args: argparse.Namespace) -> None:
    """Times decoding with rank-`args.lora` adapters on every projection, applied as low-rank
    products inside the loop against merged into the kernels once before it."""
    from glm_jax.models.lora import add_adapters, merged_state

    targets = ("q", "k", "v", "o", "gate", "up", "down")
    adapted = add_adapters(model, lora_rank=args.lora, lora_alpha=2.0 * args.lora,
                           lora_targets=targets)
    graphdef, state = nnx.split(adapted)
    flat = nnx.to_flat_state(state)
    for i, (path, variable) in enumerate(flat):  # B = 0 would leave the model the base
        if str(path[-1]).endswith("_lora_b"):
            variable.set_value(0.02 * jax.random.normal(jax.random.key(i), variable.shape))
    state = nnx.from_flat_state(flat)
    config = adapted.config
    never = args.vocab + 1
    base_graph = nnx.split(model)[0]

    @jax.jit
    def low_rank(state, prompts):
        out = glm_jax.generation.sample(nnx.merge(graphdef, state), prompts,
                                        jnp.ones_like(prompts, bool), jax.random.key(0),
                                        max_new_tokens=args.new_tokens, temperature=0.0,
                                        eos_token_ids=(never,), pad_token_id=0)
        return out.tokens

    @jax.jit
    def merged(state, prompts):
        base = merged_state(state, config, dtype=config.compute_dtype)
        out = glm_jax.generation.sample(nnx.merge(base_graph, base), prompts,
                                        jnp.ones_like(prompts, bool), jax.random.key(0),
                                        max_new_tokens=args.new_tokens, temperature=0.0,
                                        eos_token_ids=(never,), pad_token_id=0)
        return out.tokens

    same = np.mean(np.asarray(low_rank(state, prompts)) == np.asarray(merged(state, prompts)))
    best = interleaved_best({"low": lambda: jax.block_until_ready(low_rank(state, prompts)),
                             "merged": lambda: jax.block_until_ready(merged(state, prompts))},
                            args.repeats)
    low_s, merged_s = best["low"], best["merged"]
    tokens = args.batch * args.new_tokens
    print(f"LoRA rank {args.lora} on q, k, v, o, gate, up, down (unrolled layers):")
    print(f"  low-rank products : {tokens / low_s:8.1f} tokens/s ({low_s:.3f} s)")
    print(f"  merged, then decode: {tokens / merged_s:8.1f} tokens/s ({merged_s:.3f} s; "
          f"merged / low-rank {low_s / merged_s:.2f}x; greedy tokens identical: {same:.1%})")


def matmul_floor(model, batch: int, steps: int, prompt_length: int):
    """Two compiled, warmed-up programs of the model's weight matmuls alone, through XLA's dot
    on the same kernels in their stored `[out, in]` layout, one dot per kernel: (prefill,
    decode). Prefill multiplies `[batch * prompt_length, in]` activations by every layer
    kernel and `[batch, in]` by the LM head (one position per row); decode runs `steps` steps
    of `[batch, in]` activations through every kernel, chained so none is hoisted or skipped.
    Together they are the least time a generator that reads the stored kernels spends on the
    same tokens (no attention over the cache, no sampling); glm_jax's unrolled decoding reads
    copies made before its loop (`DecodeKernels`), so it can go below. Call either for the
    seconds of one run.
    """
    matrices, lm_head = [], None
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = str(path[-1])
        # Stacked layer parameters hold one kernel per layer on their leading axis.
        kernels = list(param[...]) if "layers" in path else [param[...]]
        for kernel in kernels:
            if name in ("o_kernel", "down_kernel"):  # [embed, inputs...]
                matrices.append(kernel.reshape(kernel.shape[0], -1))
            elif name.endswith("kernel"):  # [outputs..., embed]
                matrices.append(kernel.reshape(-1, kernel.shape[-1]))
            elif name == "lm_head":
                lm_head = kernel
    matrices.append(lm_head)

    def chain(matrices, rows, carry):
        for w in matrices:
            y = jnp.full((rows, w.shape[1]), carry, w.dtype) @ w.T
            carry = carry + 1e-9 * y[0, 0]
        return carry

    @jax.jit
    def prefill(matrices):
        return chain(matrices[-1:], batch, chain(matrices[:-1], batch * prompt_length,
                                                 jnp.float32(1.0)))

    @jax.jit
    def decode(matrices):
        return jax.lax.fori_loop(0, steps, lambda _, c: chain(matrices, batch, c),
                                 jnp.float32(1.0))

    programs = []
    for program in (prefill, decode):
        jax.block_until_ready(program(matrices))
        programs.append(lambda program=program: jax.block_until_ready(program(matrices)))
    return tuple(programs)


def interleaved_best(runs: dict, rounds: int) -> dict:
    """Best seconds of each of `runs` (name -> callable), timed in turn in each of `rounds`
    rounds, so a change in the machine's load falls on all of them alike."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(seconds) for name, seconds in times.items()}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.hidden // args.heads, pad_token_id=0, eos_token_id=[1])
    reference = GlmForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        # Unrolled layers: on CPU, XLA copies each layer's slice of the stacked weights at
        # every step of a scanned decode loop (the scanned form is timed below too).
        dtypes = dict(dtype=args.dtype, param_dtype=args.dtype)
        model = glm_jax.from_pretrained(path, scan_layers=False, **dtypes)
        scanned = glm_jax.from_pretrained(path, scan_layers=True, **dtypes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = reference.to(device, getattr(torch, args.dtype))

    prompts = np.random.RandomState(0).randint(2, args.vocab, (args.batch, args.prompt_length))
    never = args.vocab + 1  # no EOS: both generate exactly new_tokens tokens

    def ours(model=model):
        out = glm_jax.generate(model, prompts, max_new_tokens=args.new_tokens,
                               temperature=args.temperature, eos_token_ids=[never])
        return jax.block_until_ready(out.tokens)

    def ours_scanned():
        return ours(scanned)

    ids = torch.tensor(prompts, device=device)

    sampling = (dict(do_sample=False) if args.temperature == 0 else
                dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0))

    def theirs():
        with torch.no_grad():
            out = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, eos_token_id=None,
                                     pad_token_id=0, **sampling)
        return out.cpu()  # waits for the device

    start = time.perf_counter()
    ours()
    compile_seconds = time.perf_counter() - start
    theirs()  # warm-up
    ours_scanned()
    agree = np.mean(np.asarray(ours()) == theirs()[:, args.prompt_length:].numpy())
    floor_prefill, floor_decode = matmul_floor(model, args.batch, args.new_tokens,
                                               args.prompt_length)
    best = interleaved_best({"ours": ours, "scanned": ours_scanned, "theirs": theirs,
                             "floor_prefill": floor_prefill, "floor_decode": floor_decode},
                            args.repeats)
    ours_s, scanned_s, theirs_s = best["ours"], best["scanned"], best["theirs"]
    floor_s = best["floor_prefill"] + best["floor_decode"]

    tokens = args.batch * args.new_tokens
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({device}, {torch.get_num_threads()} threads); {args.dtype}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv heads, vocab {args.vocab}; batch {args.batch}, prompt "
          f"{args.prompt_length}, {args.new_tokens} new tokens, "
          + (f"sampled at temperature {args.temperature}" if args.temperature else "greedy"))
    print(f"glm_jax.generate : {tokens / ours_s:8.1f} tokens/s ({ours_s:.3f} s, "
          f"{floor_s / ours_s:.1%} of the floor; first call with compilation "
          f"{compile_seconds:.1f} s)")
    print(f"  scanned layers : {tokens / scanned_s:8.1f} tokens/s ({scanned_s:.3f} s, "
          f"{floor_s / scanned_s:.1%} of the floor; {ours_s / scanned_s:.2f}x unrolled)")
    print(f"transformers     : {tokens / theirs_s:8.1f} tokens/s ({theirs_s:.3f} s)")
    print(f"speed-up         : {theirs_s / ours_s:.2f}x"
          + (f"   (greedy tokens identical: {agree:.1%})" if not args.temperature else ""))
    print(f"matmul floor     : {tokens / floor_s:8.1f} tokens/s ({floor_s:.3f} s: the weight "
          f"matmuls alone on the stored [out, in] kernels, prefill {best['floor_prefill']:.3f} "
          f"s + decode {best['floor_decode']:.3f} s; {theirs_s / floor_s:.2f}x transformers)")
    if args.lora:
        lora_decoding(model, prompts, args)


if __name__ == "__main__":
    main()
