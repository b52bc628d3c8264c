"""SFT sequence packing: segment-aware attention and positions, the packed loss, the packing
dataset (every example once per epoch, whole, resumable), and train_sft with packing on."""

import json
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_sft_config
from flax import nnx

import glm_jax
from glm_jax.data import GLM4_TEMPLATE, SFTDataset, SFTExample, Tokenizer
from glm_jax.data.datasets import PackedSFTDataset, pack_greedy
from glm_jax.models import glm as glm_module
from glm_jax.models.glm import KVCache, apply_rotary, positions_from_segments
from glm_jax.models.tiny import tiny_config
from glm_jax.train.sft import sft_batch_loss, train_sft

# Prompts of 8-14 tokens and responses of 5-13 (EOS included): two or three per 32-token row.
EXAMPLES = [SFTExample(prompt=f"q{i}" + " more" * (i % 4), response="ab cd" * (1 + i % 3),
                       task=("math", "chat", None)[i % 3]) for i in range(23)]
LIMITS = dict(max_prompt_tokens=16, max_response_tokens=16)
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.tiny()


def sharp_model(seed=0):
    """The tiny model with weights of std 0.25, so that logits clearly depend on every input
    (at the init std of 0.02 a wrong mask or position could hide under the tolerance)."""
    abstract = nnx.eval_shape(lambda: glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.RandomState(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.25, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


@nnx.jit
def forward(model, ids, mask=None):
    return model(ids, mask)


def log_softmax(logits):
    shifted = np.asarray(logits, np.float64)
    shifted = shifted - shifted.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def packed(tokenizer, **kwargs):
    args = dict(batch_size=3, seed=0, **LIMITS)
    return PackedSFTDataset(EXAMPLES, tokenizer, GLM4_TEMPLATE, **{**args, **kwargs})


def unpacked_rows(tokenizer):
    """{token ids: unpacked row (the `SFTDataset` element)} of every example."""
    data = SFTDataset(EXAMPLES, tokenizer, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                      num_epochs=1, drop_remainder=False, **LIMITS)
    out = {}
    for row in rows_of(data):
        out[tuple(row["input_ids"][row["attention_mask"]])] = row
    assert len(out) == len(EXAMPLES)  # the examples are distinct
    return out


def unpacked_examples(tokenizer):
    """{token ids: (loss mask, task index)} of every example, from the unpacked dataset."""
    return {ids: (tuple(row["loss_mask"][row["attention_mask"]]), int(row["task_index"]))
            for ids, row in unpacked_rows(tokenizer).items()}


def segments(row):
    """[(token ids, loss mask)] of each segment of one packed row, in order."""
    seg = row["segment_ids"]
    return [(tuple(row["input_ids"][seg == s]), tuple(row["loss_mask"][seg == s]))
            for s in range(1, seg.max() + 1)]


def rows_of(batches):
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


# ------------------------------------------------------------------------------------ model


def test_positions_restart_in_each_segment():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    positions = np.asarray(positions_from_segments(seg > 0, seg))
    np.testing.assert_array_equal(positions, [[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))])


def test_packed_logits_equal_each_sequence_alone(monkeypatch):
    model = sharp_model()
    rng = np.random.RandomState(0)
    layout = [[5, 7, 5], [11, 5], [17]]  # few distinct lengths: few compiles
    length = 17
    ids = rng.randint(2, 500, (len(layout), length))  # padding too: it must not leak in
    seg = np.zeros_like(ids)
    for row, lengths in enumerate(layout):
        ends = np.cumsum(lengths)
        for s, (start, end) in enumerate(zip(ends - lengths, ends, strict=True), 1):
            seg[row, start:end] = s

    run = nnx.jit(lambda m, ids, seg: m(ids, seg > 0, segment_ids=seg))
    logits = np.asarray(run(model, ids, seg))
    for row, lengths in enumerate(layout):
        ends = np.cumsum(lengths)
        for start, end in zip(ends - lengths, ends, strict=True):
            alone = np.asarray(forward(model, ids[row:row + 1, start:end]))[0]
            np.testing.assert_allclose(logits[row, start:end], alone, atol=1e-5)
    # The same rows as one sequence each differ: the test would catch a leaking mask or
    # positions that do not restart.
    plain = np.asarray(forward(model, ids, seg > 0))
    assert np.abs(plain[0, 5:15] - logits[0, 5:15]).max() > 1e-2

    # Rotary scores depend on relative positions only, so the logits cannot show whether
    # positions restart per segment (they do, as in the unpacked run): record them, in a new
    # trace without an attention mask (segment 0 must still be padding).
    used = []

    def spy(x, positions, *args):
        jax.debug.callback(lambda p: used.append(np.asarray(p)), positions)
        return apply_rotary(x, positions, *args)

    monkeypatch.setattr(glm_module, "apply_rotary", spy)
    unmasked = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
    np.testing.assert_allclose(np.asarray(unmasked(model, ids, seg)), logits, atol=1e-5)
    jax.effects_barrier()
    expected = np.zeros_like(seg)
    for row, lengths in enumerate(layout):
        expected[row, :sum(lengths)] = np.concatenate([np.arange(n) for n in lengths])
    assert len(used) == 2 * model.config.num_hidden_layers  # queries and keys, every layer
    for positions in used:
        np.testing.assert_array_equal(positions, expected)


def test_segment_ids_with_a_cache_raise():
    model = sharp_model()
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, cache=KVCache.init(model.config, 1, 8), segment_ids=ids)


# ------------------------------------------------------------------------------------- loss


