"""Tests for glm_jax.data.tokenizer: both backends, the bundled tiny tokenizer, chat templates."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import sentencepiece_model
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from glm_jax.data import (
    CHATGLM3_TEMPLATE,
    GLM4_TEMPLATE,
    ChatTemplate,
    Tokenizer,
    encode_chat,
)
from glm_jax.data.tokenizer import TINY_TOKENIZER_PATH

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATOR_SCRIPT = REPO_ROOT / "scripts" / "make_tiny_tokenizer.py"

TINY_SPECIAL_IDS = {
    "<pad>": 0,
    "<|endoftext|>": 1,
    "[gMASK]": 2,
    "<sop>": 3,
    "<|system|>": 4,
    "<|user|>": 5,
    "<|assistant|>": 6,
    "<|observation|>": 7,
}

ROUND_TRIP_TEXTS = [
    "héllo wörld 你好",
    "The quick brown fox jumps over the lazy dog.",
    "0123456789 3.14159 -42 1e10",
    "line one\nline two\n\n  indented\ttab\r\n",
    "  leading and trailing spaces  ",
    "emoji 🎉 and combining é and Ω≈ç√",
    "",
]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.tiny()


# --- tiny tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tiny.vocab_size for i in ids)
    assert tiny.decode(ids) == text
    assert tiny.decode(ids, skip_special_tokens=False) == text


def test_tiny_learned_merges_compress_english(tiny: Tokenizer) -> None:
    # Pure byte-level (no merges) would need one id per byte.
    text = "the answer is the best"
    assert len(tiny.encode(text)) < len(text.encode("utf-8")) // 2


def test_tiny_special_tokens_have_fixed_single_ids(tiny: Tokenizer) -> None:
    for token, expected in TINY_SPECIAL_IDS.items():
        assert tiny.token_to_id(token) == expected
        assert tiny.encode(token) == [expected]
    ids = tiny.encode("[gMASK]<sop><|user|>\nhi")
    assert ids[:3] == [2, 3, 5]
    assert ids[3:] == tiny.encode("\nhi")
    assert 2 not in tiny.encode("[gMASK")  # a partial special string is plain text


def test_encode_ignores_post_processor(tmp_path: Path) -> None:
    # GLM-4's tokenizer.json carries a post-processor that prepends [gMASK]<sop>; the chat
    # template already writes them, so encode() must not add them a second time.
    hf = HFTokenizer.from_file(str(TINY_TOKENIZER_PATH))
    hf.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", 2), ("<sop>", 3)]
    )
    assert hf.encode("hello world").ids[:2] == [2, 3]  # the processor is active
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = Tokenizer.from_file(path)
    assert tok.encode("hello world") == Tokenizer.tiny().encode("hello world")
    assert not set(tok.encode("hello world")) & set(TINY_SPECIAL_IDS.values())


def test_tiny_decode_skips_special_tokens_by_default(tiny: Tokenizer) -> None:
    text = "[gMASK]<sop><|user|>\nhi<|assistant|>\nhello<|endoftext|>"
    ids = tiny.encode(text)
    assert tiny.decode(ids) == "\nhi\nhello"
    assert tiny.decode(ids, skip_special_tokens=False) == text


def test_tiny_eos_pad_and_vocab(tiny: Tokenizer) -> None:
    assert tiny.eos_token_ids == [1, 5, 7]
    assert tiny.pad_token_id == 0
    assert 8 + 256 <= tiny.vocab_size <= 512
    assert tiny.token_to_id("</s>") is None


# --- chat template ------------------------------------------------------------------------------

HISTORY = [("What is 1+1?", "2"), ("And {2+2}?", "4")]


def test_glm4_template_render_exact() -> None:
    expected = (
        "[gMASK]<sop>"
        "<|user|>\nWhat is 1+1?<|assistant|>\n2"
        "<|user|>\nAnd {2+2}?<|assistant|>\n4"
        "<|user|>\nThanks!<|assistant|>\n"
    )
    assert GLM4_TEMPLATE.render("Thanks!", HISTORY) == expected
    assert ChatTemplate() == GLM4_TEMPLATE


def test_chatglm3_template_render_exact() -> None:
    expected = (
        "[gMASK]sop"
        "<|user|>\n What is 1+1?<|assistant|>\n 2"
        "<|user|>\n And {2+2}?<|assistant|>\n 4"
        "<|user|>\n Thanks!<|assistant|>"
    )
    assert CHATGLM3_TEMPLATE.render("Thanks!", HISTORY) == expected


def test_template_without_history() -> None:
    assert GLM4_TEMPLATE.render("hi") == "[gMASK]<sop><|user|>\nhi<|assistant|>\n"


@pytest.mark.parametrize(
    "bad_entry",
    [("only one",), ("q", "a", "extra"), ("q", 3), "qa", None],
)
def test_template_bad_history_entry_names_index(bad_entry: object) -> None:
    history = [("q0", "a0"), ("q1", "a1"), bad_entry]
    with pytest.raises(ValueError, match=r"history\[2\]"):
        GLM4_TEMPLATE.render("p", history)  # type: ignore[arg-type]


def test_template_requires_content_placeholder() -> None:
    with pytest.raises(ValueError, match="user"):
        ChatTemplate(user="<|user|>\n")


def test_encode_chat_token_layout(tiny: Tokenizer) -> None:
    ids = encode_chat(tiny, GLM4_TEMPLATE, "hi", [("q", "a")])
    assert ids == tiny.encode(GLM4_TEMPLATE.render("hi", [("q", "a")]))
    newline = tiny.encode("\n")
    assert ids == (
        [2, 3, 5]
        + tiny.encode("\nq")
        + [6]
        + tiny.encode("\na")
        + [5]
        + tiny.encode("\nhi")
        + [6]
        + newline
    )


# --- sentencepiece backend ----------------------------------------------------------------------

SP_SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world how are you today",
    "the reward model scores the response",
    "a chosen and a rejected answer",
    "we train the policy with ppo",
    "the assistant answers the user",
]
SP_USER_SYMBOLS = ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("sp")
    (model_dir / "tokenizer.model").write_bytes(
        sentencepiece_model(SP_SENTENCES * 4, 60, user_defined_symbols=SP_USER_SYMBOLS))
    return model_dir


def test_sentencepiece_round_trip(sp_dir: Path) -> None:
    tok = Tokenizer.from_dir(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert tok.vocab_size == sp.get_piece_size()
    for sentence in SP_SENTENCES:
        ids = tok.encode(sentence)
        assert ids == sp.encode_as_ids(sentence)
        assert tok.decode(ids) == sentence


def test_sentencepiece_special_tokens(sp_dir: Path) -> None:
    tok = Tokenizer.from_dir(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for symbol in SP_USER_SYMBOLS:
        assert tok.token_to_id(symbol) == sp.piece_to_id(symbol)
        assert tok.encode(symbol) == [sp.piece_to_id(symbol)]
    # </s> is a control piece: sentencepiece alone would encode it as plain characters.
    assert tok.encode("</s>") == [sp.eos_id()]
    assert tok.token_to_id("not-a-piece") is None

    text = "[gMASK]<sop><|user|>" + SP_SENTENCES[1] + "<|assistant|>" + SP_SENTENCES[2]
    ids = tok.encode(text)
    assert ids[:3] == [sp.piece_to_id(s) for s in ("[gMASK]", "<sop>", "<|user|>")]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == SP_SENTENCES[1] + SP_SENTENCES[2]

    assert tok.eos_token_ids == [
        sp.piece_to_id("<|endoftext|>"),
        sp.piece_to_id("<|user|>"),
        sp.eos_id(),
    ]
    assert tok.pad_token_id == sp.piece_to_id("<|endoftext|>")
    # The id -> (token, special) table the reward-model check compares: every piece, and
    # special exactly for the ids encode() splits out of text.
    table = tok.token_table()
    assert sorted(table) == list(range(sp.get_piece_size()))
    assert {i for i, (_, special) in table.items() if special} == {
        i for i in range(sp.get_piece_size())
        if sp.is_control(i) or tok.encode(sp.id_to_piece(i)) == [i]}
    assert table[sp.piece_to_id("<|user|>")] == ("<|user|>", True)


# --- loading ------------------------------------------------------------------------------------


def test_from_dir_missing_names_both_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert "tokenizer.json" in message
    assert "tokenizer.model" in message
    assert str(tmp_path) in message


def test_from_dir_prefers_json(tmp_path: Path) -> None:
    shutil.copy(TINY_TOKENIZER_PATH, tmp_path / "tokenizer.json")
    # Not a valid sentencepiece model: loading it would raise.
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == Tokenizer.tiny().vocab_size
    assert tok.encode("[gMASK]") == [2]


def test_from_file_rejects_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"\.txt"):
        Tokenizer.from_file(path)


# --- asset reproducibility ----------------------------------------------------------------------


def test_tiny_asset_is_reproducible(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", GENERATOR_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = tmp_path / "tiny_tokenizer.json"
    size = module.write_tiny_tokenizer(out)
    assert size == Tokenizer.tiny().vocab_size
    assert out.read_bytes() == TINY_TOKENIZER_PATH.read_bytes()
