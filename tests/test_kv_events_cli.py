"""`--kv-events-*` flags reach the sim backend; a bad or unsupported combination is refused up front."""

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


def test_off_by_default():
    backend = make_backend(build_parser().parse_args(["--backend", "sim"]))
    assert backend.config.kv_events is None and "kv_events" not in backend.load_report().to_json()


@pytest.mark.parametrize("argv, message", [
    (["--kv-events-replay-endpoint", "tcp://*:23558"], "needs --kv-events-endpoint"),
    (["--kv-events-endpoint", "localhost:23557"], "not a ZMQ endpoint"),
    (["--kv-events-endpoint", "tcp://*:0"], "give a port"),
    (["--backend", "vllm", "--model", "x", "--kv-events-endpoint", "tcp://*:23557"], "only implemented"),
])
def test_bad_combinations_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        make_backend(build_parser().parse_args(argv))
