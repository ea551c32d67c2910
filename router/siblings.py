"""A worker's line to its sibling workers (``--workers N``), through the supervising parent.

An admin call reaches the one worker its connection landed on. For the calls that must reach every
worker (``POST /admin/reload``, adding, removing, draining a replica), that worker applies the change,
then `tell`s the others: it writes one JSON line to the pipe the parent gave every worker
(``ROUTER_CONTROL_FD``), and the parent (`router.workers`) writes the line to every other live worker's
stdin, where `listen` hands it to the admin API (`router.admin.apply_sibling_change`). The parent does
not read the messages beyond their sender: what a message means is the workers' business.

Why a pipe and not a signal: a signal cannot carry which replica to drain, nor who sent it (the sender
has already applied the change and must not apply it twice). A line is one ``write`` of at most
`MAX_LINE` bytes, below the pipe's atomic size, so lines from several workers never interleave.
In a single router (no ``--workers``) there is no pipe: `tell` returns False and nothing listens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("router.siblings")

CONTROL_FD_ENV = "ROUTER_CONTROL_FD"
MAX_LINE = 4000  # < PIPE_BUF (4096 on Linux): one write, never interleaved with another worker's


def connected() -> bool:
    """This process is a worker with siblings to tell."""
    return bool(os.environ.get(CONTROL_FD_ENV))


def tell(message: dict[str, Any]) -> bool:
    """Send ``message`` (JSON-able) to every other worker. False when there are none to tell (a single
    router) or the line could not be sent (logged)."""
    fd = os.environ.get(CONTROL_FD_ENV)
    if not fd:
        return False
    line = (json.dumps({**message, "from": os.getpid()}, separators=(",", ":")) + "\n").encode()
    if len(line) > MAX_LINE:
        log.error("change too large to pass to the other workers (%d bytes); only this worker has it", len(line))
        return False
    try:
        os.write(int(fd), line)
    except (OSError, ValueError):
        log.exception("could not reach the supervising parent; the other workers keep their config")
        return False
    return True


def sender(line: bytes) -> int | None:
    """The pid that sent ``line`` (for the parent, which relays it to everyone else), or None."""
    try:
        message = json.loads(line)
        return int(message["from"]) if isinstance(message, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


async def listen(handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Hand every message the siblings send (on stdin) to ``handle``, one at a time, until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE * 2)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("unreadable message from a sibling worker ignored: %r", line[:100])
            continue
        if not isinstance(message, dict):
            continue
        try:
            await handle(message)
        except Exception:  # one bad message must not end the listening
            log.exception("applying a sibling worker's change failed: %r", message)
