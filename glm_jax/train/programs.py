"""What a compiled training step costs: XLA's memory and FLOP analyses, checked before the
first step runs, and the per-step throughput figures derived from them."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

GIB = 1024**3

# Dense bfloat16 peak FLOP/s per device, by `jax.Device.device_kind` prefix (vendor figures).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s: `override_tflops` when set, else the table; None when unknown
    (CPUs), in which case no MFU is reported."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops
    return None


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One compiled step, per device. `bytes_needed` = arguments + outputs - donated aliases +
    temporaries + generated code; `flops` is XLA's count for one device's share of the step
    (a loop body, e.g. PPO's decoding, is counted once)."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float

    @property
    def bytes_needed(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    def describe(self) -> str:
        return (f"{self.bytes_needed / GIB:.3f} GiB per device (parameters, optimizer state "
                f"and batch {self.argument_bytes / GIB:.3f} GiB, temporaries "
                f"{self.temp_bytes / GIB:.3f} GiB, outputs not donated "
                f"{(self.output_bytes - self.alias_bytes) / GIB:.3f} GiB)")


def step_cost(compiled: Any) -> StepCost:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return StepCost(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float((cost or {}).get("flops", 0.0)))


def device_memory_limit(device: jax.Device) -> int | None:
    """Bytes the runtime lets a program use on `device`; None where it does not say (CPU)."""
    stats = device.memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


FIT_ADVICE = (". Lower the batch size or sequence lengths, shard more (config.mesh.fsdp / "
              "tensor), or use bfloat16 (config.model.dtype / param_dtype)")


def check_fits(cost: StepCost, desc: str, limit: int | None, what: str = "step",
               advice: str = FIT_ADVICE) -> None:
    """MemoryError, before any step runs, when the compiled `what` needs more than `limit`;
    the message ends with `advice`."""
    if limit is not None and cost.bytes_needed > limit:
        raise MemoryError(f"{desc}: the compiled {what} needs {cost.describe()}, but each "
                          f"device has {limit / GIB:.3f} GiB{advice}")


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """`step(state, *constants, batch)` used as `(state, batch) -> ...`, for steps that also
    read frozen arrays (reference and reward parameters)."""

    step: Any
    constants: tuple[Any, ...]

    def __call__(self, state: Any, batch: Any) -> Any:
        return self.step(state, *self.constants, batch)


def compile_step(step_fn: Any, state: Any, batch: Any, desc: str,
                 device: jax.Device | None = None, precompiled: Any = None
                 ) -> tuple[Any, StepCost | None]:
    """Compiles `step_fn` (a jitted function, or a BoundStep of one) ahead of time for
    `(state, batch)`, prints its memory needs and checks them against the device. Returns
    `(state, batch) -> outputs` running the compiled program, and its cost; a step that is
    not jitted is returned as it is, with no cost. `precompiled` (the pre-flight's
    `ProgramCost`) is run instead when it was compiled for exactly these arguments."""
    step, constants = ((step_fn.step, step_fn.constants) if isinstance(step_fn, BoundStep)
                       else (step_fn, ()))
    if not hasattr(step, "lower"):
        return step_fn, None
    if precompiled is not None and precompiled.accepts(state, *constants, batch):
        print(f"{desc}: running the pre-flight's compiled program", flush=True)
        compiled = precompiled.compiled
        return (lambda state, batch: compiled(state, *constants, batch)), precompiled.cost
    compiled = step.lower(state, *constants, batch).compile()
    cost = step_cost(compiled)
    check_fits(cost, desc, device_memory_limit(device or jax.local_devices()[0]))
    print(f"{desc}: the compiled step needs {cost.describe()}; "
          f"{cost.flops / 1e9:.3g} GFLOP per step", flush=True)
    return (lambda state, batch: compiled(state, *constants, batch)), cost


def parameter_counts(params: Any) -> dict[str, int]:
    """Parameters of an nnx State split into embedding, LM head and the rest (backbone layers,
    norms and any scalar head): the rest are the per-token matmul parameters."""
    counts = {"embedding": 0, "lm_head": 0, "rest": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        kind = ("embedding" if "embed_tokens" in name else "lm_head" if "lm_head" in name
                else "rest")
        counts[kind] += int(np.prod(leaf.shape))
    return counts


def rl_iteration_flops(config: Any, policy: dict[str, int], critic: dict[str, int] | None,
                        reward: dict[str, int] | None, *, batch: int, prompt_length: int,
                        response_length: int, epochs: int, reference: bool = True
                        ) -> dict[str, float]:
    """Matmul FLOPs of each phase of one RL iteration (all devices), counted analytically:
    XLA's cost analysis counts a loop body once, and the iteration is a decode while_loop
    and a scan over minibatch updates. `policy` / `critic` / `reward` are parameter_counts
    (None: no such model: a critic-free algorithm, a rule reward); `reference`: whether the
    reference policy's forward pass runs; `batch` counts sequences; `config` the policy's
    GlmConfig (attention shape)."""
    b, r = batch, response_length
    t = prompt_length + response_length
    attention_width = config.num_attention_heads * config.head_dim
    # Causal: the token at position i attends i + 1 tokens; per row sum_i (i + 1) = T(T+1)/2.
    attention = 4 * config.num_hidden_layers * attention_width * t * (t + 1) / 2 * b

    def backbone(counts):  # one forward over the B x T sequence
        return 0.0 if counts is None else 2 * counts["rest"] * b * t + attention

    lm_head = 2 * policy["lm_head"] * b * r  # logits at the R response positions
    policy_forward = backbone(policy) + lm_head
    critic_forward = backbone(critic)
    return {
        "rollout": policy_forward,  # prefill B x P + decode B x R tokens, R sampled logits
        "scoring": (1 + reference) * policy_forward + critic_forward + backbone(reward),
        "update": epochs * 3 * (policy_forward + critic_forward),
    }
