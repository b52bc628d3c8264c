"""Test setup: 8 forced CPU devices (set before jax is imported) and tiny reference checkpoints."""

import os
import tempfile

# Single-threaded Eigen inside each op: the full suite hung here in 6 of 9 runs, always in
# the same late test (which passes alone), with all 8 threads of XLA:CPU's intra-op pool
# blocked in collectives (gdb: 7 in an all-reduce, 1 in an all-gather) and one device's part
# never running. With multi-threaded Eigen a device's op waits on sub-tasks queued to that
# pool, which can then starve (the same wedge, and the same fix, as PyAutoFit#1528). The 8
# devices still run in parallel. Should a collective still hang, XLA aborts after 10 minutes
# instead of 40 s, with a warning after one.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_multi_thread_eigen=false"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=60"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from glm_jax.config import default_config  # noqa: E402
from glm_jax.data import PreferencePair, SFTExample, write_jsonl  # noqa: E402
from glm_jax.sharding import make_mesh  # noqa: E402
from glm_jax.train.state import TrainState  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (the same tiny model and shapes) inside fresh jitted
# closures; a compilation cache shared by the session (and by the subprocesses the tests
# start, through the environment) compiles each program once.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "glm_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, pad_token_id=0, eos_token_id=[1])


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(spec: str):
    """A config file of configs/ as the scripts load it (`--config configs/x.py[:preset]`)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values)
    values(["prog", "--config", os.path.join(CONFIGS, spec)])
    return values.config


def make_hf_model(model_type: str = "glm", seed: int = 0, **overrides):
    """A tiny random transformers GlmForCausalLM / Glm4ForCausalLM, in eval mode.

    Weights are drawn with a larger std than transformers' init so that logits differ
    clearly between tokens and greedy decoding is not decided by float noise.
    """
    import torch
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    config_cls, model_cls = ((GlmConfig, GlmForCausalLM) if model_type == "glm"
                             else (Glm4Config, Glm4ForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.25)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (model_type, **config overrides) -> (torch model, checkpoint dir), cached."""
    made = {}

    def make(model_type: str = "glm", **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in made:
            model = make_hf_model(model_type, **overrides)
            path = tmp_path_factory.mktemp(f"hf_{model_type}")
            model.save_pretrained(path)
            made[key] = (model, path)
        return made[key]

    return make


def hf_logits(model, input_ids, attention_mask=None):
    import torch

    with torch.no_grad():
        ids = torch.tensor(np.asarray(input_ids))
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(ids, attention_mask=mask).logits.numpy()


# --- data, configs and toy programs shared by the training tests ---------------------------

GOOD = ["great", "correct", "helpful", "clear", "kind", "right"]
BAD = ["wrong", "rude", "vague", "broken", "false", "lazy"]
TAUGHT = [SFTExample(prompt=f"name {i}", response=word)
          for i, word in enumerate(["apple", "river", "stone", "cloud", "maple", "tiger",
                                    "ocean", "lemon"])]
LIMITS = dict(max_prompt_tokens=16, max_response_tokens=24)  # DPO's prompt / response tokens


def separable_pairs(n, seed):
    """The chosen response uses 'good' words, the rejected one 'bad' words, lengths alike."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        length = rng.randint(2, 6)
        pairs.append(PreferencePair(
            prompt=f"question {rng.randint(0, 99)}",
            chosen=" ".join(rng.choice(GOOD) for _ in range(length)),
            rejected=" ".join(rng.choice(BAD) for _ in range(length + rng.randint(-1, 1))),
            task=["alpha", "beta"][i % 2]))
    return pairs


def tiny_sft_config(tmp_path, **sft):
    """The schema's defaults (not the pipeline's tuned configs/tiny.py), SFT on TAUGHT."""
    config = default_config()
    write_jsonl(tmp_path / "sft.jsonl", TAUGHT)
    config.sft.train_file = config.sft.eval_file = str(tmp_path / "sft.jsonl")
    config.data.max_prompt_tokens, config.data.max_response_tokens = 16, 8
    config.sft.update(batch_size=8, **sft)
    return config


def tiny_rm_config(tmp_path, **rm):
    """The schema's defaults, a reward model on separable pairs."""
    config = default_config()
    write_jsonl(tmp_path / "train.jsonl", separable_pairs(256, seed=0))
    write_jsonl(tmp_path / "test.jsonl", separable_pairs(64, seed=1))
    config.rm.train_file = str(tmp_path / "train.jsonl")
    config.rm.eval_file = str(tmp_path / "test.jsonl")
    config.data.max_prompt_tokens = 16
    config.data.max_response_tokens = 24
    config.rm.update(rm)
    return config


def dpo_config(tmp_path, **dpo):
    config = tiny_sft_config(tmp_path)
    write_jsonl(tmp_path / "pairs.jsonl", separable_pairs(128, seed=0))
    write_jsonl(tmp_path / "test.jsonl", separable_pairs(32, seed=1))
    config.dpo.train_file = str(tmp_path / "pairs.jsonl")
    config.dpo.eval_file = str(tmp_path / "test.jsonl")
    config.data.max_prompt_tokens = LIMITS["max_prompt_tokens"]
    config.data.max_response_tokens = LIMITS["max_response_tokens"]
    config.dpo.update({"batch_size": 16, **dpo})
    return config


