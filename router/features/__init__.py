"""Request features: parse a body once into `RequestFeatures` (with its prefix block-hash chain)."""

from router.features.hashing import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_CHARS_PER_TOKEN,
    HashingConfig,
    PrefixChains,
    block_hashes,
    token_block_hashes,
)
from router.features.parse import (
    FeatureError,
    RequestFeatures,
    chat_prompt_text,
    features_from_body,
    features_from_text,
)

__all__ = [
    "DEFAULT_BLOCK_CHARS",
    "DEFAULT_CHARS_PER_TOKEN",
    "FeatureError",
    "HashingConfig",
    "PrefixChains",
    "RequestFeatures",
    "block_hashes",
    "chat_prompt_text",
    "features_from_body",
    "features_from_text",
    "token_block_hashes",
]
