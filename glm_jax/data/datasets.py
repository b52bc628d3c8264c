"""Tokenization and grain batching of preference pairs and SFT examples (optionally packed).

Every pair is tokenized once, eagerly, when the dataset is built: that gives the truncation
report up front and leaves a dense source of kept pairs, so batch ``k`` is a pure function of
(pairs, seed, k) and a checkpointed iterator position resumes exactly.

Records that cannot teach are dropped and counted there too: a preference pair marked as a tie
(the loss has no tie term, so it would train an arbitrary order), a pair whose chosen and
rejected tokens are the same (zero gradient, and a wrong answer to every accuracy), and with
``special_tokens="refuse"`` a record whose text holds a special-token string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import grain
import numpy as np

from glm_jax.data.chat_template import Template, encode_chat, encode_response
from glm_jax.data.records import PreferencePair, PromptExample, SFTExample
from glm_jax.data.tokenizer import SPECIAL_TOKEN_MODES, SpecialTokens, Tokenizer

Truncation = Literal["truncate", "drop"]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; both responses end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    task: str | None = None
    prompt_truncated: bool = False
    response_truncated: bool = False


@dataclass(frozen=True)
class TokenizationReport:
    """Counts over all input records; with ``truncation="drop"`` nothing is truncated.

    ``num_dropped`` counts every dropped record: too long (``truncation="drop"``), holding
    special-token text (``special_tokens="refuse"``: ``num_special_dropped``), a tie
    (``num_ties``) or a pair with chosen == rejected tokens (``num_identical``).
    ``num_special_plain`` counts the kept records whose special-token text was encoded as plain
    text. ``str()`` gives the line the trainers print.
    """

    num_pairs: int
    num_kept: int
    num_dropped: int
    num_prompts_truncated: int
    num_responses_truncated: int  # chosen and rejected counted separately
    num_special_plain: int = 0
    num_special_dropped: int = 0
    num_ties: int = 0
    num_identical: int = 0

    @property
    def num_too_long(self) -> int:
        """Records dropped for their length."""
        return (self.num_dropped - self.num_special_dropped - self.num_ties
                - self.num_identical)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"{self.num_kept} of {self.num_pairs} records kept; "
                 f"{self.num_prompts_truncated} prompts and {self.num_responses_truncated} "
                 "responses truncated"]
        if self.num_too_long:
            parts.append(f"{self.num_too_long} too long: dropped (config.data.truncation="
                         "'drop')")
        if self.num_special_plain:
            parts.append(f"{self.num_special_plain} hold special-token text (e.g. <|user|>): "
                         "encoded as plain text")
        if self.num_special_dropped:
            parts.append(f"{self.num_special_dropped} hold special-token text (e.g. <|user|>): "
                         "dropped (config.data.special_tokens='refuse')")
        if self.num_ties or self.num_identical:
            parts.append(f"WARNING: {self.num_ties} pairs are ties, {self.num_identical} have "
                         "chosen == rejected: dropped (they teach a preference nothing)")
        return "; ".join(parts)


def _check_modes(truncation: str, special_tokens: str) -> None:
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r} "
                         "(config.data.truncation)")
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"special_tokens must be one of {SPECIAL_TOKEN_MODES}, got "
                         f"{special_tokens!r} (config.data.special_tokens)")


def _nothing_left(what: str, source: str, report: TokenizationReport) -> ValueError:
    """The error for a dataset without a single usable record, with the fix for each cause."""
    fixes = []
    if report.num_too_long:
        fixes.append("raise config.data.max_prompt_tokens / max_response_tokens or set "
                     "config.data.truncation='truncate'")
    if report.num_special_dropped:
        fixes.append("set config.data.special_tokens='plain'")
    if report.num_ties or report.num_identical:
        fixes.append("give pairs that are not ties and whose chosen and rejected differ")
    return ValueError(f"{source}: no {what} left to batch ({report})"
                      + (f": {'; '.join(fixes)}" if fixes else ""))


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """A short last batch (arrays `[n, ...]`, n <= batch_size) padded to `batch_size` rows by
    repeating its first row, so that every batch runs one compiled program; adds `valid`
    `[batch_size]` bool, False on the padding rows, which must count for nothing."""
    size = len(next(iter(batch.values())))
    padded = {k: np.concatenate([v, np.repeat(v[:1], batch_size - size, axis=0)])
              for k, v in batch.items()}
    padded["valid"] = np.arange(batch_size) < size
    return padded


@dataclass(frozen=True)
class PackingReport:
    """How well one epoch of SFT examples packed into rows of ``max_length`` tokens."""

    num_examples: int
    num_rows: int
    num_tokens: int  # real (non-padding) tokens over all rows
    max_length: int

    @property
    def fill(self) -> float:
        """Fraction of the rows' token slots holding a real token."""
        return self.num_tokens / max(self.num_rows * self.max_length, 1)

    def __str__(self) -> str:
        return (f"packed {self.num_examples} examples into {self.num_rows} rows of "
                f"{self.max_length} tokens ({self.fill:.1%} filled)")

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "fill": self.fill}


