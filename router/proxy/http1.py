"""A small HTTP/1.1 client for the proxied calls and the replicas' probes: pooled keep-alive connections,
one asyncio.Protocol each.

Why not aiohttp's ClientSession: a streamed 16-token answer arrives in about 19 packets, and aiohttp's
client spends more CPU per packet (StreamReader, flow control, timer re-arming) and per request (request
and response objects, URL and header multidicts) than the router spends routing. Here a packet costs one
`httptools` parse (C) and a list append; a request costs one write of head and body together.

What it does and keeps: POST with a body known in advance, and GET (the poller's /health and /load: at
two load polls a second per replica, a large fleet's probes cost the router more than a few of its
requests, and a GET here takes about a third of aiohttp's client CPU); responses delimited by Content-Length,
chunked encoding or the connection's end; a connection goes back to its origin's pool only when its
response was read to the end and the replica allows keep-alive, and otherwise is closed (so a reader that
stops early, e.g. because its client left, makes the replica abort the generation). Idle connections are
reused most recent first, at most `max_idle_per_origin` are kept, none past `keepalive_s`. A request sent
on a reused connection that the replica closed before answering (its keep-alive ran out as we sent) is
sent once more on a new connection: the replica closed it idle, so it never saw the request.

Errors: `ConnectFailed`, `Disconnected` (closed before the response was complete), `BadResponse` (not
parseable HTTP/1.x), and the timeouts `ConnectTimeout`, `HeadTimeout` (no response head by the deadline)
and `IdleTimeout` (a body silent for `idle_s` while being read); the timeouts are `TimeoutError`s.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from functools import lru_cache
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 16  # body bytes buffered unread before the connection stops reading (back-pressure)


class ClientError(Exception):
    """Base of the failures that are not timeouts."""


class ConnectFailed(ClientError):
    """No connection could be opened (refused, unreachable, name or TLS failure)."""


class Disconnected(ClientError):
    """The connection closed before the response was complete."""


class BadResponse(ClientError):
    """The replica's bytes are not an HTTP/1.x response."""


class ConnectTimeout(TimeoutError):
    """No connection within connect_s."""


class HeadTimeout(TimeoutError):
    """No response head by the deadline."""


class IdleTimeout(TimeoutError):
    """Nothing received for idle_s while the body was being read."""


Origin = tuple[str, int, bool, bytes]  # host, port, TLS, Host header value


@lru_cache(maxsize=4096)
def split_url(url: str) -> tuple[Origin, bytes]:
    """(origin, request target) of an http(s) URL; cached, as replicas' URLs repeat."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if tls else 80)
    host_header = parts.netloc.rpartition("@")[2]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.hostname, port, tls, host_header.encode("idna")), target.encode("ascii")


def request_head(target: bytes, host: bytes, headers: dict[str, str], body_len: int | None,
                 method: bytes = b"POST") -> bytes:
    """The request line and headers of a request with a ``body_len``-byte body (None: no body, as a GET)."""
    lines = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    if body_len is not None:
        lines += [b"Content-Length: ", str(body_len).encode(), b"\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    return b"".join(lines)


class Connection(asyncio.Protocol):
    """One keep-alive connection to one origin, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False  # an exchange is under way (bytes while idle are a broken replica)
        self.idle_since = 0.0
        self.chunks: list[bytes] = []  # body bytes not read yet; emptied in place, never replaced
        self.on_body = self.chunks.append  # httptools calls it per body piece: no Python frame
        self.parser = httptools.HttpResponseParser(self)  # reused: it starts over after each response
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: BaseException | None = None
        self.chunks.clear()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.idle_s: float | None = None
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a token must not wait for the next

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.error is not None:  # bytes after the response or unasked
            self._fail(BadResponse("unexpected bytes after the response"))
            return
        self.got_bytes = True
        if self.idle_s is not None:
            self.last_data = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"bad response: {exc}"))
            return
        self.buffered += len(data)
        if self.buffered > HIGH_WATER and not self.paused and self.chunks:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self.waiter  # one wake per packet (the reader re-checks what it waits for)
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.complete or self.error is not None:
            return
        if self.head_done and self._until_close():  # the body ran to the connection's end, as it said
            self.complete = True
            self._wake()
            return
        self._fail(Disconnected("replica closed the connection" + (f": {exc}" if exc else "")), close=False)

    # --- httptools callbacks --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer: the real head follows
            self.headers = []
            return
        self.head_done = True

    def on_message_complete(self) -> None:
        if not self.head_done:  # the end of an interim answer
            return
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is over
        self.complete = True

    # --- the exchange -----------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(data)

    async def head(self, deadline: float) -> None:
        """Wait for the response head until ``deadline`` (loop time)."""
        timer = self.timer = self.loop.call_at(deadline, self._head_timeout)
        try:
            while not self.head_done:
                if self.error is not None:
                    raise self.error
                await self.wait()
        finally:
            timer.cancel()
            self.timer = None

    def stream(self, idle_s: float) -> None:
        """From now on a read fails with `IdleTimeout` if nothing arrived for ``idle_s``."""
        self.idle_s = idle_s
        self.last_data = self.loop.time()
        self.timer = self.loop.call_at(self.last_data + idle_s, self._idle_check)

    def read_nowait(self) -> bytes | None:
        """The body bytes received since the last read; b"" at the end; None if none yet (then `wait`).
        Raises the exchange's failure once the bytes before it are read."""
        chunks = self.chunks
        if not chunks:
            if self.error is not None:
                raise self.error
            return b"" if self.complete else None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_data = self.loop.time()  # silence while paused was ours, not the replica's
            self.transport.resume_reading()
        return data

    def wait(self) -> asyncio.Future[None]:
        """Done when something arrives or the exchange fails (a future, not a coroutine: one frame less
        per token in the relay's loop). Its result is always None: the failure is read from the state."""
        waiter = self.waiter = self.loop.create_future()
        return waiter

    def done(self) -> None:
        """The exchange is over: back to the pool if the response was read to its end, else closed."""
        if self.timer is not None:
            self.timer.cancel()
        if (self.complete and self.keep_alive and not self.chunks and not self.paused and self.error is None
                and not self.closed):
            self.busy = False
            self._reset()
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    # --- internals ---------------------------------------------------------------------------------------

    def _until_close(self) -> bool:
        """The body is delimited by the connection's end (neither a length nor chunked)."""
        for name, value in self.headers:
            low = name.lower()
            if low == "content-length" or (low == "transfer-encoding" and "chunked" in value.lower()):
                return False
        return True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: BaseException, *, close: bool = True) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if close:
            self.close()

    def _head_timeout(self) -> None:
        self.timer = None
        self._fail(HeadTimeout("no response head in time"))

    def _idle_check(self) -> None:
        self.timer = None
        if self.complete or self.error is not None or self.idle_s is None:
            return
        now = self.loop.time()
        if self.paused:  # we stopped reading: the replica's silence is ours
            self.last_data = now
        due = self.last_data + self.idle_s
        if now >= due - 0.001:  # uvloop's clock has millisecond steps
            self._fail(IdleTimeout(f"nothing received for {self.idle_s:g}s"))
        else:
            self.timer = self.loop.call_at(due, self._idle_check)


