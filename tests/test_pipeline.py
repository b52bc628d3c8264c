"""Tokenization with truncation, and grain batching of preference pairs."""

import json

import numpy as np
import pytest

from glm_jax.data import (
    GLM4_TEMPLATE,
    PreferenceDataset,
    PreferencePair,
    Tokenizer,
    encode_chat,
    tokenize_pair,
)

EOS_TEXT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.tiny()


def make_pairs(n, tasks=("math", "chat", None)):
    return [PreferencePair(f"question {i}?", f"good answer {i}", f"bad {i}",
                           history=(("hi", "hello"),) if i % 4 == 0 else (),
                           task=tasks[i % len(tasks)]) for i in range(n)]


def build(pairs, tokenizer, **kwargs):
    args = dict(batch_size=4, max_prompt_tokens=48, max_response_tokens=16, seed=0)
    return PreferenceDataset(pairs, tokenizer, GLM4_TEMPLATE, **{**args, **kwargs})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_tokenize_pair_fitting(tokenizer):
    pair = PreferencePair("What is 2+2?", "4", "five", history=(("hi", "hello"),), task="math")
    out = tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=64,
                        max_response_tokens=16)
    eos = tokenizer.eos_token_ids[0]
    assert out.prompt_ids == encode_chat(tokenizer, GLM4_TEMPLATE, pair.prompt, pair.history)
    assert out.chosen_ids == tokenizer.encode("4") + [eos]
    assert out.rejected_ids == tokenizer.encode("five") + [eos]
    assert (out.task, out.prompt_truncated, out.response_truncated) == ("math", False, False)


def test_prompt_truncation_keeps_prefix_and_most_recent_tokens(tokenizer):
    history = tuple((f"old question {i}", f"old answer {i}") for i in range(6))
    pair = PreferencePair("the final question", "yes", "no", history=history)
    full = encode_chat(tokenizer, GLM4_TEMPLATE, pair.prompt, pair.history)
    prefix = tokenizer.encode(GLM4_TEMPLATE.prefix)
    assert len(prefix) == 2 and len(full) > 40
    for mode in ("truncate", "drop"):
        out = tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=30,
                            max_response_tokens=16, truncation=mode)
        if mode == "drop":
            assert out is None
            continue
        assert len(out.prompt_ids) == 30
        assert out.prompt_ids == prefix + full[-28:]
        text = tokenizer.decode(out.prompt_ids, skip_special_tokens=False)
        assert text.startswith("[gMASK]<sop>")
        assert text.endswith("<|user|>\nthe final question<|assistant|>\n")
        assert "old question 0" not in text
        assert out.prompt_truncated and not out.response_truncated


def test_response_truncation_keeps_beginning_and_eos(tokenizer):
    long_text = "one two three four five six seven eight nine ten"
    ids = tokenizer.encode(long_text)
    eos = tokenizer.eos_token_ids[0]
    pair = PreferencePair("q", "short", long_text)
    out = tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=32,
                        max_response_tokens=8)
    assert out.rejected_ids == ids[:7] + [eos]
    assert out.chosen_ids == tokenizer.encode("short") + [eos]
    assert out.response_truncated and not out.prompt_truncated
    # Exactly at the limit (text + EOS) is not truncated.
    exact = tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=32,
                          max_response_tokens=len(ids) + 1)
    assert exact.rejected_ids == ids + [eos] and not exact.response_truncated
    assert tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=32,
                         max_response_tokens=8, truncation="drop") is None


def test_invalid_limits(tokenizer):
    pair = PreferencePair("q", "a", "b")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=2, max_response_tokens=8)
    with pytest.raises(ValueError, match="max_response_tokens"):
        tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=32, max_response_tokens=1)
    with pytest.raises(ValueError, match="truncation"):
        tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, max_prompt_tokens=32,
                      max_response_tokens=8, truncation="cut")


