"""Low-rank adapters (LoRA): what trains, the base with the adapters off, merging, and PEFT's
adapter format.

A model whose GlmConfig has a `lora_rank` holds, beside its base weights (`nnx.Param`), an
A and a B factor (`LoRAParam`) per targeted projection, stacked per layer like the layers
(glm_jax.models.glm). Training updates only the adapters, and a reward model's or critic's
scalar head (`is_trained`); the base stays frozen. The base alone is the same state without
the adapters, run by the graph of `config.without_lora()`: the reference policy of DPO and
PPO with no second copy.

PEFT's format, for transformers' `GlmForCausalLM` / `Glm4ForCausalLM`: `adapter_config.json`
and `adapter_model.safetensors` with tensors named
`base_model.model.model.layers.{i}.{self_attn.q_proj|...|mlp.gate_up_proj|...}.lora_{A,B}
.weight`, A `[rank, in]` and B `[out, rank]`. transformers fuses gate and up into one
`gate_up_proj`, so glm_jax's gate and up share their A and PEFT's B is theirs stacked (zeros
for an untargeted one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from glm_jax.models.glm import DTYPES, LoRAParam
from glm_jax.models.heads import GlmForCausalLM

ADAPTER_DIR = "adapter"  # where a training stage writes its adapters, beside its `hf` export
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers"
# PEFT module names (transformers' Glm / Glm4) -> the glm_jax targets they adapt.
PEFT_MODULES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
                "gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
_MODULE_PATH = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                "o_proj": "self_attn", "gate_up_proj": "mlp", "down_proj": "mlp"}
# A scalar head (reward model, critic) trains with its model's adapters: it is new weights.
TRAINED_HEAD = ("head_kernel", "head_bias")


def is_trained(path: tuple[Any, ...], variable: Any) -> bool:
    """The nnx filter of what LoRA training updates: the adapters and a scalar head."""
    return isinstance(variable, LoRAParam) or (bool(path) and path[-1] in TRAINED_HEAD)


def split_trained(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trained, frozen) parts of a LoRA model's state (`is_trained`)."""
    return nnx.split_state(params, is_trained, ...)


def join(trained: nnx.State, frozen: nnx.State) -> nnx.State:
    """The whole state again from `split_trained`'s parts."""
    return nnx.merge_state(frozen, trained)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def has_adapters(tree: Any) -> bool:
    """Whether `tree` (a State, or a dict of them) holds any `LoRAParam`."""
    return any(isinstance(v, LoRAParam) for v in jax.tree.leaves(tree, is_leaf=_is_variable))


def partition(params: Any) -> tuple[Any, Any]:
    """(trained, frozen) parts of the parameters a training step updates: for a State with
    adapters, `split_trained`'s; for a dict of parts (PPO's policy and critic), part by part;
    anything else is all trained (frozen None). What the optimizer and the checkpoints hold
    is the trained part."""
    if isinstance(params, nnx.State):
        return split_trained(params) if has_adapters(params) else (params, None)
    if isinstance(params, dict):
        parts = {name: partition(part) for name, part in params.items()}
        return ({name: t for name, (t, _) in parts.items()},
                {name: f for name, (_, f) in parts.items()})
    return params, None


def unpartition(trained: Any, frozen: Any) -> Any:
    """The parameters again from `partition`'s parts."""
    if frozen is None:
        return trained
    if isinstance(trained, nnx.State):
        return join(trained, frozen)
    return {name: unpartition(part, frozen[name]) for name, part in trained.items()}


def _params_fields(state: Any) -> list[str]:
    """The fields of a train state (TrainState, RLState) that hold a model's parameters."""
    if not dataclasses.is_dataclass(state):
        return []
    return [f.name for f in dataclasses.fields(state) if f.name.endswith("params")]


def stored_part(state: Any) -> Any:
    """`state` with its parameters' frozen parts left out: what a checkpoint holds (a LoRA
    run's adapters, optimizer state and step, not the base it is trained on)."""
    if not dataclasses.is_dataclass(state):
        return state
    return state.replace(**{name: partition(getattr(state, name))[0]
                            for name in _params_fields(state)})


def with_frozen_of(stored: Any, state: Any) -> Any:
    """`stored_part`'s output (e.g. restored from a checkpoint) with `state`'s frozen parts."""
    if not dataclasses.is_dataclass(stored):
        return stored
    return stored.replace(**{name: unpartition(getattr(stored, name),
                                               partition(getattr(state, name))[1])
                             for name in _params_fields(stored)})


