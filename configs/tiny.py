"""The embedded tiny default: a 2-layer GLM-4-shaped model on CPU, every stage's settings.

Use with any script: `--config configs/tiny.py`, overriding fields on the command line, e.g.
`--config.rm.num_steps=50 --config.mesh.fsdp=8`.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    # Every training section: a NaN/Inf loss or gradient skips that update (counted in the
    # metric skipped_nonfinite); more than max_nonfinite_steps in a row stop the run.
    config.seed = 0
    # Mesh axis sizes; one may be -1 (the remaining devices).
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # init_checkpoint: a Hugging Face / ChatGLM directory; empty means a fresh random tiny model
    # whose fields `tiny` may override (glm_jax.models.tiny.tiny_config).
    config.model = ConfigDict(dict(init_checkpoint="", dtype="float32", param_dtype="float32",
                                   tiny=ConfigDict()))
    # tokenizer: a directory with tokenizer.json / tokenizer.model; empty means the init
    # checkpoint's, or the bundled tiny tokenizer.
    config.data = ConfigDict(dict(tokenizer="", template="glm4", max_prompt_tokens=64,
                                  max_response_tokens=64, truncation="truncate",
                                  on_error="raise"))
    # Supervised fine-tuning: loss on response tokens only; the result is exported to
    # WORKDIR/hf for the later stages' model.init_checkpoint.
    config.sft = ConfigDict(dict(
        train_file="", eval_file="", packing=False, batch_size=16, num_steps=200,
        learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
        max_grad_norm=1.0, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
        log_every=10, max_nonfinite_steps=10))
    # Reward model (paper eq. 1-2): l2_coef is the lambda of eq. 2.
    config.rm = ConfigDict(dict(
        train_file="", eval_file="", batch_size=16, num_steps=200, learning_rate=1e-3,
        warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, l2_coef=0.0,
        eval_every=100, checkpoint_every=100, keep_checkpoints=2, log_every=10,
        max_nonfinite_steps=10))
    # DPO (paper eq. 7); the reference is the initial model. mode: "offline" trains on the
    # annotated pairs of train_file; "reward_pairs" first samples num_samples responses to each
    # prompt of prompt_file with the initial policy, scores them with reward_model (an RM
    # workdir) and pairs each prompt's best and worst when their reward gap exceeds
    # pair_margin (written to WORKDIR/reward_pairs.jsonl), then trains offline on those;
    # "online" does the same with the current policy at every step (batch_size prompts).
    # eval_file (annotated pairs) gives implicit-reward accuracy in every mode; sft_coef
    # weighs an optional next-token loss on the chosen responses.
    config.dpo = ConfigDict(dict(
        mode="offline", train_file="", eval_file="", prompt_file="", reward_model="",
        num_samples=4, pair_margin=0.5,
        # Sampling of the reward-built pairs' responses.
        temperature=1.0, top_k=0, top_p=1.0,
        beta=0.1, sft_coef=0.0, batch_size=16, num_steps=200,
        learning_rate=1e-4, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
        max_grad_norm=1.0, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
        log_every=10, max_nonfinite_steps=10))
    # Rejection-sampling fine-tuning (best-of-N, the paper's comparison point): sample
    # num_samples responses (temperature, top_k, top_p; batch_size rows per compiled call) to
    # each prompt of prompt_file from the policy (model.init_checkpoint), score them with
    # reward_model (an RM workdir), keep each prompt's best, then run SFT with config.sft's
    # optimiser and steps on the winners. min_reward: "" keeps every best, a number drops the
    # prompts whose best reward is below it. require_eos: responses cut off at
    # data.max_response_tokens without EOS never win.
    config.rsft = ConfigDict(dict(
        prompt_file="", reward_model="", num_samples=4, temperature=1.0, top_k=0, top_p=1.0,
        min_reward="", require_eos=True, batch_size=16))
    # PPO (paper eq. 3-6). Four models: the policy (model.init_checkpoint, trained), the frozen
    # reference (the same initial weights), the frozen reward model (reward_model: an RM
    # workdir) and the critic (initialised from the reward model or the policy, trained).
    # Each iteration samples batch_size prompts' responses, scores them, and runs ppo_epochs
    # passes of minibatch updates, all in one compiled program.
    config.ppo = ConfigDict(dict(
        prompt_file="", reward_model="", critic_init="reward",
        # num_steps counts iterations; fused=False runs rollout, scoring and updates as
        # separate programs with host transfers in between (for debugging).
        num_steps=50, fused=True, batch_size=16, minibatch_size=8, ppo_epochs=2,
        # Sampling of the rollouts.
        temperature=1.0, top_k=0, top_p=1.0,
        # Optimisers (AdamW, warmup + cosine over all minibatch updates).
        learning_rate=1e-4, critic_learning_rate=1e-4, warmup_steps=0, end_lr_ratio=1.0,
        weight_decay=0.0, max_grad_norm=1.0,
        # Losses: clipped surrogate, clipped value loss, GAE.
        clip_ratio=0.2, clip_value=0.2, value_coef=1.0, gamma=1.0, lam=0.95,
        # KL penalty against the reference policy (eq. 4): kl_target > 0 makes the
        # coefficient adaptive (Ziegler et al.), moving towards kl_target over kl_horizon.
        kl_coef=0.05, kl_kind="k1", kl_target=0.0, kl_horizon=10000,
        # Eq. 5: subtract the reward of the reference policy's response to the same prompt,
        # generated once (greedy, or sampled with the settings above) and cached in
        # reference_cache (empty: WORKDIR/reference_responses.jsonl).
        reference_reward=True, reference_greedy=True, reference_cache="",
        whiten_rewards=False, whiten_advantages=True,
        # Eq. 6: next-token loss on sft_file (an SFT JSONL) weighted by sft_coef.
        sft_file="", sft_coef=0.0, sft_batch_size=8,
        # Responses that reach the length limit without EOS get no_eos_penalty subtracted.
        no_eos_penalty=0.0,
        # Prompt filter (paper 3.4): sample filter_samples responses per prompt and drop the
        # prompt when their reward variance is below filter_min_variance (0 samples: off).
        filter_samples=0, filter_min_variance=1e-3,
        checkpoint_every=10, keep_checkpoints=2, log_every=1,
        max_nonfinite_steps=10))
    return config
