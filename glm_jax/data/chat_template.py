"""Chat templates: a conversation rendered as the text a GLM model was trained on.

``ChatTemplate`` is glm_jax's built-in GLM format (the fallback, and the tiny default's);
``JinjaChatTemplate`` renders the ``chat_template`` a checkpoint ships in its
``tokenizer_config.json``, as transformers' ``apply_chat_template`` does. Both give the rendered
text as (text, is_content) parts, so that a record's own text is encoded as plain text
(``Tokenizer.encode_plain``) and the template's special-token strings as special ids.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from glm_jax.data.tokenizer import CONFIG_FILENAME, Tokenizer

Parts = list[tuple[str, bool]]  # (text, is_content): is_content marks a record's own text


class Template(Protocol):
    """What the data pipeline needs of a chat template, built-in or the checkpoint's."""

    @property
    def prefix(self) -> str:
        """The text every rendering starts with, kept when an over-long prompt is cut."""
        ...

    def parts(self, prompt: str, history: Sequence[tuple[str, str]] = (),
              system: str | None = None) -> Parts:
        """The prompt rendered up to and including the generation prompt, as parts."""
        ...

    def response_parts(self, response: str, prompt: str,
                       history: Sequence[tuple[str, str]] = (),
                       system: str | None = None) -> Parts:
        """The assistant's `response` to that prompt as the template writes it after the
        generation prompt: lead text, the response, then the turn's closing text."""
        ...

    @property
    def response_lead(self) -> str:
        """The lead text of `response_parts`, which a sampled response's text starts with."""
        ...


def response_text(template: Template, decoded: str) -> str:
    """A sampled response's decoded text (EOS dropped) as a record's response: without the
    template's lead text, so that encoding it again does not write the lead twice."""
    lead = template.response_lead
    return decoded[len(lead):] if lead and decoded.startswith(lead) else decoded


def _check_history(history: Sequence[tuple[str, str]]) -> None:
    for index, entry in enumerate(history):
        if (
            not isinstance(entry, (tuple, list))
            or len(entry) != 2
            or not all(isinstance(x, str) for x in entry)
        ):
            raise ValueError(
                f"history[{index}] must be a (user, assistant) pair of strings, got {entry!r}"
            )


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")


@dataclass(frozen=True)
class ChatTemplate:
    """glm_jax's built-in GLM chat format; defaults match GLM-4.

    Turn templates hold ``{content}``, substituted with ``str.replace`` rather than
    ``str.format`` so braces in user text need no escaping.
    """

    prefix: str = "[gMASK]<sop>"
    system: str = "<|system|>\n{content}"
    user: str = "<|user|>\n{content}"
    assistant: str = "<|assistant|>\n{content}"
    generation_prompt: str = "<|assistant|>\n"

    def __post_init__(self) -> None:
        for name in ("system", "user", "assistant"):
            if "{content}" not in getattr(self, name):
                raise ValueError(f"ChatTemplate.{name} must contain '{{content}}'")

    def render(self, prompt: str, history: Sequence[tuple[str, str]] = (),
               system: str | None = None) -> str:
        """Render prefix, the system message, each (user, assistant) pair, the final user turn
        and the generation prompt."""
        return "".join(text for text, _ in self.parts(prompt, history, system))

    def parts(self, prompt: str, history: Sequence[tuple[str, str]] = (),
              system: str | None = None) -> Parts:
        """`render`'s text as (text, is_content) pieces: is_content marks the record's own text
        (system message, prompt and history turns), False the template's."""
        _check_text("prompt", prompt)
        _check_history(history)
        parts = [(self.prefix, False)]
        if system is not None:
            _check_text("system", system)
            parts += _fill(self.system, system)
        for user, assistant in history:
            parts += _fill(self.user, user) + _fill(self.assistant, assistant)
        parts += _fill(self.user, prompt)
        parts.append((self.generation_prompt, False))
        return parts

    def response_parts(self, response: str, prompt: str = "",
                       history: Sequence[tuple[str, str]] = (),
                       system: str | None = None) -> Parts:
        """The assistant's turn after the generation prompt: its lead text (ChatGLM3's "\\n "),
        then `response` (the conversation does not change it here)."""
        _check_text("response", response)
        lead = self.response_lead
        return [(lead, False), (response, True)] if lead else [(response, True)]

    @property
    def response_lead(self) -> str:
        """The assistant turn's text before its content, less the generation prompt: what the
        model writes before a response's own text ("" for GLM-4's built-in format)."""
        lead = self.assistant.split("{content}")[0]
        return lead[len(self.generation_prompt):] if lead.startswith(self.generation_prompt) \
            else ""