def test_packed_loss_is_the_unpacked_token_mean(tokenizer):
    batch = packed(tokenizer, batch_size=4, seed=1)[0]
    assert batch["segment_ids"].max() >= 2  # examples do share rows
    model = sharp_model(1)
    loss, stats = nnx.jit(sft_batch_loss)(model, batch)

    # Reference: the batch's examples as unpacked rows (one example each, right-padded).
    examples = unpacked_rows(tokenizer)
    unpacked = [examples[ids] for row in rows_of([batch]) for ids, _ in segments(row)]
    ids = np.stack([row["input_ids"] for row in unpacked])
    logp = log_softmax(forward(model, ids, np.stack([row["attention_mask"] for row in unpacked])))
    nll, count = 0.0, 0
    for i, row in enumerate(unpacked):
        for t in np.nonzero(row["loss_mask"])[0]:  # response tokens, EOS included
            nll -= logp[i, t - 1, ids[i, t]]
            count += 1
    assert int(stats["response_tokens"]) == count
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


def test_no_target_crosses_a_segment_boundary():
    # Train on every token: only the pairs inside a segment may count.
    model = sharp_model(2)
    rng = np.random.RandomState(1)
    seg = np.array([[1] * 6 + [2] * 5 + [3] * 4 + [0] * 3])
    ids = rng.randint(2, 500, seg.shape)
    batch = {"input_ids": ids, "attention_mask": seg > 0, "loss_mask": seg > 0,
             "segment_ids": seg}
    loss, stats = nnx.jit(sft_batch_loss)(model, batch)
    nll, count = 0.0, 0
    for s in (1, 2, 3):
        tokens = ids[0, seg[0] == s]
        logp = log_softmax(forward(model, tokens[None])[0])
        nll -= sum(logp[t - 1, tokens[t]] for t in range(1, len(tokens)))
        count += len(tokens) - 1
    assert int(stats["response_tokens"]) == count
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)


# ---------------------------------------------------------------------------------- dataset


def test_pack_greedy_keeps_items_whole_and_in_rows_that_fit():
    lengths = np.random.RandomState(0).randint(1, 20, 200)
    rows = pack_greedy(lengths, 32, num_open=4)
    assert sorted(i for row in rows for i in row) == list(range(200))
    for r, row in enumerate(rows):
        assert row == sorted(row) and sum(lengths[row]) <= 32
        # Greedy: the item that opened row r fitted none of the rows it could have gone in.
        first = row[0]
        for earlier in rows[max(r - 4, 0):r]:
            assert sum(lengths[[i for i in earlier if i < first]]) + lengths[first] > 32
    with pytest.raises(ValueError, match="not in"):
        pack_greedy([3, 33], 32)


def test_every_example_once_per_epoch_whole(tokenizer):
    examples = unpacked_examples(tokenizer)
    data = packed(tokenizer, num_epochs=2, drop_remainder=False)
    report = data.packing_report
    rows = rows_of(data)
    assert len(rows) == 2 * report.num_rows and report.num_examples == len(EXAMPLES)
    assert report.num_rows < len(EXAMPLES)  # packing saved rows
    expected = Counter((ids, mask) for ids, (mask, _) in examples.items())
    for epoch in (rows[:report.num_rows], rows[report.num_rows:]):
        assert Counter(s for row in epoch for s in segments(row)) == expected
    for row in rows:
        seg = row["segment_ids"]
        assert row["input_ids"].shape == (MAX_LENGTH,)
        # Segments 1..k, each contiguous and in order, then padding only.
        real = seg[seg > 0]
        np.testing.assert_array_equal(np.unique(real), np.arange(1, seg.max() + 1))
        assert np.all(np.diff(real) >= 0) and np.all(np.diff((seg > 0).astype(int)) <= 0)
        np.testing.assert_array_equal(row["attention_mask"], seg > 0)
        assert np.all(row["input_ids"][seg == 0] == tokenizer.pad_token_id)
        assert row["task_index"] == examples[segments(row)[0][0]][1]  # the first example's
    tokens = sum(len(ids) for ids in examples)
    assert report.num_tokens == tokens
    assert report.fill == pytest.approx(tokens / (report.num_rows * MAX_LENGTH))
    assert report.fill > tokens / (len(EXAMPLES) * MAX_LENGTH)  # better than one per row


def test_packing_follows_the_seed(tokenizer):
    def contents(seed):
        return [segments(row) for row in rows_of(packed(tokenizer, seed=seed, num_epochs=1))]

    assert contents(0) == contents(0)
    assert contents(0) != contents(1)


def test_resume_from_iterator_state(tokenizer):
    iterator = iter(packed(tokenizer, batch_size=2, seed=5))
    for _ in range(7):  # past the end of the first epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]
    resumed = iter(packed(tokenizer, batch_size=2, seed=5))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_processes_share_each_global_batch(tokenizer):
    whole = packed(tokenizer, batch_size=4)
    parts = [packed(tokenizer, batch_size=4, process_index=i, process_count=2) for i in (0, 1)]
    for step in range(5):
        for key, value in whole[step].items():
            np.testing.assert_array_equal(
                np.concatenate([p[step][key] for p in parts]), value)


# ----------------------------------------------------------------------------- train_sft


def test_train_sft_with_packing_learns(tmp_path, capsys):
    config = tiny_sft_config(tmp_path, packing=True, num_steps=40, learning_rate=3e-3,
                             eval_every=0, checkpoint_every=40, log_every=1000)
    config.sft.batch_size = 2  # rows
    config.data.max_prompt_tokens = 32  # room for several examples per row
    final = train_sft(config, tmp_path / "w")
    report = re.search(r"packed (\d+) examples into (\d+) rows", capsys.readouterr().out)
    assert report and int(report[1]) == 8 and int(report[2]) < 8
    records = [json.loads(line)
               for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # The unpacked eval (the same examples) improved as much: packing trains the same loss.
    assert final["eval"]["loss"] < 0.5 * losses[0]
