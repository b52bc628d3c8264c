"""Checkpoint chat templates (tokenizer_config.json's Jinja ``chat_template``) against
transformers' ``apply_chat_template``, the response's token span, system messages, and the
EOS ids of generation_config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CHATGLM3_CHAT_TEMPLATE, GLM4_CHAT_TEMPLATE
from transformers import PreTrainedTokenizerFast

from glm_jax.data import PreferencePair, PromptExample, SFTExample, read_jsonl, write_jsonl
from glm_jax.data.chat_template import (
    GLM4_TEMPLATE,
    JinjaChatTemplate,
    encode_chat,
    encode_response,
    response_text,
    template_for,
)
from glm_jax.data.datasets import tokenize_pair
from glm_jax.data.tokenizer import TINY_TOKENIZER_PATH, Tokenizer

CHATGLM3 = CHATGLM3_CHAT_TEMPLATE
GLM4 = GLM4_CHAT_TEMPLATE
# ChatML-style: each turn closed by the EOS token and a newline, the system message optional,
# written with whitespace control as Hub templates are.
CLOSED_TURNS = ("{%- for m in messages %}\n"
                "    {{- '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}\n"
                "{%- endfor %}\n"
                "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")
TEMPLATES = {"chatglm3": CHATGLM3, "glm4": GLM4, "closed_turns": CLOSED_TURNS}

CONVERSATIONS = [
    ("What is 2 + 2?", (), None),
    ("And times 3?", (("What is 2 + 2?", "4."),), None),
    ("你好，世界？", (("hi", "hello!"), ("how are you", "fine\nthanks")), None),
    ("What is 2 + 2?", (), "You are terse."),
    ("And times 3?", (("What is 2 + 2?", "4."),), "You are terse."),
    ("Say {braces} and <b>tags</b>", (("a", "b"), ("c", "d")), "系统 message"),
]


def _messages(prompt, history, system):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in history:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": prompt}]


def _checkpoint_dir(tmp_path: Path, chat_template: str, **extra) -> Path:
    """A tokenizer directory as a checkpoint ships it: the bundled tiny tokenizer.json and a
    tokenizer_config.json holding `chat_template`."""
    shutil.copy(TINY_TOKENIZER_PATH, tmp_path / "tokenizer.json")
    config = {"chat_template": chat_template, "eos_token": "<|endoftext|>",
              "pad_token": "<pad>", **extra}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def _reference(chat_template: str) -> PreTrainedTokenizerFast:
    reference = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER_PATH),
                                        eos_token="<|endoftext|>", pad_token="<pad>")
    reference.chat_template = chat_template
    return reference


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS)
def test_rendering_equals_transformers_apply_chat_template(tmp_path, name, prompt, history,
                                                            system):
    tokenizer = Tokenizer.from_dir(_checkpoint_dir(tmp_path, TEMPLATES[name]))
    template = template_for("auto", tokenizer)
    assert isinstance(template, JinjaChatTemplate)
    reference = _reference(TEMPLATES[name])
    messages = _messages(prompt, history, system)

    expected = reference.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    assert template.render(prompt, history, system) == expected
    parts = template.parts(prompt, history, system)
    assert "".join(text for text, _ in parts) == expected
    contents = [text for text, is_content in parts if is_content]
    assert contents == [m["content"] for m in messages]

    # The whole conversation, the response included, is the prompt then the response parts.
    response = "Four, 四."
    full = reference.apply_chat_template([*messages, {"role": "assistant",
                                                      "content": response}], tokenize=False)
    response_parts = template.response_parts(response, prompt, history, system)
    assert expected + "".join(text for text, _ in response_parts) == full
    assert [text for text, is_content in response_parts if is_content] == [response]


@pytest.mark.parametrize("name", ["glm4", "closed_turns"])
def test_prompt_and_response_tokens_are_the_rendered_conversation(tmp_path, name):
    """The loss and the reward sit on the right tokens: prompt ids + response ids are the ids
    of the checkpoint's rendering of the whole conversation, cut after the turn's EOS."""
    tokenizer = Tokenizer.from_dir(_checkpoint_dir(tmp_path, TEMPLATES[name]))
    template = template_for("checkpoint", tokenizer)
    reference = _reference(TEMPLATES[name])
    eos = tokenizer.token_to_id("<|endoftext|>")
    for prompt, history, system in CONVERSATIONS:
        messages = _messages(prompt, history, system)
        prompt_ids = encode_chat(tokenizer, template, prompt, history, system)
        assert prompt_ids == reference.apply_chat_template(messages, tokenize=True,
                                                           add_generation_prompt=True,
                                                           return_dict=False)
        response_ids = encode_response(tokenizer, template, "Four.", prompt, history, system)
        full = reference.apply_chat_template([*messages, {"role": "assistant",
                                                          "content": "Four."}],
                                             tokenize=True, return_dict=False)
        if name == "glm4":  # the turn has no closing text: EOS is appended
            assert prompt_ids + response_ids == full + [eos]
            assert tokenizer.decode(response_ids) == "\nFour."
        else:  # the closing text's EOS ends the response; the newline after it is dropped
            assert prompt_ids + response_ids == full[:-1]
            assert response_ids[-1] == eos
        pair = tokenize_pair(PreferencePair(prompt, "Four.", "Five.", history=history,
                                            system=system),
                             tokenizer, template, max_prompt_tokens=256,
                             max_response_tokens=64)
        assert pair.prompt_ids == prompt_ids and pair.chosen_ids == response_ids


def test_chatglm3_template_with_a_sentencepiece_style_space(tmp_path):
    """ChatGLM3's template writes "\\n " before each content; the response's lead is that text,
    and decoded samples lose it again before they become records."""
    template = template_for("auto", Tokenizer.from_dir(_checkpoint_dir(tmp_path, CHATGLM3)))
    assert template.prefix == "[gMASK]sop<|user|>"
    assert template.response_parts("ok", "q") == [("\n ", False), ("ok", True)]
    assert template.response_lead == "\n "
    assert response_text(template, "\n ok") == "ok"
    assert response_text(template, "ok") == "ok"  # no lead to strip
    assert response_text(GLM4_TEMPLATE, "\nok") == "\nok"  # the built-in has no lead


def test_special_token_strings_in_records_stay_plain_text_under_a_jinja_template(tmp_path):
    tokenizer = Tokenizer.from_dir(_checkpoint_dir(tmp_path, GLM4))
    template = template_for("auto", tokenizer)
    user = tokenizer.token_to_id("<|user|>")
    ids = encode_chat(tokenizer, template, "hi <|user|> there", system="be <|user|>")
    assert ids.count(user) == 1  # the template's own turn token only
    response = encode_response(tokenizer, template, "end<|endoftext|>", "q")
    assert response.count(tokenizer.token_to_id("<|endoftext|>")) == 1  # the appended EOS


def test_an_empty_response_keeps_its_turn(tmp_path):
    """GLM-4's template leaves out an empty message; a sampled response that is EOS at once
    still gets the turn's lead text, then EOS."""
    tokenizer = Tokenizer.from_dir(_checkpoint_dir(tmp_path, GLM4))
    template = template_for("auto", tokenizer)
    assert encode_response(tokenizer, template, "", "q") == (
        tokenizer.encode("\n") + [tokenizer.token_to_id("<|endoftext|>")])