def _fill(turn: str, content: str) -> Parts:
    """A turn template with `content` in place of its ``{content}``, as `parts` pieces."""
    first, *rest = turn.split("{content}")
    parts = [(first, False)]
    for piece in rest:
        parts += [(content, True), (piece, False)]
    return parts


GLM4_TEMPLATE = ChatTemplate()
# THUDM/chatglm3-6b's own template: the space after each newline stands for the word boundary
# its remote code gets by encoding the role line and the content separately.
CHATGLM3_TEMPLATE = ChatTemplate(
    prefix="[gMASK]sop",
    system="<|system|>\n {content}",
    user="<|user|>\n {content}",
    assistant="<|assistant|>\n {content}",
    generation_prompt="<|assistant|>",
)


# A message's content is replaced by this marker (numbered) to find where the template put it;
# private-use code points, which no real text holds.
_MARKER = "\ue000glm_jax:{}\ue001"


class JinjaChatTemplate:
    """A checkpoint's own chat template (``chat_template`` in ``tokenizer_config.json``),
    rendered as transformers' ``apply_chat_template`` renders it.

    The record's texts are located in the rendering by rendering the same conversation with
    numbered markers in place of each message's content; the pieces between the markers are the
    template's. The rendering with the real contents must equal the joined pieces, so a template
    that rewrites contents (strips them, say) is refused rather than silently misencoded.
    """

    def __init__(self, source: str, variables: dict[str, Any] | None = None,
                 origin: str = "chat_template") -> None:
        """`source`: the Jinja text; `variables`: what else the template may read
        (``bos_token``, ``eos_token``, ...); `origin`: where it came from, for errors."""
        import jinja2

        self.source = source
        self.origin = origin
        self._variables = dict(variables or {})
        try:
            self._template = _jinja_environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"{origin}: not a valid Jinja template ({e})") from e
        # A record's prompt is located by encode_chat and again by each encode_response: once.
        self._locate_cached = functools.lru_cache(maxsize=8)(self._locate)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> JinjaChatTemplate | None:
        """The template in the tokenizer's ``tokenizer_config.json``, or None if it has none.

        A list of named templates (the newer format) gives its ``default`` one.
        """
        source = tokenizer.config.get("chat_template")
        origin = f"{tokenizer.path.parent / CONFIG_FILENAME}: chat_template"
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{origin}: expected a string, got {type(source).__name__}")
        return cls(source, _special_token_variables(tokenizer.config), origin)

    def render_messages(self, messages: Sequence[dict[str, str]],
                        add_generation_prompt: bool) -> str:
        """The template applied to `messages` (dicts with ``role`` and ``content``)."""
        import jinja2

        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin}: rendering failed: {e}") from e

    def render(self, prompt: str, history: Sequence[tuple[str, str]] = (),
               system: str | None = None) -> str:
        """The prompt rendered with the generation prompt, as `apply_chat_template` does."""
        return self.render_messages(_messages(prompt, history, system),
                                    add_generation_prompt=True)

    def parts(self, prompt: str, history: Sequence[tuple[str, str]] = (),
              system: str | None = None) -> Parts:
        """`render`'s text as (text, is_content) pieces."""
        messages = _messages(prompt, history, system)
        return self._located(messages, add_generation_prompt=True)

    def response_parts(self, response: str, prompt: str,
                       history: Sequence[tuple[str, str]] = (),
                       system: str | None = None) -> Parts:
        """What the template writes after the generation prompt when the conversation ends
        with the assistant's `response`: lead text, the response, the turn's closing text.

        Raises ValueError when the template writes the assistant's turn in a way that does not
        start with its own generation prompt: no response span could then be found."""
        _check_text("response", response)
        messages = _messages(prompt, history, system)
        prompt_parts = self._located(messages, add_generation_prompt=True)
        full = self._located([*messages, {"role": "assistant", "content": response}],
                             add_generation_prompt=False)
        prompt_text = "".join(text for text, _ in prompt_parts)
        # The conversation's own parts are the same in both renderings, so the response's
        # parts are those after the prompt's text: a cut inside the template text there.
        tail, start = [], 0
        for text, is_content in full:
            end = start + len(text)
            if start >= len(prompt_text):
                tail.append((text, is_content))
            elif end > len(prompt_text):
                tail.append((text[len(prompt_text) - start:], is_content))
            start = end
        full_text = "".join(text for text, _ in full)
        if (not full_text.startswith(prompt_text)
                or [text for text, is_content in tail if is_content] != [response]):
            raise ValueError(
                f"{self.origin}: the rendering of a conversation that ends with the assistant's "
                "turn does not start with the rendering of its prompt and generation prompt, so "
                "the response's tokens cannot be located; use config.data.template = 'glm4' "
                "or 'chatglm3' for glm_jax's built-in template")
        return [part for part in tail if part[0] or part[1]]

    @functools.cached_property
    def response_lead(self) -> str:
        """Template text the model writes before a response's own text (GLM-4's "\\n" after
        ``<|assistant|>``), stripped from decoded samples before they become records' text."""
        first_text, first_is_content = self.response_parts("x", "x")[0]
        return "" if first_is_content else first_text

    def _located(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> Parts:
        """The rendering of `messages` as (text, is_content) parts."""
        key = tuple((m["role"], m["content"]) for m in messages)
        return list(self._locate_cached(key, add_generation_prompt))

    def _locate(self, messages: tuple[tuple[str, str], ...], add_generation_prompt: bool
                ) -> tuple[tuple[str, bool], ...]:
        """`_located` of (role, content) pairs, uncached."""
        contents = [content for _, content in messages]
        markers = [_MARKER.format(i) for i in range(len(messages))]
        for content in contents:
            if "\ue000glm_jax:" in content:
                raise ValueError("a message holds glm_jax's private template marker")
        marked = self.render_messages(
            [{"role": role, "content": marker}
             for (role, _), marker in zip(messages, markers, strict=True)],
            add_generation_prompt)
        parts: Parts = []
        rest = marked
        for content, marker in zip(contents, markers, strict=True):
            if rest.count(marker) != 1 or marked.count(marker) != 1:
                raise ValueError(f"{self.origin}: the template writes a message's content "
                                 f"{marked.count(marker)} times; glm_jax needs it once")
            before, rest = rest.split(marker)
            parts += [(before, False), (content, True)]
        parts.append((rest, False))
        parts = [part for part in parts if part[0] or part[1]]
        if not all(contents):
            # Templates may leave an empty message out (GLM-4's does): the turn is then kept
            # with nothing in it, as a sampled response that is EOS at once was generated.
            return tuple(parts)
        plain = self.render_messages([{"role": role, "content": content}
                                      for role, content in messages], add_generation_prompt)
        if plain != "".join(text for text, _ in parts):
            raise ValueError(
                f"{self.origin}: the template changes the messages' text (it renders "
                f"{plain[:120]!r}, not the text as given), so the record's text cannot be "
                "located in it; use config.data.template = 'glm4' or 'chatglm3' for glm_jax's "
                "built-in template")
        return tuple(parts)

    @functools.cached_property
    def prefix(self) -> str:
        """The template text before the first message's content, without trailing spaces
        (``[gMASK]<sop><|user|>`` for GLM-4): kept when an over-long prompt is cut."""
        first = self._located([{"role": "user", "content": "x"}], add_generation_prompt=True)
        return first[0][0].rstrip() if not first[0][1] else ""


def _messages(prompt: str, history: Sequence[tuple[str, str]],
              system: str | None) -> list[dict[str, str]]:
    _check_text("prompt", prompt)
    _check_history(history)
    messages = []
    if system is not None:
        _check_text("system", system)
        messages.append({"role": "system", "content": system})
    for user, assistant in history:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": prompt})
    return messages


def _special_token_variables(config: dict[str, Any]) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... of a tokenizer_config.json, as strings: what
    transformers passes a chat template besides the messages."""
    out = {}
    for name, value in config.items():
        if name.endswith("_token"):
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[name] = value
    return out


@functools.cache
def _jinja_environment() -> Any:
    """A sandboxed Jinja environment set up as transformers' ``apply_chat_template`` sets it
    up: trimmed blocks, loop controls, a ``tojson`` that keeps non-ASCII text, and the
    ``raise_exception`` and ``strftime_now`` functions templates call."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def encode_parts(tokenizer: Tokenizer, parts: Parts) -> list[int]:
    """Encode (text, is_content) parts: special-token strings in the template's text become
    their ids, and the text between them, contents included, is encoded as plain text.

    Without a special-token string in the record's text this is ``tokenizer.encode`` of the
    joined text. With one, that string is spelled as ordinary text, and the text around it is
    still encoded in one piece with the template text beside it (ChatGLM3's "\\n " before a
    content merges with its first word, as in one string).
    """
    if not any(tokenizer.special_tokens_in(text) for text, is_content in parts if is_content):
        return tokenizer.encode("".join(text for text, _ in parts))
    ids: list[int] = []
    run = ""  # plain text since the last special token of the template
    for text, is_content in parts:
        segments = [(text, None)] if is_content else tokenizer.split_special(text)
        for piece, special_id in segments:
            if special_id is None:
                run += piece
                continue
            if run:
                ids += tokenizer.encode_plain(run)
                run = ""
            ids.append(special_id)
    if run:
        ids += tokenizer.encode_plain(run)
    return ids


def encode_chat(
    tokenizer: Tokenizer,
    template: Template,
    prompt: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
) -> list[int]:
    """Render a chat prompt with ``template`` and encode it (no extra special tokens).

    Special-token strings inside the prompt, history or system message are encoded as ordinary
    text (``Tokenizer.encode_plain``); without any, this is ``tokenizer.encode`` of the
    rendered text.
    """
    return encode_parts(tokenizer, template.parts(prompt, history, system))


def encode_response(
    tokenizer: Tokenizer,
    template: Template,
    response: str,
    prompt: str,
    history: Sequence[tuple[str, str]] = (),
    system: str | None = None,
) -> list[int]:
    """The ids the model is trained to generate after the prompt: the template's lead text,
    the response as plain text, and the turn's closing text up to and including its first EOS
    id (``tokenizer.eos_token_ids``); when the closing text holds none, the first EOS id is
    appended. With glm_jax's built-in templates this is the response then EOS."""
    parts = template.response_parts(response, prompt, history, system)
    last_content = max(i for i, (_, is_content) in enumerate(parts) if is_content)
    ids = encode_parts(tokenizer, parts[: last_content + 1])
    closing = tokenizer.encode("".join(text for text, _ in parts[last_content + 1:]))
    eos = set(tokenizer.eos_token_ids)
    for index, token in enumerate(closing):
        if token in eos:
            return ids + closing[: index + 1]
    return ids + closing + [tokenizer.eos_token_ids[0]]


def template_for(name: str, tokenizer: Tokenizer) -> Template:
    """The chat template `name` (config.data.template) for `tokenizer`: "auto" is the
    tokenizer's own (tokenizer_config.json's chat_template) when it ships one, else "glm4";
    "checkpoint" requires the tokenizer's own; "glm4" and "chatglm3" are the built-ins."""
    if name in BUILT_IN_TEMPLATES:
        return BUILT_IN_TEMPLATES[name]
    if name not in ("auto", "checkpoint"):
        raise ValueError(f"config.data.template = {name!r}; choose one of {list(TEMPLATE_NAMES)}")
    own = JinjaChatTemplate.from_tokenizer(tokenizer)
    if own is not None:
        return own
    if name == "checkpoint":
        raise ValueError(
            f"config.data.template = 'checkpoint', but the tokenizer {tokenizer.path} has no "
            f"chat_template: {Path(tokenizer.path).parent / CONFIG_FILENAME} is missing or has "
            "no chat_template field; set config.data.template = 'auto' (or 'glm4' / 'chatglm3')")
    return GLM4_TEMPLATE


BUILT_IN_TEMPLATES: dict[str, ChatTemplate] = {"glm4": GLM4_TEMPLATE,
                                               "chatglm3": CHATGLM3_TEMPLATE}
TEMPLATE_NAMES: tuple[str, ...] = ("auto", "checkpoint", *BUILT_IN_TEMPLATES)
