"""Data utilities: tokenizer wrapper and GLM chat templates."""

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
    "Tokenizer",
    "encode_chat",
]
