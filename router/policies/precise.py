"""precise: the cost policy pricing the engines' KV events (``cost`` with ``index: precise``).

Its own name so a config or a benchmark can ask for exact routing in one word; every other parameter is
the cost policy's (same names and defaults, so config validation lists them). See
`router.policies.kv_match` for what ``precise`` trusts per replica status.
"""

from __future__ import annotations

import inspect
from typing import Any

from router.policies.cost import Cost


class Precise(Cost):
    name = "precise"

    def __init__(self, *, index: str = "precise", **params: Any) -> None:
        super().__init__(index=index, **params)


_cost_signature = inspect.signature(Cost.__init__)
Precise.__init__.__signature__ = _cost_signature.replace(  # type: ignore[attr-defined]
    parameters=[p.replace(default="precise") if p.name == "index" else p
                for p in _cost_signature.parameters.values()])
