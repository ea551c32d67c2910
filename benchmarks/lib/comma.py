"""Comma-separated command-line values, parsed one way for every benchmark command.

    p.add_argument("--seeds", type=comma_list(int), default="1,2,3")          # -> [1, 2, 3]
    p.add_argument("--engines", type=comma_list(choices=ENGINES), default=...)

A bad value is argparse's error naming the flag (``argument --seeds: invalid int value 'x' in '1,x'``, exit
status 2), not a traceback from wherever the text was split later.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection
from typing import Any, TypeVar

T = TypeVar("T")


def comma_list(cast: Callable[[str], T] = str, *, choices: Collection[str] | None = None,  # type: ignore[assignment]
               allow_empty: bool = False) -> Callable[[str], list[T]]:
    """An argparse ``type=``: ``" a, b,,c "`` -> ``[cast("a"), cast("b"), cast("c")]``.

    Items are stripped and empty ones dropped; order and duplicates are kept. With ``choices`` each item
    must be one of them (checked before ``cast``). No item at all is an error unless ``allow_empty``.
    ``cast`` may raise ValueError or TypeError (reported as an invalid value of its name) or
    argparse.ArgumentTypeError (its message is reported as is)."""
    kind = getattr(cast, "__name__", "")

    def parse(text: str) -> list[T]:
        out: list[T] = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"unknown {item!r}; choose from {', '.join(choices)}")
            try:
                out.append(cast(item))
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"invalid {kind} value {item!r} in {text!r}") from None
        if not out and not allow_empty:
            raise argparse.ArgumentTypeError(f"expected a comma list of at least one value, got {text!r}")
        return out

    parse.__name__ = f"comma list of {kind}"  # argparse's name for the type in its own messages
    return parse


def positive_int(text: str) -> int:
    """A ``cast`` for counts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0  # refused below, as a count under 1 is
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def joined(values: list[Any]) -> str:
    """A parsed list as the command line gives it: ``[1, 4]`` -> ``"1,4"``, ``[16.0, 0.5]`` -> ``"16,0.5"``."""
    return ",".join(str(v).removesuffix(".0") if isinstance(v, float) else str(v) for v in values)
