"""Per-device memory of every training program at real model sizes, on any CPU.

Each program (SFT step, reward-model step, offline DPO step, fused PPO iteration) of a config
is lowered and compiled with abstract parameters (nothing allocated) on N forced CPU devices,
with the config's mesh, precision and remat, and XLA's memory analysis is read
(`glm_jax.train.preflight.compile_program`, the same check every training script runs before
its weights load). The models' shapes come from the table below, so no checkpoint is needed.

    python benchmarks/memory.py                      # the issue's target rows (a few minutes)
    python benchmarks/memory.py --models glm4_9b --programs rm --tokens 1024,4096
    python benchmarks/memory.py --json               # one JSON list, a row per program

Sizes: sft / rm / dpo run `--batch` sequences (pairs for rm and dpo) of `--tokens` tokens
(half prompt, half response); ppo runs `--ppo-prompts` prompts of `--ppo-tokens` prompt +
response tokens, minibatches of `--ppo-minibatch`, `--ppo-epochs` epochs, with the SFT term
(eq. 6) on. `--config-ppo` adds a row with each config file's own PPO settings. `--lora R`
puts rank-R adapters on q, k, v, o, gate, up and down of every trained model (alpha 2R): the
bases frozen in the config's frozen_dtype, the PPO critic sharing the reward model's backbone
(critic_init "reward"), the reference the policy's base (no copy).

The table's upcasts column (not in the --json rows) is the float32 copies XLA:CPU makes of
bfloat16 arguments for its float32 dots (`cpu_upcast_bytes`), which a GPU or TPU does not
hold: subtract it for an accelerator's estimate.

    python benchmarks/memory.py --models glm4_9b --programs dpo,ppo --lora 16
    python benchmarks/memory.py --models glm4_9b --programs dpo,ppo --lora 16 --mesh gpu1 \
        --devices 1 --ppo-prompts 8 --ppo-sft-batch 8 --tokens 2048   # one 80 GiB GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_DEVICES = 8
for _i, _arg in enumerate(sys.argv):  # the device count must be known before jax loads
    if _arg == "--devices" and _i + 1 < len(sys.argv):
        _DEVICES = int(sys.argv[_i + 1])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={_DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"

import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from ml_collections import ConfigDict  # noqa: E402

from glm_jax.train.common import mesh_from_config  # noqa: E402
from glm_jax.train.preflight import PROGRAMS, compile_program  # noqa: E402
from glm_jax.train.programs import GIB  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Architectures (transformers' field names) of the models the configs name; GLM-4-32B-0414
# has no config file of its own and runs with glm4_9b.py's settings.
SHAPES = {
    "chatglm3_6b": dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696,
                        num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=2,
                        head_dim=128, use_post_norms=False),
    "glm4_9b": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696,
                    num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                    head_dim=128, use_post_norms=False),
    "glm4_32b": dict(vocab_size=151552, hidden_size=6144, intermediate_size=23040,
                     num_hidden_layers=61, num_attention_heads=48, num_key_value_heads=2,
                     head_dim=128, use_post_norms=True),
}
CONFIG_FILES = {"chatglm3_6b": "chatglm3_6b.py", "glm4_9b": "glm4_9b.py",
                "glm4_32b": "glm4_9b.py"}


def load_config(model: str, mesh: str) -> ConfigDict:
    spec = importlib.util.spec_from_file_location("config_file", CONFIGS / CONFIG_FILES[model])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(mesh)
    config.model.init_checkpoint = ""  # the shape below, abstract: no checkpoint is read
    config.model.tiny = ConfigDict(SHAPES[model])
    return config


def sized(config: ConfigDict, program: str, args: argparse.Namespace, tokens: int,
          own_ppo: bool) -> tuple[ConfigDict, int, int]:
    """`config` at the benchmark's sizes for `program` (`own_ppo`: PPO with the config file's
    own settings); returns it, its batch and tokens."""
    config = ConfigDict(config.to_dict())
    if args.layers:
        config.model.tiny.num_hidden_layers = args.layers
    if args.lora:
        config.model.lora.update(rank=args.lora, alpha=2.0 * args.lora,
                                 targets="q,k,v,o,gate,up,down")
    if program == "ppo":
        if not own_ppo:
            half = args.ppo_tokens // 2
            config.data.max_prompt_tokens = config.data.max_response_tokens = half
            config.ppo.update(batch_size=args.ppo_prompts, minibatch_size=args.ppo_minibatch,
                              ppo_epochs=args.ppo_epochs)
            if args.ppo_sft_batch:
                config.ppo.sft_batch_size = args.ppo_sft_batch
        data = config.data
        return config, config.ppo.batch_size, data.max_prompt_tokens + data.max_response_tokens
    config.data.max_prompt_tokens = tokens // 2
    config.data.max_response_tokens = tokens - tokens // 2
    section = {"sft": config.sft, "rm": config.rm, "dpo": config.dpo}[program]
    section.batch_size = args.batch
    return config, args.batch, tokens


_PARAMETER = re.compile(r"^\s*(%[\w.\-]+) = bf16\[[\d,]*\]\S* parameter\(")
_UPCAST = re.compile(r"^\s*%[\w.\-]+ = f32\[([\d,]*)\]\S* fusion\((%[\w.\-]+)\), "
                     r"kind=kLoop, calls=%wrapped_convert")


def cpu_upcast_bytes(compiled: Any) -> int:
    """Bytes of the float32 copies XLA:CPU makes of bfloat16 program arguments (its dots run
    in float32; it converts each such weight once, in the entry computation, and feeds the
    copy to every loop). A GPU or TPU multiplies bfloat16 natively and holds none of them."""
    lines = compiled.as_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    entry = lines[start:]
    end = next((i for i, line in enumerate(entry) if line.startswith("}")), len(entry))
    entry = entry[:end]
    parameters = {m.group(1) for line in entry if (m := _PARAMETER.match(line))}
    total = 0
    for line in entry:
        m = _UPCAST.match(line)
        if m and m.group(2) in parameters:
            total += 4 * math.prod(int(d) for d in m.group(1).split(",") if d)
    return total


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model in args.models:
        base = load_config(model, args.mesh)
        if args.remat:
            base.model.remat = args.remat
        mesh = mesh_from_config(base)
        mesh_name = ",".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))
        jobs = [(p, t, False) for p in args.programs if p != "ppo" for t in args.tokens]
        if "ppo" in args.programs:
            jobs.append(("ppo", 0, False))
            if args.config_ppo:
                jobs.append(("ppo", 0, True))
        for program, tokens, own_settings in jobs:
            config, batch, tokens = sized(base, program, args, tokens, own_settings)
            result = compile_program(config, program, mesh)
            cost = result.cost
            name = program if not own_settings else "ppo (config)"
            row = dict(model=model, program=f"{name} lora{args.lora}" if args.lora else name,
                       mesh=mesh_name, layers=config.model.tiny.num_hidden_layers,
                       batch=batch, tokens=tokens,
                       argument_gib=round(cost.argument_bytes / GIB, 3),
                       temp_gib=round(cost.temp_bytes / GIB, 3),
                       total_gib=round(cost.bytes_needed / GIB, 3),
                       compile_s=round(result.compile_seconds, 1))
            rows.append(row)
            if not args.json:  # the JSON rows keep their documented keys
                upcasts = round(cpu_upcast_bytes(result.compiled) / GIB, 3)
                shown = [*list(row.values())[:-1], upcasts, row["compile_s"]]
                print(" | ".join(str(v) for v in shown), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="chatglm3_6b,glm4_9b,glm4_32b",
                        type=lambda s: s.split(","), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        type=lambda s: s.split(","), help=f"of {', '.join(PROGRAMS)}")
    parser.add_argument("--mesh", default="gpu8", help="a mesh preset (glm_jax.config)")
    parser.add_argument("--devices", type=int, default=8, help="forced CPU devices")
    parser.add_argument("--batch", type=int, default=8, help="sequences / pairs (sft, rm, dpo)")
    parser.add_argument("--tokens", default="4096", type=lambda s: [int(t) for t in
                                                                   s.split(",")],
                        help="tokens per sequence (sft, rm, dpo), comma-separated")
    parser.add_argument("--ppo-prompts", type=int, default=64)
    parser.add_argument("--ppo-tokens", type=int, default=2048, help="prompt + response")
    parser.add_argument("--ppo-minibatch", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--ppo-sft-batch", type=int, default=0,
                        help="SFT rows per PPO update (0: the config's)")
    parser.add_argument("--config-ppo", action="store_true",
                        help="also each config file's own PPO settings")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count")
    parser.add_argument("--remat", default="", help="override config.model.remat")
    parser.add_argument("--lora", type=int, default=0,
                        help="LoRA rank on every trained model (0: full fine-tuning)")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args()
    if not args.json:
        print("model | program | mesh | layers | batch | tokens | argument GiB | temp GiB | "
              "total GiB | XLA:CPU bf16 upcasts GiB | compile s", flush=True)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
