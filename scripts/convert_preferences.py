"""Convert HH-RLHF, chosen/rejected message-list or OpenAI `messages` data to glm_jax JSONL.

    python scripts/convert_preferences.py --input FILE(.jsonl|.jsonl.gz|.parquet) \
        --format hh|chosen_rejected|messages --kind preference|sft|prompt \
        --output OUT.jsonl [--strict]

`hh` and `chosen_rejected` give preference records; `messages` gives sft records (dialogues
ending with the assistant's turn) or prompt records (ending with the user's). Records that
cannot be converted (a system message after the first message, turns that do not alternate,
identical responses, ...) are skipped and counted by reason; with --strict the first one is
an error (exit 1) and no output is written. The formats: glm_jax/data/converters.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glm_jax import cli
from glm_jax.data import SOURCE_FORMATS, ConversionReport, DataError, convert_file, write_jsonl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True,
                        help="source records: JSONL (.jsonl, .jsonl.gz) or .parquet")
    parser.add_argument("--format", choices=SOURCE_FORMATS, required=True,
                        help="source format of --input")
    parser.add_argument("--kind", choices=["preference", "sft", "prompt"], default="preference",
                        help="glm_jax record kind to write (default: preference)")
    parser.add_argument("--output", type=Path, required=True, help="glm_jax records (JSONL)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first record that cannot be converted, instead of "
                             "skipping it")
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> ConversionReport:
    """Convert ``--input``, write ``--output`` and print the report; returns the report."""
    args = parse_args(argv)
    try:
        records, report = convert_file(args.input, args.format, args.kind, strict=args.strict)
    except ModuleNotFoundError as e:
        if e.name != "pyarrow":
            raise
        sys.exit(f"error: {e}")
    print(report.format())
    if not records:
        raise DataError(f"{args.input}: no record converted, {args.output} not written: is "
                        f"--format {args.format} the format of the file?")
    write_jsonl(args.output, records)
    print(f"wrote {len(records)} {args.kind} records to {args.output}")
    return report


if __name__ == "__main__":
    cli.run(main, absl=False)
