"""Tests for the GLM tokenizer forms beyond tokenizer.json: ChatGLM3's sentencepiece model with
special tokens appended after its vocab, and GLM-4's original tiktoken ranks ``tokenizer.model``.

Every tokenizer is built in the test (no downloads); ids are checked against independent
references: a re-derivation of ChatGLM3's remote SPTokenizer over ``sentencepiece``, and for
GLM-4 transformers' ``TikTokenConverter`` (the same ranks file as a ``tokenizers`` BPE).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from conftest import (
    CHATGLM3_CHAT_TEMPLATE,
    GLM4_CHAT_TEMPLATE,
    sentencepiece_model,
    tiny_sft_config,
)
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from glm_jax.data import Tokenizer
from glm_jax.data.chat_template import (
    CHATGLM3_TEMPLATE,
    encode_chat,
    encode_response,
    template_for,
)
from glm_jax.data.tokenizer import CHATGLM3_SPECIAL_TOKENS, GLM4_TIKTOKEN_SPECIAL_TOKENS

# Written out here rather than imported: what THUDM's remote code appends, in its order.
CHATGLM3_NAMES = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_NAMES = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
              "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>",
              "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? I'm fine, you're kind.",
    "the reward model scores each response of the policy",
    "Aesop wrote fables and the sopranos sang a song",
    "we'll train it with 12345 steps and 3.14159 as a constant",
    "我们用强化学习训练语言模型",
    "你好，世界！今天天气很好。",
    "助手回答用户的问题，模型学习数据。",
    "模型 model 数据 data 训练 train 你好 hello",
]


def test_constants_match_the_remote_tables() -> None:
    assert list(CHATGLM3_SPECIAL_TOKENS) == CHATGLM3_NAMES
    assert list(GLM4_TIKTOKEN_SPECIAL_TOKENS) == GLM4_NAMES


# --- ChatGLM3: sentencepiece + appended special tokens ------------------------------------------


class ChatGLM3Reference:
    """What chatglm3-6b's tokenization_chatglm.py (SPTokenizer, build_chat_input) does, over a
    plain SentencePieceProcessor: special ids appended at sp.vocab_size() + i, looked up before
    the pieces; text encoded with sp.encode; decode writes special ids as their strings."""

    def __init__(self, model_file: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.special = {t: self.sp.vocab_size() + i for i, t in enumerate(CHATGLM3_NAMES)}
        self.index_special = {i: t for t, i in self.special.items()}

    def encode_segments(self, segments: list[tuple[str, bool]]) -> list[int]:
        """(text, is_special) segments -> ids: a special by its id, text by sp.encode."""
        ids: list[int] = []
        for text, special in segments:
            ids += [self.special[text]] if special else self.sp.encode(text)
        return ids

    def build_chat_input(self, query: str, history: list[dict[str, str]]) -> list[int]:
        ids = [self.special["[gMASK]"], self.special["sop"]]
        for message in [*history, {"role": "user", "content": query}]:
            ids += [self.special[f"<|{message['role']}|>"]]
            ids += self.sp.encode(message.get("metadata", "") + "\n")
            ids += self.sp.encode(message["content"])
        return ids + [self.special["<|assistant|>"]]

    def decode(self, ids: list[int]) -> str:
        text, buffer = "", []
        for i in ids:
            if i in self.index_special:
                if buffer:
                    text += self.sp.decode(buffer)
                    buffer = []
                text += self.index_special[i]
            else:
                buffer.append(i)
        return text + (self.sp.decode(buffer) if buffer else "")


@pytest.fixture(scope="module")
def chatglm3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentencepiece model without GLM pieces, named ChatGLMTokenizer in its config."""
    model_dir = tmp_path_factory.mktemp("chatglm3")
    (model_dir / "tokenizer.model").write_bytes(
        sentencepiece_model(CORPUS * 8, 400, byte_fallback=True))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ChatGLMTokenizer", "padding_side": "left"}))
    return model_dir


