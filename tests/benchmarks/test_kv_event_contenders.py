"""KV-event contenders of `benchmarks.compare` (issue 14): who needs the engines' events, the command lines
that follow them, ``--router-processes`` and ``--kv-fraction``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.compare import contenders, parse_args
from benchmarks.lib.client import client_session, stream_chat
from benchmarks.lib.defaults import MODEL
from benchmarks.lib.fleet import EngineSpec, Fleet, kv_event_endpoints
from benchmarks.lib.routers import Contender, peer_available, peer_contender, run_router

URLS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def test_only_contenders_that_price_or_follow_events_need_them() -> None:
    needs = {c.name: c.needs_kv_events for c in contenders(parse_args(["--policies", "cost,precise,cache_aware"]))}
    assert needs["precise"] and needs["vllm-router:kv_aware"]
    assert not needs["cost"] and not needs["cache_aware"] and not needs["vllm-router:cache_aware"]
    assert Contender("cost-precise", "ours", "cost", {"index": "precise"}).needs_kv_events


def test_engines_publish_on_local_sockets_named_after_their_port() -> None:
    argv = EngineSpec(kv_events=True).argv(9001)
    pub, replay = kv_event_endpoints("http://127.0.0.1:9001")
    assert argv[argv.index("--kv-events-endpoint") + 1] == pub and pub.startswith("ipc://")
    assert argv[argv.index("--kv-events-replay-endpoint") + 1] == replay
    assert "--kv-events-endpoint" not in EngineSpec().argv(9001)


def test_our_precise_router_follows_events_with_the_sim_tokenizer(tmp_path: Path) -> None:
    argv = Contender("precise", "ours", "precise", workers=4).argv(8123, URLS, tmp_path)
    assert argv[-2:] == ["--workers", "4"]
    cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    assert cfg["kv_events"] == {"enabled": True, "tokenizer": "sim"}
    plain = Contender("cost", "ours", "cost").argv(8123, URLS, tmp_path)
    assert "--workers" not in plain and "kv_events" not in yaml.safe_load(Path(plain[4]).read_text())


def test_kv_aware_names_each_workers_event_source(tmp_path: Path) -> None:
    argv = peer_contender("vllm-router", "kv_aware").argv(1, URLS, tmp_path, kv_sources={
        URLS[0]: "tcp://127.0.0.1:7001", URLS[1]: "tcp://127.0.0.1:7002"})
    i = argv.index("--kv-event-source")
    assert argv[i:i + 4] == ["--kv-event-source", f"{URLS[0]}=tcp://127.0.0.1:7001",
                             "--kv-event-source", f"{URLS[1]}=tcp://127.0.0.1:7002"]
    assert argv[-4:] == ["--kv-event-block-size", "16", "--kv-event-model", MODEL]


def test_router_processes_add_a_named_variant_of_each_of_ours() -> None:
    cands = contenders(parse_args(["--policies", "cost,precise", "--no-peers", "--router-processes", "1,4"]))
    assert [(c.name, c.workers) for c in cands] == [("cost", 1), ("precise", 1), ("cost@4p", 4), ("precise@4p", 4)]
    with pytest.raises(SystemExit):
        contenders(parse_args(["--no-peers", "--router-processes", "0"]))


@pytest.mark.timeout(120)
async def test_kv_aware_starts_on_relayed_events_and_routes(tmp_path: Path) -> None:
    # A smoke test of the command line and the relay: where each request lands depends on when the events
    # arrive, so only "it routes and its engines report cache hits" is asserted, which holds either way.
    if (why := peer_available("vllm-router")) is not None:
        pytest.skip(why)
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "shared context " * 60}]}
    kv_aware = peer_contender("vllm-router", "kv_aware")
    async with Fleet(2, EngineSpec(profile="instant", kv_events=True), log_dir=tmp_path) as fleet, \
            run_router(kv_aware, fleet.engine_urls, tmp_path) as r, client_session() as s:
        assert r.argv[0] == sys.executable and "--kv-event-source" in r.argv
        first = await stream_chat(s, r.url, body)
        again = [await stream_chat(s, r.url, body) for _ in range(3)]
    assert first.ok and all(x.ok for x in again)
    assert again[-1].usage["prompt_tokens_details"]["cached_tokens"] > 0


def test_untold_processes_price_our_cost_family_variants_as_a_lone_router() -> None:
    args = parse_args(["--policies", "cost,precise,round_robin", "--router-processes", "1,4", "--no-peers",
                       "--untold-processes"])
    params = {c.name: c.params for c in contenders(args)}
    assert params["precise@4p"]["router_processes"] == 1 and params["cost@4p"]["router_processes"] == 1
    assert "router_processes" not in params["precise"] and "router_processes" not in params["round_robin@4p"]
