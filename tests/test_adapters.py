"""seqio Tasks and the TFDS builder yield exactly the native pipeline's token ids.

Needs the `seqio` extra (`pip install -e ".[seqio]"`); CI installs it and runs this file.
"""

import numpy as np
import pytest

seqio = pytest.importorskip("seqio", reason="the seqio extra is not installed")

from glm_jax.data import (  # noqa: E402
    GLM4_TEMPLATE,
    PreferenceDataset,
    PreferencePair,
    PromptExample,
    SFTExample,
    Tokenizer,
    tokenize_record,
    write_jsonl,
)
from glm_jax.data.adapters import GlmJaxRecords, GlmVocabulary, register_seqio_tasks  # noqa: E402

LIMITS = dict(max_prompt_tokens=20, max_response_tokens=10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    pairs = [PreferencePair(prompt=f"question {i} " * (1 + i % 4), chosen="good answer " * i,
                            rejected="bad", history=((("hi", "hello"),) if i % 2 else ()),
                            task=["math", "chat"][i % 2],
                            system="be brief" if i % 3 == 0 else None) for i in range(1, 9)]
    sft = [SFTExample(p.prompt, p.chosen, p.history, p.task, system=p.system) for p in pairs]
    prompts = [PromptExample(p.prompt, p.history, p.task, system=p.system) for p in pairs]
    paths = {}
    for kind, records in (("preference", pairs), ("sft", sft), ("prompt", prompts)):
        write_jsonl(tmp / f"{kind}.jsonl", records)
        paths[kind] = {"train": str(tmp / f"{kind}.jsonl")}
    return tmp, paths, {"preference": pairs, "sft": sft, "prompt": prompts}


def test_seqio_tasks_yield_the_native_token_ids(files):
    _, paths, records = files
    tokenizer = Tokenizer.tiny()
    names = register_seqio_tasks("glm_jax_test", paths, tokenizer=tokenizer,
                                 template=GLM4_TEMPLATE, **LIMITS)
    assert names == ["glm_jax_test_preference", "glm_jax_test_sft", "glm_jax_test_prompt"]
    for kind, name in zip(("preference", "sft", "prompt"), names, strict=True):
        task = seqio.get_mixture_or_task(name)
        examples = list(task.get_dataset(split="train", shuffle=False).as_numpy_iterator())
        assert len(examples) == len(records[kind])
        for example, record in zip(examples, records[kind], strict=True):
            expected = tokenize_record(record, tokenizer, GLM4_TEMPLATE, **LIMITS)
            for key, ids in expected.items():
                assert example[key].tolist() == ids, (kind, key)
            assert example["task"].decode() == record.task
    # Some prompts and responses really were truncated, by the native rules.
    assert any(len(e["prompt"]) == LIMITS["max_prompt_tokens"] for e in examples)


def test_preference_task_matches_the_training_batches(files):
    _, paths, records = files
    tokenizer = Tokenizer.tiny()
    (name,) = register_seqio_tasks("glm_jax_rows", {"preference": paths["preference"]},
                                   tokenizer=tokenizer, template=GLM4_TEMPLATE, **LIMITS)
    examples = list(seqio.get_mixture_or_task(name).get_dataset(
        split="train", shuffle=False).as_numpy_iterator())
    batch = PreferenceDataset(records["preference"], tokenizer, GLM4_TEMPLATE, batch_size=8,
                              shuffle=False, num_epochs=1, **LIMITS)[0]
    for row, example in enumerate(examples):
        chosen = np.concatenate([example["prompt"], example["chosen"]])
        np.testing.assert_array_equal(batch["chosen_ids"][row][batch["chosen_mask"][row]], chosen)


def test_tasks_of_one_kind_mix(files):
    tmp, _, records = files
    # seqio mixes Tasks with the same features: e.g. two SFT sources.
    write_jsonl(tmp / "sft_math.jsonl", [r for r in records["sft"] if r.task == "math"])
    write_jsonl(tmp / "sft_chat.jsonl", [r for r in records["sft"] if r.task == "chat"])
    names = [register_seqio_tasks(f"glm_jax_{source}",
                                  {"sft": {"train": tmp / f"sft_{source}.jsonl"}},
                                  tokenizer=Tokenizer.tiny(), template=GLM4_TEMPLATE, **LIMITS)[0]
             for source in ("math", "chat")]
    seqio.MixtureRegistry.remove("glm_jax_mix")
    seqio.MixtureRegistry.add("glm_jax_mix", [(names[0], 1.0), (names[1], 1.0)])
    mixed = list(seqio.get_mixture_or_task("glm_jax_mix").get_dataset(
        split="train", shuffle=False, seed=0, num_epochs=1,
        sequence_length={"prompt": 32, "response": 16}).as_numpy_iterator())
    # Native token ids from both sources (a Mixture keeps only the output features, and with
    # num_epochs=1 it stops when its first source runs out).
    expected = {r.task: [] for r in records["sft"]}
    for r in records["sft"]:
        expected[r.task].append(tokenize_record(r, Tokenizer.tiny(), GLM4_TEMPLATE, **LIMITS))
    as_lists = [{"prompt": e["prompt"].tolist(), "response": e["response"].tolist()}
                for e in mixed]
    assert all(e in expected["math"] + expected["chat"] for e in as_lists)
    for source, examples in expected.items():
        assert any(e in examples for e in as_lists), source
    assert len(mixed) >= 5


def test_vocabulary_wraps_the_tokenizer():
    tokenizer = Tokenizer.tiny()
    vocabulary = GlmVocabulary(tokenizer)
    text = "[gMASK]<sop><|user|>\nhello world"
    assert vocabulary.encode(text) == tokenizer.encode(text)
    assert vocabulary.encode_tf(text).numpy().tolist() == tokenizer.encode(text)
    assert vocabulary.decode(tokenizer.encode("hello world")) == "hello world"
    assert vocabulary.eos_id == tokenizer.eos_token_ids[0]
    assert vocabulary.vocab_size == tokenizer.vocab_size


def test_tfds_builder_records_and_token_ids(files):
    tmp, paths, records = files
    tokenizer = Tokenizer.tiny()
    builder = GlmJaxRecords(kind="preference", files=paths["preference"], tokenizer=tokenizer,
                            template=GLM4_TEMPLATE, data_dir=str(tmp / "tfds"), **LIMITS)
    builder.download_and_prepare()
    examples = list(builder.as_dataset(split="train", shuffle_files=False).as_numpy_iterator())
    assert len(examples) == len(records["preference"])
    by_prompt = {(e["prompt"].decode(), e["chosen"].decode()): e for e in examples}
    for record in records["preference"]:
        example = by_prompt[(record.prompt, record.chosen)]
        assert example["rejected"].decode() == record.rejected
        assert example["task"].decode() == record.task
        assert example["system"].decode() == (record.system or "")
        history = tuple(zip([u.decode() for u in example["history"]["user"]],
                            [a.decode() for a in example["history"]["assistant"]], strict=True))
        assert history == record.history
        expected = tokenize_record(record, tokenizer, GLM4_TEMPLATE, **LIMITS)
        for key, ids in expected.items():
            assert example[f"{key}_ids"].tolist() == ids


def test_unknown_record_kind():
    with pytest.raises(ValueError, match="record kind 'pairs' is not one of"):
        register_seqio_tasks("x", {"pairs": {"train": "a.jsonl"}}, tokenizer=Tokenizer.tiny(),
                             template=GLM4_TEMPLATE, **LIMITS)