# Every appended special token, between texts with Chinese, emoji (byte-fallback), digits.
CHATGLM3_SEGMENTS: list[tuple[str, bool]] = [
    ("[gMASK]", True), ("sop", True), ("<|system|>", True),
    ("\nYou are a helpful 助手.", False), ("<|user|>", True),
    ("\n你好 🎉 hello world, what's 1+1?", False), ("<|assistant|>", True),
    ("\n答案: 2 😀", False), ("<|observation|>", True), ("\n[tool output] 42 ", False),
    ("[MASK]", True), (" x ", False), ("[sMASK]", True), ("eop", True), ("\n", False),
]


def test_chatglm3_encode_matches_remote(chatglm3_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatglm3_dir)
    ref = ChatGLM3Reference(chatglm3_dir / "tokenizer.model")
    text = "".join(t for t, _ in CHATGLM3_SEGMENTS)
    ids = tok.encode(text)
    assert ids == ref.encode_segments(CHATGLM3_SEGMENTS)
    assert ref.sp.unk_id() not in ids  # emoji went through byte fallback, not <unk>
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
    assert tok.decode(ids) == "".join(t for t, special in CHATGLM3_SEGMENTS if not special)


def test_chatglm3_ids_and_vocab(chatglm3_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatglm3_dir)
    sp = spm.SentencePieceProcessor(model_file=str(chatglm3_dir / "tokenizer.model"))
    size = sp.vocab_size()
    assert tok.vocab_size == size + 9
    for i, name in enumerate(CHATGLM3_NAMES):
        assert tok.token_to_id(name) == size + i
        assert tok.encode(name) == [size + i]
    assert tok.token_to_id("</s>") == sp.eos_id() == 2
    table = tok.token_table()
    assert sorted(table) == list(range(size + 9))
    assert table[size + 3] == ("sop", True)
    assert table[sp.piece_to_id("▁the")] == ("▁the", False)
    assert 2 in tok.eos_token_ids
    # EOS_TOKEN_CANDIDATES order: <|user|>, <|observation|>, </s>; pad: </s> (no <pad> piece).
    assert tok.eos_token_ids == [size + 6, size + 8, 2]
    assert tok.pad_token_id == 2


def test_chatglm3_build_chat_input(chatglm3_dir: Path) -> None:
    """The remote build_chat_input's ids, from glm_jax's encode of the template text and
    encode_plain of the contents (which hold special-token strings, spelled as text)."""
    tok = Tokenizer.from_dir(chatglm3_dir)
    ref = ChatGLM3Reference(chatglm3_dir / "tokenizer.model")
    history = [{"role": "system", "content": "be brief <|user|> sop"},
               {"role": "user", "content": "Aesop 你好?"},
               {"role": "assistant", "content": "fables 🎉 eop [gMASK]"}]
    query = "and the sopranos?"
    ids = tok.encode("[gMASK]sop")
    for message in [*history, {"role": "user", "content": query}]:
        ids += tok.encode(f"<|{message['role']}|>\n") + tok.encode_plain(message["content"])
    ids += tok.encode("<|assistant|>")
    assert ids == ref.build_chat_input(query, history)


CHATGLM3_CHATS = [  # (system, [(user, assistant), ...], query, response)
    (None, [], "你好", "Hello 🎉"),
    ("You are a helpful 助手.", [("hi", "hello!")], "what's 1+1?", "2"),
    ("be brief <|user|> sop", [("Aesop 你好?", "fables 🎉 eop [gMASK]")],
     "and the sopranos? <|observation|>", "sop <|assistant|> eop"),
]


def test_chatglm3_chat_templates_give_the_remote_ids(chatglm3_dir: Path, tmp_path: Path) -> None:
    """The checkpoint's own chat template (tokenizer_config.json) and glm_jax's chatglm3 format
    both encode a conversation as the remote build_chat_input does, special-token strings in
    the contents included; a response is what its fine-tuning code trains on after
    <|assistant|>: sp.encode("\\n") + sp.encode(response), then EOS."""
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((chatglm3_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHATGLM3_CHAT_TEMPLATE}))
    tok = Tokenizer.from_dir(tmp_path)
    ref = ChatGLM3Reference(tmp_path / "tokenizer.model")
    for system, pairs, query, response in CHATGLM3_CHATS:
        history = [{"role": "system", "content": system}] if system is not None else []
        for user, assistant in pairs:
            history += [{"role": "user", "content": user},
                        {"role": "assistant", "content": assistant}]
        for template in (template_for("checkpoint", tok), CHATGLM3_TEMPLATE):
            assert encode_chat(tok, template, query, pairs, system) == \
                ref.build_chat_input(query, history)
            ids = encode_response(tok, template, response, query, pairs, system)
            assert ids == ref.sp.encode("\n") + ref.sp.encode(response) + \
                [tok.eos_token_ids[0]]


