"""Preference-data cleaning (paper 3.2-3.3): ties, cyclic preferences, length balancing, stats.

Pure Python/numpy and order-preserving, so each step can be run and inspected in a notebook.
Lengths are in tokens; ``token_length`` defaults to the bundled tiny tokenizer.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from glm_jax.data.records import PreferencePair
from glm_jax.data.tokenizer import Tokenizer

TokenLength = Callable[[str], int]

_default_tokenizer: Tokenizer | None = None


def default_token_length(text: str) -> int:
    """Token count of ``text`` under the bundled tiny tokenizer (loaded once, on first use)."""
    global _default_tokenizer
    if _default_tokenizer is None:
        _default_tokenizer = Tokenizer.tiny()
    return len(_default_tokenizer.encode(text))


def tokenizer_length(tokenizer: Tokenizer) -> TokenLength:
    """Token count of a text under `tokenizer`, each distinct text tokenized once: one
    function to share across all the cleaning steps of a run."""
    return _memoized(lambda text: len(tokenizer.encode(text)))


def _memoized(token_length: TokenLength | None) -> TokenLength:
    # Responses recur across pairs of one prompt; tokenize each text once per call.
    fn = token_length or default_token_length
    cache: dict[str, int] = {}

    def length(text: str) -> int:
        if text not in cache:
            cache[text] = fn(text)
        return cache[text]

    return length


def drop_ties(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Drop pairs marked ``tie`` and pairs whose chosen and rejected texts are identical."""
    return [p for p in pairs if not p.tie and p.chosen != p.rejected]


def _strongly_connected_components(num_nodes: int, edges: list[list[int]]) -> list[int]:
    """Component id per node (iterative Tarjan, so deep graphs hit no recursion limit)."""
    index = [-1] * num_nodes
    low = [0] * num_nodes
    on_stack = [False] * num_nodes
    component = [-1] * num_nodes
    stack: list[int] = []
    counter = 0
    num_components = 0
    for root in range(num_nodes):
        if index[root] != -1:
            continue
        work = [(root, 0)]  # (node, position in its edge list)
        while work:
            node, pos = work[-1]
            if pos == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack[node] = True
            if pos < len(edges[node]):
                work[-1] = (node, pos + 1)
                succ = edges[node][pos]
                if index[succ] == -1:
                    work.append((succ, 0))
                elif on_stack[succ]:
                    low[node] = min(low[node], index[succ])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack[member] = False
                    component[member] = num_components
                    if member == node:
                        break
                num_components += 1
    return component


