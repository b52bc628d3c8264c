"""Setup shared by the training programs: mesh, tokenizer and model from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from glm_jax.data.chat_template import Template, template_for
from glm_jax.data.records import PromptExample, read_jsonl
from glm_jax.data.tokenizer import Tokenizer
from glm_jax.models.convert import HEADS, from_pretrained, read_config, require_kind
from glm_jax.models.glm import GlmConfig
from glm_jax.models.heads import GlmRewardModel
from glm_jax.models.lora import add_adapters, cast_frozen, merged_model
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import (
    MeshConfig,
    check_model_fits_mesh,
    initialize_distributed,
    make_mesh,
    shard_state,
)
from glm_jax.train.checkpoint import load_model_config, load_trained_model
from glm_jax.train.workdir import write_file


def mesh_from_config(config: ConfigDict) -> Mesh:
    """The mesh of `config.mesh` over every process's devices (starting the multi-process
    runtime first when config.distributed or the environment asks for it)."""
    initialize_distributed(**config.get("distributed", {}))
    return make_mesh(MeshConfig(**config.mesh))


def template_from_config(config: ConfigDict, tokenizer: Tokenizer) -> Template:
    """The chat template config.data.template names, for `tokenizer` ("auto": the tokenizer's
    own chat_template when its tokenizer_config.json has one, else glm_jax's GLM-4 format)."""
    return template_for(config.data.template, tokenizer)


def tokenizer_from_config(config: ConfigDict) -> Tokenizer:
    """config.data.tokenizer, else the init checkpoint's tokenizer, else the bundled tiny one."""
    if config.data.tokenizer:
        return Tokenizer.from_dir(config.data.tokenizer)
    if config.model.init_checkpoint:
        return Tokenizer.from_dir(init_checkpoint(config))
    return Tokenizer.tiny()


def init_checkpoint(config: ConfigDict) -> str:
    """config.model.init_checkpoint, refused when it is a directory of another kind than a
    Hugging Face model (a training or pipeline workdir) with what to give instead."""
    require_kind(config.model.init_checkpoint, "hf", "config.model.init_checkpoint")
    return config.model.init_checkpoint


def tokenizer_source(config: ConfigDict, tokenizer: Tokenizer) -> str:
    """Where `tokenizer_from_config` took `tokenizer` from, in words for errors."""
    if config.data.tokenizer:
        return f"config.data.tokenizer = '{config.data.tokenizer}'"
    if config.model.init_checkpoint:
        return f"the tokenizer of config.model.init_checkpoint, {tokenizer.path}"
    return f"the bundled tiny tokenizer {tokenizer.path}, as config.data.tokenizer is empty"


def check_vocab(tokenizer: Tokenizer, vocab_size: int, model_source: str,
                tokenizer_source: str) -> None:
    """Raises when a model of `vocab_size` embedding rows (from `model_source`, in words) has
    none for some of `tokenizer`'s ids (from `tokenizer_source`): those ids would read past the
    embedding, and training would give loss=nan at every step."""
    num_ids = max(tokenizer.token_table()) + 1
    if vocab_size < num_ids:
        raise ValueError(
            f"the model's vocab_size {vocab_size} ({model_source}) is smaller than the "
            f"tokenizer's {num_ids} ids (max id + 1, special tokens included; "
            f"{tokenizer_source}): ids from {vocab_size} on have no embedding (training gives "
            f"loss=nan, scores and samples are garbage). Give a model and a tokenizer that "
            f"belong together: a model with vocab_size >= {num_ids}, or the tokenizer the "
            f"model was trained with")


def check_tokenizer_fits(config: ConfigDict, tokenizer: Tokenizer) -> None:
    """`check_vocab` for the model and tokenizer of `config` (config.json only, no weights):
    every stage calls it before its pre-flight and before loading any weights."""
    if config.model.init_checkpoint:
        model_source = f"config.model.init_checkpoint = '{config.model.init_checkpoint}'"
    else:
        model_source = ("config.model.tiny.vocab_size" if "vocab_size" in config.model.get(
            "tiny", {}) else "the tiny default, as config.model.tiny.vocab_size is unset")
    check_vocab(tokenizer, model_config_from_config(config).vocab_size, model_source,
                tokenizer_source(config, tokenizer))


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


def lora_overrides(config: ConfigDict, role: str) -> dict[str, Any]:
    """The GlmConfig fields of config.model.lora for a model of `role` ("sft", "reward",
    "policy", "critic"): its adapters, or none when LoRA is off or not on this role."""
    lora = config.model.get("lora")

    def names(text: str) -> tuple[str, ...]:
        return tuple(name.strip() for name in text.split(","))

    if not lora or not lora.rank or role not in names(lora.roles):
        return {}
    return {"lora_rank": lora.rank, "lora_alpha": float(lora.alpha),
            "lora_dropout": float(lora.dropout), "lora_targets": names(lora.targets)}


def model_from_config(config: ConfigDict, head: str, mesh: Mesh, role: str = "") -> nnx.Module:
    """`head` ("lm", "reward", "value") from config.model.init_checkpoint, or a fresh tiny
    model (config.model.tiny overrides its fields) when no checkpoint is given; with fresh
    low-rank adapters when config.model.lora puts them on `role`."""
    lora = lora_overrides(config, role)
    if config.model.init_checkpoint:
        # With adapters the base is frozen: read straight into config.model.frozen_dtype.
        model = from_pretrained(init_checkpoint(config), mesh=mesh, head=head,
                                seed=config.seed,
                                **(frozen_overrides if lora else trained_overrides)(config))
        if not lora:
            return model
        return add_adapters(model, mesh, config.seed, config.model.param_dtype, **lora)
    glm_config = model_config_from_config(config, role)
    check_model_fits_mesh(glm_config, mesh)
    graphdef, state = nnx.split(HEADS[head](glm_config, rngs=nnx.Rngs(config.seed)))
    model = nnx.merge(graphdef, shard_state(state, mesh))
    return cast_frozen(model, frozen_overrides(config)["param_dtype"]) if lora else model


def model_config_from_config(config: ConfigDict, role: str = "") -> GlmConfig:
    """The GlmConfig of config.model: the init checkpoint's config.json (read alone, no
    weights), or the tiny model's; with the run's dtypes and runtime fields, and the adapters
    of config.model.lora when it puts them on `role`."""
    overrides = {**trained_overrides(config), **lora_overrides(config, role)}
    if config.model.init_checkpoint:
        return read_config(init_checkpoint(config), **overrides)
    return tiny_config(**overrides, **config.model.get("tiny", {}))


def save_tokenizer(tokenizer: Tokenizer, workdir: str | Path) -> None:
    """Copies the tokenizer file, with its tokenizer_config.json and generation_config.json,
    beside the checkpoints under the names `Tokenizer.from_dir` looks for, so the workdir is
    self-contained."""
    for name, contents in tokenizer.files().items():
        write_file(Path(workdir) / name, contents)


def is_main_process() -> bool:
    return jax.process_index() == 0


def save_config(config: ConfigDict, workdir: str | Path) -> None:
    """Writes the resolved config (after command-line overrides) as `workdir/config.json`."""
    write_file(Path(workdir) / "config.json", config.to_json_best_effort(indent=2) + "\n")


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
    report.print_skipped(path)
    if not prompts:
        raise ValueError(f"{field} = {path!r} has no prompts")
    return prompts


def load_reward_model(path: str, field: str, tokenizer: Tokenizer, mesh: Mesh,
                      overrides: dict[str, Any] | None = None) -> GlmRewardModel:
    """The trained reward model of the RM workdir `path` (config `field`), sharded over
    `mesh`, with its config's `overrides` (`frozen_overrides`: precision and runtime). It must
    have been trained with the policy's `tokenizer` (the same token for every id, and an
    embedding for each), or it would score garbage without any error."""
    if not path:
        raise ValueError(f"{field} is empty: set it to a reward-model workdir "
                         "(scripts/train_rm.py)")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{field} = {path!r} is not a directory: expected a "
                                "reward-model workdir (scripts/train_rm.py)")
    require_kind(path, "reward", field)
    try:
        model_config = load_model_config(path)
        own_tokenizer = Tokenizer.from_dir(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field} = {path!r}: {e} (scripts/train_rm.py writes "
                                "model_config.json and the tokenizer into its workdir; to a "
                                "workdir without its tokenizer, copy the one the reward model "
                                "was trained with)") from e
    table, policy_table = own_tokenizer.token_table(), tokenizer.token_table()
    if table != policy_table:
        i = min(i for i in table.keys() | policy_table.keys()
                if table.get(i) != policy_table.get(i))
        raise ValueError(
            f"{field} = {path!r} was trained with another tokenizer than the policy's: id {i} "
            f"is {_token_words(table.get(i))} in {own_tokenizer.path} and "
            f"{_token_words(policy_table.get(i))} in {tokenizer.path}. It would score the "
            "policy's ids as other tokens, and re-tokenizing between two tokenizers is not "
            "implemented: train the reward model with the policy's tokenizer "
            "(scripts/train_rm.py with the same config.data.tokenizer or model.init_checkpoint)")
    check_vocab(tokenizer, model_config.vocab_size, f"{field} = '{path}'",
                str(tokenizer.path))
    try:
        model = load_trained_model(path, GlmRewardModel, mesh, overrides=overrides)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field} = {path!r}: {e}") from e
    # Frozen from here: a LoRA reward model runs with its adapters folded in.
    return merged_model(model) if model.config.lora_rank else model


def _token_words(entry: tuple[str, bool] | None) -> str:
    """An entry of `Tokenizer.token_table`, in words."""
    if entry is None:
        return "absent"
    return repr(entry[0]) + (" (special)" if entry[1] else "")