def test_report_counts_in_both_modes(tokenizer):
    long = "word " * 40
    pairs = [PreferencePair("q1", "a", "b"), PreferencePair("q2", "c", "d"),
             PreferencePair("q3 " + long, "e", "f"),  # long prompt
             PreferencePair("q4", long, "g"),  # long chosen
             PreferencePair("q5", long, long + "x")]  # both responses long
    report = build(pairs, tokenizer, max_prompt_tokens=24, max_response_tokens=8,
                   batch_size=1).report
    # q5's responses are the same tokens once cut to 8: a pair that teaches nothing.
    assert report.to_dict() == {"num_pairs": 5, "num_kept": 4, "num_dropped": 1,
                                "num_prompts_truncated": 1, "num_responses_truncated": 3,
                                "num_special_plain": 0, "num_special_dropped": 0,
                                "num_ties": 0, "num_identical": 1}
    dataset = build(pairs, tokenizer, max_prompt_tokens=24, max_response_tokens=8, batch_size=1,
                    truncation="drop", shuffle=False, num_epochs=1)
    assert dataset.report.to_dict() == {"num_pairs": 5, "num_kept": 2, "num_dropped": 3,
                                        "num_prompts_truncated": 0,
                                        "num_responses_truncated": 0,
                                        "num_special_plain": 0, "num_special_dropped": 0,
                                        "num_ties": 0, "num_identical": 0}
    kept = [tokenizer.decode(b["chosen_ids"][0][b["chosen_mask"][0]]) for b in dataset]
    assert [text.split("\n")[1] for text in kept] == ["q1", "q2"]


def test_batches_shapes_padding_and_decode(tokenizer):
    pairs = make_pairs(12)
    dataset = build(pairs, tokenizer, num_epochs=1)
    assert dataset.tasks == ["chat", "math"]
    assert dataset.num_batches == 3 and dataset.max_length == 64
    rendered = {GLM4_TEMPLATE.render(p.prompt, p.history): p for p in pairs}
    seen = []
    for batch in dataset:
        assert set(batch) == {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask",
                              "chosen_response_mask", "rejected_response_mask", "task_index",
                              "pair_index"}
        assert batch["task_index"].shape == (4,) and batch["task_index"].dtype == np.int32
        for name in ("chosen", "rejected"):
            ids, mask = batch[f"{name}_ids"], batch[f"{name}_mask"]
            assert ids.shape == mask.shape == (4, 64)
            assert ids.dtype == np.int32 and mask.dtype == bool
            lengths = mask.sum(axis=1)
            # Right padding: the mask is a prefix and everything after it is the pad id.
            np.testing.assert_array_equal(mask, np.arange(64)[None] < lengths[:, None])
            assert np.all(ids[~mask] == tokenizer.pad_token_id)
        for row in range(4):
            chosen = tokenizer.decode(batch["chosen_ids"][row][batch["chosen_mask"][row]],
                                      skip_special_tokens=False)
            rejected = tokenizer.decode(batch["rejected_ids"][row][batch["rejected_mask"][row]],
                                        skip_special_tokens=False)
            prompt_text = chosen[: chosen.rindex("<|assistant|>\n") + len("<|assistant|>\n")]
            pair = rendered[prompt_text]
            assert chosen == prompt_text + pair.chosen + EOS_TEXT
            assert rejected == prompt_text + pair.rejected + EOS_TEXT
            expected_task = -1 if pair.task is None else dataset.tasks.index(pair.task)
            assert batch["task_index"][row] == expected_task
            seen.append(pair)
    assert sorted(seen, key=pairs.index) == pairs  # one epoch: every pair exactly once


def test_max_length(tokenizer):
    pairs = make_pairs(4)
    batch = build(pairs, tokenizer, max_length=100)[0]
    assert batch["chosen_ids"].shape == (4, 100)
    with pytest.raises(ValueError, match="do not fit max_length=10"):
        build(pairs, tokenizer, max_length=10)


def test_same_seed_same_batches_different_seed_different_order(tokenizer):
    pairs = make_pairs(16)
    a = take(iter(build(pairs, tokenizer, seed=7)), 10)  # crosses epoch boundaries
    b = take(iter(build(pairs, tokenizer, seed=7)), 10)  # a fresh dataset, same seed
    assert_batches_equal(a, b)
    c = take(iter(build(pairs, tokenizer, seed=8)), 10)
    assert not all(np.array_equal(x["chosen_ids"], y["chosen_ids"])
                   for x, y in zip(a, c, strict=True))
    # Each epoch is a permutation, reshuffled per epoch.
    first = np.concatenate([x["chosen_ids"] for x in a[:4]])
    second = np.concatenate([x["chosen_ids"] for x in a[4:8]])
    assert sorted(map(tuple, first)) == sorted(map(tuple, second))
    assert not np.array_equal(first, second)


