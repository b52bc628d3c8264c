"""Data that is bad or cannot teach: invalid UTF-8 and JSON positions, empty and missing files
named by their config field, evaluation over every example (a set smaller than one batch
included), ties and chosen == rejected pairs, special-token strings in record text, and the
truncation of PPO's prompts."""

import io
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

import glm_jax
from glm_jax.config import default_config
from glm_jax.data import (
    GLM4_TEMPLATE,
    PreferenceDataset,
    PreferencePair,
    PromptExample,
    SFTDataset,
    SFTExample,
    Tokenizer,
    read_jsonl,
    write_jsonl,
)
from glm_jax.data.chat_template import encode_chat
from glm_jax.data.records import DataError
from glm_jax.models.tiny import tiny_config
from glm_jax.sharding import make_mesh
from glm_jax.train import dpo as dpo_module
from glm_jax.train.dpo import implicit_reward_accuracy, reference_logps, train_dpo
from glm_jax.train.reward import evaluate_pairs, train_reward_model
from glm_jax.train.rollout import encode_prompt_file
from glm_jax.train.sft import evaluate_sft, sft_dataset, train_sft

LIMITS = dict(max_prompt_tokens=16, max_response_tokens=8)
TOKENIZER = Tokenizer.tiny()


def one_device_mesh():
    return make_mesh((1, 1, 1), jax.devices()[:1])


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def small_config(**data):
    config = default_config()
    config.data.update(**LIMITS, **data)
    config.sft.batch_size = config.rm.batch_size = config.dpo.batch_size = 16
    return config


# --- reading -------------------------------------------------------------------------------------


def test_invalid_utf8_names_file_and_line_and_skip_counts_it(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n'
                     b'{"prompt": "caf\xe9", "response": "b"}\n'  # latin-1, not UTF-8
                     b'{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 \(byte 0xe9 at byte 16"):
        read_jsonl(path, "sft")
    records, report = read_jsonl(path, "sft", on_error="skip")
    assert [r.prompt for r in records] == ["a", "c"]
    assert (report.num_skipped, report.first_skipped_lines) == (1, [2])
    assert report.first_error.startswith(f"{path}:2: invalid UTF-8")


@pytest.mark.parametrize("line", ['{"prompt": "a", "response": ',  # cut at the end
                                  '{"prompt": "a",, "response": "b"}',
                                  '{"prompt": "é", "response": "b" x}'])
def test_json_error_reports_the_column_json_finds_in_the_line(tmp_path, line):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "response": "b"}\n' + line + "\n",
                                        encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(line)
    assert expected.value.lineno == 1
    with pytest.raises(DataError, match=rf":2: invalid JSON: .* \(column "
                                        rf"{expected.value.colno}\)$"):
        read_jsonl(tmp_path / "sft.jsonl", "sft")


def test_end_of_line_error_was_column_1_before():
    # Why the line break is stripped: json reports an error at the end of the line at the
    # start of the next one.
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads('{"prompt": \n')
    assert (error.value.lineno, error.value.colno) == (2, 1)


def test_empty_or_all_bad_file_names_its_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"config.rm.train_file = '{path}' has no records "
                                        r"\(the file is empty or blank\)"):
        read_jsonl(path, "preference", field="config.rm.train_file")
    path.write_text('{"prompt": 1, "response": "b"}\n')
    with pytest.raises(DataError, match=r"has no records: all 1 lines are bad \(first: .*:1: "
                                        "prompt: expected a string"):
        read_jsonl(path, "sft", on_error="skip", field="config.sft.eval_file")
    assert read_jsonl(tmp_path / "x.jsonl", "sft", on_error="skip")[0] == []  # no field: allowed


def write_files(tmp_path, stage, config, *, train="ok", eval="ok"):
    """config.<stage>.train_file / eval_file: "ok" (real records), "empty" or "missing"."""
    kind = "sft" if stage == "sft" else "preference"
    records = ([SFTExample(f"q{i}", f"answer {i}") for i in range(4)] if kind == "sft"
               else [PreferencePair(f"q{i}", "good", "bad") for i in range(4)])
    for name, state in (("train_file", train), ("eval_file", eval)):
        path = tmp_path / f"{stage}_{name}.jsonl"
        if state == "ok":
            write_jsonl(path, records)
        elif state == "empty":
            path.write_text("")
        else:
            path.unlink(missing_ok=True)
        config[stage][name] = str(path)