class UpstreamPool:
    """Keep-alive connections per origin, shared by every proxied call of one router.

    max_idle_per_origin bounds the idle connections kept (connections in use are not limited here; the
    router's admission limits bound them); keepalive_s closes connections idle for longer."""

    def __init__(self, *, max_idle_per_origin: int = 256, keepalive_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._idle: dict[Origin, deque[Connection]] = {}
        self._all: set[Connection] = set()
        self._closed = False

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, connect_s: float,
                   head_s: float) -> Response:
        """POST ``body`` and wait for the response head: `connect_s` bounds a new connection, `head_s`
        the whole call (connect included)."""
        origin, target = split_url(url)
        return await self._request(origin, request_head(target, origin[3], headers, len(body)) + body,
                                   connect_s, head_s)

    async def get(self, url: str, headers: dict[str, str] | None = None, *, connect_s: float,
                  head_s: float) -> Response:
        """GET ``url`` and wait for the response head, bounded as `post`."""
        origin, target = split_url(url)
        return await self._request(origin, request_head(target, origin[3], headers or {}, None, b"GET"),
                                   connect_s, head_s)

    async def _request(self, origin: Origin, data: bytes, connect_s: float, head_s: float) -> Response:
        deadline = self.loop.time() + head_s
        conn = self._take_idle(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, data, deadline)
            except Disconnected:
                if conn.got_bytes:
                    raise
                # closed idle as we sent: the replica never saw this request; once more on a new connection
        conn = await self._connect(origin, connect_s, deadline)
        return await self._exchange(conn, data, deadline)

    async def _exchange(self, conn: Connection, data: bytes, deadline: float) -> Response:
        try:
            conn.send(data)
            await conn.head(deadline)
        except BaseException:  # failed, timed out or cancelled (the client left): never reused
            conn.close()
            raise
        return Response(conn)

    async def _connect(self, origin: Origin, connect_s: float, deadline: float) -> Connection:
        if self._closed:
            raise ConnectFailed("the upstream pool is closed")
        host, port, tls, _ = origin
        limit = min(connect_s, deadline - self.loop.time())
        context = None
        if tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(max(0.0, limit)):
                _, conn = await self.loop.create_connection(lambda: Connection(self, origin), host, port,
                                                            ssl=context)
        except TimeoutError:
            if limit < connect_s:
                raise HeadTimeout("no response head in time (still connecting)") from None
            raise ConnectTimeout(f"no connection within {connect_s:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        self._all.add(conn)
        if self._closed:
            conn.close()
            raise ConnectFailed("the upstream pool is closed")
        return conn

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        now = self.loop.time()
        conn.idle_since = now
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        idle.append(conn)
        while idle and (len(idle) > self.max_idle_per_origin or idle[0].idle_since < now - self.keepalive_s):
            idle.popleft().close()

    def forget(self, conn: Connection) -> None:
        """``conn`` is closed: it leaves the pool."""
        self._all.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    @property
    def idle_count(self) -> int:
        return sum(len(d) for d in self._idle.values())

    @property
    def open_count(self) -> int:
        return len(self._all)

    async def close(self) -> None:
        """Close every connection, idle or in use; later calls fail with `ConnectFailed`."""
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost


class Response:
    """A response whose head has arrived; its body is read with `read_chunk` or `read` (or, in a hot
    loop, `read_nowait` and `wait`), then `close`."""

    __slots__ = ("_conn", "status", "headers", "read_nowait", "wait")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self.read_nowait = conn.read_nowait
        self.wait = conn.wait

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return default

    def stream(self, idle_s: float) -> None:
        """Reads fail with `IdleTimeout` after ``idle_s`` without a byte."""
        self._conn.stream(idle_s)

    async def read_chunk(self) -> bytes:
        """The body bytes received since the last read (waiting for some); b"" at the end."""
        conn = self._conn
        while (data := conn.read_nowait()) is None:
            await conn.wait()
        return data

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Release the connection (reused if the body was read to its end); idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None  # type: ignore[assignment]
            conn.done()