def test_no_shuffle_keeps_input_order_and_remainder(tokenizer):
    pairs = make_pairs(10)
    dataset = build(pairs, tokenizer, shuffle=False, num_epochs=1, drop_remainder=False)
    batches = list(dataset)
    assert [len(b["task_index"]) for b in batches] == [4, 4, 2]
    texts = [tokenizer.decode(row[mask]) for b in batches
             for row, mask in zip(b["chosen_ids"], b["chosen_mask"], strict=True)]
    assert [text.split("\n")[-2] for text in texts] == [p.prompt for p in pairs]
    assert len(list(build(pairs, tokenizer, num_epochs=1))) == 2  # drop_remainder=True


def test_get_state_set_state_resumes_exactly(tokenizer):
    pairs = make_pairs(10)
    reference = take(iter(build(pairs, tokenizer, seed=3)), 9)
    iterator = iter(build(pairs, tokenizer, seed=3))
    assert_batches_equal(take(iterator, 4), reference[:4])
    state = json.loads(json.dumps(iterator.get_state()))  # survives a JSON checkpoint
    take(iterator, 2)  # progress that the restore must undo
    resumed = iter(build(pairs, tokenizer, seed=3))
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), reference[4:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_cover_the_global_batch(tokenizer, process_count):
    pairs = make_pairs(22)
    global_batches = list(build(pairs, tokenizer, batch_size=8, num_epochs=2))
    assert len(global_batches) == 5  # 44 rows -> 5 whole global batches
    shards = [list(build(pairs, tokenizer, batch_size=8, num_epochs=2,
                         process_index=i, process_count=process_count))
              for i in range(process_count)]
    local = 8 // process_count
    for step, expected in enumerate(global_batches):
        assert all(len(shard) == 5 for shard in shards)
        for key, value in expected.items():
            for i, shard in enumerate(shards):
                assert shard[step][key].shape[0] == local
                np.testing.assert_array_equal(shard[step][key],
                                              value[i * local:(i + 1) * local])


def test_invalid_sharding_arguments(tokenizer):
    pairs = make_pairs(8)
    with pytest.raises(ValueError, match="multiple of process_count"):
        build(pairs, tokenizer, batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        build(pairs, tokenizer, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="drop_remainder"):
        build(pairs, tokenizer, process_count=2, drop_remainder=False)
    with pytest.raises(ValueError, match="no preference pairs"):
        build([PreferencePair("q", "a " * 50, "b")], tokenizer, truncation="drop")


def test_tokenize_record_follows_the_pair_rules_for_every_kind(tokenizer):
    from glm_jax.data import PromptExample, SFTExample, tokenize_record

    pair = PreferencePair(prompt="word " * 40, chosen="long answer " * 20, rejected="no",
                          history=(("hi", "hello"),))
    limits = dict(max_prompt_tokens=24, max_response_tokens=12)
    tokens = tokenize_pair(pair, tokenizer, GLM4_TEMPLATE, **limits)
    as_pair = tokenize_record(pair, tokenizer, GLM4_TEMPLATE, **limits)
    assert as_pair == {"prompt": tokens.prompt_ids, "chosen": tokens.chosen_ids,
                       "rejected": tokens.rejected_ids}
    sft = tokenize_record(SFTExample(pair.prompt, pair.chosen, pair.history), tokenizer,
                          GLM4_TEMPLATE, **limits)
    assert sft == {"prompt": tokens.prompt_ids, "response": tokens.chosen_ids}
    assert len(sft["prompt"]) == 24 and sft["response"][-1] == tokenizer.eos_token_ids[0]
    prompt = tokenize_record(PromptExample(pair.prompt, pair.history), tokenizer,
                             GLM4_TEMPLATE, **limits)
    assert prompt == {"prompt": tokens.prompt_ids}
    assert tokenize_record(SFTExample(pair.prompt, "x"), tokenizer, GLM4_TEMPLATE,
                           truncation="drop", **limits) is None