TRAINERS = {"sft": train_sft, "rm": train_reward_model, "dpo": train_dpo}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_empty_and_missing_files_name_the_config_field(tmp_path, stage, which):
    config = small_config()
    write_files(tmp_path, stage, config, **{which: "empty"})
    field = f"config.{stage}.{which}_file"
    path = config[stage][f"{which}_file"]
    with pytest.raises(DataError, match=rf"{field} = '{path}' has no records"):
        TRAINERS[stage](config, tmp_path / "w")
    write_files(tmp_path, stage, config, **{which: "missing"})
    with pytest.raises(FileNotFoundError, match=rf"{field} = '{path}' does not exist"):
        TRAINERS[stage](config, tmp_path / "w")
    assert not (tmp_path / "w" / "checkpoints").exists()  # failed before any training


# --- evaluation over every example ----------------------------------------------------------------

THREE_SFT = [SFTExample("name 1", "apple"), SFTExample("name 2", "a river stone"),
             SFTExample("what", "a cloud", history=(("hi", "hello"),))]
THREE_PAIRS = [PreferencePair("q1", "great answer", "wrong"),
               PreferencePair("q2", "kind", "rude and vague"),
               PreferencePair("q3", "clear", "lazy", task="t")]


def test_sft_eval_smaller_than_a_batch_covers_every_example():
    config = small_config()
    model = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    data = sft_dataset(THREE_SFT, TOKENIZER, GLM4_TEMPLATE, config, shuffle=False,
                       num_epochs=1, drop_remainder=False)
    graphdef, params = nnx.split(model)
    result = evaluate_sft(graphdef, params, data, one_device_mesh())

    nll, count = 0.0, 0
    for example in THREE_SFT:  # one example at a time, from the model's logits
        row = SFTDataset([example], TOKENIZER, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                         **LIMITS)[0]
        logp = log_softmax(model(row["input_ids"], row["attention_mask"]))[0]
        for t in np.nonzero(row["loss_mask"][0])[0]:
            nll -= logp[t - 1, row["input_ids"][0, t]]
            count += 1
    assert result["response_tokens"] == count == sum(
        len(TOKENIZER.encode(e.response)) + 1 for e in THREE_SFT)
    np.testing.assert_allclose(result["loss"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(nll / count), rtol=1e-5)


def test_rm_eval_smaller_than_a_batch_covers_every_pair():
    config = small_config()
    model = glm_jax.GlmRewardModel(tiny_config(), rngs=nnx.Rngs(1))
    result = evaluate_pairs(model, TOKENIZER, GLM4_TEMPLATE, THREE_PAIRS, config)
    chosen, rejected = [], []
    for pair in THREE_PAIRS:
        row = PreferenceDataset([pair], TOKENIZER, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                                **LIMITS)[0]
        chosen.append(float(model(row["chosen_ids"], row["chosen_mask"])[0]))
        rejected.append(float(model(row["rejected_ids"], row["rejected_mask"])[0]))
    chosen, rejected = np.array(chosen), np.array(rejected)
    assert result["pairs"] == 3
    assert result["accuracy"] == pytest.approx(np.mean(chosen > rejected))
    assert result["margin"] == pytest.approx(np.mean(chosen - rejected), rel=1e-4, abs=1e-6)


def test_dpo_eval_smaller_than_a_batch_covers_every_pair():
    config = small_config()
    reference = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(0))
    policy = glm_jax.GlmForCausalLM(tiny_config(), rngs=nnx.Rngs(5))
    data = dpo_module._dataset(THREE_PAIRS, TOKENIZER, GLM4_TEMPLATE, config, shuffle=False,
                               num_epochs=1, drop_remainder=False)
    graphdef, ref_params = nnx.split(reference)
    ref = reference_logps(graphdef, ref_params, data, one_device_mesh(), 3, 16)
    result = implicit_reward_accuracy(graphdef, nnx.split(policy)[1], data, ref, 0.5,
                                      one_device_mesh())

    def logps(model, row, name):
        logp = log_softmax(model(row[f"{name}_ids"], row[f"{name}_mask"]))[0]
        ids = row[f"{name}_ids"][0]
        return sum(logp[t - 1, ids[t]] for t in np.nonzero(row[f"{name}_response_mask"][0])[0])

    rewards = []
    for pair in THREE_PAIRS:
        row = PreferenceDataset([pair], TOKENIZER, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                                **LIMITS)[0]
        rewards.append([0.5 * (logps(policy, row, n) - logps(reference, row, n))
                        for n in ("chosen", "rejected")])
    rewards = np.array(rewards)
    assert result["reward_accuracy"] == pytest.approx(np.mean(rewards[:, 0] > rewards[:, 1]))
    assert result["reward_margin"] == pytest.approx(np.mean(rewards[:, 0] - rewards[:, 1]),
                                                    rel=1e-4)