def ppo_config(**ppo):
    config = tiny_sft_config(Path(tempfile.mkdtemp()))
    config.ppo.update({"batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, **ppo})
    return config


RL_PROMPT_TOKENS, RL_RESPONSE_TOKENS = 16, 8


def rl_prompts(n, seed=0):
    """`n` short left-padded prompts `[n, RL_PROMPT_TOKENS]` (ids, mask)."""
    from glm_jax.data import GLM4_TEMPLATE, PromptExample, Tokenizer
    from glm_jax.train.rollout import encode_prompts

    rng = np.random.RandomState(seed)
    examples = [PromptExample(f"item {rng.randint(100)} {rng.randint(100)}") for _ in range(n)]
    return encode_prompts(examples, Tokenizer.tiny(), GLM4_TEMPLATE, RL_PROMPT_TOKENS)


class TokenCountReward(nnx.Module):
    """A toy reward model: how many response tokens (the tokens after the first
    `prompt_length`, inside the mask) have ids in [low, high)."""

    def __init__(self, low: int, high: int, prompt_length: int):
        self.low, self.high, self.prompt_length = low, high, prompt_length
        self.scale = nnx.Param(jnp.ones(()))

    def __call__(self, ids, mask):
        hits = (ids >= self.low) & (ids < self.high) & mask
        return self.scale[...] * jnp.sum(hits[:, self.prompt_length:], axis=1,
                                         dtype=jnp.float32)


def build_rl(mesh, config, reward_model=None, learning_rate=1e-3, roles=None):
    """(program, state, frozen) of config.ppo's algorithm over fresh tiny roles on `mesh`
    (or `roles`); `reward_model` (an nnx module) replaces the random reward model."""
    import dataclasses

    from glm_jax.data import Tokenizer
    from glm_jax.models.tiny import tiny_config
    from glm_jax.train.rl import RLSettings, make_rl, required_roles
    from glm_jax.train.roles import Role, random_roles
    from glm_jax.train.rollout import SamplingSettings
    from glm_jax.train.state import make_optimizer

    settings = RLSettings.from_config(config)
    if roles is None:
        roles = random_roles(tiny_config(), mesh, reward=reward_model is None,
                             **required_roles(settings))
    if reward_model is not None:
        roles = dataclasses.replace(roles, reward=Role.of(reward_model))
    tokenizer = Tokenizer.tiny()
    sampling = SamplingSettings(max_new_tokens=RL_RESPONSE_TOKENS,
                                eos_token_ids=tuple(tokenizer.eos_token_ids),
                                pad_token_id=tokenizer.pad_token_id)
    optimizers = {name: make_optimizer(learning_rate=learning_rate, num_steps=1000)
                  for name in ("policy", "critic")}
    with jax.set_mesh(mesh):
        return make_rl(settings, roles, sampling, optimizers)


def run_rl_iterations(mesh, config, num, reward_model=None, fused=True, **kwargs):
    """`num` iterations on one batch of prompts: (metrics per iteration, the parameters before
    as (policy, critic, reference, reward), the same after, final state)."""
    from glm_jax.sharding import batch_sharding, to_device
    from glm_jax.train.state import shardings_of

    program, state, frozen = build_rl(mesh, config, reward_model, **kwargs)

    def parameters(state):
        return jax.device_get((state.params, state.critic_params, frozen.get("reference"),
                               frozen.get("reward")))

    before = parameters(state)
    ids, mask = rl_prompts(config.ppo.batch_size)
    batch = {"prompt_ids": ids, "prompt_mask": mask,
             "ref_reward": np.linspace(-1, 1, len(ids)).astype(np.float32)}
    shardings = batch_sharding(mesh, batch)
    make = program.jit_iteration if fused else program.step_by_step
    iteration = make(shardings_of(state), shardings)
    history = []
    with jax.set_mesh(mesh):
        for _ in range(num):
            state, metrics = iteration(state, frozen, to_device(batch, shardings))
            history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return history, before, parameters(state), state


def single_device():
    return make_mesh((1, 1, 1), jax.devices()[:1])


def loss_fn(params, batch):
    """A toy training loss for the loop's tests: one parameter vector, batches of `x`."""
    return jnp.mean((params["w"] * batch["x"] - 1.0) ** 2), {}


def initial_state(tx):
    params = {"w": jnp.full((4,), 0.5, jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


class Batches:
    """x = 1 for the first `good` steps, then NaN; resumable by position."""

    def __init__(self, good):
        self.good, self.position = good, 0

    def __iter__(self):
        return self

    def __next__(self):
        value = 1.0 if self.position < self.good else np.nan
        self.position += 1
        return {"x": np.full((2, 4), value, np.float32)}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def recorded_losses(workdir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of workdir/metrics.jsonl with a loss."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def straight_and_resumed(train, config, section: str, workdir: Path, steps: int = 4) -> Path:
    """Runs `steps` steps in workdir/straight, and steps/2 then (resuming) steps in
    workdir/resumed; asserts bit-identical per-step losses. Returns a copy of the run as it
    was at the half-way checkpoint (workdir/half)."""
    config[section].update(num_steps=steps, checkpoint_every=steps // 2)
    train(config, workdir / "straight")
    config[section].num_steps = steps // 2
    train(config, workdir / "resumed")
    shutil.copytree(workdir / "resumed", workdir / "half")
    config[section].num_steps = steps
    train(config, workdir / "resumed")
    straight = recorded_losses(workdir / "straight")
    assert [s for s, _ in straight] == list(range(1, steps + 1))
    assert recorded_losses(workdir / "resumed") == straight  # exact float equality
    return workdir / "half"


# THUDM/chatglm3-6b's tokenizer_config.json chat_template, verbatim.
CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>"
    "\n {{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n "
    "{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")

# THUDM/glm-4-9b-chat's, without its tool-calling branch (no tools in these records).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>"
    "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def sentencepiece_model(sentences: list[str], vocab_size: int, **options) -> bytes:
    """A BPE sentencepiece model trained on `sentences` in memory, with normalization off (text
    kept exactly as given); `options` go to the trainer (byte_fallback, user_defined_symbols)."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2, **options)
    return buf.getvalue()
