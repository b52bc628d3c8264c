"""The embedded tiny default: a 2-layer GLM-4-shaped model on CPU, every stage's settings.

Use with any script: `--config configs/tiny.py`, overriding fields on the command line, e.g.
`--config.rm.num_steps=50 --config.mesh.fsdp=8`.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
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
        train_file="", eval_file="", batch_size=16, num_steps=200, learning_rate=1e-3,
        warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
        eval_every=100, checkpoint_every=100, keep_checkpoints=2, log_every=10))
    # Reward model (paper eq. 1-2): l2_coef is the lambda of eq. 2.
    config.rm = ConfigDict(dict(
        train_file="", eval_file="", batch_size=16, num_steps=200, learning_rate=1e-3,
        warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0, l2_coef=0.0,
        eval_every=100, checkpoint_every=100, keep_checkpoints=2, log_every=10))
    # Offline DPO (paper eq. 7) on annotated pairs; the reference is the initial model.
    # sft_coef weighs an optional next-token loss on the chosen responses.
    config.dpo = ConfigDict(dict(
        train_file="", eval_file="", beta=0.1, sft_coef=0.0, batch_size=16, num_steps=200,
        learning_rate=1e-4, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0,
        max_grad_norm=1.0, eval_every=100, checkpoint_every=100, keep_checkpoints=2,
        log_every=10))
    return config
