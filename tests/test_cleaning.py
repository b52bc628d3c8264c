"""Preference cleaning: ties, cycles, bucket-based length balancing, Table 2 statistics."""

import math
import random

import pytest

from glm_jax.data import (
    PreferencePair,
    Tokenizer,
    balance_by_length,
    drop_cycles,
    drop_ties,
    format_table,
    length_bias_by_bucket,
    preference_stats,
)
from glm_jax.data.cleaning import default_token_length


def words(text: str) -> int:
    """A transparent token count for hand-computed expectations."""
    return len(text.split())


def edges_of(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


def pp(chosen, rejected, prompt="q", **kwargs):
    return PreferencePair(prompt, chosen, rejected, **kwargs)


def test_drop_ties_drops_flagged_and_identical_pairs_in_order():
    pairs = [pp("a", "b"), pp("c", "d", tie=True), pp("e", "e"), pp("f", "g"),
             pp("h", "i", tie=True)]
    assert edges_of(drop_ties(pairs)) == [("a", "b"), ("f", "g")]


def test_three_cycle_removed_acyclic_pair_kept():
    pairs = [pp("A", "B"), pp("A", "D"), pp("B", "C"), pp("C", "A"), pp("D", "E")]
    assert edges_of(drop_cycles(pairs)) == [("A", "D"), ("D", "E")]


def test_two_cycle_removed():
    pairs = [pp("A", "B"), pp("A", "C"), pp("B", "A")]
    assert edges_of(drop_cycles(pairs)) == [("A", "C")]


def test_two_separate_cycles_and_the_edge_between_them():
    pairs = [pp("A", "B"), pp("B", "A"), pp("B", "C"), pp("C", "D"), pp("D", "E"),
             pp("E", "C"), pp("E", "F")]
    # B>C joins two cyclic components but is itself on no cycle; so is E>F.
    assert edges_of(drop_cycles(pairs)) == [("B", "C"), ("E", "F")]


def test_four_cycle_with_chord_all_removed():
    pairs = [pp("A", "B"), pp("B", "C"), pp("C", "D"), pp("D", "A"), pp("A", "C"),
             pp("D", "X")]
    assert edges_of(drop_cycles(pairs)) == [("D", "X")]


def test_different_prompts_or_histories_are_not_mixed():
    pairs = [pp("A", "B", prompt="q1"), pp("B", "A", prompt="q2"),
             pp("A", "B", history=(("u", "v"),)), pp("B", "A", prompt="q1",
                                                     history=(("u", "w"),))]
    assert drop_cycles(pairs) == pairs
    # ... while the same (prompt, history) is one group.
    same = [pp("A", "B", history=(("u", "v"),)), pp("B", "A", history=(("u", "v"),))]
    assert drop_cycles(same) == []


def test_long_cycle_and_long_chain_need_no_recursion():
    n = 20_000
    cycle = [pp(f"r{i}", f"r{(i + 1) % n}", prompt="cycle") for i in range(n)]
    chain = [pp(f"r{i}", f"r{i + 1}", prompt="chain") for i in range(n)]
    assert drop_cycles(cycle + chain) == chain


def reaches(pairs, src, dst, prompt):
    """Brute-force reachability src -> dst along chosen -> rejected edges of one prompt."""
    seen, todo = {src}, [src]
    while todo:
        node = todo.pop()
        for p in pairs:
            if p.prompt == prompt and p.chosen == node and p.rejected not in seen:
                seen.add(p.rejected)
                todo.append(p.rejected)
    return dst in seen


def test_drop_cycles_matches_reachability_on_random_graphs():
    rng = random.Random(0)
    for _ in range(200):
        nodes = [f"n{i}" for i in range(rng.randint(2, 7))]
        pairs = [pp(*rng.sample(nodes, 2), prompt=rng.choice("xy"))
                 for _ in range(rng.randint(1, 12))]
        # An edge u -> v is on a cycle exactly when v reaches u.
        expected = [p for p in pairs if not reaches(pairs, p.rejected, p.chosen, p.prompt)]
        assert drop_cycles(pairs) == expected


def length_biased_pairs():
    """Pairs with word-count differences; 'L' marks longer-chosen, 'S' shorter-chosen."""
    pairs = []
    # d = 0: always kept
    pairs += [pp("w " * 3, "v " * 3, prompt=f"eq{i}") for i in range(3)]
    # bucket [1, 4): 6 longer-chosen (d=1..3), 2 shorter-chosen
    pairs += [pp("w " * (2 + i % 3), "v", prompt=f"L1_{i}") for i in range(6)]
    pairs += [pp("w", "v " * 3, prompt=f"S1_{i}") for i in range(2)]
    # bucket [4, 8): 1 longer-chosen, 3 shorter-chosen
    pairs += [pp("w " * 6, "v", prompt="L2_0")]
    pairs += [pp("w", "v " * (5 + i), prompt=f"S2_{i}") for i in range(3)]
    # bucket [8, inf): only longer-chosen: the whole bucket goes
    pairs += [pp("w " * 20, "v", prompt=f"L3_{i}") for i in range(3)]
    random.Random(1).shuffle(pairs)
    return pairs


def test_balance_equalizes_each_bucket_and_keeps_equal_lengths():
    pairs = length_biased_pairs()
    out = balance_by_length(pairs, [1, 4, 8], seed=0, token_length=words)
    rows = length_bias_by_bucket(out, [1, 4, 8], token_length=words)
    assert rows == [{"bucket": "[1, 4)", "count": 4, "longer_wins": 0.5},
                    {"bucket": "[4, 8)", "count": 2, "longer_wins": 0.5},
                    {"bucket": "[8, inf)", "count": 0, "longer_wins": None}]
    prompts = [p.prompt for p in out]
    assert {f"eq{i}" for i in range(3)} <= set(prompts)  # d == 0 kept
    assert {"S1_0", "S1_1", "L2_0"} <= set(prompts)  # the minority group is never cut
    assert not any(p.startswith("L3") for p in prompts)
    assert len(out) == 3 + 4 + 2
    input_order = [p.prompt for p in pairs]
    assert prompts == sorted(prompts, key=input_order.index)  # survivors keep input order


def test_balance_is_deterministic_by_seed():
    pairs = length_biased_pairs()
    runs = {seed: balance_by_length(pairs, [1, 4, 8], seed, token_length=words)
            for seed in range(8)}
    assert balance_by_length(pairs, [1, 4, 8], 3, token_length=words) == runs[3]
    assert len({tuple(p.prompt for p in out) for out in runs.values()}) > 1


def test_balance_extra_first_bucket_below_first_edge():
    # edges start at 3: d = 1 and d = 2 share the extra bucket [1, 3)
    pairs = [pp("w w", "v", prompt="a"), pp("w w w", "v", prompt="b"),
             pp("w", "v v v", prompt="c"), pp("w " * 4, "v", prompt="d")]
    out = balance_by_length(pairs, [3, 10], seed=0, token_length=words)
    assert length_bias_by_bucket(pairs, [3, 10], token_length=words) == [
        {"bucket": "[1, 3)", "count": 3, "longer_wins": 2 / 3},
        {"bucket": "[3, 10)", "count": 1, "longer_wins": 1.0},
        {"bucket": "[10, inf)", "count": 0, "longer_wins": None}]
    assert len(out) == 2 and "c" in {p.prompt for p in out}


@pytest.mark.parametrize("edges", [[], [4, 4], [8, 4], [-1, 4]])
def test_bad_bucket_edges(edges):
    with pytest.raises(ValueError, match="bucket_edges"):
        balance_by_length([pp("a", "b")], edges, seed=0, token_length=words)


def test_stats_hand_computed():
    pairs = [PreferencePair("a b c", "r r", "r", history=(("u1 u2", "x"),)),
             PreferencePair("a", "s s s s", "t t t")]
    assert preference_stats(pairs, words) == {
        "num_comparisons": 2, "avg_turns": 1.5, "avg_history_tokens": 1.5,
        "avg_prompt_tokens": 2.0, "avg_response_tokens": 2.5}
    empty = preference_stats([], words)
    assert empty["num_comparisons"] == 0 and math.isnan(empty["avg_prompt_tokens"])


def test_default_token_length_is_the_tiny_tokenizer():
    tokenizer = Tokenizer.tiny()
    text = "Bucket-based length balancing, 3.3!"
    assert default_token_length(text) == len(tokenizer.encode(text)) > 1
    pairs = [PreferencePair("hello there", "a much longer answer here", "no")]
    stats = preference_stats(pairs)
    assert stats["avg_prompt_tokens"] == len(tokenizer.encode("hello there"))
    assert stats["avg_response_tokens"] == (len(tokenizer.encode("a much longer answer here"))
                                            + len(tokenizer.encode("no"))) / 2


def test_format_table():
    rows = [{"step": "input", "n": 10, "avg": 1.5}, {"step": "drop_ties", "n": 9, "avg": None}]
    assert format_table(rows) == (
        "step        n    avg\n"
        "---------  --  -----\n"
        "input      10  1.500\n"
        "drop_ties   9      -")
    assert format_table([]) == ""
