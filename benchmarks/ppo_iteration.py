"""Seconds per PPO iteration: the fused program against step-by-step, split into rollout,
scoring and update, with model FLOPs utilisation (MFU) against this machine's float32 matmul
rate.

Random tiny-shaped models (policy, critic, reference = the policy's initial weights, reward
model) on a 1-device mesh (`--devices N` asks for N CPU devices), random prompts with no
padding, and an EOS id the vocabulary never produces, so every response has exactly
`--response-length` tokens and every iteration does the same work. One run; the ratios are
what to compare (absolute figures depend on the machine and its load, which is printed).

  fused         `RLProgram.jit_iteration`: the whole iteration as one program, state donated.
  step-by-step  `RLProgram.step_by_step`: rollout, scoring and update as three programs with
                the rollout and the experience fetched to the host in between. Each phase is
                also timed on its own (jitted separately, on device arrays, blocked on its
                outputs), and so are the two host fetches; "share" is each part's fraction
                of their sum.

  algorithms    the fused iteration of each of `--algorithms` (default ppo, grpo, rloo) on the
                same number of sequences: PPO one response to each of `--batch` prompts, the
                critic-free ones `--generations` responses to each of `--batch / --generations`
                prompts (no critic to run or train; GRPO's KL is a k3 loss term).
                `--lora R` adds each with rank-R adapters on the policy and critic (no
                reference copy, the critic on the policy's frozen base).

Model FLOPs count the matmuls the algorithm needs, from the parameter trees: 2 x (non-embedding
parameters) per token through a backbone (the embedding lookup is free), 2 x (LM head) per
token whose logits are used (the R response positions), and causal attention, 4 x layers x
heads x head_dim x (tokens attended) per token. Rollout: B x T tokens through the policy
(prefill P, decode R). Scoring: forward of policy, reference, critic (PPO) and reward model
over B x T tokens. Update: epochs x (policy + critic) forward + backward (3 x forward). MFU =
FLOPs / seconds / (best of a few jitted 2048^3 float32 matmuls).

    python benchmarks/ppo_iteration.py [--hidden 256 --layers 4 --batch 16 --response-length 64
                                        --json ppo_iteration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.models.heads import GlmValueModel
from glm_jax.models.lora import add_adapters, fresh_part, graph_of, is_trained
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import (
    MeshConfig,
    batch_sharding,
    check_model_fits_mesh,
    make_mesh,
    to_device,
)
from glm_jax.train.programs import parameter_counts, rl_iteration_flops
from glm_jax.train.rl import RLSettings, make_rl, required_roles
from glm_jax.train.roles import Role, Roles, random_roles
from glm_jax.train.rollout import SamplingSettings
from glm_jax.train.state import make_optimizer, shardings_of


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scan-layers", action="store_true",
                        help="scanned layers (default unrolled, the faster form on CPU)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (0: 3 x hidden)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16, help="prompts per iteration")
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--response-length", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3,
                        help="timed iterations of each kind, after one warm-up")
    parser.add_argument("--devices", type=int, default=1,
                        help="mesh size; above 1 on CPU, asks JAX for that many CPU devices")
    parser.add_argument("--algorithms", default="ppo,grpo,rloo",
                        help="comma-separated algorithms whose fused iterations are compared "
                             "(empty: none)")
    parser.add_argument("--generations", type=int, default=4,
                        help="responses per prompt of the critic-free algorithms")
    parser.add_argument("--lora", type=int, default=0,
                        help="also each algorithm with adapters of this rank on the policy "
                             "and critic (0: none)")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    if args.batch % args.generations:
        parser.error(f"--batch {args.batch} must be a multiple of --generations "
                     f"{args.generations}")
    if args.batch % args.minibatch:
        parser.error(f"--batch {args.batch} must be a multiple of --minibatch {args.minibatch}")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be a multiple of --heads {args.heads}")
    return args


def seconds_of(run: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 `[n, n] @ [n, n]` rate of one jitted matmul, GFLOP/s."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    return 2 * n**3 / min(seconds_of(lambda: matmul(a, b), repeats)) / 1e9


def model_config(args: argparse.Namespace):
    return tiny_config(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate or 3 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                       scan_layers=args.scan_layers)


def build(args: argparse.Namespace, mesh, algorithm: str = "ppo", lora: int = 0):
    """(program, state, frozen) of `algorithm` on random roles: PPO samples one response to
    each of `--batch` prompts, the group algorithms `--generations` responses to each of
    `--batch / --generations` prompts, so every algorithm samples and trains on the same
    number of sequences of the same lengths. `lora`: rank of adapters on every projection of
    the policy and the critic (the reference the policy's base, the critic sharing it)."""
    config = model_config(args)
    check_model_fits_mesh(config, mesh)
    group = 1 if algorithm == "ppo" else args.generations
    settings = RLSettings(
        seed=0, algorithm=algorithm, batch_size=args.batch // group, num_generations=group,
        minibatch_size=args.minibatch, ppo_epochs=args.epochs, kl_kind="k3", kl_coef=0.05,
        kl_in="loss" if algorithm == "grpo" else "reward")
    roles = random_roles(config, mesh, reward=True, **required_roles(settings))
    if lora:
        roles = with_lora(roles, lora, mesh)
    optimizer = make_optimizer(learning_rate=1e-5, num_steps=1000)
    # An EOS id outside the vocabulary: `sample` stops a row on `jnp.isin(token, eos)`, which
    # a sampled id in [0, vocab) never satisfies, so no row ends early and the while_loop
    # always runs the full R steps.
    sampling = SamplingSettings(max_new_tokens=args.response_length,
                                eos_token_ids=(args.vocab + 1,), pad_token_id=0,
                                temperature=1.0)
    with jax.set_mesh(mesh):
        return make_rl(settings, roles, sampling, {"policy": optimizer, "critic": optimizer})


def with_lora(roles: Roles, rank: int, mesh) -> Roles:
    """`roles` with rank-`rank` adapters on the policy (no reference copy: its base is the
    reference) and a LoRA critic sharing the policy's base, as train_ppo builds them."""
    lora = dict(lora_rank=rank, lora_alpha=2.0 * rank,
                lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
    policy = Role.of(add_adapters(roles.policy.module(), mesh, **lora))
    if roles.critic is None:
        return Roles(policy, reward=roles.reward)
    config = roles.critic.config.replace(**lora)
    critic = Role(graph_of(GlmValueModel, config),
                  fresh_part(GlmValueModel, config, 1, mesh, is_trained), config)
    return Roles(policy, reward=roles.reward, critic=critic, critic_base="policy")


def prompt_batch(args: argparse.Namespace, prompts: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    ids = rng.randint(2, args.vocab, (args.batch, args.prompt_length)).astype(np.int32)
    return {"prompt_ids": ids[:prompts],
            "prompt_mask": np.ones((prompts, args.prompt_length), bool),
            "ref_reward": np.zeros(prompts, np.float32)}


def iteration_flops(args: argparse.Namespace, state: Any, frozen: dict[str, Any]
                    ) -> dict[str, float]:
    return rl_iteration_flops(
        model_config(args), parameter_counts(state.params),
        None if state.critic_params is None else parameter_counts(state.critic_params),
        parameter_counts(frozen["reward"]), batch=args.batch, prompt_length=args.prompt_length,
        response_length=args.response_length, epochs=args.epochs,
        reference="reference" in frozen)


def compare_algorithms(args: argparse.Namespace, mesh, peak: float) -> dict[str, Any]:
    """Seconds per fused iteration (best of `--iterations` after a warm-up) and MFU of each
    algorithm of `--algorithms`, on the same number of sequences; rounds interleave the
    algorithms so a change in the machine's load hits them alike."""
    runs = {}
    variants = [(a, 0) for a in args.algorithms]
    variants += [(a, args.lora) for a in args.algorithms if args.lora]
    for algorithm, lora in variants:
        program, state, frozen = build(args, mesh, algorithm, lora)
        batch = prompt_batch(args, program.settings.batch_size)
        shardings = batch_sharding(mesh, batch)
        with jax.set_mesh(mesh):
            step = program.jit_iteration(shardings_of(state), shardings)
            batch = to_device(batch, shardings)
            began = time.perf_counter()
            state, _ = jax.block_until_ready(step(state, frozen, batch))
        # The same model FLOPs with adapters (the full model's forward and backward passes;
        # the adapters' own are a few percent): their MFU compares with the full model's.
        name = f"{algorithm} lora{lora}" if lora else algorithm
        runs[name] = dict(step=step, state=state, frozen=frozen, batch=batch,
                          compile=time.perf_counter() - began, times=[],
                          flops=(runs[algorithm]["flops"] if lora else
                                 sum(iteration_flops(args, state, frozen).values())))
    for _ in range(args.iterations):
        for run in runs.values():
            with jax.set_mesh(mesh):
                began = time.perf_counter()
                run["state"], _ = jax.block_until_ready(
                    run["step"](run["state"], run["frozen"], run["batch"]))
            run["times"].append(time.perf_counter() - began)
    print()
    print("| algorithm | prompts x responses | seconds per iteration | vs ppo | GFLOP | MFU |")
    print("|---|---|---|---|---|---|")
    out = {}
    for algorithm, run in runs.items():
        seconds = min(run["times"])
        group = 1 if algorithm.split()[0] == "ppo" else args.generations
        out[algorithm] = {"seconds": seconds, "median": statistics.median(run["times"]),
                          "compile_seconds": run["compile"], "gflop": run["flops"] / 1e9,
                          "mfu": run["flops"] / seconds / 1e9 / peak}
        ratio = seconds / min(runs["ppo"]["times"]) if "ppo" in runs else float("nan")
        print(f"| {algorithm} | {args.batch // group} x {group} | {seconds:.3f} | "
              f"{ratio:.2f}x | {run['flops'] / 1e9:.1f} | {out[algorithm]['mfu']:.1%} |")
    return out


def main() -> None:
    args = parse_args()
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
    load_before = os.getloadavg()
    mesh = make_mesh(MeshConfig(), jax.devices()[:args.devices])
    config = model_config(args)
    program, state, frozen = build(args, mesh)
    counts = {name: parameter_counts(params) for name, params in (
        ("policy", state.params), ("critic", state.critic_params), ("reward", frozen["reward"]))}
    flops = iteration_flops(args, state, frozen)
    host_batch = prompt_batch(args, args.batch)
    shardings = batch_sharding(mesh, host_batch)
    batch = to_device(host_batch, shardings)
    state_sharding = shardings_of(state)
    repeats = args.iterations
    times: dict[str, list[float]] = {name: [] for name in (
        "fused", "rollout", "scoring", "update", "host_transfers", "step_by_step")}
    compile_seconds: dict[str, float] = {}
    peaks = [matmul_gflops()]

    with jax.set_mesh(mesh):
        fused = program.jit_iteration(state_sharding, shardings)
        step_by_step = program.step_by_step(state_sharding, shardings)
        # The phases on their own: separately jitted, device arrays in and out.
        rollout_fn = jax.jit(program.rollout)
        score_fn = jax.jit(program.score)
        update_fn = jax.jit(lambda state, frozen, experience: program.update(
            state, frozen, experience, None), out_shardings=(state_sharding, None),
            donate_argnums=0)
        # Round 0 compiles (the warm-up); rounds 1..N are timed. The variants alternate within
        # each round, so a change in the machine's load hits them alike. The one state
        # threads through every call (each donates it); the work of an iteration does not
        # depend on the weights.
        for number in range(1 + repeats):
            clock = [time.perf_counter()]
            state, metrics = jax.block_until_ready(fused(state, frozen, batch))
            clock.append(time.perf_counter())
            rollout = jax.block_until_ready(rollout_fn(state, batch))
            clock.append(time.perf_counter())
            jax.device_get(rollout)  # what step_by_step fetches between the programs
            clock.append(time.perf_counter())
            scored = jax.block_until_ready(score_fn(state, frozen, rollout, batch))
            clock.append(time.perf_counter())
            jax.device_get(scored)
            clock.append(time.perf_counter())
            state, _ = jax.block_until_ready(update_fn(state, frozen, scored[0]))
            clock.append(time.perf_counter())
            state, _ = jax.block_until_ready(step_by_step(state, frozen, batch))
            clock.append(time.perf_counter())
            fused_s, rollout_s, fetch1, scoring_s, fetch2, update_s, split_s = np.diff(clock)
            seconds = {"fused": fused_s, "rollout": rollout_s, "scoring": scoring_s,
                       "update": update_s, "host_transfers": fetch1 + fetch2,
                       "step_by_step": split_s}
            if number == 0:
                compile_seconds = {name: float(value) for name, value in seconds.items()}
                length = float(metrics["response_length"])
                if length != args.response_length:
                    raise RuntimeError(f"mean response length {length} != "
                                       f"{args.response_length}: sampling stopped early")
            else:
                for name, value in seconds.items():
                    times[name].append(float(value))
            peaks.append(matmul_gflops(repeats=2))

    peak = max(peaks)
    load_after = os.getloadavg()
    best = {name: min(values) for name, values in times.items()}
    phases = ("rollout", "scoring", "update")
    parts = sum(best[p] for p in (*phases, "host_transfers"))
    flops["step_by_step"] = flops["fused"] = sum(flops[p] for p in phases)

    def row(label, name, share=True):
        seconds = best[name]
        cells = [label, f"{seconds:.3f}",
                 f"{seconds / parts:.0%}" if share else "-"]
        if name in flops:
            achieved = flops[name] / seconds / 1e9
            cells += [f"{flops[name] / 1e9:.1f}", f"{achieved:.1f}", f"{achieved / peak:.1%}"]
        else:
            cells += ["-", "-", "-"]
        return "| " + " | ".join(cells) + " |"

    n = counts["policy"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} ({jax.default_backend()}, {args.devices}-device mesh), "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, float32 "
          f"matmul 2048^3: {peak:.1f} GFLOP/s")
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
          f"{args.kv_heads} kv heads, mlp {config.intermediate_size}, vocab {args.vocab}: "
          f"{n['rest'] / 1e6:.2f}M non-embedding + {n['lm_head'] / 1e6:.2f}M LM head "
          f"parameters per policy, x4 models")
    print(f"iteration: {args.batch} prompts x ({args.prompt_length} prompt + "
          f"{args.response_length} response tokens), {args.epochs} epochs of "
          f"{args.batch // args.minibatch} minibatches of {args.minibatch}; best of "
          f"{repeats} interleaved rounds after a warm-up (compilation: fused "
          f"{compile_seconds['fused']:.1f} s)")
    print()
    print("| phase | seconds | share | GFLOP | GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    print(row("rollout (sample R tokens)", "rollout"))
    print(row("scoring (4 forwards, GAE)", "scoring"))
    print(row(f"update ({args.epochs} epochs, policy + critic)", "update"))
    print(row("host transfers (device_get)", "host_transfers"))
    print(row("**step-by-step iteration**", "step_by_step", share=False))
    print(row("**fused iteration**", "fused", share=False))
    print()
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"speed-up of fused over step-by-step: {best['step_by_step'] / best['fused']:.2f}x "
          f"best, {median['step_by_step'] / median['fused']:.2f}x median (fused "
          f"{best['fused']:.3f} s, step-by-step {best['step_by_step']:.3f} s per iteration; "
          f"its parts timed on their own sum to {parts:.3f} s, the base of 'share')")

    algorithms = compare_algorithms(args, mesh, peak) if args.algorithms else {}

    if args.json:
        report = {
            "algorithms": algorithms,
            "args": vars(args),
            "machine": {"processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "jax": jax.__version__,
                        "backend": jax.default_backend(), "devices": args.devices,
                        "load_average_before": load_before, "load_average_after": load_after,
                        "matmul_gflops": peak, "matmul_gflops_all": peaks},
            "parameters": counts,
            "seconds": {name: {"best": best[name], "median": statistics.median(values),
                               "all": values} for name, values in times.items()},
            "compile_seconds": compile_seconds,
            "gflop": {name: value / 1e9 for name, value in flops.items()},
            "mfu": {name: flops[name] / best[name] / 1e9 / peak for name in flops},
            "fused_speedup": best["step_by_step"] / best["fused"],
            "fused_speedup_median": median["step_by_step"] / median["fused"],
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
