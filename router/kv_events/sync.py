"""`EventSync`: sequence tracking for one engine's event stream, in front of its `EngineBlockIndex`. Pure.

The I/O layer (`router.kv_events.subscriber`) feeds it what arrives and performs the replays it asks for;
everything that decides is here, so it is tested without sockets.

Batches carry a sequence number that starts at 0 when the engine's publisher starts and grows by one per
batch. Live messages can be lost (ZMQ drops at the high-water mark, a slow joiner misses the first ones);
the engine keeps its last ``buffer_steps`` batches for replay. States (`status`):

- ``unsynced``: nothing applied yet, or a full resync is under way (start-up, reconnect, engine restart).
- ``synced``: every batch from 0 (or from the last full resync's replay that started at 0) was applied in
  order: the index is exact.
- ``stale``: a gap was seen, or the connection dropped, and the repair has not finished: do not trust it.
- ``partial``: batches were lost beyond the replay buffer (or no replay endpoint answered). The index was
  cleared at the loss and rebuilt from later events only, so it is a **subset** of the engine's cache
  (every block it holds was stored after the loss and not removed since). It stays partial until the
  engine clears its cache (``AllBlocksCleared``) or a full resync's replay starts at sequence 0.

Transitions (what `on_live` does with a message carrying ``seq``):

- ``seq == next``: apply, ``next += 1``.
- ``seq < next`` with the timestamp of the batch applied under that number: a batch already applied from
  a replay (live messages queue up while a replay runs): skip.
- ``seq < next`` otherwise: the publisher started again (engine restart): full resync (clear the index
  *and* its engine-hash memory, replay from 0).
- ``seq > next``: a gap: hold the message, status ``stale``, ask for a replay from ``next``.

A replay answers batches ``>= start`` in order: those below ``next`` are skipped, the next one applied; if the
first one is beyond ``next`` the missing batches are gone: clear, ``partial``, continue from it. When the
replay ends (or fails) the held live message is processed again. A reconnection after a disconnect is
treated as a possible engine restart (the new publisher's sequence could already be past ours): full resync.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from kv_wire import AllBlocksCleared, KVEventBatch
from router.kv_events.index import EngineBlockIndex

Status = Literal["unsynced", "synced", "stale", "partial"]


@dataclass(slots=True)
class SyncStats:
    batches: int = 0  # batches applied
    live: int = 0  # of those, received live (the others came from replays)
    duplicates: int = 0  # batches skipped because already applied
    gaps: int = 0  # live sequence gaps detected
    replays: int = 0  # replay requests issued
    lost: int = 0  # batches lost for good (beyond the replay buffer or no replay)
    restarts: int = 0  # publisher restarts detected (sequence went back)
    resyncs: int = 0  # full resyncs (start-up, reconnect, restart)
    disconnects: int = 0


class EventSync:
    """Applies one engine's batches to its index in sequence order and says when to replay."""

    def __init__(self, index: EngineBlockIndex) -> None:
        self.index = index
        self.status: Status = "unsynced"
        self.next_seq = 0  # sequence number of the next batch to apply
        self.recent_window = 16_384  # applied batches remembered (seq -> ts) to tell duplicates from restarts
        self._recent: OrderedDict[int, float] = OrderedDict()
        self.replaying_from: int | None = None  # a replay is under way (its start)
        self._held: tuple[int, KVEventBatch] | None = None  # live message waiting for a replay
        self._probing = False  # the replay under way is an idle probe (its failure loses nothing)
        self._after_replay: Status = "synced"  # status once the replay under way has covered its gap
        self.highest_seen: int | None = None  # highest live sequence received (None before the first)
        self.stats = SyncStats()

    @property
    def exact(self) -> bool:
        return self.status == "synced"

    # -- connection ----------------------------------------------------------------------------------

    def full_resync(self) -> int:
        """Forget everything and rebuild from the publisher's buffer. Returns the replay start (0)."""
        self.stats.resyncs += 1
        self.index.clear(forget=True)
        self.status = "unsynced"
        self.next_seq = 0
        self._recent.clear()
        self._after_replay = "synced"
        return self._request(0)

    def on_connected(self) -> int:
        """The subscription is (re)established: full resync (returns the replay start)."""
        return self.full_resync()

    def probe(self) -> int | None:
        """When idle: ask for everything from ``next`` (catches a lost last batch). None if not now."""
        if self.replaying_from is not None or self.status not in ("synced", "partial"):
            return None
        self._after_replay = self.status
        self._probing = True
        return self._request(self.next_seq)

    def on_disconnected(self) -> None:
        """The connection dropped (or the subscriber failed): stale until the reconnection's resync."""
        self.stats.disconnects += 1
        self.status = "stale"
        self.replaying_from = None  # a replay in flight is abandoned
        self._held = None
        self._probing = False

    # -- live ----------------------------------------------------------------------------------------

    def on_live(self, seq: int, batch: KVEventBatch) -> int | None:
        """A message from the PUB socket. Returns a replay start if a replay must run before more input."""
        if self.replaying_from is not None:
            raise RuntimeError("live input while a replay is under way (the I/O layer must wait)")
        self.highest_seen = seq  # the publisher's latest number as far as we know (lag = this + 1 - next)
        if seq < self.next_seq:
            if self._recent.get(seq) == batch.ts:
                self.stats.duplicates += 1
                return None
            self.stats.restarts += 1
            start = self.full_resync()
            self._held = (seq, batch)
            return start
        if seq > self.next_seq:
            self.stats.gaps += 1
            self._after_replay = "partial" if self.status == "partial" else "synced"
            if self.status != "unsynced":
                self.status = "stale"
            self._held = (seq, batch)
            return self._request(self.next_seq)
        self._apply(seq, batch)
        self.stats.live += 1
        return None

    # -- replay --------------------------------------------------------------------------------------

    def on_replay(self, seq: int, batch: KVEventBatch) -> None:
        """One batch of the replay answer (in order)."""
        if seq < self.next_seq:
            self.stats.duplicates += 1
            return
        if seq > self.next_seq:
            self._lose(seq)
        self._apply(seq, batch)

    def on_replay_end(self, ok: bool = True) -> None:
        """The end marker arrived (``ok``), or the replay failed or timed out (then what it should have
        brought is lost, except for an idle probe's). Then the held live message, if any, is applied."""
        self.replaying_from = None
        probing, self._probing = self._probing, False
        held, self._held = self._held, None
        if probing and not ok:
            self.status = self._after_replay
            return
        if held is not None and held[0] > self.next_seq:
            # The replay did not cover the gap up to the held message: those batches are gone.
            self._lose(held[0])
        elif not ok and held is None:
            # Nothing to compare with: we cannot know what was missed.
            self._lose(self.next_seq)
        self.status = self._after_replay
        if held is not None and held[0] == self.next_seq:
            self._apply(*held)
        elif held is not None:
            self.stats.duplicates += 1

    # -- internals -----------------------------------------------------------------------------------

    def _request(self, start: int) -> int:
        self.replaying_from = start
        self.stats.replays += 1
        return start

    def _lose(self, seq: int) -> None:
        """Batches ``next_seq .. seq - 1`` will never come: restart the index from here, as a subset."""
        self.stats.lost += max(seq - self.next_seq, 0)
        self.index.clear(forget=False)
        self.status = self._after_replay = "partial"
        self.next_seq = seq

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        self.index.apply_all(batch.events)
        self.next_seq = seq + 1
        recent = self._recent
        recent[seq] = batch.ts
        if len(recent) > self.recent_window:
            recent.popitem(last=False)
        self.stats.batches += 1
        if self._after_replay == "partial" and any(isinstance(e, AllBlocksCleared) for e in batch.events):
            # The engine emptied its cache and so did the index, in order: from here on it is exact.
            self._after_replay = "synced"
            if self.status == "partial":
                self.status = "synced"