def test_chatglm3_bare_word_specials(chatglm3_dir: Path) -> None:
    tok = Tokenizer.from_dir(chatglm3_dir)
    sp = spm.SentencePieceProcessor(model_file=str(chatglm3_dir / "tokenizer.model"))
    appended = set(range(sp.vocab_size(), sp.vocab_size() + 9))
    # Inside a word (any letter or digit next to it), "sop"/"eop" are ordinary text.
    for text in ("Aesop", "sopa", "Aesop's fables", "the sopranos", "eopsop", "sop1", "你sop"):
        assert tok.special_tokens_in(text) == []
        assert tok.encode(text) == sp.encode(text)
        assert tok.encode_plain(text) == sp.encode(text)
    assert tok.special_tokens_in("[gMASK]sop") == ["[gMASK]", "sop"]
    assert tok.special_tokens_in("[gMASK]sop<|user|>\nhi") == ["[gMASK]", "sop", "<|user|>"]
    assert tok.special_tokens_in("a sop to him, eop.") == ["sop", "eop"]
    assert tok.encode("x sop.") == sp.encode("x ") + [sp.vocab_size() + 3] + sp.encode(".")
    # Record text is spelled with ordinary pieces: the same ids sentencepiece alone gives.
    for text in ("<|user|> sop", "[gMASK]sop<|assistant|>eop", "a sop to him"):
        ids = tok.encode_plain(text)
        assert ids == sp.encode(text)
        assert not appended & set(ids)
        assert tok.decode(ids) == text


def test_chatglm3_needs_its_tokenizer_class(chatglm3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((chatglm3_dir / "tokenizer.model").read_bytes())
    plain = Tokenizer.from_dir(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert plain.vocab_size == sp.vocab_size()
    assert plain.token_to_id("<|user|>") is None
    assert plain.special_tokens_in("[gMASK]sop") == []
    # A copy made with files() keeps tokenizer_config.json, so the appended ids too.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in Tokenizer.from_dir(chatglm3_dir).files().items():
        (copy / name).write_bytes(data)
    assert Tokenizer.from_dir(copy).token_table() == Tokenizer.from_dir(chatglm3_dir).token_table()


# --- GLM-4: tiktoken ranks ----------------------------------------------------------------------


def train_ranks() -> dict[bytes, int]:
    """Byte-level BPE ranks learnt by ``tokenizers`` on CORPUS: all 256 bytes plus merges,
    ranked in the order they were learnt (what a tiktoken rank means)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS * 8, trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(to_byte[c] for c in token): i for token, i in hf.get_vocab().items()}


def write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    """One ``base64(token) rank`` line per token, in rank order, as GLM-4's tokenizer.model."""
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank
                              for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])))


def glm4_config(names_to_ids: dict[str, int]) -> dict[str, object]:
    return {"tokenizer_class": "ChatGLM4Tokenizer",
            "added_tokens_decoder": {str(i): {"content": name, "lstrip": False,
                                              "normalized": False, "rstrip": False,
                                              "single_word": False, "special": True}
                                     for name, i in names_to_ids.items()}}


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("glm4")
    ranks = train_ranks()
    write_ranks(model_dir / "tokenizer.model", ranks)
    specials = {name: len(ranks) + i for i, name in enumerate(GLM4_NAMES)}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(glm4_config(specials)))
    return model_dir


