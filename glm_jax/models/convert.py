"""Hugging Face / ChatGLM checkpoints <-> glm_jax parameters.

Loads `config.json` + `*.safetensors` (single file or sharded with an index) or
`pytorch_model*.bin`, for model_type "glm", "glm4" (transformers) and "chatglm" (ChatGLM2/3
remote code). One tensor at a time is read on the host, reshaped to our layout and placed
straight onto its shards, so the whole model never sits on one device.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from glm_jax.models.glm import DTYPES, GlmConfig
from glm_jax.models.heads import GlmForCausalLM, GlmRewardModel, GlmValueModel
from glm_jax.sharding import check_model_fits_mesh, logical_to_spec

SUPPORTED_MODEL_TYPES = ("glm", "glm4", "chatglm")
HEADS = {"lm": GlmForCausalLM, "reward": GlmRewardModel, "value": GlmValueModel}
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


# ----------------------------------------------------------------------------- directory kinds

# What each kind of directory is, in words, for the errors of a directory given in the wrong
# place (a workdir where a Hugging Face export is expected, and the other way round).
KINDS = {
    "hf": "a Hugging Face model directory (config.json with a model_type)",
    "policy": "a policy training workdir (SFT, DPO, PPO or RSFT: its checkpoints hold a "
              "language model, no reward head)",
    "reward": "a reward-model workdir (scripts/train_rm.py: its checkpoints hold a reward head)",
    "workdir": "a glm_jax training workdir without a readable checkpoint",
    "pipeline": "a pipeline workdir (scripts/run_pipeline.py: data/ and one directory per stage)",
    "missing": "not a directory",
    "other": "neither a Hugging Face model directory nor a glm_jax workdir",
}
EXPECTED = {
    "hf": "a Hugging Face model directory such as runs/sft/hf (the training scripts export "
          "one to WORKDIR/hf)",
    "reward": "a reward-model workdir written by scripts/train_rm.py (model_config.json and "
              "checkpoints/ holding a reward head)",
}


def directory_kind(path: str | os.PathLike) -> str:
    """What directory `path` holds, one of `KINDS`, told from its file names, config.json and
    (for a training workdir) the parameter names in its latest checkpoint's metadata: no
    weights are read."""
    path = Path(path)
    if not path.is_dir():
        return "missing"
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raw = None  # reading it as a checkpoint reports the line
        if isinstance(raw, dict) and "model_type" in raw:
            return "hf"
    if (path / "model_config.json").is_file():
        head = _checkpoint_head(path / "checkpoints")
        if head is None and (path / "hf").is_dir():
            head = "policy"  # only language models are exported
        return head or "workdir"
    if (path / "data").is_dir() and any(path.glob("*/stage.json")):
        return "pipeline"
    return "other"


def _checkpoint_head(directory: Path) -> str | None:
    """"reward" or "policy" by the parameters of the newest orbax checkpoint in `directory`
    whose metadata reads (None without one): a reward model's have `head_kernel`, a policy's
    `lm_head` (PPO keeps its critic apart, in `critic_params`)."""
    if not directory.is_dir():
        return None
    import orbax.checkpoint as ocp

    # Unfinished saves are named "<step>.orbax-checkpoint-tmp-...": not digits.
    for step in sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
                       reverse=True):
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / "state")
        except (OSError, ValueError):  # a damaged step: its loader reports it
            continue
        params = getattr(metadata, "tree", metadata).get("params", {})
        if "head_kernel" in params:
            return "reward"
        if "lm_head" in params:
            return "policy"
    return None


def require_kind(path: str | os.PathLike, expected: str, field: str = "") -> None:
    """Raises CheckpointError when `path` (config `field`, if any) is a directory of a known
    kind other than `expected` ("hf" or "reward"), saying what it is and what to give instead.
    A missing or unrecognised directory passes: its loader says what is missing."""
    path = Path(path)
    found = directory_kind(path)
    if found in (expected, "missing", "other") or (expected, found) == ("reward", "workdir"):
        return
    hf = path / "hf"
    hints = {
        ("hf", "policy"): f"use its export {hf}" + ("" if hf.is_dir() else
                                                     ", written when its run finishes"),
        ("hf", "reward"): "a reward model cannot start a policy: give the SFT export here (e.g. "
                          "runs/sft/hf), and the reward-model workdir as ppo.reward_model, "
                          "dpo.reward_model or rsft.reward_model",
        ("hf", "workdir"): f"its run has written no checkpoint yet: let it finish, then use {hf}",
        ("hf", "pipeline"): f"use its SFT export {path / 'sft' / 'hf'}",
        ("reward", "hf"): "an export holds a language model, not a reward model: train one with "
                          "scripts/train_rm.py (model.init_checkpoint = this directory) and "
                          "give its workdir",
        ("reward", "policy"): "train a reward model with scripts/train_rm.py and give its "
                              "workdir",
        ("reward", "pipeline"): f"use its reward model {path / 'rm'}",
    }
    subject = f"{field} = '{path}'" if field else str(path)
    raise CheckpointError(f"{subject} is {KINDS[found]}, not {EXPECTED[expected]}: "
                          f"{hints[expected, found]}")


# ----------------------------------------------------------------------------- config


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def _field(cfg: dict[str, Any], name: str, source: Path) -> Any:
    if name not in cfg:
        raise CheckpointError(f"{source}: required field {name!r} is missing")
    return cfg[name]


def config_from_hf(cfg: dict[str, Any], source: Path, **overrides: Any) -> GlmConfig:
    """GlmConfig from a config.json dict (model_type glm, glm4 or chatglm)."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; glm_jax "
                              f"loads {', '.join(SUPPORTED_MODEL_TYPES)}")
    eos = cfg.get("eos_token_id", 2 if model_type == "chatglm" else 1)
    eos = tuple(eos) if isinstance(eos, list | tuple) else (eos,)
    if model_type == "chatglm":
        for name, required in (("add_bias_linear", False), ("rmsnorm", True),
                               ("apply_residual_connection_post_layernorm", False),
                               ("post_layer_norm", True)):
            if cfg.get(name, required) != required:
                raise CheckpointError(f"{source}: {name} = {cfg[name]!r} is not supported "
                                      f"(ChatGLM2/3 checkpoints have {required})")
        heads = _field(cfg, "num_attention_heads", source)
        hidden = _field(cfg, "hidden_size", source)
        fields = dict(
            vocab_size=cfg.get("padded_vocab_size") or _field(cfg, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_field(cfg, "ffn_hidden_size", source),
            num_hidden_layers=_field(cfg, "num_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=(cfg.get("multi_query_group_num", heads)
                                 if cfg.get("multi_query_attention", False) else heads),
            head_dim=cfg.get("kv_channels") or hidden // heads,
            partial_rotary_factor=0.5,
            rope_theta=10000.0 * cfg.get("rope_ratio", 1.0),
            rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
            attention_bias=bool(cfg.get("add_qkv_bias", True)),
            use_post_norms=False,
            max_position_embeddings=cfg.get("seq_length", 8192),
            pad_token_id=cfg.get("pad_token_id") or 0,
        )
    else:
        if cfg.get("tie_word_embeddings", False):
            raise CheckpointError(f"{source}: tie_word_embeddings = true is not supported: GLM "
                                  "models have an untied output layer")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported "
                                  "(only the default rotary embedding)")
        heads = _field(cfg, "num_attention_heads", source)
        hidden = _field(cfg, "hidden_size", source)
        fields = dict(
            vocab_size=_field(cfg, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_field(cfg, "intermediate_size", source),
            num_hidden_layers=_field(cfg, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            partial_rotary_factor=rope.get("partial_rotary_factor",
                                           cfg.get("partial_rotary_factor", 0.5)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=cfg.get("rms_norm_eps", 1.5625e-07),
            attention_bias=bool(cfg.get("attention_bias", True)),
            use_post_norms=model_type == "glm4",
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            pad_token_id=cfg.get("pad_token_id") or 0,
        )
    return GlmConfig(eos_token_id=eos, **{**fields, **overrides})


def config_to_hf(config: GlmConfig, dtype: str) -> dict[str, Any]:
    """config.json for transformers' GlmForCausalLM / Glm4ForCausalLM."""
    glm4 = config.use_post_norms
    rope = {"rope_type": "default", "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor}
    return {
        "architectures": ["Glm4ForCausalLM" if glm4 else "GlmForCausalLM"],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        # Both spellings: transformers >= 5 reads rope_parameters, 4.x the top-level fields.
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "partial_rotary_factor": config.partial_rotary_factor,
        "tie_word_embeddings": False,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": list(config.eos_token_id),
        "torch_dtype": dtype,
        "use_cache": True,
    }


# ----------------------------------------------------------------------------- tensors


class TensorReader:
    """Reads single tensors from the weight files of a checkpoint directory, lazily."""

    def __init__(self, path: Path):
        self.path = path
        self._locations: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        index = path / "model.safetensors.index.json"
        bin_index = path / "pytorch_model.bin.index.json"
        if index.exists():
            weight_map = _field(_read_json(index), "weight_map", index)
            self._locations = {name: path / file for name, file in weight_map.items()}
        elif (path / "model.safetensors").exists():
            self._locations = dict.fromkeys(self._safetensors_keys(path / "model.safetensors"),
                                            path / "model.safetensors")
        elif bin_index.exists():
            weight_map = _field(_read_json(bin_index), "weight_map", bin_index)
            self._locations = {name: path / file for name, file in weight_map.items()}
        else:
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
            if not files:
                raise FileNotFoundError(f"{path}: no weights found (looked for model.safetensors,"
                                        " model.safetensors.index.json, *.safetensors and "
                                        "pytorch_model*.bin)")
            for file in files:
                names = (self._safetensors_keys(file) if file.suffix == ".safetensors"
                         else self._torch_file(file).keys())
                self._locations.update(dict.fromkeys(names, file))
        for file in set(self._locations.values()):
            if not file.exists():
                raise FileNotFoundError(f"{path}: the index lists weight file {file.name}, "
                                        "which does not exist")

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def _safetensors_keys(self, file: Path) -> list[str]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="numpy") as f:
                return list(f.keys())
        except SafetensorError as e:
            raise _unreadable(file, e) from e

    def _torch_file(self, file: Path) -> dict[str, Any]:
        if file not in self._handles:
            try:
                import torch
            except ImportError as e:
                raise CheckpointError(f"{file}: reading pytorch_model*.bin needs torch "
                                      "(pip install torch), or convert it to safetensors") from e
            self._handles[file] = torch.load(file, map_location="cpu", weights_only=True,
                                             mmap=True)
        return self._handles[file]

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32 numpy, checked against the expected `shape`."""
        if name not in self._locations:
            files = sorted({f.name for f in self._locations.values()})
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                  f"(weight files: {', '.join(files)})")
        file = self._locations[name]
        if file.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(file, framework="numpy") as f:
                    if name not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                        raise CheckpointError(f"{file}: tensor {name!r} is listed in the index "
                                              "but not in the file")
                    array = f.get_tensor(name)
            except SafetensorError as e:
                raise _unreadable(file, e) from e
        else:
            tensor = self._torch_file(file)[name]
            array = tensor.float().numpy()
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(array.shape)}, but "
                                  f"the config expects {tuple(shape)}")
        return np.asarray(array, dtype=np.float32)


def _unreadable(file: Path, error: Exception) -> CheckpointError:
    """The error for a weight file that safetensors cannot read (`error`, its own words)."""
    return CheckpointError(f"{file}: not a readable safetensors file ({error}): it is truncated "
                           "or corrupt, e.g. by an interrupted copy or download. Export it again "
                           "(the training stage's WORKDIR/hf, or save_pretrained) or download it "
                           "again")


Path_ = tuple[Any, ...]
LAYERS: Path_ = ("model", "layers")  # the stacked decoder layers, in every head
Recipe = tuple[tuple[tuple[str, tuple[int, ...]], ...], Callable[..., np.ndarray]]


def _layer_recipes(config: GlmConfig, model_type: str, i: int) -> dict[Path_, Recipe]:
    """Layer i's slice of each stacked layer parameter (keyed by the stacked path)."""
    e, h, k, d, m = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                     config.head_dim, config.intermediate_size)
    ours = LAYERS
    recipes: dict[Path_, Recipe] = {}

    def linear_in(name: str, heads: int, rows: slice | None = None, total: int | None = None):
        # HF Linear weight [heads * head_dim, embed] -> our kernel [heads, head_dim, embed].
        shape = (total or heads * d, e)
        return ((name, shape),), lambda w: w[rows or slice(None)].reshape(heads, d, e)

    def bias(name: str, heads: int, rows: slice | None = None, total: int | None = None):
        return ((name, (total or heads * d,)),), lambda b: b[rows or slice(None)].reshape(heads, d)

    if model_type == "chatglm":
        hf = f"transformer.encoder.layers.{i}"
        qkv, total = f"{hf}.self_attention.query_key_value", (h + 2 * k) * d
        parts = {"q": (slice(0, h * d), h), "k": (slice(h * d, (h + k) * d), k),
                 "v": (slice((h + k) * d, total), k)}
        for p, (rows, heads) in parts.items():
            recipes[(*ours, "self_attn", f"{p}_kernel")] = linear_in(f"{qkv}.weight", heads,
                                                                     rows, total)
            if config.attention_bias:
                recipes[(*ours, "self_attn", f"{p}_bias")] = bias(f"{qkv}.bias", heads, rows,
                                                                  total)
        o_name = f"{hf}.self_attention.dense.weight"
        gate_up, down = f"{hf}.mlp.dense_h_to_4h.weight", f"{hf}.mlp.dense_4h_to_h.weight"
    else:
        hf = f"model.layers.{i}"
        for p, heads in (("q", h), ("k", k), ("v", k)):
            recipes[(*ours, "self_attn", f"{p}_kernel")] = linear_in(
                f"{hf}.self_attn.{p}_proj.weight", heads)
            if config.attention_bias:
                recipes[(*ours, "self_attn", f"{p}_bias")] = bias(f"{hf}.self_attn.{p}_proj.bias",
                                                                  heads)
        o_name = f"{hf}.self_attn.o_proj.weight"
        gate_up, down = f"{hf}.mlp.gate_up_proj.weight", f"{hf}.mlp.down_proj.weight"
        if config.use_post_norms:
            for norm in ("post_self_attn_layernorm", "post_mlp_layernorm"):
                recipes[(*ours, norm, "weight")] = (((f"{hf}.{norm}.weight", (e,)),), _same)
    recipes[(*ours, "self_attn", "o_kernel")] = (((o_name, (e, h * d)),),
                                                 lambda w: w.reshape(e, h, d))
    recipes[(*ours, "mlp", "gate_kernel")] = (((gate_up, (2 * m, e)),), lambda w: w[:m])
    recipes[(*ours, "mlp", "up_kernel")] = (((gate_up, (2 * m, e)),), lambda w: w[m:])
    recipes[(*ours, "mlp", "down_kernel")] = (((down, (e, m)),), _same)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        recipes[(*ours, norm, "weight")] = (((f"{hf}.{norm}.weight", (e,)),), _same)
    return recipes


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _backbone_recipes(config: GlmConfig, model_type: str) -> dict[Path_, Recipe]:
    v, e = config.vocab_size, config.hidden_size
    if model_type == "chatglm":
        embed, norm = "transformer.embedding.word_embeddings.weight", \
            "transformer.encoder.final_layernorm.weight"
    else:
        embed, norm = "model.embed_tokens.weight", "model.norm.weight"
    return {("model", "embed_tokens"): (((embed, (v, e)),), _same),
            ("model", "norm", "weight"): (((norm, (e,)),), _same)}


def _lm_head_recipe(config: GlmConfig, model_type: str) -> Recipe:
    name = "transformer.output_layer.weight" if model_type == "chatglm" else "lm_head.weight"
    return ((name, (config.vocab_size, config.hidden_size)),), _same


# ----------------------------------------------------------------------------- public API


def _sharding(variable: nnx.Variable, mesh: Mesh | None, drop_leading: bool = False
              ) -> NamedSharding | None:
    """Where `variable` (without its leading axis: one layer of a stacked one) goes on
    `mesh`; None without a mesh."""
    if mesh is None:
        return None
    axes = tuple(variable.get_metadata().get("logical_axes", ()))
    return NamedSharding(mesh, logical_to_spec(axes[1:] if drop_leading else axes))


def _place(array: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    # Each device receives only its own slice of the host tensor.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _stack_on_device(layers: list[jax.Array], sharding: NamedSharding | None) -> jax.Array:
    """The per-layer arrays (each already on its shards) as one stacked array: one layer's
    tensor at a time is on the host, and on each device the stacked shard is built from the
    layers' shards without any gather."""
    stack = jax.jit(lambda *xs: jax.numpy.stack(xs), out_shardings=sharding)
    return stack(*layers)


def read_config(path: str | os.PathLike, **overrides: Any) -> GlmConfig:
    """The GlmConfig of checkpoint directory `path` (its config.json only, no weights), with
    `overrides` (dtype, param_dtype, remat, ...)."""
    return _read_config(Path(path), overrides)[1]


def _read_config(path: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], GlmConfig]:
    """(config.json as read, its GlmConfig with `overrides`)."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    require_kind(path, "hf")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: config.json is missing; a Hugging Face checkpoint "
                                "directory needs config.json next to its weights")
    raw = _read_json(config_file)
    # generation_config.json's EOS ids are the ones the checkpoint's authors generate with
    # (GLM-4: <|endoftext|>, <|user|>, <|observation|>); config.json may list fewer.
    generation_file = path / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.exists() else {}
    if "eos_token_id" in generation:
        raw = {**raw, "eos_token_id": generation["eos_token_id"]}
    return raw, config_from_hf(raw, config_file, **overrides)


def from_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str | None = None, mesh: Mesh | None = None, head: str = "lm",
                    seed: int = 0, **overrides: Any) -> nnx.Module:
    """Loads a Hugging Face GLM / GLM-4 / ChatGLM2-3 checkpoint directory.

    Args:
      path: directory with config.json and safetensors (or pytorch_model*.bin) weights.
      dtype: compute dtype ("float32" or "bfloat16"); also the parameter dtype unless
        `param_dtype` is given.
      mesh: if given, every parameter is created directly sharded over it.
      head: "lm" (GlmForCausalLM), or "reward" / "value" to start a reward model or critic
        from a language-model checkpoint (the backbone is loaded, the scalar head initialised
        from `seed`).
      overrides: other GlmConfig fields that say how the model runs (remat, scan_layers,
        attention, vocab_chunk).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    path = Path(path)
    raw, config = _read_config(path, dict(dtype=dtype, param_dtype=param_dtype or dtype,
                                          **overrides))
    if mesh is not None:
        check_model_fits_mesh(config, mesh)
    reader = TensorReader(path)

    abstract = nnx.eval_shape(lambda: HEADS[head](config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    recipes = _backbone_recipes(config, raw["model_type"])
    if head == "lm":
        recipes[("lm_head",)] = _lm_head_recipe(config, raw["model_type"])
    else:  # a fresh scalar head, initialised as a new reward model / critic would be
        init = nnx.initializers.normal(config.initializer_range)
        recipes[("head_kernel",)] = ((), lambda: np.asarray(
            init(jax.random.key(seed), (config.hidden_size,), np.float32)))
        recipes[("head_bias",)] = ((), lambda: np.zeros((), np.float32))
    np_dtype = _NP_DTYPES[config.param_dtype]

    def build(recipe: Recipe, shape: tuple[int, ...]) -> np.ndarray:
        sources, transform = recipe
        array = transform(*(reader.get(name, source_shape) for name, source_shape in sources))
        array = np.array(array, dtype=np_dtype, order="C")
        if array.shape != shape:  # a recipe bug, never a user error
            raise AssertionError(f"built {array.shape}, expected {shape}")
        return array

    flat = nnx.to_flat_state(state)
    layers = range(config.num_hidden_layers)
    layer_recipes = [_layer_recipes(config, raw["model_type"], i) for i in layers]
    for key, variable in tqdm(flat, desc=f"loading {path.name}", unit="tensor", leave=False):
        if key[:len(LAYERS)] == LAYERS:  # stacked: one layer's tensor on the host at a time
            layer_sharding = _sharding(variable, mesh, drop_leading=True)
            value = _stack_on_device(
                [_place(build(layer_recipes[i][key], variable.shape[1:]), layer_sharding)
                 for i in layers], _sharding(variable, mesh))
        else:
            value = _place(build(recipes[key], variable.shape), _sharding(variable, mesh))
        variable.set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _hf_tensors(config: GlmConfig, flat: dict[Path_, Any]) -> Iterator[tuple[str, Callable]]:
    """(HF name, thunk producing the float32 numpy tensor) in transformers' GLM layout."""

    def host(key: Path_, layer: int | None = None) -> np.ndarray:
        value = flat[key][...]
        if layer is not None:  # one layer of a stacked parameter, sliced before the transfer
            value = value[layer]
        return np.asarray(jax.device_get(value), dtype=np.float32)

    e = config.hidden_size
    yield "model.embed_tokens.weight", lambda: host(("model", "embed_tokens"))
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}"

        def layer(*name: str, i: int = i) -> np.ndarray:
            return host((*LAYERS, *name), i)

        # Every thunk binds this layer's `layer` (they are called after the loop has moved on).
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.use_post_norms:
            norms += ["post_self_attn_layernorm", "post_mlp_layernorm"]
        for norm in norms:
            yield f"{hf}.{norm}.weight", lambda n=norm, f=layer: f(n, "weight")
        for p in ("q", "k", "v"):
            yield (f"{hf}.self_attn.{p}_proj.weight",
                   lambda p=p, f=layer: f("self_attn", f"{p}_kernel").reshape(-1, e))
            if config.attention_bias:
                yield (f"{hf}.self_attn.{p}_proj.bias",
                       lambda p=p, f=layer: f("self_attn", f"{p}_bias").reshape(-1))
        yield (f"{hf}.self_attn.o_proj.weight",
               lambda f=layer: f("self_attn", "o_kernel").reshape(e, -1))
        yield f"{hf}.mlp.gate_up_proj.weight", lambda f=layer: np.concatenate(
            [f("mlp", "gate_kernel"), f("mlp", "up_kernel")])
        yield f"{hf}.mlp.down_proj.weight", lambda f=layer: f("mlp", "down_kernel")
    yield "model.norm.weight", lambda: host(("model", "norm", "weight"))
    yield "lm_head.weight", lambda: host(("lm_head",))


def save_pretrained(model: GlmForCausalLM, path: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> Path:
    """Writes `model` as a transformers GlmForCausalLM / Glm4ForCausalLM checkpoint directory.

    Weights go to model.safetensors, or to several files plus model.safetensors.index.json when
    larger than `max_shard_bytes`. Each file is written to a temporary name and renamed, so an
    interrupted save never leaves a truncated file under a final name. A model with low-rank
    adapters is written merged (`lora.merged_model`): the full model they make.
    """
    if not isinstance(model, GlmForCausalLM):
        raise TypeError(f"save_pretrained writes language models (GlmForCausalLM), got "
                        f"{type(model).__name__}")
    if model.config.lora_rank:
        from glm_jax.models.lora import merged_model

        model = merged_model(model)
    from safetensors.numpy import save_file

    config = model.config
    dtype = dtype or config.param_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    np_dtype = _NP_DTYPES[dtype]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model)))

    tensors = list(_hf_tensors(config, flat))
    itemsize = np.dtype(np_dtype).itemsize
    sizes = {}
    for key, variable in flat.items():
        sizes[key] = math.prod(variable.shape) * itemsize
    total = sum(sizes.values())
    num_shards = max(1, math.ceil(total / max_shard_bytes))
    per_shard = math.ceil(len(tensors) / num_shards)
    names = (["model.safetensors"] if num_shards == 1 else
             [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)])

    weight_map = {}
    for shard, file_name in enumerate(names):
        chunk = tensors[shard * per_shard:(shard + 1) * per_shard]
        arrays = {name: np.ascontiguousarray(thunk().astype(np_dtype)) for name, thunk in chunk}
        _atomic_write(path / file_name, lambda tmp, a=arrays: save_file(a, tmp,
                                                                        metadata={"format": "pt"}))
        weight_map.update(dict.fromkeys(arrays, file_name))
    if num_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(path / "model.safetensors.index.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    config_json = json.dumps(config_to_hf(config, dtype), indent=2)
    _atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(config_json))
    return path


def _atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(str(tmp))
    umask = os.umask(0o022)  # read it (and put it back): safetensors writes 0600 files
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)
