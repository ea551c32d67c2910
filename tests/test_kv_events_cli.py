"""`--kv-events-*` flags reach the sim and vllm backends; a bad or unsupported combination is refused up front."""

from __future__ import annotations

import pytest

from engine_server.cli import build_parser, make_backend
from engine_server.kv_events import KVEventsSettings


def test_flags_configure_the_sim_backend():
    args = build_parser().parse_args([
        "--backend", "sim", "--kv-events-endpoint", "tcp://*:23557", "--kv-events-replay-endpoint",
        "tcp://*:23558", "--kv-events-topic", "kv", "--kv-events-buffer-steps", "50"])
    backend = make_backend(args)
    assert backend.config.kv_events == KVEventsSettings(endpoint="tcp://*:23557", replay_endpoint="tcp://*:23558",
                                                        topic="kv", buffer_steps=50)
    assert backend.kv_events is None  # sockets are bound at start(), not at construction
    assert backend.load_report().to_json()["kv_events"] == {
        "publisher": "zmq", "endpoint": "tcp://*:23557", "replay_endpoint": "tcp://*:23558", "topic": "kv"}


def test_flags_configure_the_vllm_backend():
    """The vllm backend hands the flags to vLLM's own publisher and advertises them in /load, as the sim."""
    pytest.importorskip("vllm")
    backend = make_backend(build_parser().parse_args([
        "--backend", "vllm", "--model", "some/model", "--block-size", "32", "--kv-events-endpoint",
        "tcp://*:23557", "--kv-events-replay-endpoint", "tcp://*:23558", "--kv-events-topic", "kv"]))
    from engine_server.vllm_backend import kv_events_config

    cfg = kv_events_config(backend.config.kv_events)
    assert (cfg.enable_kv_cache_events, cfg.publisher, cfg.endpoint, cfg.replay_endpoint, cfg.topic) == (
        True, "zmq", "tcp://*:23557", "tcp://*:23558", "kv")
    load = backend.load_report().to_json()
    assert load["block_size"] == 32 and load["kv_events"] == {
        "publisher": "zmq", "endpoint": "tcp://*:23557", "replay_endpoint": "tcp://*:23558", "topic": "kv"}


def test_off_by_default():
    backend = make_backend(build_parser().parse_args(["--backend", "sim"]))
    assert backend.config.kv_events is None and "kv_events" not in backend.load_report().to_json()


@pytest.mark.parametrize("argv, message", [
    (["--kv-events-replay-endpoint", "tcp://*:23558"], "needs --kv-events-endpoint"),
    (["--kv-events-endpoint", "localhost:23557"], "not a ZMQ endpoint"),
    (["--kv-events-endpoint", "tcp://*:0"], "give a port"),
])
def test_bad_combinations_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        make_backend(build_parser().parse_args(argv))


def test_the_watch_tool_reports_status_and_matches(tmp_path):
    """`python -m router.kv_events` follows a publisher and reports what the router knows, as JSON lines."""
    import json
    import subprocess
    import sys
    import tempfile

    from engine_server.kv_events import KVEventPublisher, block_stored
    from kv_wire import KVEventBatch

    d = tempfile.mkdtemp(prefix="kvw", dir="/tmp")
    s = KVEventsSettings(endpoint=f"ipc://{d}/pub", replay_endpoint=f"ipc://{d}/replay")
    pub = KVEventPublisher(s)
    try:
        pub.publish(KVEventBatch(ts=1.0, events=[block_stored([11], None, [1, 2, 3, 4], 4)]))
        assert pub.flush()
        out = subprocess.run(
            [sys.executable, "-m", "router.kv_events", "--endpoint", s.endpoint, "--replay-endpoint",
             s.replay_endpoint, "--block-size", "4", "--model", "m", "--interval", "0.1", "--until-synced",
             "--duration", "50",
             "--tokens", "1,2,3,4,5"], capture_output=True, text=True, timeout=60, check=True)
    finally:
        pub.shutdown()
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["replicas"]["direct"]["status"] == "synced" and last["replicas"]["direct"]["blocks"] == 1
    assert last["match"] == {"direct": 1}