def test_eval_file_with_nothing_usable_names_the_file(tmp_path):
    config = small_config(special_tokens="refuse")
    with pytest.raises(ValueError, match=r"config.sft.eval_file = 'e.jsonl': no SFT examples "
                                         r"left .*set config.data.special_tokens='plain'"):
        sft_dataset([SFTExample("hi <|user|>", "x")], TOKENIZER, GLM4_TEMPLATE, config,
                    shuffle=False, num_epochs=1, drop_remainder=False,
                    source="config.sft.eval_file = 'e.jsonl'")


# --- pairs that cannot teach ----------------------------------------------------------------------


def test_ties_and_identical_pairs_are_dropped_and_reported():
    pairs = [PreferencePair("q", "a", "b", tie=True), PreferencePair("q", "same", "same"),
             PreferencePair("q", "good", "bad")]
    data = PreferenceDataset(pairs, TOKENIZER, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                             num_epochs=1, **LIMITS)
    report = data.report
    assert (report.num_kept, report.num_dropped, report.num_ties, report.num_identical) == (
        1, 2, 1, 1)
    assert "1 pairs are ties, 1 have chosen == rejected: dropped" in str(report)
    [batch] = list(data)
    assert TOKENIZER.decode(batch["chosen_ids"][0][batch["chosen_response_mask"][0]]) == "good"


def test_rm_training_on_ties_only_is_refused_naming_the_file(tmp_path):
    config = small_config()
    write_jsonl(tmp_path / "ties.jsonl", [PreferencePair(f"q{i}", "a", "b", tie=True)
                                          for i in range(4)]
                + [PreferencePair("q", "same", "same")])
    config.rm.train_file = str(tmp_path / "ties.jsonl")
    with pytest.raises(ValueError, match=rf"config.rm.train_file = '{tmp_path}/ties.jsonl': no "
                                         r"preference pairs left .*4 pairs are ties, 1 have "
                                         "chosen == rejected.*not ties"):
        train_reward_model(config, tmp_path / "w")


def test_dpo_pairs_with_chosen_equal_rejected_only_are_refused():
    with pytest.raises(ValueError, match=r"config.dpo.train_file = 'p.jsonl': no preference "
                                         r"pairs left .*0 pairs are ties, 2 have chosen =="):
        dpo_module._dataset([PreferencePair("q", "x", "x"), PreferencePair("r", "y", "y")],
                            TOKENIZER, GLM4_TEMPLATE, small_config(),
                            source="config.dpo.train_file = 'p.jsonl'")


# --- special tokens in record text ----------------------------------------------------------------