def test_templates_that_rewrite_contents_or_split_the_generation_prompt_are_refused(tmp_path):
    trims = JinjaChatTemplate("{% for m in messages %}<|user|>{{ m['content'] | trim }}"
                              "{% endfor %}", origin="ckpt/tokenizer_config.json")
    with pytest.raises(ValueError, match=r"ckpt/tokenizer_config.json: the template changes "
                                         r"the messages' text"):
        trims.parts("  padded  ")
    # The generation prompt is not a prefix of the assistant's turn: no response span.
    mismatch = JinjaChatTemplate(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")
    with pytest.raises(ValueError, match="response's tokens cannot be located"):
        mismatch.response_parts("r", "q")
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        JinjaChatTemplate("{% for m in messages %}")
    raising = JinjaChatTemplate("{{ raise_exception('no system messages') }}")
    with pytest.raises(ValueError, match="rendering failed: no system messages"):
        raising.parts("q")


def test_template_choice_auto_checkpoint_and_built_in(tmp_path):
    plain = Tokenizer.tiny()  # ships no tokenizer_config.json
    assert template_for("auto", plain) is GLM4_TEMPLATE
    with pytest.raises(ValueError, match=r"'checkpoint'.*tokenizer_config.json is missing or "
                                         r"has no chat_template"):
        template_for("checkpoint", plain)
    with pytest.raises(ValueError, match="choose one of"):
        template_for("llama", plain)
    own = Tokenizer.from_dir(_checkpoint_dir(tmp_path, GLM4))
    assert template_for("glm4", own) is GLM4_TEMPLATE
    # The newer format: a list of named templates, of which "default" renders chats.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": GLM4}]}))
    listed = template_for("auto", Tokenizer.from_dir(tmp_path))
    assert listed.render("q") == "[gMASK]<sop><|user|>\nq<|assistant|>"


def test_builtin_template_renders_a_system_message():
    assert GLM4_TEMPLATE.render("q", (("a", "b"),), system="s") == (
        "[gMASK]<sop><|system|>\ns<|user|>\na<|assistant|>\nb<|user|>\nq<|assistant|>\n")
    assert GLM4_TEMPLATE.render("q") == "[gMASK]<sop><|user|>\nq<|assistant|>\n"


def test_system_field_round_trips_through_jsonl(tmp_path):
    records = {
        "preference": PreferencePair("q", "a", "b", system="be brief"),
        "sft": SFTExample("q", "a", history=(("u", "v"),), system=""),
        "prompt": PromptExample("q", system="系统"),
    }
    for kind, record in records.items():
        write_jsonl(tmp_path / f"{kind}.jsonl", [record, PromptExample("q")]
                    if kind == "prompt" else [record])
        read, _ = read_jsonl(tmp_path / f"{kind}.jsonl", kind)
        assert read[0] == record
    assert "system" not in PromptExample("q").to_json()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "system": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: system: expected a string, got number"):
        read_jsonl(tmp_path / "bad.jsonl", "prompt")


def test_eos_ids_come_from_generation_config(tmp_path):
    shutil.copy(TINY_TOKENIZER_PATH, tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [1, 5, 7]  # the candidates' ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == [7, 1]
    assert encode_response(tokenizer, GLM4_TEMPLATE, "ok", "q")[-1] == 7
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 6}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == [6]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 99999]}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id \[99999\] is "
                                         r"outside the vocab"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_tokenizer_files_carry_the_configs_into_a_workdir(tmp_path):
    from glm_jax.train.common import save_tokenizer

    (tmp_path / "ckpt").mkdir()
    source = _checkpoint_dir(tmp_path / "ckpt", GLM4)
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    (tmp_path / "work").mkdir()
    save_tokenizer(Tokenizer.from_dir(source), tmp_path / "work")
    copied = Tokenizer.from_dir(tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert copied.eos_token_ids == [1, 5]
    assert template_for("auto", copied).render("q") == "[gMASK]<sop><|user|>\nq<|assistant|>"


def test_sft_from_a_checkpoint_with_its_own_template_and_eos(tmp_path):
    """A checkpoint directory as users download it (weights, tokenizer.json, its
    tokenizer_config.json chat template, generation_config.json) trains with
    config.data.template = "checkpoint", and the workdir and its hf/ export carry the same
    tokenizer, template and EOS ids (config.json's too) to the next stage."""
    from conftest import tiny_sft_config

    from glm_jax.models.tiny import write_tiny_checkpoint
    from glm_jax.train.sft import train_sft

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": GLM4}))
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 1]}))
    config = tiny_sft_config(tmp_path, num_steps=2, eval_every=2, checkpoint_every=2)
    config.model.init_checkpoint = str(checkpoint)
    config.data.template = "checkpoint"
    train_sft(config, tmp_path / "sft")
    for where in (tmp_path / "sft", tmp_path / "sft" / "hf"):
        tokenizer = Tokenizer.from_dir(where)
        assert tokenizer.eos_token_ids == [5, 1]
        template = template_for("checkpoint", tokenizer)
        assert template.render("q", system="s") == (
            "[gMASK]<sop><|system|>\ns<|user|>\nq<|assistant|>")
    assert json.loads((tmp_path / "sft" / "hf" / "config.json").read_text())[
        "eos_token_id"] == [5, 1]


def test_a_record_the_template_refuses_is_named(tmp_path):
    """Many checkpoints' templates raise_exception on what they do not support (here: system
    messages); the error names the data source and the record."""
    from glm_jax.data import SFTDataset

    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer = Tokenizer.from_dir(_checkpoint_dir(tmp_path, no_system))
    examples = [SFTExample("a", "b"), SFTExample("c", "d", system="be brief")]
    with pytest.raises(ValueError, match=r"config.sft.train_file = 'x.jsonl': record 2: .*"
                                         r"rendering failed: System role not supported"):
        SFTDataset(examples, tokenizer, template_for("auto", tokenizer), batch_size=1,
                   max_prompt_tokens=32, max_response_tokens=8,
                   source="config.sft.train_file = 'x.jsonl'")
