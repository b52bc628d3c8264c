"""Build the tiny byte-level BPE tokenizer bundled as ``glm_jax/assets/tiny_tokenizer.json``.

The tokenizer exists so tests and toy runs need no downloaded weights: its base vocabulary is
the 256 byte-level symbols, so it can encode any text, plus a few merges learned from the fixed
corpus below and the GLM special tokens at fixed low ids. Training is deterministic, and
``tests/test_tokenizer.py`` checks that re-running this script reproduces the committed file
byte for byte.

Usage::

    python scripts/make_tiny_tokenizer.py [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from glm_jax import cli

# Order fixes the ids (0..7); glm_jax code and tests rely on these exact values.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)

# 8 special + 256 byte symbols + at most 184 merges; a tiny model uses an embedding of 512.
TARGET_VOCAB_SIZE = 448
MAX_VOCAB_SIZE = 512

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "glm_jax" / "assets" / "tiny_tokenizer.json"

# Short chat-flavoured English so the learned merges are the common words of the toy tasks.
CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short poem about the sea and the sky.",
    "The assistant answers the question of the user in a helpful way.",
    "A good answer is honest, helpful and harmless.",
    "The reward model gives a higher score to the better response.",
    "We train the policy with proximal policy optimization.",
    "Direct preference optimization compares a chosen and a rejected response.",
    "The model generates one token at a time until it reaches the end of text.",
    "Can you explain how a transformer language model works?",
    "Attention lets every token look at the tokens that came before it.",
    "There are seven days in a week and twelve months in a year.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "1 + 1 = 2, 2 + 2 = 4, 3 * 3 = 9, 10 - 4 = 6.",
    "The numbers 0 1 2 3 4 5 6 7 8 9 are the ten digits.",
    "I think that this is the right answer, but I am not sure.",
    "Thank you for your question. Here is what I know about it.",
    "The sun rises in the east and sets in the west.",
    "Water is made of hydrogen and oxygen.",
    "She reads a book in the garden every morning.",
    "They went to the market to buy some fruit and bread.",
    "It is important to be kind to other people.",
    "The weather is nice today, so let us go for a walk.",
    "Learning a new language takes time and practice.",
    "The cat is sleeping on the chair near the window.",
    "Do you want to play a game with me this evening?",
    "This is a simple example of a chat between a user and an assistant.",
    "The teacher asked the students to read the next chapter.",
    "Computers store information as bits and bytes.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "The answer is yes. The answer is no. The answer is maybe.",
    "Sorry, I cannot help with that request.",
    "Summarize the following text in one sentence.",
    "Translate the sentence into French, please.",
    "The story ends when the hero comes back home.",
    "Good morning! Good evening! Good night!",
)


def build_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE tokenizer on ``CORPUS`` and return it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor: encode() must never insert special tokens on its own.
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(CORPUS), trainer=trainer)

    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual_id = tokenizer.token_to_id(token)
        if actual_id != expected_id:
            raise RuntimeError(f"special token {token!r} got id {actual_id}, want {expected_id}")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > MAX_VOCAB_SIZE:
        raise RuntimeError(f"vocab size {size} exceeds {MAX_VOCAB_SIZE}")
    return tokenizer


def write_tiny_tokenizer(out: str | Path = DEFAULT_OUT) -> int:
    """Write the tiny tokenizer JSON to ``out`` and return its vocab size."""
    tokenizer = build_tokenizer()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write bytes ourselves (not Tokenizer.save) so the file's exact bytes are under our control.
    out.write_bytes((tokenizer.to_str(pretty=True) + "\n").encode("utf-8"))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output tokenizer.json")
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    size = write_tiny_tokenizer(args.out)
    print(f"wrote {args.out} (vocab size {size})")


if __name__ == "__main__":
    cli.run(main, absl=False)