def drop_cycles(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Drop every pair whose preference lies on a cycle among responses to the same dialogue.

    Pairs are grouped by (prompt, history); within a group each pair is an edge
    chosen -> rejected between response texts. An edge is on a cycle exactly when both ends are
    in the same strongly connected component, so A>B with B>A, or A>B, B>C, C>A, are all
    removed, while the group's acyclic pairs survive. Survivors keep their input order.
    """
    groups: dict[tuple[str, Any], list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[(p.prompt, p.history)].append(i)
    on_cycle = [False] * len(pairs)
    for members in groups.values():
        node_of: dict[str, int] = {}
        for i in members:
            for text in (pairs[i].chosen, pairs[i].rejected):
                node_of.setdefault(text, len(node_of))
        edges: list[list[int]] = [[] for _ in node_of]
        for i in members:
            edges[node_of[pairs[i].chosen]].append(node_of[pairs[i].rejected])
        component = _strongly_connected_components(len(node_of), edges)
        for i in members:
            on_cycle[i] = (component[node_of[pairs[i].chosen]]
                           == component[node_of[pairs[i].rejected]])
    return [p for p, bad in zip(pairs, on_cycle, strict=True) if not bad]


def _check_edges(bucket_edges: Sequence[int]) -> list[int]:
    edges = [int(e) for e in bucket_edges]
    if not edges:
        raise ValueError("bucket_edges must not be empty")
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"bucket_edges must be non-negative and strictly increasing, "
                         f"got {list(bucket_edges)}")
    return edges


def _bucket(d: int, edges: list[int]) -> int:
    """Bucket of a length difference d > 0: i for edges[i] <= d < edges[i+1], -1 below edges[0]."""
    return bisect.bisect_right(edges, d) - 1


def _bucket_label(b: int, edges: list[int]) -> str:
    low = 1 if b == -1 else edges[b]
    high = edges[b + 1] if b + 1 < len(edges) else "inf"
    return f"[{low}, {high})"


def balance_by_length(
    pairs: Sequence[PreferencePair],
    bucket_edges: Sequence[int],
    seed: int,
    *,
    token_length: TokenLength | None = None,
) -> list[PreferencePair]:
    """Bucket-based length balancing (paper 3.3).

    Each pair with d = |len(chosen) - len(rejected)| > 0 (in tokens) goes to the bucket with
    ``edges[i] <= d < edges[i+1]`` (the last bucket is open-ended, d < edges[0] forms an extra
    first bucket). In each bucket the larger of the "longer chosen" / "shorter chosen" groups is
    subsampled, by a permutation from ``numpy.random.default_rng([seed, bucket])``, to the size of
    the smaller one. Pairs with d == 0 carry no length signal and are all kept. Survivors keep
    their input order; the same pairs and seed always give the same result.
    """
    edges = _check_edges(bucket_edges)
    length = _memoized(token_length)
    keep = [True] * len(pairs)
    # bucket -> (indices where the longer response was chosen, where the shorter one was)
    groups: dict[int, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, p in enumerate(pairs):
        diff = length(p.chosen) - length(p.rejected)
        if diff != 0:
            groups[_bucket(abs(diff), edges)][0 if diff > 0 else 1].append(i)
    for b, (longer, shorter) in sorted(groups.items()):
        larger, smaller = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
        # Seeding per bucket makes one bucket's subsample independent of the others' contents.
        rng = np.random.default_rng([seed, b + 1])
        for position in rng.permutation(len(larger))[len(smaller):]:
            keep[larger[position]] = False
    return [p for p, k in zip(pairs, keep, strict=True) if k]


def preference_stats(
    pairs: Sequence[PreferencePair], token_length: TokenLength | None = None
) -> dict[str, float]:
    """The paper's Table 2 columns.

    ``avg_turns`` counts the history turns plus the final one; ``avg_history_tokens`` sums the
    tokens of every user and assistant text in the history (no template tokens);
    ``avg_response_tokens`` averages over chosen and rejected. Averages are NaN for no pairs.
    """
    length = _memoized(token_length)
    n = len(pairs)

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else math.nan

    return {
        "num_comparisons": n,
        "avg_turns": mean([len(p.history) + 1 for p in pairs]),
        "avg_history_tokens": mean(
            [sum(length(u) + length(a) for u, a in p.history) for p in pairs]),
        "avg_prompt_tokens": mean([length(p.prompt) for p in pairs]),
        "avg_response_tokens": mean(
            [length(p.chosen) for p in pairs] + [length(p.rejected) for p in pairs]),
    }


def length_bias_by_bucket(
    pairs: Sequence[PreferencePair],
    bucket_edges: Sequence[int],
    token_length: TokenLength | None = None,
) -> list[dict[str, Any]]:
    """Per length-difference bucket (as in ``balance_by_length``): how often the longer wins.

    Returns one row per bucket, ``{"bucket": "[8, 16)", "count": n, "longer_wins": f}`` with
    ``longer_wins`` None for an empty bucket. Pairs with equal lengths are in no bucket. The
    extra bucket below ``edges[0]`` is listed only when it can hold pairs (``edges[0] > 1``).
    """
    edges = _check_edges(bucket_edges)
    length = _memoized(token_length)
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # bucket -> [count, longer wins]
    for p in pairs:
        diff = length(p.chosen) - length(p.rejected)
        if diff != 0:
            entry = counts[_bucket(abs(diff), edges)]
            entry[0] += 1
            entry[1] += diff > 0
    buckets = ([-1] if edges[0] > 1 else []) + list(range(len(edges)))
    rows = []
    for b in buckets:
        count, wins = counts.get(b, (0, 0))
        rows.append({"bucket": _bucket_label(b, edges), "count": count,
                     "longer_wins": wins / count if count else None})
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as an aligned plain-text table (columns in first-seen key order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if not columns:
        return ""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), int | float) or row.get(c) is None for row in rows)
               for c in columns]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)
