"""Features of a request the router forwards without reading a prompt (`passthrough_paths`: embeddings,
score, rerank, ...): the model it names, its size as the load it brings, and no prefix.

Why no prefix: these endpoints' inputs are not generation prompts whose KV blocks a replica keeps for the
next request, so there is nothing to match; the policy places them by load alone, and they count in a
replica's in-flight work like any request."""

from __future__ import annotations

import math
from typing import Any

from router.features.hashing import HashingConfig
from router.features.parse import FeatureError, RequestFeatures


def passthrough_features(body: dict[str, Any], body_bytes: int, request_id: str,
                         hashing: HashingConfig) -> RequestFeatures:
    """``body`` is the client's JSON object, ``body_bytes`` its size: the token estimate (load only) is
    the size over ``hashing.chars_per_token``. Raises `FeatureError` for a missing model or a non-boolean
    ``stream``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise FeatureError("'model' must be a non-empty string", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise FeatureError("'stream' must be a boolean", "stream")
    return RequestFeatures(request_id=request_id, model=model, kind="other", prompt_chars=body_bytes,
                           token_estimate=math.ceil(body_bytes / hashing.chars_per_token), max_tokens=None,
                           block_hashes=(), block_chars=hashing.block_chars, stream=stream,
                           block_tokens=hashing.block_tokens)