def pack_greedy(lengths: Sequence[int], max_length: int, num_open: int = 8) -> list[list[int]]:
    """Greedy first-fit packing of items, taken in order, into rows of ``max_length`` tokens.

    Each item goes into the first of the ``num_open`` most recently opened rows with room
    for it, else opens a new row; items are never split. Bounding the rows searched keeps
    this linear in the number of items while filling nearly as well as unbounded first-fit.
    Returns the rows in opening order, each the list of its item indices in order.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for i, length in enumerate(lengths):
        if not 0 < length <= max_length:
            raise ValueError(f"item {i} has {length} tokens, not in [1, {max_length}]")
        for r in range(max(len(rows) - num_open, 0), len(rows)):
            if free[r] >= length:
                break
        else:
            r = len(rows)
            rows.append([])
            free.append(max_length)
        rows[r].append(i)
        free[r] -= length
    return rows


def _check_limits(tokenizer: Tokenizer, template: Template, max_prompt_tokens: int,
                  max_response_tokens: int) -> int:
    num_prefix = len(tokenizer.encode(template.prefix))
    if max_prompt_tokens <= num_prefix:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no room after the "
                         f"template prefix ({num_prefix} tokens)")
    if max_response_tokens < 2:
        raise ValueError(f"max_response_tokens={max_response_tokens} must be >= 2 "
                         "(one token plus EOS)")
    return num_prefix


def _tokenize_parts(
    record: PreferencePair | SFTExample | PromptExample, responses: Sequence[str],
    tokenizer: Tokenizer, template: Template, num_prefix: int, max_prompt_tokens: int,
    max_response_tokens: int, truncation: Truncation, special_tokens: SpecialTokens = "plain",
    where: str = "",
) -> tuple[tuple[list[int], list[list[int]]] | None, int, int, bool]:
    """((prompt ids, response ids) or None if dropped, prompts truncated, responses truncated,
    whether the record's text holds a special-token string).

    Every response ends with EOS (`encode_response`); special-token strings in the record's
    text are encoded as plain text, or with ``special_tokens="refuse"`` drop the record. A
    record the chat template or tokenizer cannot encode raises ValueError naming `where`.
    """
    _check_modes(truncation, special_tokens)
    context = (record.prompt, record.history, record.system)
    texts = [record.prompt, record.system or "", *(turn for pair in record.history
                                                   for turn in pair), *responses]
    special = any(tokenizer.special_tokens_in(text) for text in texts)
    if special and special_tokens == "refuse":
        return None, 0, 0, True
    try:
        prompt = encode_chat(tokenizer, template, *context)
        encoded = [encode_response(tokenizer, template, r, *context) for r in responses]
    except ValueError as e:
        raise ValueError(f"{where}: {e}" if where else str(e)) from e
    prompt_over = len(prompt) > max_prompt_tokens
    responses_over = [len(r) > max_response_tokens for r in encoded]
    if truncation == "drop" and (prompt_over or any(responses_over)):
        return None, 0, 0, special
    if prompt_over:
        # The prefix ([gMASK]<sop>) is what the model was trained to see first; the oldest
        # dialogue turns matter least for judging the final response.
        keep = max_prompt_tokens - num_prefix
        prompt = prompt[:num_prefix] + prompt[-keep:]
    # A cut response keeps its last token, the EOS that ends it.
    encoded = [r[: max_response_tokens - 1] + r[-1:] if over else r
               for r, over in zip(encoded, responses_over, strict=True)]
    return (prompt, encoded), int(prompt_over), sum(responses_over), special


def _tokenize(
    pair: PreferencePair, tokenizer: Tokenizer, template: Template, num_prefix: int,
    max_prompt_tokens: int, max_response_tokens: int, truncation: Truncation,
    special_tokens: SpecialTokens = "plain", where: str = "",
) -> tuple[TokenizedPair | None, int, int, bool]:
    """(tokenized pair or None if dropped, prompts truncated, responses truncated, whether
    its text holds a special-token string)."""
    parts, n_prompt, n_responses, special = _tokenize_parts(
        pair, (pair.chosen, pair.rejected), tokenizer, template, num_prefix, max_prompt_tokens,
        max_response_tokens, truncation, special_tokens, where)
    if parts is None:
        return None, 0, 0, special
    prompt, (chosen, rejected) = parts
    tokenized = TokenizedPair(prompt, chosen, rejected, pair.task,
                              prompt_truncated=bool(n_prompt),
                              response_truncated=bool(n_responses))
    return tokenized, n_prompt, n_responses, special


def tokenize_record(
    record: PreferencePair | SFTExample | PromptExample,
    tokenizer: Tokenizer,
    template: Template,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    truncation: Truncation = "truncate",
    special_tokens: SpecialTokens = "plain",
) -> dict[str, list[int]] | None:
    """Token ids of any record kind, by the same rules as `tokenize_pair`: `prompt` always,
    `chosen` and `rejected` for a preference pair, `response` for an SFT example. None when
    `truncation="drop"` and the record is too long, or `special_tokens="refuse"` and its text
    holds a special-token string."""
    num_prefix = _check_limits(tokenizer, template, max_prompt_tokens, max_response_tokens)
    if isinstance(record, PreferencePair):
        names, texts = ("chosen", "rejected"), (record.chosen, record.rejected)
    elif isinstance(record, SFTExample):
        names, texts = ("response",), (record.response,)
    else:
        names, texts = (), ()
    parts, _, _, _ = _tokenize_parts(record, texts, tokenizer, template, num_prefix,
                                     max_prompt_tokens, max_response_tokens, truncation,
                                     special_tokens)
    if parts is None:
        return None
    prompt, responses = parts
    return {"prompt": prompt, **dict(zip(names, responses, strict=True))}


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: Tokenizer,
    template: Template,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    truncation: Truncation = "truncate",
    special_tokens: SpecialTokens = "plain",
) -> TokenizedPair | None:
    """Tokenize a pair: the chat-rendered prompt, and each response followed by EOS.

    An over-long prompt loses its oldest tokens after the template prefix (the prefix and the
    most recent turns stay); an over-long response is cut at the end but keeps its final EOS.
    With ``truncation="drop"`` an over-long pair gives None instead. A special-token string in
    the pair's text is encoded as plain text, or gives None with ``special_tokens="refuse"``.
    """
    num_prefix = _check_limits(tokenizer, template, max_prompt_tokens, max_response_tokens)
    return _tokenize(pair, tokenizer, template, num_prefix, max_prompt_tokens,
                     max_response_tokens, truncation, special_tokens)[0]


def tokenize_prompts(
    prompts: Sequence[PromptExample],
    tokenizer: Tokenizer,
    template: Template,
    *,
    max_prompt_tokens: int,
    truncation: Truncation = "truncate",
    special_tokens: SpecialTokens = "plain",
) -> tuple[list[list[int] | None], TokenizationReport]:
    """The chat-rendered ids of each prompt (None where dropped, by the rules of
    `tokenize_pair`) and the counts."""
    num_prefix = _check_limits(tokenizer, template, max_prompt_tokens, 2)
    out: list[list[int] | None] = []
    truncated = special_plain = special_dropped = 0
    for i, prompt in enumerate(prompts):
        parts, n_prompt, _, special = _tokenize_parts(
            prompt, (), tokenizer, template, num_prefix, max_prompt_tokens, 2, truncation,
            special_tokens, where=f"prompt {i + 1}")
        out.append(None if parts is None else parts[0])
        truncated += n_prompt
        special_plain += special and parts is not None
        special_dropped += special and special_tokens == "refuse"
    num_kept = sum(ids is not None for ids in out)
    report = TokenizationReport(
        num_pairs=len(prompts), num_kept=num_kept, num_dropped=len(prompts) - num_kept,
        num_prompts_truncated=truncated, num_responses_truncated=0,
        num_special_plain=special_plain, num_special_dropped=special_dropped)
    return out, report


class _BatchedDataset:
    """The grain chain both datasets share: kept rows -> shuffle(seed) -> repeat(num_epochs)
    -> encode -> batch, with this process's share of every global batch."""

    def _batch(self, kept: list, encode, *, batch_size: int, seed: int, shuffle: bool,
               num_epochs: int | None, drop_remainder: bool, process_index: int,
               process_count: int) -> None:
        rows = grain.MapDataset.source(kept)
        if shuffle:
            rows = rows.shuffle(seed=seed)
        rows = rows.repeat(num_epochs)
        if drop_remainder:
            # Cut to whole global batches first so that every process drops the same tail.
            rows = rows[: len(rows) // batch_size * batch_size]
        rows = rows.map(encode)
        # Global batch k is local chunks k*n .. k*n+n-1 of b = batch_size / n rows each; this
        # process takes chunk k*n + process_index.
        local = batch_size // process_count
        chunks = rows.batch(local, drop_remainder=drop_remainder)
        self._dataset: grain.MapDataset = chunks[process_index::process_count]
        self.num_batches: int | None = None if num_epochs is None else len(self._dataset)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """The local batch of step ``step`` (random access, same as the iterator's)."""
        return self._dataset[step]

    def __iter__(self) -> grain.DatasetIterator:
        # Rows are cheap to pad (tokenization is done), so one reader thread is plenty.
        options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)
        return self._dataset.to_iter_dataset(options).__iter__()


def _check_batching(batch_size: int, drop_remainder: bool, process_index: int,
                    process_count: int) -> None:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if process_count > 1 and not drop_remainder:
        # A partial last batch would give the processes different numbers of steps.
        raise ValueError("drop_remainder=False is not supported with process_count > 1")


class PreferenceDataset(_BatchedDataset):
    """Batches of (chosen, rejected) rows for reward-model training, built on ``grain``.

    Pipeline: kept pairs -> shuffle(seed) -> repeat(num_epochs) -> rows -> batch. Each element
    is a dict of numpy arrays:

    - ``chosen_ids``, ``rejected_ids``: ``[batch, max_length]`` int32, prompt + response ids,
      right-padded with ``tokenizer.pad_token_id``;
    - ``chosen_mask``, ``rejected_mask``: ``[batch, max_length]`` bool, True on real tokens;
    - ``chosen_response_mask``, ``rejected_response_mask``: ``[batch, max_length]`` bool, True
      on the response tokens (EOS included);
    - ``task_index``: ``[batch]`` int32, index into ``self.tasks`` (sorted), -1 for no task;
    - ``pair_index``: ``[batch]`` int32, the pair's index among the kept pairs (in input order),
      for per-pair values computed once (DPO's reference log-probs).

    ``batch_size`` is the global batch; process ``process_index`` of ``process_count`` gets rows
    ``[i*b/n, (i+1)*b/n)`` of every global batch. ``iter(dataset)`` gives a grain
    ``DatasetIterator`` whose ``get_state()`` (a small dict) and ``set_state()`` resume exactly
    on a dataset built with the same arguments. ``report`` holds the truncation counts.

    Ties and pairs whose chosen and rejected tokens are the same are dropped (counted in
    ``report``); ``special_tokens`` says what a special-token string in a pair's text does
    ("plain": encoded as text, "refuse": the pair is dropped). ``source`` (e.g.
    ``"config.rm.train_file = 'x.jsonl'"``) names the pairs' origin in the error raised when
    none is left.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        tokenizer: Tokenizer,
        template: Template,
        *,
        batch_size: int,
        max_prompt_tokens: int,
        max_response_tokens: int,
        max_length: int | None = None,
        truncation: Truncation = "truncate",
        special_tokens: SpecialTokens = "plain",
        source: str = "the input",
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        _check_batching(batch_size, drop_remainder, process_index, process_count)
        _check_modes(truncation, special_tokens)
        num_prefix = _check_limits(tokenizer, template, max_prompt_tokens, max_response_tokens)
        self.batch_size = batch_size
        self.max_length = max_length or max_prompt_tokens + max_response_tokens
        self.pad_token_id = tokenizer.pad_token_id
        self.tasks: list[str] = sorted({p.task for p in pairs if p.task is not None})
        self._task_index = {task: i for i, task in enumerate(self.tasks)}

        # Compact int32 arrays: Python int lists would cost ~10x the memory at paper scale.
        kept: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        prompts_truncated = responses_truncated = special_plain = special_dropped = 0
        ties = identical = 0
        for i, pair in enumerate(pairs):
            if pair.tie:
                ties += 1
                continue
            tokenized, n_prompt, n_response, special = _tokenize(
                pair, tokenizer, template, num_prefix, max_prompt_tokens, max_response_tokens,
                truncation, special_tokens, where=f"{source}: record {i + 1}")
            prompts_truncated += n_prompt
            responses_truncated += n_response
            special_plain += special and tokenized is not None
            special_dropped += special and special_tokens == "refuse"
            if tokenized is None:
                continue
            if tokenized.chosen_ids == tokenized.rejected_ids:
                identical += 1
                continue
            longest = len(tokenized.prompt_ids) + max(len(tokenized.chosen_ids),
                                                      len(tokenized.rejected_ids))
            if longest > self.max_length:
                raise ValueError(f"pair {i}: {longest} tokens do not fit max_length="
                                 f"{self.max_length}; use max_length >= max_prompt_tokens + "
                                 "max_response_tokens")
            kept.append((np.asarray(tokenized.prompt_ids, np.int32),
                         np.asarray(tokenized.chosen_ids, np.int32),
                         np.asarray(tokenized.rejected_ids, np.int32),
                         self._task_index.get(tokenized.task, -1), len(kept)))
        self.report = TokenizationReport(
            num_pairs=len(pairs), num_kept=len(kept), num_dropped=len(pairs) - len(kept),
            num_prompts_truncated=prompts_truncated,
            num_responses_truncated=responses_truncated, num_special_plain=special_plain,
            num_special_dropped=special_dropped, num_ties=ties, num_identical=identical)
        if not kept:
            raise _nothing_left("preference pairs", source, self.report)

        self._batch(kept, self._encode, batch_size=batch_size, seed=seed, shuffle=shuffle,
                    num_epochs=num_epochs, drop_remainder=drop_remainder,
                    process_index=process_index, process_count=process_count)

    def _encode(self, row: tuple[np.ndarray, np.ndarray, np.ndarray, int, int]
                ) -> dict[str, np.ndarray]:
        prompt, chosen, rejected, task_index, pair_index = row
        out: dict[str, np.ndarray] = {}
        positions = np.arange(self.max_length)
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            length = len(prompt) + len(response)
            ids = np.full(self.max_length, self.pad_token_id, np.int32)
            ids[: len(prompt)] = prompt
            ids[len(prompt) : length] = response
            out[f"{name}_ids"] = ids
            out[f"{name}_mask"] = positions < length
            out[f"{name}_response_mask"] = (positions >= len(prompt)) & (positions < length)
        out["task_index"] = np.int32(task_index)
        out["pair_index"] = np.int32(pair_index)
        return out


# One tokenized SFT example: (prompt ids, response ids ending with EOS, task index or -1).
_SFTItem = tuple[np.ndarray, np.ndarray, int]


class SFTDataset(_BatchedDataset):
    """Batches of (prompt, response) rows for supervised fine-tuning, built on ``grain``.

    Each element is a dict of numpy arrays, rows right-padded to ``max_length``:

    - ``input_ids``: ``[batch, max_length]`` int32, prompt + response (ending with EOS);
    - ``attention_mask``: ``[batch, max_length]`` bool, True on real tokens;
    - ``loss_mask``: ``[batch, max_length]`` bool, True on response tokens: position t is
      trained to predict from the tokens before it;
    - ``task_index``: ``[batch]`` int32, index into ``self.tasks``, -1 for no task.

    Truncation, special tokens, ``source``, determinism, resume and process sharding as in
    ``PreferenceDataset``.
    ``PackedSFTDataset`` packs several examples per row instead.
    """

    def __init__(
        self,
        examples: Sequence[SFTExample],
        tokenizer: Tokenizer,
        template: Template,
        *,
        batch_size: int,
        max_prompt_tokens: int,
        max_response_tokens: int,
        truncation: Truncation = "truncate",
        special_tokens: SpecialTokens = "plain",
        source: str = "the input",
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ) -> None:
        _check_batching(batch_size, drop_remainder, process_index, process_count)
        _check_modes(truncation, special_tokens)
        num_prefix = _check_limits(tokenizer, template, max_prompt_tokens, max_response_tokens)
        self.batch_size = batch_size
        self.max_length = max_prompt_tokens + max_response_tokens
        self.pad_token_id = tokenizer.pad_token_id
        self.tasks: list[str] = sorted({e.task for e in examples if e.task is not None})
        task_index = {task: i for i, task in enumerate(self.tasks)}
        kept: list[_SFTItem] = []
        prompts_truncated = responses_truncated = special_plain = special_dropped = 0
        for i, example in enumerate(examples):
            parts, n_prompt, n_response, special = _tokenize_parts(
                example, (example.response,), tokenizer, template, num_prefix,
                max_prompt_tokens, max_response_tokens, truncation, special_tokens,
                where=f"{source}: record {i + 1}")
            prompts_truncated += n_prompt
            responses_truncated += n_response
            special_plain += special and parts is not None
            special_dropped += special and special_tokens == "refuse"
            if parts is not None:
                prompt, (response,) = parts
                kept.append((np.asarray(prompt, np.int32), np.asarray(response, np.int32),
                             task_index.get(example.task, -1)))
        self.report = TokenizationReport(
            num_pairs=len(examples), num_kept=len(kept), num_dropped=len(examples) - len(kept),
            num_prompts_truncated=prompts_truncated,
            num_responses_truncated=responses_truncated, num_special_plain=special_plain,
            num_special_dropped=special_dropped)
        if not kept:
            raise _nothing_left("SFT examples", source, self.report)
        self._batch(self._rows(kept, seed=seed, shuffle=shuffle), self._encode,
                    batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                    drop_remainder=drop_remainder, process_index=process_index,
                    process_count=process_count)

    def _rows(self, kept: list[_SFTItem], *, seed: int, shuffle: bool) -> list:
        """The source rows of the grain chain: here one example each."""
        return kept

    def _encode(self, row: _SFTItem) -> dict[str, np.ndarray]:
        out = _encode_sft_row([row], self.max_length, self.pad_token_id)
        del out["segment_ids"]
        return out


class PackedSFTDataset(SFTDataset):
    """``SFTDataset`` with several whole examples packed into each row of ``max_length``.

    The kept examples are shuffled (``seed``) and packed once, greedily (``pack_greedy``);
    grain then shuffles, repeats, batches and shards those rows exactly like unpacked rows
    (so every epoch holds each example exactly once, the rows' order changes per epoch, and
    ``get_state`` / ``set_state`` resume exactly). ``batch_size`` counts rows. Elements have
    ``SFTDataset``'s keys, over packed rows, plus:

    - ``segment_ids``: ``[batch, max_length]`` int32, k on the tokens of the row's k-th
      example (1-based), 0 on padding; pass it to the model so that each example attends only
      to itself with positions from 0;
    - ``task_index`` is that of the row's first example (-1 for no task).

    ``packing_report`` holds the example / row counts and the fill fraction.
    """

    def _rows(self, kept: list[_SFTItem], *, seed: int, shuffle: bool) -> list[list[_SFTItem]]:
        # Shuffle before packing so a row does not gather neighbours of the input file.
        order = (np.random.default_rng(seed).permutation(len(kept)) if shuffle
                 else np.arange(len(kept)))
        lengths = [len(kept[i][0]) + len(kept[i][1]) for i in order]
        rows = [[kept[order[i]] for i in row] for row in pack_greedy(lengths, self.max_length)]
        self.packing_report = PackingReport(num_examples=len(kept), num_rows=len(rows),
                                            num_tokens=sum(lengths), max_length=self.max_length)
        return rows

    def _encode(self, row: list[_SFTItem]) -> dict[str, np.ndarray]:
        return _encode_sft_row(row, self.max_length, self.pad_token_id)


def _encode_sft_row(examples: Sequence[_SFTItem], max_length: int, pad_token_id: int
                    ) -> dict[str, np.ndarray]:
    """One row holding ``examples`` (prompt ids, response ids, task index) back to back,
    right-padded to ``max_length``: ``[max_length]`` arrays as in ``PackedSFTDataset``."""
    ids = np.full(max_length, pad_token_id, np.int32)
    loss_mask = np.zeros(max_length, bool)
    segment_ids = np.zeros(max_length, np.int32)
    start = 0
    for segment, (prompt, response, _) in enumerate(examples, 1):
        middle, end = start + len(prompt), start + len(prompt) + len(response)
        ids[start:middle], ids[middle:end] = prompt, response
        loss_mask[middle:end] = True
        segment_ids[start:end] = segment
        start = end
    return {"input_ids": ids, "attention_mask": segment_ids > 0, "loss_mask": loss_mask,
            "segment_ids": segment_ids, "task_index": np.int32(examples[0][2])}
