"""Generate chat responses from a GLM checkpoint directory.

    python scripts/generate.py --checkpoint DIR --prompt "What is 2+2?" [--prompt ...]
    python scripts/generate.py --demo        # a tiny random model with the bundled tokenizer
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import glm_jax
from glm_jax import cli
from glm_jax.data import Tokenizer
from glm_jax.data.chat_template import TEMPLATE_NAMES, template_for
from glm_jax.generation import generate_text
from glm_jax.models.convert import read_config
from glm_jax.models.tiny import write_tiny_checkpoint
from glm_jax.train.common import check_vocab


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint directory")
    source.add_argument("--demo", action="store_true",
                        help="write a tiny random checkpoint (to --workdir) and generate from it")
    parser.add_argument("--workdir", type=Path, help="where --demo writes its checkpoint")
    parser.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    parser.add_argument("--template", choices=TEMPLATE_NAMES, default="auto",
                        help="auto: the checkpoint's own chat_template (tokenizer_config.json) "
                             "when it ships one, else glm4")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--mesh", default=None,
                        help="data,fsdp,tensor sizes, e.g. 1,-1,1 (default: no mesh)")
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    checkpoint = args.checkpoint
    if args.demo:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="glm_jax_demo_"))
        checkpoint = write_tiny_checkpoint(workdir / "tiny_checkpoint", seed=args.seed)
        print(f"wrote a tiny random GLM-4 checkpoint to {checkpoint} (its text is noise: it is "
              "untrained)")
    prompts = args.prompt or ["Who are you?", "Sort these numbers: 3 1 2"]
    mesh = None
    if args.mesh:
        mesh = glm_jax.make_mesh(glm_jax.MeshConfig(*(int(x) for x in args.mesh.split(","))))
    vocab_size = read_config(checkpoint).vocab_size  # config.json alone, before any weights
    tokenizer = Tokenizer.from_dir(checkpoint)
    check_vocab(tokenizer, vocab_size, str(checkpoint / "config.json"), str(tokenizer.path))
    model = glm_jax.from_pretrained(checkpoint, dtype=args.dtype, mesh=mesh)
    kwargs = dict(template=template_for(args.template, tokenizer),
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, rng=args.seed)
    for attempt in ("compile + run", "run"):  # the second call reuses the compiled program
        start = time.perf_counter()
        texts = generate_text(model, tokenizer, prompts, **kwargs)
        seconds = time.perf_counter() - start
        print(f"[{attempt}] {len(prompts)} prompts x {args.max_new_tokens} tokens: "
              f"{seconds:.2f} s")
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"\n>>> {prompt}\n{text}")
    return texts


if __name__ == "__main__":
    cli.run(main, absl=False)
