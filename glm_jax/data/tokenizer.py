"""Tokenizer wrapper and GLM chat template.

``Tokenizer`` puts one interface over the two on-disk formats GLM-family checkpoints ship:
a Hugging Face ``tokenizer.json`` (``tokenizers`` library) or a sentencepiece
``tokenizer.model``. ``ChatTemplate`` renders the GLM chat format as plain text; special-token
strings in that text (``[gMASK]``, ``<|user|>``, ...) encode to their single special ids.
``encode_chat`` keeps that for the template's own text only: a special-token string written
inside a record's text is encoded as ordinary text (``Tokenizer.encode_plain``), so user text
can never end a response or open a turn.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as HFTokenizer

HF_FILENAME = "tokenizer.json"
SP_FILENAME = "tokenizer.model"

TINY_TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer.json"

# GLM-4 stops generation on the first three; the last two cover sentencepiece/Llama-style vocabs.
EOS_TOKEN_CANDIDATES: tuple[str, ...] = (
    "<|endoftext|>",
    "<|user|>",
    "<|observation|>",
    "</s>",
    "<eos>",
)
PAD_TOKEN_CANDIDATES: tuple[str, ...] = ("<pad>", "<|endoftext|>", "</s>")

# GLM-family special-token strings; the sentencepiece backend treats those in its vocab as special.
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|endoftext|>",
    "<pad>",
    "<eos>",
    "<s>",
    "</s>",
)

# What becomes of a record whose text holds a special-token string (config.data.special_tokens):
# "plain" encodes it as ordinary text, "refuse" drops the record.
SpecialTokens = Literal["plain", "refuse"]
SPECIAL_TOKEN_MODES: tuple[str, ...] = ("plain", "refuse")


class _Backend(Protocol):
    vocab_size: int
    special_tokens: dict[str, int]  # special-token string -> id

    def encode(self, text: str) -> list[int]: ...

    def encode_plain(self, text: str) -> list[int]: ...

    def token_table(self) -> dict[int, tuple[str, bool]]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...


class _HFBackend:
    """``tokenizers`` backend; added special tokens are already split out by the library."""

    def __init__(self, path: Path) -> None:
        self._tok = HFTokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {token.content: i for i, token
                               in self._tok.get_added_tokens_decoder().items() if token.special}

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: the chat template already spells out every special token,
        # and a post-processor (e.g. GLM's prefix) would otherwise duplicate them.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_plain(self, text: str) -> list[int]:
        # encode() splits added tokens out of the text before anything else, with no switch to
        # turn that off; the normalizer, pre-tokenizer and model it then runs on the rest are
        # called here directly, so that the text between added tokens is encoded as encode()
        # would, and added-token strings are spelled like any other text.
        tok = self._tok
        normalized = tok.normalizer.normalize_str(text) if tok.normalizer else text
        pieces = (tok.pre_tokenizer.pre_tokenize_str(normalized) if tok.pre_tokenizer
                  else [(normalized, None)])
        return [token.id for piece, _ in pieces for token in tok.model.tokenize(piece)]

    def token_table(self) -> dict[int, tuple[str, bool]]:
        special = set(self.special_tokens)
        return {i: (token, token in special)
                for token, i in self._tok.get_vocab(with_added_tokens=True).items()}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SPBackend:
    """sentencepiece backend; special pieces are split out of the text by hand.

    sentencepiece never matches control pieces (``</s>``) in raw text, and its Python API cannot
    tell user-defined pieces from ordinary ones, so the control pieces plus those of
    ``SPECIAL_TOKENS`` in the vocab are located with a regex and mapped to their ids, and only
    the text between them goes through ``encode_as_ids``.

    ``encode_plain`` uses a second processor over the same model in which those special pieces
    are marked unused (sentencepiece never emits an unused piece), so their strings are spelled
    with ordinary pieces (byte pieces where the vocab has no piece for a character).
    """

    def __init__(self, path: Path) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._sp.get_piece_size()
        self._special: dict[str, int] = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
        }
        for token in SPECIAL_TOKENS:
            i = self.token_to_id(token)
            if i is not None:
                self._special[token] = i
        self._special_ids = frozenset(self._special.values())
        self.special_tokens = dict(self._special)
        self._plain_sp = _without_pieces(path, self._special_ids)
        # Longest first so that a special token containing another one wins the match.
        names = sorted(self._special, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def encode(self, text: str) -> list[int]:
        if self._pattern is None:
            return list(self._sp.encode_as_ids(text))
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode_as_ids(text[start : match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode_as_ids(text[start:]))
        return ids

    def encode_plain(self, text: str) -> list[int]:
        return list(self._plain_sp.encode_as_ids(text))

    def token_table(self) -> dict[int, tuple[str, bool]]:
        # Special as encode() treats them: control pieces and GLM's special tokens.
        return {i: (self._sp.id_to_piece(i), self._sp.is_control(i) or i in self._special_ids)
                for i in range(self._sp.get_piece_size())}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Decode each run between special ids on its own: encode() encoded those runs separately
        # (each with sentencepiece's dummy-prefix space), so this mirrors it and round-trips.
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i in self._special_ids:
                if run:
                    parts.append(self._sp.decode_ids(run))
                    run = []
                if not skip_special_tokens:
                    parts.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode_ids(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        # piece_to_id returns the unk id for unknown pieces; only a round trip proves presence.
        i = self._sp.piece_to_id(token)
        if 0 <= i < self.vocab_size and self._sp.id_to_piece(i) == token:
            return i
        return None


def _without_pieces(path: Path, ids: frozenset[int]) -> spm.SentencePieceProcessor:
    """A processor of the model at `path` that never emits the pieces `ids`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for i in ids:
        proto.pieces[i].type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class Tokenizer:
    """One interface over a ``tokenizer.json`` or a sentencepiece ``tokenizer.model``."""

    def __init__(self, backend: _Backend, path: Path) -> None:
        self._backend = backend
        self.path = path
        # Longest first so that a special token containing another one wins the match.
        names = sorted(backend.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, names))) if names else None
        self._special_ids = frozenset(backend.special_tokens.values())

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``.json`` (Hugging Face tokenizers) or ``.model`` (sentencepiece) file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(_HFBackend(path), path)
        if path.suffix == ".model":
            return cls(_SPBackend(path), path)
        raise ValueError(
            f"unknown tokenizer file type {path.suffix!r} for {path}; expected .json or .model"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a directory, else ``tokenizer.model``."""
        path = Path(path)
        for name in (HF_FILENAME, SP_FILENAME):
            if (path / name).is_file():
                return cls.from_file(path / name)
        raise FileNotFoundError(f"no tokenizer in {path}: expected {HF_FILENAME} or {SP_FILENAME}")

    @classmethod
    def tiny(cls) -> Tokenizer:
        """The bundled byte-level BPE tokenizer (vocab <= 512) for tests and toy models."""
        return cls.from_file(TINY_TOKENIZER_PATH)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text to ids; adds no special tokens, but maps special-token strings to their ids."""
        return self._backend.encode(text)

    def special_tokens_in(self, text: str) -> list[str]:
        """The special-token strings (``<|user|>``, ``<|endoftext|>``, ...) written in `text`."""
        if self._special_pattern is None:
            return []
        return self._special_pattern.findall(text)

    def encode_plain(self, text: str) -> list[int]:
        """Text to ids with every special-token string in it encoded as ordinary text: what a
        record's own text (a prompt, a response, a dialogue turn) must be encoded with.

        Text without such strings encodes exactly as ``encode``. Raises ValueError if the
        tokenizer still produced a special id (it cannot spell the text otherwise).
        """
        if not self.special_tokens_in(text):
            return self.encode(text)
        ids = self._backend.encode_plain(text)
        special = sorted(self._special_ids.intersection(ids))
        if special:
            raise ValueError(f"{self.path} cannot encode {text[:80]!r} as plain text: it "
                             f"gives special ids {special}; set config.data.special_tokens="
                             "'refuse' to drop such records")
        return ids

    def token_table(self) -> dict[int, tuple[str, bool]]:
        """Every id -> (its token, whether it is special): what a model trained with this
        tokenizer has learnt the ids to mean (a re-saved copy has the same table)."""
        return self._backend.token_table()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids to text, dropping special tokens unless ``skip_special_tokens`` is False."""
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a single vocab entry, or None if it is not in the vocab."""
        return self._backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation, in ``EOS_TOKEN_CANDIDATES`` order, for those present."""
        ids = (self.token_to_id(t) for t in EOS_TOKEN_CANDIDATES)
        return [i for i in ids if i is not None]

    @property
    def pad_token_id(self) -> int:
        """The first of ``PAD_TOKEN_CANDIDATES`` in the vocab, else 0."""
        for token in PAD_TOKEN_CANDIDATES:
            i = self.token_to_id(token)
            if i is not None:
                return i
        return 0

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


@dataclass(frozen=True)
class ChatTemplate:
    """The GLM chat format as text; defaults match GLM-4.

    Turn templates hold ``{content}``, substituted with ``str.replace`` rather than
    ``str.format`` so braces in user text need no escaping.
    """

    prefix: str = "[gMASK]<sop>"
    user: str = "<|user|>\n{content}"
    assistant: str = "<|assistant|>\n{content}"
    generation_prompt: str = "<|assistant|>\n"

    def __post_init__(self) -> None:
        for name in ("user", "assistant"):
            if "{content}" not in getattr(self, name):
                raise ValueError(f"ChatTemplate.{name} must contain '{{content}}'")

    def render(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """Render prefix, each (user, assistant) pair, the final user turn and the gen prompt."""
        return "".join(text for text, _ in self.parts(prompt, history))

    def parts(self, prompt: str, history: Sequence[tuple[str, str]] = ()
              ) -> list[tuple[str, bool]]:
        """`render`'s text as (text, is_content) pieces: is_content marks the record's own text
        (prompt and history turns), False the template's."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        parts = [(self.prefix, False)]
        for index, entry in enumerate(history):
            if (
                not isinstance(entry, (tuple, list))
                or len(entry) != 2
                or not all(isinstance(x, str) for x in entry)
            ):
                raise ValueError(
                    f"history[{index}] must be a (user, assistant) pair of strings, got {entry!r}"
                )
            user, assistant = entry
            parts += _fill(self.user, user) + _fill(self.assistant, assistant)
        parts += _fill(self.user, prompt)
        parts.append((self.generation_prompt, False))
        return parts


def _fill(turn: str, content: str) -> list[tuple[str, bool]]:
    """A turn template with `content` in place of its ``{content}``, as `parts` pieces."""
    first, *rest = turn.split("{content}")
    parts = [(first, False)]
    for piece in rest:
        parts += [(content, True), (piece, False)]
    return parts


GLM4_TEMPLATE = ChatTemplate()
CHATGLM3_TEMPLATE = ChatTemplate(
    prefix="[gMASK]sop",
    user="<|user|>\n{content}",
    assistant="<|assistant|>\n{content}",
    generation_prompt="<|assistant|>",
)


def encode_chat(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompt: str,
    history: Sequence[tuple[str, str]] = (),
) -> list[int]:
    """Render a chat prompt with ``template`` and encode it (no extra special tokens).

    Special-token strings inside the prompt or history are encoded as ordinary text
    (``Tokenizer.encode_plain``); without any, this is ``tokenizer.encode`` of the rendered text.
    """
    parts = template.parts(prompt, history)
    if not any(tokenizer.special_tokens_in(text) for text, is_content in parts if is_content):
        return tokenizer.encode("".join(text for text, _ in parts))
    ids: list[int] = []
    template_text = ""  # consecutive template pieces, encoded together as `encode` would
    for text, is_content in parts:
        if not is_content:
            template_text += text
            continue
        if template_text:
            ids += tokenizer.encode(template_text)
            template_text = ""
        ids += tokenizer.encode_plain(text)
    if template_text:
        ids += tokenizer.encode(template_text)
    return ids
