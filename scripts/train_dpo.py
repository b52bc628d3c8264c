"""Offline DPO (paper eq. 7) on preference pairs; exports WORKDIR/hf.

    python scripts/train_dpo.py --config configs/tiny.py --workdir runs/dpo \
        --config.dpo.train_file=pairs.jsonl --config.model.init_checkpoint=runs/sft/hf
"""

from absl import app, flags, logging
from ml_collections import config_flags

from glm_jax.train.dpo import train_dpo

config_flags.DEFINE_config_file("config", "configs/tiny.py", "glm_jax config file")
flags.DEFINE_string("workdir", None, "directory for checkpoints and metrics", required=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    train_dpo(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