def test_glm4_original_checkpoint_from_sft_to_generation(glm4_dir: Path, tmp_path: Path) -> None:
    """A checkpoint as the original GLM-4 ships it (tiktoken tokenizer.model, its
    tokenizer_config.json with the chat template, generation_config.json): SFT runs on it with
    its own template; the export keeps the same token table and EOS ids, and
    scripts/generate.py on it answers as the library does with the checkpoint's template."""
    import importlib.util

    import glm_jax
    from glm_jax.generation import generate_text
    from glm_jax.models.tiny import write_tiny_checkpoint
    from glm_jax.train.sft import train_sft

    original = Tokenizer.from_dir(glm4_dir)
    checkpoint = write_tiny_checkpoint(tmp_path / "glm-4", vocab_size=768)
    (checkpoint / "tokenizer.json").unlink()  # the original checkpoints ship no tokenizer.json
    (checkpoint / "tokenizer.model").write_bytes((glm4_dir / "tokenizer.model").read_bytes())
    config = json.loads((glm4_dir / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": GLM4_CHAT_TEMPLATE}))
    eos = [original.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))

    sft = tiny_sft_config(tmp_path, num_steps=2, eval_every=2, checkpoint_every=2)
    sft.model.init_checkpoint, sft.data.template = str(checkpoint), "checkpoint"
    train_sft(sft, tmp_path / "sft")
    export = Tokenizer.from_dir(tmp_path / "sft" / "hf")
    assert export.path.name == "tokenizer.model"
    assert export.token_table() == original.token_table() and export.eos_token_ids == eos

    spec = importlib.util.spec_from_file_location(
        "generate_script", Path(__file__).resolve().parents[1] / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    texts = script.main(["--checkpoint", str(tmp_path / "sft" / "hf"), "--prompt", "你好",
                         "--max-new-tokens", "4"])
    model = glm_jax.from_pretrained(tmp_path / "sft" / "hf")
    assert texts == generate_text(model, export, ["你好"], max_new_tokens=4, temperature=0.0,
                                  template=template_for("checkpoint", export))


def converted(model_file: Path, specials: list[str] | None) -> HFTokenizer:
    """transformers' conversion of the ranks file to a tokenizers BPE (its own file reader;
    TIKTOKEN_CACHE_DIR="" since tiktoken's reader caches a file by its path otherwise)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", "")
        return TikTokenConverter(vocab_file=str(model_file), pattern=GLM4_PATTERN,
                                 extra_special_tokens=specials).converted()


GLM4_TEXTS = [
    "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nhello world<|assistant|>\n",
    "".join(GLM4_NAMES),
    "你好，世界！今天天气很好。🎉😀 emoji and 中文 mixed<|endoftext|>",
    "numbers 1234567 and 3.14159, -42; I'm sure you're right, we'll see, it's HE'S",
    "line one\nline two\r\n\n   indented\ttab  \n\n",
    "<|begin_of_image|>x<|end_of_image|><|begin_of_video|>  <|end_of_video|>[MASK][sMASK]<eop>",
    "  leading and trailing spaces  ",
    "",
]


@pytest.mark.parametrize("text", GLM4_TEXTS)
def test_glm4_encode_matches_converter(glm4_dir: Path, text: str) -> None:
    tok = Tokenizer.from_dir(glm4_dir)
    ref = converted(glm4_dir / "tokenizer.model", GLM4_NAMES)
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    # Plain: special strings spelled as text, as the converter without added tokens does.
    plain = tok.encode_plain(text)
    assert plain == converted(glm4_dir / "tokenizer.model", None).encode(text).ids
    assert not set(plain) & {tok.token_to_id(name) for name in GLM4_NAMES}
    assert tok.decode(plain) == text


def test_glm4_ids_vocab_and_table(glm4_dir: Path) -> None:
    tok = Tokenizer.from_dir(glm4_dir)
    ranks = train_ranks()
    n = len(ranks)
    assert tok.vocab_size == n + 14
    for i, name in enumerate(GLM4_NAMES):
        assert tok.token_to_id(name) == n + i
        assert tok.encode(name) == [n + i]
    # Hand-checked ids: a single byte, merged words, a merged Chinese character (3 bytes).
    assert tok.encode("a") == [ranks[b"a"]]
    assert b" the" in ranks and b"\xe4\xbd\xa0" in ranks  # " the" and 你 were learnt
    assert tok.encode("the the") == [ranks[b"the"], ranks[b" the"]]
    assert tok.encode("你") == [ranks["你".encode()]]
    assert tok.token_to_id(" the") == ranks[b" the"]
    assert tok.token_to_id("no such token at all") is None
    # GLM-4's stop ids; <|endoftext|> pads.
    assert tok.eos_token_ids == [n, n + 7, n + 9]
    assert tok.pad_token_id == n
    # The same table as the tokenizer.json converted from the same ranks (GLM-4's "-hf" form).
    ref = converted(glm4_dir / "tokenizer.model", GLM4_NAMES)
    added = {i for i, t in ref.get_added_tokens_decoder().items() if t.special}
    assert tok.token_table() == {i: (s, i in added)
                                 for s, i in ref.get_vocab(with_added_tokens=True).items()}


def test_glm4_tokenizer_json_form_agrees(glm4_dir: Path, tmp_path: Path) -> None:
    converted(glm4_dir / "tokenizer.model", GLM4_NAMES).save(str(tmp_path / "tokenizer.json"))
    hf_form, tiktoken_form = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(glm4_dir)
    assert hf_form.token_table() == tiktoken_form.token_table()
    for text in GLM4_TEXTS:
        assert hf_form.encode(text) == tiktoken_form.encode(text)
        assert hf_form.special_tokens_in(text) == tiktoken_form.special_tokens_in(text)
        assert hf_form.encode_plain(text) == tiktoken_form.encode_plain(text)


def test_glm4_decode_partial_character(glm4_dir: Path) -> None:
    tok = Tokenizer.from_dir(glm4_dir)
    ids = tok.encode("🎉")  # not learnt: its 4 bytes as 4 byte tokens
    assert len(ids) == 4
    assert tok.decode(ids) == "🎉"
    assert tok.decode(ids[:2]) == "\ufffd"
    assert tok.decode(ids[:2] + tok.encode("<|user|>") + ids, skip_special_tokens=False) == (
        "\ufffd<|user|>🎉")


def test_glm4_special_ids_follow_the_config(tmp_path: Path) -> None:
    ranks = train_ranks()
    n = len(ranks)
    write_ranks(tmp_path / "tokenizer.model", ranks)
    # No tokenizer_config.json: GLM-4's table at len(ranks) + i.
    tok = Tokenizer.from_dir(tmp_path)
    assert [tok.token_to_id(name) for name in GLM4_NAMES] == list(range(n, n + 14))
    # added_tokens_decoder wins: here in reverse order, and an extra token.
    specials = {name: n + 13 - i for i, name in enumerate(GLM4_NAMES)} | {"<|extra|>": n + 20}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(glm4_config(specials)))
    tok = Tokenizer.from_dir(tmp_path)
    assert {name: tok.token_to_id(name) for name in specials} == specials
    assert tok.vocab_size == n + 21
    assert tok.encode("hi<|extra|>[gMASK]") == tok.encode_plain("hi") + [n + 20, n + 11]
    assert tok.encode_plain("<|extra|>") == converted(tmp_path / "tokenizer.model",
                                                      None).encode("<|extra|>").ids


@pytest.mark.parametrize(("line", "message"), [
    (b"@@not-base64@@ 2", "bad base64"),
    (b"QUJD", "expected '<base64 token> <rank>'"),
    (b"QUJD x", "not a non-negative integer"),
    (b"QUJD 1", "rank 1 again (first on line 1)"),
    (b"AA== 7", "again (first on line 1)"),
])
def test_glm4_malformed_ranks_name_file_and_line(tmp_path: Path, line: bytes,
                                                 message: str) -> None:
    ranks = {bytes([b]): b + 1 for b in range(256)}
    path = tmp_path / "tokenizer.model"
    write_ranks(path, ranks)
    lines = path.read_bytes().splitlines()
    lines.insert(2, line)  # line 3
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match="line 3") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_glm4_bad_first_line_is_still_read_as_ranks(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    write_ranks(path, {bytes([b]): b for b in range(256)})
    path.write_bytes(b"not*base64 0\n" + path.read_bytes().split(b"\n", 1)[1])
    with pytest.raises(ValueError, match="line 1: bad base64"):
        Tokenizer.from_dir(tmp_path)


def test_glm4_ranks_without_every_byte(tmp_path: Path) -> None:
    write_ranks(tmp_path / "tokenizer.model", {bytes([b]): b for b in range(255)})
    with pytest.raises(ValueError, match=r"no rank for the single bytes \[255\]") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(info.value)
