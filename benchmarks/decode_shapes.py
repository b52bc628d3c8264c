"""The model, decoding shape and sampling flags benchmarks/generate.py and decode_profile.py
share (a module of its own: scripts/generate.py takes the name `generate` when both are
importable)."""

from __future__ import annotations

import argparse


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--hidden, --layers, --heads, --kv-heads, --vocab, --batch, --prompt-length,
    --new-tokens and --temperature, with the benchmarks' defaults (greedy)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy; above 0: sampled from the whole vocabulary")
