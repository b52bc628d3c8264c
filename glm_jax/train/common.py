"""Setup shared by the training programs: mesh, tokenizer and model from a config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.data.records import PromptExample, read_jsonl
from glm_jax.data.tokenizer import CHATGLM3_TEMPLATE, GLM4_TEMPLATE, ChatTemplate, Tokenizer
from glm_jax.models.convert import HEADS, from_pretrained, read_config
from glm_jax.models.glm import GlmConfig
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import (
    MeshConfig,
    check_model_fits_mesh,
    initialize_distributed,
    make_mesh,
    shard_state,
)
from glm_jax.train.checkpoint import load_trained_model

TEMPLATES = {"glm4": GLM4_TEMPLATE, "chatglm3": CHATGLM3_TEMPLATE}


def mesh_from_config(config: ConfigDict) -> Mesh:
    """The mesh of `config.mesh` over every process's devices (starting the multi-process
    runtime first when config.distributed or the environment asks for it)."""
    initialize_distributed(**config.get("distributed", {}))
    return make_mesh(MeshConfig(**config.mesh))


def template_from_config(config: ConfigDict) -> ChatTemplate:
    name = config.data.template
    if name not in TEMPLATES:
        raise ValueError(f"config.data.template = {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def tokenizer_from_config(config: ConfigDict) -> Tokenizer:
    """config.data.tokenizer, else the init checkpoint's tokenizer, else the bundled tiny one."""
    if config.data.tokenizer:
        return Tokenizer.from_dir(config.data.tokenizer)
    if config.model.init_checkpoint:
        return Tokenizer.from_dir(config.model.init_checkpoint)
    return Tokenizer.tiny()


RUNTIME_FIELDS = ("remat", "scan_layers", "attention", "vocab_chunk")


def runtime_overrides(config: ConfigDict) -> dict[str, Any]:
    """The GlmConfig fields that say how a program runs (remat, scanned layers, attention,
    vocabulary chunk), from config.model: they apply to every model a stage builds or loads."""
    return {name: config.model[name] for name in RUNTIME_FIELDS}


def trained_overrides(config: ConfigDict) -> dict[str, Any]:
    """GlmConfig overrides for a trained model: the run's dtypes and runtime fields."""
    return {**runtime_overrides(config), "dtype": config.model.dtype,
            "param_dtype": config.model.param_dtype}


def frozen_overrides(config: ConfigDict) -> dict[str, Any]:
    """GlmConfig overrides for a frozen model (reference policy, reward model): a trained
    model's, with the weights in config.model.frozen_dtype when set."""
    return {**trained_overrides(config),
            "param_dtype": config.model.frozen_dtype or config.model.param_dtype}


def model_from_config(config: ConfigDict, head: str, mesh: Mesh) -> nnx.Module:
    """`head` ("lm", "reward", "value") from config.model.init_checkpoint, or a fresh tiny
    model (config.model.tiny overrides its fields) when no checkpoint is given."""
    if config.model.init_checkpoint:
        return from_pretrained(config.model.init_checkpoint, mesh=mesh, head=head,
                               seed=config.seed, **trained_overrides(config))
    glm_config = model_config_from_config(config)
    check_model_fits_mesh(glm_config, mesh)
    model = HEADS[head](glm_config, rngs=nnx.Rngs(config.seed))
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, shard_state(state, mesh))


def model_config_from_config(config: ConfigDict) -> GlmConfig:
    """The GlmConfig of config.model: the init checkpoint's config.json (read alone, no
    weights), or the tiny model's; with the run's dtypes and runtime fields."""
    if config.model.init_checkpoint:
        return read_config(config.model.init_checkpoint, **trained_overrides(config))
    return tiny_config(**trained_overrides(config), **config.model.get("tiny", {}))


def save_tokenizer(tokenizer: Tokenizer, workdir: str | Path) -> None:
    """Copies the tokenizer file beside the checkpoints, under the name `Tokenizer.from_dir`
    looks for, so the workdir is self-contained."""
    name = "tokenizer.json" if tokenizer.path.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(tokenizer.path, Path(workdir) / name)


def is_main_process() -> bool:
    return jax.process_index() == 0


def save_config(config: ConfigDict, workdir: str | Path) -> None:
    """Writes the resolved config (after command-line overrides) as `workdir/config.json`."""
    (Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def load_config(workdir: str | Path) -> ConfigDict:
    """The config a training run in `workdir` was resolved to."""
    import json

    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: is {workdir} a glm_jax training workdir?")
    return ConfigDict(json.loads(path.read_text()))


def read_prompts(path: str, field: str, on_error: str = "raise") -> list[PromptExample]:
    """The prompts of the JSONL file `path`, named in errors by its config `field` (e.g.
    "config.ppo.prompt_file"); skipped bad lines are reported."""
    if not path:
        raise ValueError(f"{field} is empty: set it to a prompt JSONL file")
    if not Path(path).exists():
        raise FileNotFoundError(f"{field} = {path!r} does not exist")
    prompts, report = read_jsonl(path, "prompt", on_error=on_error)
    if report.num_skipped:
        print(f"{path}: skipped {report.num_skipped} bad lines "
              f"(first: {report.first_skipped_lines})")
    if not prompts:
        raise ValueError(f"{field} = {path!r} has no prompts")
    return prompts


def load_reward_model(path: str, field: str, vocab_size: int, mesh: Mesh,
                      overrides: dict[str, Any] | None = None) -> GlmRewardModel:
    """The trained reward model of the RM workdir `path` (config `field`), sharded over
    `mesh`, with its config's `overrides` (`frozen_overrides`: precision and runtime); it must
    read the policy's token ids (`vocab_size`), or it would score garbage without any
    error."""
    if not path:
        raise ValueError(f"{field} is empty: set it to a reward-model workdir "
                         "(scripts/train_rm.py)")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{field} = {path!r} is not a directory: expected a "
                                "reward-model workdir (scripts/train_rm.py)")
    try:
        model = load_trained_model(path, GlmRewardModel, mesh, overrides=overrides)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field} = {path!r}: {e}") from e
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"{field} = {path!r} has vocab_size {model.config.vocab_size}, the "
                         f"policy {vocab_size}: they must share one tokenizer")
    return model
