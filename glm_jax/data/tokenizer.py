"""The tokenizer of a GLM checkpoint, in whichever form the checkpoint ships it.

``Tokenizer`` puts one interface over the on-disk formats GLM-family checkpoints ship:
a Hugging Face ``tokenizer.json`` (``tokenizers`` library), a sentencepiece ``tokenizer.model``
(ChatGLM3's with its special tokens appended after the sentencepiece vocab) or GLM-4's original
``tokenizer.model`` of tiktoken BPE ranks, with the ``tokenizer_config.json`` (chat template,
special tokens) and ``generation_config.json`` (EOS ids) beside it. Special-token strings in a
chat template's text (``[gMASK]``, ``<|user|>``, ...) encode to their single special ids;
``encode_plain`` spells them as ordinary text, for a record's own text, so user text can never
end a response or open a turn. Chat templates: ``glm_jax.data.chat_template``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer as HFTokenizer

HF_FILENAME = "tokenizer.json"
SP_FILENAME = "tokenizer.model"
CONFIG_FILENAME = "tokenizer_config.json"
GENERATION_CONFIG_FILENAME = "generation_config.json"

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


# ChatGLM3's tokenizer (THUDM/chatglm3-6b, tokenization_chatglm.py's SPTokenizer) appends these
# after its sentencepiece vocab, at ids sp_size + i; its tokenizer_config.json names the class
# CHATGLM3_TOKENIZER_CLASS. "sop" and "eop" are bare words: see `_special_token_pattern`.
CHATGLM3_TOKENIZER_CLASS = "ChatGLMTokenizer"
CHATGLM3_SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)

# GLM-4's original tokenizer.model (THUDM/glm-4-9b-chat) is tiktoken BPE ranks, not sentencepiece:
# its remote code splits text with this pattern and puts these special tokens at len(ranks) + i
# (its tokenizer_config.json lists the same ids in added_tokens_decoder).
GLM4_TIKTOKEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_TIKTOKEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# A first line "<token> <rank>" marks a tiktoken ranks file (the token's base64 is checked when
# the file is read, so that a bad one is reported with its line); a sentencepiece model is a
# binary protobuf whose first byte is a newline (0x0A, field 1), so its first line is empty.
_TIKTOKEN_FIRST_LINE = re.compile(rb"\S+[ \t]+[0-9]+[ \t]*\r?\n?")


def _special_token_pattern(names: Iterable[str], *,
                           bound_bare_words: bool) -> re.Pattern[str] | None:
    """A regex matching any of the special-token strings `names`, or None if there are none.

    Longest first, so that a special token containing another one wins the match. With
    `bound_bare_words`, a name whose first (last) character is a word character (``\\w``: a
    letter in any script, a digit or ``_``) matches only where the text before (after) it is no
    word character: ChatGLM3's ``sop`` is found in "[gMASK]sop<|user|>" and "sop." but not in
    "Aesop", "sopa", "eopsop" or "你sop"; names that begin and end with punctuation
    (``<|user|>``, ``[gMASK]``) match anywhere.
    """
    alternatives = []
    for name in sorted(filter(None, names), key=len, reverse=True):
        alternative = re.escape(name)
        if bound_bare_words and re.match(r"\w", name[0]):
            alternative = r"(?<!\w)" + alternative
        if bound_bare_words and re.match(r"\w", name[-1]):
            alternative += r"(?!\w)"
        alternatives.append(alternative)
    return re.compile("|".join(alternatives)) if alternatives else None


class _Backend(Protocol):
    vocab_size: int
    special_tokens: dict[str, int]  # special-token string -> id
    # Where encode() finds special-token strings in text (None: it has none); Tokenizer's
    # special_tokens_in uses it, so that it finds exactly (or, HF, at least) what encode() splits.
    special_pattern: re.Pattern[str] | None

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
        # tokenizers matches an added token anywhere in the text (unless it is single_word, which
        # this over-detects: such text then goes through encode_plain, which is safe).
        self.special_pattern = _special_token_pattern(self.special_tokens, bound_bare_words=False)

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


def _split_special(text: str, pattern: re.Pattern[str] | None,
                   special_tokens: dict[str, int]) -> list[tuple[str, int | None]]:
    """`text` as (piece, special id or None) segments: each match of `pattern` with its id in
    `special_tokens`, and the (non-empty) text between them."""
    segments: list[tuple[str, int | None]] = []
    start = 0
    for match in pattern.finditer(text) if pattern is not None else ():
        if match.start() > start:
            segments.append((text[start:match.start()], None))
        segments.append((match.group(), special_tokens[match.group()]))
        start = match.end()
    if start < len(text):
        segments.append((text[start:], None))
    return segments


def _encode_split(text: str, pattern: re.Pattern[str] | None, special_tokens: dict[str, int],
                  encode_run: Callable[[str], Sequence[int]]) -> list[int]:
    """The ids of `text`: special-token strings (`pattern`'s matches) as their ids, each run of
    text between them through `encode_run` on its own."""
    ids: list[int] = []
    for piece, special_id in _split_special(text, pattern, special_tokens):
        ids.extend(encode_run(piece) if special_id is None else (special_id,))
    return ids


def _decode_runs(ids: Sequence[int], special_names: dict[int, str],
                 decode_run: Callable[[list[int]], str], skip_special_tokens: bool) -> str:
    """`ids` as text: each run of ordinary ids through `decode_run`, each special id as its name
    in `special_names` (left out with `skip_special_tokens`)."""
    parts: list[str] = []
    run: list[int] = []
    for i in map(int, ids):
        if i in special_names:
            if run:
                parts.append(decode_run(run))
                run = []
            if not skip_special_tokens:
                parts.append(special_names[i])
        else:
            run.append(i)
    if run:
        parts.append(decode_run(run))
    return "".join(parts)


class _SPBackend:
    """sentencepiece backend; special pieces are split out of the text by hand.

    sentencepiece never matches control pieces (``</s>``) in raw text, and its Python API cannot
    tell user-defined pieces from ordinary ones, so the control pieces plus those of
    ``SPECIAL_TOKENS`` in the vocab are located with a regex and mapped to their ids, and only
    the text between them goes through ``encode_as_ids``.

    `appended` special tokens (ChatGLM3's ``CHATGLM3_SPECIAL_TOKENS``) get the ids after the
    sentencepiece vocab, ``piece_size + i``, as ChatGLM3's own tokenizer gives them; like it, they
    win over a sentencepiece piece of the same string. The vocab then has ``piece_size +
    len(appended)`` ids.

    ``encode_plain`` uses a second processor over the same model in which those special pieces
    (and pieces an appended token shadows) are marked unused (sentencepiece never emits an
    unused piece), so their strings are spelled with ordinary pieces (byte pieces where the vocab
    has no piece for a character); it never emits an appended id, which sentencepiece knows not.
    """

    def __init__(self, path: Path, appended: Sequence[str] = ()) -> None:
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        piece_size = self._sp.get_piece_size()
        self.vocab_size = piece_size + len(appended)
        self._special: dict[str, int] = {
            self._sp.id_to_piece(i): i for i in range(piece_size) if self._sp.is_control(i)
        }
        for token in SPECIAL_TOKENS:
            i = self._piece_id(token)
            if i is not None:
                self._special[token] = i
        self._appended = {token: piece_size + i for i, token in enumerate(appended)}
        if len(self._appended) != len(appended):
            raise ValueError(f"appended special tokens for {path} repeat a string: {appended}")
        # Pieces spelling an appended token: never special ids any more, never emitted as plain.
        shadowed = {i for i in map(self._piece_id, appended) if i is not None}
        self._special.update(self._appended)
        self._special_names = {i: token for token, i in self._special.items()}
        self._special_ids = frozenset(self._special.values())
        self.special_tokens = dict(self._special)
        self._plain_sp = _without_pieces(
            path, frozenset(i for i in self._special_ids | shadowed if i < piece_size))
        self.special_pattern = _special_token_pattern(self._special, bound_bare_words=True)

    def encode(self, text: str) -> list[int]:
        return _encode_split(text, self.special_pattern, self._special, self._sp.encode_as_ids)

    def encode_plain(self, text: str) -> list[int]:
        return list(self._plain_sp.encode_as_ids(text))

    def token_table(self) -> dict[int, tuple[str, bool]]:
        # Special as encode() treats them: control pieces, GLM's special tokens, appended ones.
        table = {i: (self._sp.id_to_piece(i), self._sp.is_control(i) or i in self._special_ids)
                 for i in range(self._sp.get_piece_size())}
        table.update((i, (token, True)) for token, i in self._appended.items())
        return table

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Each run between special ids on its own: encode() encoded those runs separately (each
        # with sentencepiece's dummy-prefix space), so this mirrors it and round-trips.
        return _decode_runs(ids, self._special_names, self._sp.decode_ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        appended = self._appended.get(token)
        return appended if appended is not None else self._piece_id(token)

    def _piece_id(self, token: str) -> int | None:
        """The id of the sentencepiece piece `token`, or None if the model has no such piece."""
        # piece_to_id returns the unk id for unknown pieces; only a round trip proves presence.
        i = self._sp.piece_to_id(token)
        if 0 <= i < self._sp.get_piece_size() and self._sp.id_to_piece(i) == token:
            return i
        return None


def _without_pieces(path: Path, ids: frozenset[int]) -> spm.SentencePieceProcessor:
    """A processor of the model at `path` that never emits the pieces `ids`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    for i in ids:
        proto.pieces[i].type = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class _TiktokenBackend:
    """GLM-4's original ``tokenizer.model``: tiktoken BPE ranks, one ``base64(token) rank`` a line.

    Ordinary text goes through a ``tiktoken.Encoding`` of those ranks with
    ``GLM4_TIKTOKEN_PATTERN``, as GLM-4's remote code encodes it (``disallowed_special=()``).
    `special_tokens` (string -> id; None: ``GLM4_TIKTOKEN_SPECIAL_TOKENS`` at ``len(ranks) + i``)
    are split out of the text by encode() only, longest first, as transformers splits added
    tokens before the remote tokenizer sees the rest; encode_plain encodes the whole text as
    ordinary text, so it never emits a special id.
    """

    def __init__(self, path: Path, special_tokens: dict[str, int] | None = None) -> None:
        try:
            import tiktoken
        except ImportError as e:  # a core dependency; only this format needs it
            raise ImportError(f"{path} is a tiktoken ranks file (GLM-4's tokenizer.model); "
                              "reading it needs the tiktoken package (pip install tiktoken)") from e
        self._ranks = _read_tiktoken_ranks(path)
        if special_tokens is None:
            special_tokens = {token: len(self._ranks) + i
                              for i, token in enumerate(GLM4_TIKTOKEN_SPECIAL_TOKENS)}
        self._token_bytes = {rank: token for token, rank in self._ranks.items()}
        clash = sorted(set(special_tokens.values()) & self._token_bytes.keys())
        if clash:
            raise ValueError(f"special token ids {clash} of {path} are also ranks of ordinary "
                             f"tokens in it; expected ids from {max(self._token_bytes) + 1} on")
        if len(set(special_tokens.values())) != len(special_tokens):
            raise ValueError(f"two special tokens of {path} share an id: {special_tokens}")
        self.special_tokens = dict(special_tokens)
        self._special_names = {i: token for token, i in special_tokens.items()}
        self.vocab_size = max([*self._token_bytes, *self._special_names]) + 1
        # Builds the BPE in memory; no download (only tiktoken.get_encoding fetches files).
        self._enc = tiktoken.Encoding(name=f"glm_jax:{path}", pat_str=GLM4_TIKTOKEN_PATTERN,
                                      mergeable_ranks=self._ranks, special_tokens=special_tokens)
        self.special_pattern = _special_token_pattern(special_tokens, bound_bare_words=True)

    def encode(self, text: str) -> list[int]:
        return _encode_split(text, self.special_pattern, self.special_tokens, self.encode_plain)

    def encode_plain(self, text: str) -> list[int]:
        # encode_ordinary is encode(text, disallowed_special=()): special strings are plain text.
        return self._enc.encode_ordinary(text) if text else []

    def token_table(self) -> dict[int, tuple[str, bool]]:
        # Token bytes shown in GPT-2's byte-level alphabet, as a tokenizer.json converted from the
        # same ranks (GLM-4's "-hf" checkpoints) shows them, so that the two tables compare equal.
        alphabet = _byte_level_alphabet()
        table = {rank: ("".join(alphabet[b] for b in token), False)
                 for rank, token in self._token_bytes.items()}
        table.update((i, (token, True)) for i, token in self._special_names.items())
        return table

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # The bytes of each run between special ids are joined, then decoded: a character split
        # over several tokens decodes whole; invalid UTF-8 becomes U+FFFD.
        return _decode_runs(ids, self._special_names, self._decode_run, skip_special_tokens)

    def _decode_run(self, ids: list[int]) -> str:
        unknown = [i for i in ids if i not in self._token_bytes]
        if unknown:
            raise ValueError(f"ids {unknown[:8]} are not in the vocab "
                             f"(ids 0..{self.vocab_size - 1})")
        return b"".join(self._token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        special = self.special_tokens.get(token)
        return special if special is not None else self._ranks.get(token.encode("utf-8"))


def _is_tiktoken_ranks(path: Path) -> bool:
    """Whether the ``.model`` file `path` is tiktoken ranks text rather than sentencepiece."""
    with path.open("rb") as f:
        first_line = f.readline(4096)
    return _TIKTOKEN_FIRST_LINE.fullmatch(first_line) is not None


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank from a tiktoken ranks file (``base64(token bytes) rank`` a line),
    checked line by line: errors name the file and line."""
    ranks: dict[bytes, int] = {}
    line_of_token: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}, line {number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{where}: bad base64 token {fields[0][:80]!r} ({e})") from e
        if not token:
            raise ValueError(f"{where}: empty token")
        if not fields[1].isdigit():
            raise ValueError(f"{where}: rank {fields[1][:80]!r} is not a non-negative integer")
        rank = int(fields[1])
        if token in line_of_token:
            raise ValueError(f"{where}: token {token!r} again (first on line "
                             f"{line_of_token[token]})")
        if rank in line_of_rank:
            raise ValueError(f"{where}: rank {rank} again (first on line {line_of_rank[rank]})")
        ranks[token] = rank
        line_of_token[token] = line_of_rank[rank] = number
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: no rank for the single bytes {missing[:16]}"
                         f"{' ...' if len(missing) > 16 else ''} ({len(missing)} of 256): "
                         "byte-level BPE needs one for every byte")
    return ranks


@functools.cache
def _byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``), indexed by byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    alphabet: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(256 + shifted))
            shifted += 1
    return tuple(alphabet)


def _added_tokens(tokenizer_config: dict[str, Any], where: Path) -> dict[str, int] | None:
    """String -> id of tokenizer_config.json's ``added_tokens_decoder`` (id -> {"content": ...}),
    or None when it has none; `where` names the file in errors."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    if not decoder:
        return None
    if not isinstance(decoder, dict):
        raise ValueError(f"{where}: added_tokens_decoder must be an object of id -> token, "
                         f"got {type(decoder).__name__}")
    tokens: dict[str, int] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not isinstance(content, str) or not content:
            raise ValueError(f"{where}: added_tokens_decoder[{key!r}] must map an id to "
                             f'{{"content": "<token>", ...}}, got {entry!r}')
        if content in tokens:
            raise ValueError(f"{where}: added_tokens_decoder lists {content!r} at ids "
                             f"{tokens[content]} and {key}")
        tokens[content] = int(key)
    return tokens


def _read_json_file(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} when there is no such file."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _load_backend(path: Path, tokenizer_config: dict[str, Any]) -> _Backend:
    """The backend for the tokenizer file `path`, given its directory's tokenizer_config.json.

    A ``.model`` file is told apart by its content: GLM-4's tiktoken ranks are text
    (``_TiktokenBackend``, special tokens from ``added_tokens_decoder``), a sentencepiece model is
    binary (``_SPBackend``, with ChatGLM3's appended special tokens when tokenizer_config.json
    names ``CHATGLM3_TOKENIZER_CLASS``).
    """
    if path.suffix == ".json":
        return _HFBackend(path)
    if path.suffix == ".model":
        if _is_tiktoken_ranks(path):
            return _TiktokenBackend(
                path, _added_tokens(tokenizer_config, path.parent / CONFIG_FILENAME))
        chatglm3 = tokenizer_config.get("tokenizer_class") == CHATGLM3_TOKENIZER_CLASS
        return _SPBackend(path, appended=CHATGLM3_SPECIAL_TOKENS if chatglm3 else ())
    raise ValueError(
        f"unknown tokenizer file type {path.suffix!r} for {path}; expected .json or .model"
    )


class Tokenizer:
    """One interface over a ``tokenizer.json`` or a sentencepiece ``tokenizer.model``, with what
    the checkpoint ships beside it: ``tokenizer_config.json`` (its chat template, special tokens)
    and ``generation_config.json`` (the ids that end generation)."""

    def __init__(self, backend: _Backend, path: Path, *,
                 config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None) -> None:
        self._backend = backend
        self.path = path
        self.config = config or {}  # tokenizer_config.json
        self.generation_config = generation_config or {}
        # The backend's own rule for where text holds a special-token string (ChatGLM3's bare
        # "sop" only as a word of its own), so special_tokens_in finds what encode() splits.
        self._special_pattern = backend.special_pattern
        self._special_ids = frozenset(backend.special_tokens.values())
        self._eos_token_ids = self._generation_eos_ids()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``.json`` (Hugging Face tokenizers) or ``.model`` (sentencepiece, or GLM-4's
        tiktoken ranks) file, with the ``tokenizer_config.json`` and ``generation_config.json``
        beside it when there are."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        config = _read_json_file(path.parent / CONFIG_FILENAME)
        generation_config = _read_json_file(path.parent / GENERATION_CONFIG_FILENAME)
        return cls(_load_backend(path, config), path, config=config,
                   generation_config=generation_config)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` from a directory, else ``tokenizer.model``."""
        path = Path(path)
        for name in (HF_FILENAME, SP_FILENAME):
            if (path / name).is_file():
                return cls.from_file(path / name)
        raise FileNotFoundError(f"no tokenizer in {path}: expected {HF_FILENAME} or {SP_FILENAME}")

    def files(self) -> dict[str, bytes]:
        """File name -> contents of what `from_dir` reads: the tokenizer file and the
        configuration files beside it, for copying the tokenizer into another directory."""
        name = HF_FILENAME if self.path.suffix == ".json" else SP_FILENAME
        out = {name: self.path.read_bytes()}
        for extra in (CONFIG_FILENAME, GENERATION_CONFIG_FILENAME):
            if (self.path.parent / extra).is_file():
                out[extra] = (self.path.parent / extra).read_bytes()
        return out

    def _generation_eos_ids(self) -> list[int] | None:
        """generation_config.json's ``eos_token_id`` (an id or a list), checked on the vocab."""
        value = self.generation_config.get("eos_token_id")
        if value is None:
            return None
        ids = value if isinstance(value, list) else [value]
        where = self.path.parent / GENERATION_CONFIG_FILENAME
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{where}: eos_token_id must be an id or a non-empty list of ids, "
                             f"got {value!r}")
        outside = [i for i in ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"{where}: eos_token_id {outside} is outside the vocab of "
                             f"{self.path} (ids 0..{self.vocab_size - 1})")
        return list(dict.fromkeys(ids))

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

    def split_special(self, text: str) -> list[tuple[str, int | None]]:
        """`text` as (piece, special id or None) segments: each special-token string `encode`
        would map to its id, and the text between them."""
        return _split_special(text, self._special_pattern, self._backend.special_tokens)

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
        """Ids that end generation: generation_config.json's ``eos_token_id`` when the tokenizer
        has one beside it, else those of ``EOS_TOKEN_CANDIDATES`` in the vocab, in that order.
        The first is the one appended to training responses."""
        if self._eos_token_ids is not None:
            return list(self._eos_token_ids)
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
