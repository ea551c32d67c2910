"""A gsp-shaped workload for fleets of a thousand replicas, built lazily (``--scale``)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from benchmarks.lib import workloads as wl


class _LazySessions(Sequence[wl.Session]):
    """gsp-shaped sessions built on demand, so a million-request workload costs no memory up front.

    Text comes from slices of one seeded pseudo-word pool instead of per-request generation: the same
    shape as `workloads.gsp` (a group system prompt, then a unique question), built in microseconds.
    """

    def __init__(self, requests: int, groups: int, system_tokens: int, question_tokens: int,
                 output_tokens: int, seed: int) -> None:
        rng = random.Random(seed)
        self.n, self.output_tokens = requests, output_tokens
        self.pool = wl.text_of(rng, 1 << 18)  # 1 MiB of pseudo-words
        span = len(self.pool) - (system_tokens + question_tokens) * wl.CHARS_PER_TOKEN
        self.systems = [f"Group {g}. " + self._slice(rng.randrange(span), system_tokens) for g in range(groups)]
        self.group_of = [rng.randrange(groups) for _ in range(requests)]
        self.offset = [rng.randrange(span) for _ in range(requests)]
        self.question_tokens = question_tokens

    def _slice(self, start: int, tokens: int) -> str:
        return self.pool[start:start + tokens * wl.CHARS_PER_TOKEN]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> wl.Session:  # type: ignore[override]
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = self.group_of[i]
        question = f"Question {i}: " + self._slice(self.offset[i], self.question_tokens)
        req = wl.Request(({"role": "system", "content": self.systems[g]},
                          {"role": "user", "content": question}), self.output_tokens)
        return wl.Session(id=f"s{i}", turns=(req,), group=f"g{g}")

    def __iter__(self) -> Iterator[wl.Session]:
        return (self[i] for i in range(self.n))


class _ScaleWorkload(wl.Workload):
    """One request per session, so counting requests need not build every session."""

    @property
    def num_requests(self) -> int:
        return len(self.sessions)


def scale_workload(requests: int, replicas: int, *, seed: int = 0, system_tokens: int = 512,
                   question_tokens: int = 64, output_tokens: int = 32,
                   groups_per_replica: int = 16) -> wl.Workload:
    """gsp at fleet scale: ``groups_per_replica x replicas`` groups, one request per session, lazily built."""
    groups = max(1, min(requests, groups_per_replica * replicas))
    sessions = _LazySessions(requests, groups, system_tokens, question_tokens, output_tokens, seed)
    return _ScaleWorkload("gsp-scale", sessions, {  # type: ignore[arg-type]
        "requests": requests, "groups": groups, "system_tokens": system_tokens,
        "question_tokens": question_tokens, "output_tokens": output_tokens, "seed": seed})