def special_ids(tokenizer):
    return {tokenizer.token_to_id(t) for t in ("<|user|>", "<|assistant|>", "<|endoftext|>",
                                                "[gMASK]", "<sop>")} - {None}


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    sentences = ["hello world how are you", "the user asks and the assistant answers",
                 "a < b | c > d [x] e", "hi there"] * 4
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=60, model_type="bpe",
        user_defined_symbols=["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer.from_file(path)


@pytest.mark.parametrize("backend", ["hf", "sentencepiece"])
def test_special_token_text_encodes_as_plain_text(backend, sp_tokenizer):
    tokenizer = TOKENIZER if backend == "hf" else sp_tokenizer
    text = "hi <|user|> there"
    assert tokenizer.encode(text) != tokenizer.encode_plain(text)  # the library alone would
    ids = tokenizer.encode_plain(text)
    assert not special_ids(tokenizer) & set(ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode_plain("hi there") == tokenizer.encode("hi there")  # unchanged

    # In a chat, only the template's own <|user|> is the special id.
    ids = encode_chat(tokenizer, GLM4_TEMPLATE, "ask <|user|><|assistant|> me",
                      history=(("a <|endoftext|>", "b"),))
    user, assistant = tokenizer.token_to_id("<|user|>"), tokenizer.token_to_id("<|assistant|>")
    assert (ids.count(user), ids.count(assistant)) == (2, 2)
    assert tokenizer.token_to_id("<|endoftext|>") not in ids
    if backend == "hf":  # the small sentencepiece vocab has no piece for "\n"
        rendered = GLM4_TEMPLATE.render("ask <|user|><|assistant|> me",
                                        (("a <|endoftext|>", "b"),))
        assert tokenizer.decode(ids, skip_special_tokens=False) == rendered


def test_special_tokens_plain_or_refuse_in_datasets():
    examples = [SFTExample("q", "answer <|endoftext|> more"), SFTExample("q <|user|>", "fine"),
                SFTExample("q", "clean")]
    plain = SFTDataset(examples, TOKENIZER, GLM4_TEMPLATE, batch_size=3, shuffle=False,
                       num_epochs=1, **LIMITS)
    assert (plain.report.num_kept, plain.report.num_special_plain) == (3, 2)
    assert "2 hold special-token text (e.g. <|user|>): encoded as plain text" in str(plain.report)
    batch = plain[0]
    eos = TOKENIZER.eos_token_ids[0]
    response = batch["input_ids"][0][batch["loss_mask"][0]]
    assert list(response).count(eos) == 1 and response[-1] == eos  # ends only at its end

    refuse = SFTDataset(examples, TOKENIZER, GLM4_TEMPLATE, batch_size=1, shuffle=False,
                        num_epochs=1, special_tokens="refuse", **LIMITS)
    assert (refuse.report.num_kept, refuse.report.num_dropped,
            refuse.report.num_special_dropped) == (1, 2, 2)
    assert "2 hold special-token text (e.g. <|user|>): dropped" in str(refuse.report)

    pairs = [PreferencePair("q", "good <|assistant|>", "bad"), PreferencePair("q", "a", "b")]
    report = PreferenceDataset(pairs, TOKENIZER, GLM4_TEMPLATE, batch_size=1,
                               special_tokens="refuse", **LIMITS).report
    assert (report.num_kept, report.num_special_dropped) == (1, 1)
    with pytest.raises(ValueError, match=r"got 'keep' \(config.data.special_tokens\)"):
        SFTDataset(examples, TOKENIZER, GLM4_TEMPLATE, batch_size=1, special_tokens="keep",
                   **LIMITS)


def test_trainer_passes_special_tokens_from_config(tmp_path, capsys):
    config = small_config(special_tokens="refuse")
    write_jsonl(tmp_path / "sft.jsonl", [SFTExample("q <|user|>", "x")])
    config.sft.train_file = str(tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match=rf"config.sft.train_file = '{tmp_path}/sft.jsonl': no "
                                         "SFT examples left"):
        train_sft(config, tmp_path / "w")


# --- PPO prompts ----------------------------------------------------------------------------------


def test_prompts_drop_or_truncate_and_report(capsys):
    prompts = [PromptExample("short"), PromptExample("word " * 40), PromptExample("<|user|>")]
    config = small_config(truncation="drop")
    kept, ids, mask = encode_prompt_file(prompts, TOKENIZER, GLM4_TEMPLATE, config.data,
                                         "config.ppo.prompt_file")
    assert [p.prompt for p in kept] == ["short", "<|user|>"]
    assert ids.shape == (2, 16) and mask[:, -1].all()
    assert TOKENIZER.decode(ids[0][mask[0]]) == "\nshort\n"
    out = capsys.readouterr().out
    assert "config.ppo.prompt_file: 2 of 3 records kept" in out
    assert "1 too long: dropped (config.data.truncation='drop')" in out
    assert "1 hold special-token text (e.g. <|user|>): encoded as plain text" in out

    config = small_config(truncation="truncate")
    kept, ids, mask = encode_prompt_file(prompts, TOKENIZER, GLM4_TEMPLATE, config.data,
                                         "config.ppo.prompt_file")
    assert len(kept) == 3 and mask[1].all()
    assert "3 of 3 records kept; 1 prompts and 0 responses truncated" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"config.ppo.prompt_file: no prompts left \(0 of 1 "
                                         r"records kept.*config.data.truncation='truncate'"):
        encode_prompt_file(prompts[1:2], TOKENIZER, GLM4_TEMPLATE,
                           small_config(truncation="drop").data, "config.ppo.prompt_file")


def test_missing_prompt_file_names_the_field(tmp_path):
    from glm_jax.train.common import read_prompts

    with pytest.raises(FileNotFoundError, match=r"config.ppo.prompt_file = '.*nope.jsonl'"):
        read_prompts(str(tmp_path / "nope.jsonl"), "config.ppo.prompt_file")


def test_nothing_written_by_a_failed_read(tmp_path):
    # A refused run leaves the user's files as they were.
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"\xff\n")
    before = path.read_bytes()
    with pytest.raises(DataError):
        read_jsonl(path, "sft", field="config.sft.train_file")
    assert path.read_bytes() == before and sorted(Path(tmp_path).iterdir()) == [path]
