"""Clean a preference JSONL file for reward-model training (paper 3.2-3.3).

    python scripts/prepare_preferences.py --input raw.jsonl --output clean.jsonl \
        [--tokenizer DIR] [--bucket-edges 1,8,16,32,64] [--seed 0] [--no-balance] \
        [--on-error raise|skip]

Steps: drop ties -> drop cyclic preferences -> bucket-based length balancing. Prints the
Table 2 statistics after each step and, per length-difference bucket, how often the longer
response wins before and after balancing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from glm_jax import cli
from glm_jax.data import (
    PreferencePair,
    Tokenizer,
    balance_by_length,
    drop_cycles,
    drop_ties,
    format_table,
    length_bias_by_bucket,
    preference_stats,
    read_jsonl,
    tokenizer_length,
    write_jsonl,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="preference pairs (JSONL)")
    parser.add_argument("--output", type=Path, required=True, help="cleaned pairs (JSONL)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="directory with tokenizer.json or tokenizer.model "
                             "(default: the bundled tiny tokenizer)")
    parser.add_argument("--bucket-edges", default="1,8,16,32,64",
                        help="comma-separated token-length-difference bucket edges")
    parser.add_argument("--seed", type=int, default=0, help="seed of the balancing subsample")
    parser.add_argument("--no-balance", action="store_true", help="skip length balancing")
    parser.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                        help="on a bad input line: stop with its file:line, or skip it")
    cli.add_debug_argument(parser)
    return parser.parse_args(argv)


def _bias_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict]:
    return [{"bucket": b["bucket"], "count_before": b["count"],
             "longer_wins_before": b["longer_wins"], "count_after": a["count"],
             "longer_wins_after": a["longer_wins"]} for b, a in zip(before, after, strict=True)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the cleaning steps, write ``--output``, and return the statistics printed."""
    args = parse_args(argv)
    try:
        edges = [int(x) for x in args.bucket_edges.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--bucket-edges: expected comma-separated integers, "
                         f"got {args.bucket_edges!r}") from None
    token_length = (None if args.tokenizer is None
                    else tokenizer_length(Tokenizer.from_dir(args.tokenizer)))
    pairs, report = read_jsonl(args.input, "preference", on_error=args.on_error)
    print(f"read {report.num_read} pairs from {args.input}"
          + (f", skipped {report.num_skipped} bad line(s) (first: {report.first_skipped_lines}; "
             f"{report.first_error})" if report.num_skipped else ""))

    steps: list[dict[str, Any]] = []

    def record(step: str, current: list[PreferencePair]) -> None:
        steps.append({"step": step, **preference_stats(current, token_length)})

    record("input", pairs)
    pairs = drop_ties(pairs)
    record("drop_ties", pairs)
    pairs = drop_cycles(pairs)
    record("drop_cycles", pairs)
    bias_before = length_bias_by_bucket(pairs, edges, token_length)
    if not args.no_balance:
        pairs = balance_by_length(pairs, edges, args.seed, token_length=token_length)
        record("balance_by_length", pairs)
    bias_after = length_bias_by_bucket(pairs, edges, token_length)

    print("\nTable 2 statistics after each step\n" + format_table(steps))
    print("\nLength bias: fraction of pairs where the longer response is chosen, per bucket of "
          "|len(chosen) - len(rejected)| tokens\n"
          + format_table(_bias_table(bias_before, bias_after)))
    write_jsonl(args.output, pairs)
    print(f"\nwrote {len(pairs)} pairs to {args.output}")
    return {
        "read": {"num_read": report.num_read, "num_skipped": report.num_skipped,
                 "first_skipped_lines": report.first_skipped_lines,
                 "first_error": report.first_error},
        "steps": steps,
        "length_bias": {"before": bias_before, "after": bias_after},
        "num_written": len(pairs),
    }


if __name__ == "__main__":
    cli.run(main, absl=False)
