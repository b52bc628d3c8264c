"""seqio Tasks and a tensorflow-datasets builder over glm_jax's own records.

An adapter, not a second pipeline: records are read by `read_jsonl` and tokenized by
`tokenize_record`, so a Task (and the TFDS dataset) carries exactly the token ids that
glm_jax's own pipeline trains on, and t5x-style users can put them in seqio Mixtures.
Needs the `seqio` extra: `pip install -e ".[seqio]"` (it brings TensorFlow).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from glm_jax.data.chat_template import Template
from glm_jax.data.datasets import Truncation, tokenize_record
from glm_jax.data.records import read_jsonl
from glm_jax.data.tokenizer import Tokenizer

# Token-id features of each record kind (every response ends with EOS).
FEATURES = {"preference": ("prompt", "chosen", "rejected"), "sft": ("prompt", "response"),
            "prompt": ("prompt",)}
_TEXT_FIELDS = {"preference": ("chosen", "rejected"), "sft": ("response",), "prompt": ()}


class GlmVocabulary(seqio.Vocabulary):
    """A seqio Vocabulary over a glm_jax `Tokenizer` (no special tokens added on encode)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        super().__init__(extra_ids=0)

    # seqio mixes only Tasks whose vocabularies compare equal: the same tokenizer file is.
    def __eq__(self, other: object) -> bool:
        return (isinstance(other, GlmVocabulary)
                and self.tokenizer.path.resolve() == other.tokenizer.path.resolve())

    def __hash__(self) -> int:
        return hash(self.tokenizer.path.resolve())

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_ids[0]

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        ids = tf.py_function(lambda x: np.asarray(self._encode(x.numpy().decode()), np.int32),
                             [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        text = tf.py_function(lambda x: self._decode(x.numpy()), [ids], tf.string)
        text.set_shape([])
        return text


def _check_kind(kind: str) -> None:
    if kind not in FEATURES:
        raise ValueError(f"record kind {kind!r} is not one of {sorted(FEATURES)}")


def register_seqio_tasks(name_prefix: str, files: Mapping[str, Mapping[str, str | Path]], *,
                         tokenizer: Tokenizer, template: Template, max_prompt_tokens: int,
                         max_response_tokens: int, truncation: Truncation = "truncate"
                         ) -> list[str]:
    """Registers one seqio Task per record kind in `files` and returns their names.

    files: `{kind: {split: jsonl_path}}` with kind "preference", "sft" or "prompt"; the Task
    `f"{name_prefix}_{kind}"` yields int32 token-id features (`FEATURES[kind]`) plus the
    record's `task` string. Registering a name again replaces the Task.
    """
    vocabulary = GlmVocabulary(tokenizer)
    limits = dict(max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                  truncation=truncation)
    names = []
    for kind, splits in files.items():
        _check_kind(kind)
        keys = FEATURES[kind]

        def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, kind=kind,
                       splits=splits, keys=keys) -> tf.data.Dataset:
            del shuffle_files, seed  # one file per split: there is nothing to shuffle
            records, _ = read_jsonl(splits[split], kind)

            def examples():
                for record in records:
                    tokens = tokenize_record(record, tokenizer, template, **limits)
                    if tokens is not None:
                        yield {**{k: np.asarray(tokens[k], np.int32) for k in keys},
                               "task": record.task or ""}

            signature = {k: tf.TensorSpec([None], tf.int32) for k in keys}
            signature["task"] = tf.TensorSpec([], tf.string)
            return tf.data.Dataset.from_generator(examples, output_signature=signature)

        name = f"{name_prefix}_{kind}"
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(dataset_fn, splits=list(splits)),
            output_features={k: seqio.Feature(vocabulary, add_eos=False) for k in keys})
        names.append(name)
    return names


class GlmJaxRecords(tfds.core.GeneratorBasedBuilder):
    """glm_jax JSONL records of one kind as a TFDS dataset: the text fields, the history, the
    task and system message ("" when absent), and the token ids (`{feature}_ids`) that
    glm_jax's pipeline makes of them."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, kind: str, files: Mapping[str, str | Path], tokenizer: Tokenizer,
                 template: Template, max_prompt_tokens: int, max_response_tokens: int,
                 truncation: Truncation = "truncate", **kwargs: Any):
        _check_kind(kind)
        self.kind, self.files = kind, dict(files)
        self.tokenizer, self.template = tokenizer, template
        self.limits = dict(max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens, truncation=truncation)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        features = {"prompt": text, "task": text, "system": text,
                    "history": tfds.features.Sequence({"user": text, "assistant": text})}
        features.update({field: text for field in _TEXT_FIELDS[self.kind]})
        features.update({f"{k}_ids": tfds.features.Sequence(np.int32)
                         for k in FEATURES[self.kind]})
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # local files only: nothing is downloaded
        return {split: self._generate_examples(Path(path)) for split, path in self.files.items()}

    def _generate_examples(self, path: Path):
        records, _ = read_jsonl(path, self.kind)
        for index, record in enumerate(records):
            tokens = tokenize_record(record, self.tokenizer, self.template, **self.limits)
            if tokens is None:
                continue
            example = {"prompt": record.prompt, "task": record.task or "",
                       "system": record.system or "",
                       "history": [{"user": u, "assistant": a} for u, a in record.history]}
            example.update({field: getattr(record, field) for field in _TEXT_FIELDS[self.kind]})
            example.update({f"{k}_ids": np.asarray(v, np.int32) for k, v in tokens.items()})
            yield index, example
