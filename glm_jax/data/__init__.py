"""Data utilities: tokenizer and GLM chat templates, preference records, cleaning, batching."""

from glm_jax.data.cleaning import (
    balance_by_length,
    drop_cycles,
    drop_ties,
    format_table,
    length_bias_by_bucket,
    preference_stats,
    tokenizer_length,
)
from glm_jax.data.datasets import (
    PreferenceDataset,
    SFTDataset,
    TokenizationReport,
    TokenizedPair,
    tokenize_pair,
    tokenize_record,
)
from glm_jax.data.records import (
    DataError,
    PreferencePair,
    PromptExample,
    ReadReport,
    Record,
    SFTExample,
    read_jsonl,
    write_jsonl,
)
from glm_jax.data.tokenizer import (
    CHATGLM3_TEMPLATE,
    GLM4_TEMPLATE,
    ChatTemplate,
    Tokenizer,
    encode_chat,
)

__all__ = [
    "CHATGLM3_TEMPLATE",
    "GLM4_TEMPLATE",
    "ChatTemplate",
    "DataError",
    "PreferenceDataset",
    "SFTDataset",
    "PreferencePair",
    "PromptExample",
    "ReadReport",
    "Record",
    "SFTExample",
    "TokenizationReport",
    "TokenizedPair",
    "Tokenizer",
    "balance_by_length",
    "drop_cycles",
    "drop_ties",
    "encode_chat",
    "format_table",
    "length_bias_by_bucket",
    "preference_stats",
    "read_jsonl",
    "tokenize_pair",
    "tokenize_record",
    "tokenizer_length",
    "write_jsonl",
]
