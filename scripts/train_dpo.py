r"""DPO (paper eq. 7); exports WORKDIR/hf. Three modes (config.dpo.mode):

    # offline: annotated preference pairs
    python scripts/train_dpo.py --config configs/tiny.py --workdir runs/dpo \
        --config.dpo.train_file=pairs.jsonl --config.model.init_checkpoint=runs/sft/hf

    # reward_pairs: pairs built once by the reward model from the SFT model's samples
    python scripts/train_dpo.py --config configs/tiny.py --workdir runs/dpo_rm \
        --config.dpo.mode=reward_pairs --config.dpo.prompt_file=prompts.jsonl \
        --config.dpo.reward_model=runs/rm --config.model.init_checkpoint=runs/sft/hf

    # online: pairs built at every step from the current policy's samples
    python scripts/train_dpo.py --config configs/tiny.py --workdir runs/dpo_online \
        --config.dpo.mode=online --config.dpo.prompt_file=prompts.jsonl \
        --config.dpo.reward_model=runs/rm --config.model.init_checkpoint=runs/sft/hf
"""

from absl import flags, logging

from glm_jax import cli
from glm_jax.train.dpo import train_dpo

cli.define_flags()
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics", required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_dpo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