def frozen_fingerprint(state: Any) -> list[float]:
    """Per frozen parameter array of `state` (a train state, or a model's parameters), the
    sum of its absolute values: what a LoRA checkpoint records of the base its adapters were
    trained on, to refuse another base at resume (within bfloat16 rounding: 1% apart). Empty
    without frozen parts."""
    frozen = ([partition(getattr(state, name))[1] for name in _params_fields(state)]
              if dataclasses.is_dataclass(state) else [partition(state)[1]])
    leaves = jax.tree.leaves([f for f in frozen if f is not None])
    return [float(x) for x in _abs_sums(leaves)] if leaves else []


@jax.jit
def _abs_sums(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in arrays]


def base_state(params: nnx.State) -> nnx.State:
    """The state without its adapters: what the graph of `config.without_lora()` runs (the
    base model, adapters off)."""
    return nnx.split_state(params, LoRAParam, ...)[1]


def base_graphdef(module_type: type[nnx.Module], config: Any) -> nnx.GraphDef:
    """The graph of `module_type` built from `config` without adapters (nothing allocated)."""
    return graph_of(module_type, config.without_lora())


def graph_of(cls: type[nnx.Module], config: Any) -> nnx.GraphDef:
    """The graph of `cls(config)` (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))[0]


def fresh_part(cls: type[nnx.Module], config: Any, seed: int, mesh: Mesh | None,
               wanted: Any = LoRAParam) -> nnx.State:
    """The `wanted` part (an nnx filter: the adapters, or `is_trained` for the adapters and a
    scalar head) of a fresh `cls(config)` of `seed`, placed on `mesh` by the logical-axis
    rules. Jitted: the rest of the model, drawn too, is never computed."""
    from glm_jax.sharding import state_shardings

    def fresh() -> nnx.State:
        return nnx.split_state(nnx.state(cls(config, rngs=nnx.Rngs(seed))), wanted, ...)[0]

    abstract = jax.eval_shape(fresh)
    return jax.jit(fresh, out_shardings=None if mesh is None
                   else state_shardings(abstract, mesh))()


def add_adapters(model: nnx.Module, mesh: Mesh | None = None, seed: int = 0,
                 param_dtype: str = "float32", **lora: Any) -> nnx.Module:
    """`model` (no adapters) with fresh adapters of `lora` (lora_rank, lora_alpha,
    lora_targets): A drawn as a fresh model of `seed` draws it, B zero, so the model computes
    what it did. The base's arrays are shared, not copied (whatever their dtype); a scalar
    head, trained, is cast to `param_dtype`, which the model's config then records. The
    adapters are placed on `mesh` by the logical-axis rules."""
    config, cls = model.config.replace(param_dtype=param_dtype, **lora), type(model)
    head, base = nnx.split_state(nnx.state(model), is_trained, ...)
    head = jax.tree.map(lambda x: x.astype(param_dtype), head)
    return nnx.merge(graph_of(cls, config), base, head, fresh_part(cls, config, seed, mesh))


def cast_frozen(model: nnx.Module, dtype: str) -> nnx.Module:
    """`model` with the frozen part of its weights (`is_trained`'s complement) cast to
    `dtype`, each array keeping its sharding: a LoRA model's base in bfloat16."""
    graphdef, trained, frozen = nnx.split(model, is_trained, ...)
    return nnx.merge(graphdef, trained, jax.tree.map(lambda x: x.astype(dtype), frozen))


# Per target: (module, kernel, A, B, how B @ A becomes the kernel's shape). Stacked layers
# lead every array (`l`).
_DELTAS = {
    "q": ("self_attn", "q_kernel", "q_lora_a", "q_lora_b", "lhdr,lre->lhde"),
    "k": ("self_attn", "k_kernel", "k_lora_a", "k_lora_b", "lhdr,lre->lhde"),
    "v": ("self_attn", "v_kernel", "v_lora_a", "v_lora_b", "lhdr,lre->lhde"),
    "o": ("self_attn", "o_kernel", "o_lora_a", "o_lora_b", "ler,lrhd->lehd"),
    "gate": ("mlp", "gate_kernel", "gate_up_lora_a", "gate_lora_b", "lmr,lre->lme"),
    "up": ("mlp", "up_kernel", "gate_up_lora_a", "up_lora_b", "lmr,lre->lme"),
    "down": ("mlp", "down_kernel", "down_lora_a", "down_lora_b", "ler,lrm->lem"),
}


def merged_state(params: nnx.State, config: Any, dtype: Any = None) -> nnx.State:
    """The base state with each adapter folded into its kernel, `W + scale * B A`, computed in
    float32 and stored in `dtype` (default: config.param_dtype, the trained precision; a
    bfloat16 base would round the adapters' small updates away): the model of
    `config.without_lora()` that computes what the adapted one does."""
    dtype = DTYPES[config.param_dtype] if dtype is None else dtype
    base = base_state(params)
    layers = params["model"]["layers"]
    for target in config.lora_targets:
        module, kernel, a, b, spec = _DELTAS[target]
        variable = base["model"]["layers"][module][kernel]
        delta = jnp.einsum(spec, layers[module][b][...].astype(jnp.float32),
                           layers[module][a][...].astype(jnp.float32)) * config.lora_scale
        variable.set_value((variable[...].astype(jnp.float32) + delta).astype(dtype))
    return base


def merged_model(model: nnx.Module) -> nnx.Module:
    """`model` (with adapters) as the base model with the adapters folded in."""
    config = model.config
    merged = jax.jit(lambda state: merged_state(state, config))(nnx.state(model))
    return nnx.merge(base_graphdef(type(model), config), merged)


# ----------------------------------------------------------------------------- PEFT format


def _peft_tensors(config: Any, layers: Any) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32, host) from the stacked adapters `layers` (model.layers)."""
    m = config.intermediate_size

    def host(module: str, name: str) -> np.ndarray:
        return np.asarray(jax.device_get(layers[module][name][...]), np.float32)

    out = {}
    for i in range(config.num_hidden_layers):
        def put(peft: str, a: np.ndarray, b: np.ndarray, i: int = i) -> None:
            name = f"{PEFT_PREFIX}.{i}.{_MODULE_PATH[peft]}.{peft}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(a.shape[1], -1))
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(-1, b.shape[-1]))

        for target in ("q", "k", "v", "o", "down"):
            if target in config.lora_targets:
                module, _, a, b, _ = _DELTAS[target]
                put(f"{target}_proj", host(module, a), host(module, b))
        if {"gate", "up"} & set(config.lora_targets):
            zeros = np.zeros((config.num_hidden_layers, m, config.lora_rank), np.float32)
            b = np.concatenate([host("mlp", f"{t}_lora_b") if t in config.lora_targets
                                else zeros for t in ("gate", "up")], axis=1)
            put("gate_up_proj", host("mlp", "gate_up_lora_a"), b)
    return out


def save_adapter(model: GlmForCausalLM, path: str | os.PathLike, *,
                 base_model_name_or_path: str = "") -> Path:
    """Writes `model`'s adapters as a PEFT LoRA adapter directory (`adapter_config.json` +
    `adapter_model.safetensors`) for transformers' Glm / Glm4 model of the same base:
    `peft.PeftModel.from_pretrained(base, path)` computes what `model` does."""
    from safetensors.numpy import save_file

    from glm_jax.models.convert import _atomic_write

    config = model.config
    if not isinstance(model, GlmForCausalLM) or not config.lora_rank:
        raise TypeError("save_adapter writes the adapters of a language model with LoRA "
                        f"(a GlmForCausalLM whose config has a lora_rank); got "
                        f"{type(model).__name__} with lora_rank={config.lora_rank}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _peft_tensors(config, nnx.state(model)["model"]["layers"])
    modules = [peft for peft, targets in PEFT_MODULES.items()
               if set(targets) & set(config.lora_targets)]
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
        "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    _atomic_write(path / ADAPTER_WEIGHTS,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(path / ADAPTER_CONFIG,
                  lambda tmp: Path(tmp).write_text(json.dumps(adapter_config, indent=2)))
    return path


class AdapterError(ValueError):
    """A PEFT adapter that cannot be loaded; the message names the file and the field."""


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The LoRA settings of PEFT adapter directory `path` as GlmConfig fields
    (lora_rank, lora_alpha, lora_dropout, lora_targets); AdapterError for what glm_jax cannot
    run."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: a PEFT adapter directory holds "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file}: not valid JSON (line {e.lineno}: {e.msg})") from e

    def refuse(field: str, why: str) -> AdapterError:
        return AdapterError(f"{file}: {field} = {raw.get(field)!r}: {why}")

    if raw.get("peft_type") != "LORA":
        raise refuse("peft_type", "glm_jax loads LoRA adapters")
    for field in ("use_rslora", "use_dora"):
        if raw.get(field):
            raise refuse(field, "glm_jax's adapters are plain LoRA (scale lora_alpha / r)")
    for field in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if raw.get(field):
            raise refuse(field, "glm_jax uses one rank and alpha for every targeted module "
                                "of every layer, and trains no other module")
    modules = raw.get("target_modules")
    if isinstance(modules, str) or not modules:
        raise refuse("target_modules", f"expected a list of module names among "
                                       f"{', '.join(PEFT_MODULES)}")
    unknown = sorted(set(modules) - set(PEFT_MODULES))
    if unknown:
        raise refuse("target_modules", f"{', '.join(unknown)} "
                                       f"{'is' if len(unknown) == 1 else 'are'} not a module "
                                       f"of transformers' Glm / Glm4 that glm_jax adapts "
                                       f"({', '.join(PEFT_MODULES)})")
    targets = [t for peft in PEFT_MODULES if peft in modules for t in PEFT_MODULES[peft]]
    return {"lora_rank": int(raw["r"]), "lora_alpha": float(raw["lora_alpha"]),
            "lora_dropout": float(raw.get("lora_dropout") or 0.0),
            "lora_targets": tuple(targets)}


def load_adapter(path: str | os.PathLike, base: GlmForCausalLM,
                 mesh: Mesh | None = None) -> GlmForCausalLM:
    """The model `base` (no adapters) with the PEFT LoRA adapter of directory `path` applied
    (its adapters as `LoRAParam`s, trainable further); the base's arrays are shared, not
    copied. AdapterError names the file and the tensor of anything that does not fit."""
    from safetensors.numpy import load_file

    from glm_jax.sharding import shard_state

    if base.config.lora_rank:
        raise ValueError("load_adapter applies an adapter to a base model without one; this "
                         f"model already has lora_rank={base.config.lora_rank}")
    config = base.config.replace(**read_adapter_config(path))
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing (PEFT's .bin adapters are not read: save "
                                f"with safe_serialization=True)")
    try:
        stored = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"{file} cannot be read: {e}") from e
    stored = {k.replace(".default.", "."): v for k, v in stored.items()}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(base)(config,
                                                                     rngs=nnx.Rngs(0))))
    adapters = nnx.split_state(abstract, LoRAParam, ...)[0]
    layers = adapters["model"]["layers"]
    n, r, m = config.num_hidden_layers, config.lora_rank, config.intermediate_size

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in stored:
            raise AdapterError(f"{file}: tensor {name} is missing")
        value = stored[name]
        if value.shape != shape:
            raise AdapterError(f"{file}: tensor {name} has shape {list(value.shape)}, "
                               f"expected {list(shape)} for this base model at r={r}")
        return np.asarray(value, np.float32)

    def stacked(peft: str, factor: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.stack([read(f"{PEFT_PREFIX}.{i}.{_MODULE_PATH[peft]}.{peft}.lora_{factor}"
                              f".weight", shape) for i in range(n)])

    for peft, targets in PEFT_MODULES.items():
        if not set(targets) & set(config.lora_targets):
            continue
        module = _MODULE_PATH[peft]
        if peft == "gate_up_proj":
            a = layers[module]["gate_up_lora_a"]
            b = stacked(peft, "B", (2 * m, r))
            for half, target in enumerate(("gate", "up")):
                layers[module][f"{target}_lora_b"].set_value(b[:, half * m:(half + 1) * m])
        else:
            _, _, a_name, b_name, _ = _DELTAS[targets[0]]
            a, b_var = layers[module][a_name], layers[module][b_name]
            b_var.set_value(stacked(peft, "B", (int(np.prod(b_var.shape[1:-1])), r))
                            .reshape(b_var.shape))
        a.set_value(stacked(peft, "A", (r, int(np.prod(a.shape[2:])))).reshape(a.shape))
    placed = (shard_state(adapters, mesh) if mesh is not None
              else jax.tree.map(jnp.asarray, adapters))
    return nnx.merge(graphdef, nnx.state(base), placed)
