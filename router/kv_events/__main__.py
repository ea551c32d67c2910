"""`python -m router.kv_events`: follow engines' KV events and print what the router would know.

A diagnostic for operators and for checking an engine's event configuration before routing on it: it
subscribes exactly as the router will (`KVEventHub`), then prints one JSON line per interval with each
replica's sync status, blocks held and counters, and optionally the blocks each replica holds for a prompt
given as token ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import aiohttp

from router.features.hashing import token_block_hashes
from router.kv_events.subscriber import EventSource, KVEventHub

EPILOG = """\
examples:
  # engines that advertise their endpoints in /load (our engine server with --kv-events-endpoint)
  python -m router.kv_events --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002
  # a stock vLLM started with --kv-events-config (give what /load cannot tell)
  python -m router.kv_events --endpoint tcp://10.0.0.7:5557 --replay-endpoint tcp://10.0.0.7:5558 \\
      --block-size 16 --model meta-llama/Llama-3.1-8B-Instruct --duration 30
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router.kv_events", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="engine server URL whose /load advertises kv_events (repeatable)")
    p.add_argument("--endpoint", help="a publisher's PUB endpoint, given directly")
    p.add_argument("--replay-endpoint", help="its ROUTER replay endpoint (optional)")
    p.add_argument("--topic", default="", help="its topic (default empty)")
    p.add_argument("--block-size", type=int, default=16, help="its KV block size in tokens (default 16)")
    p.add_argument("--model", default="", help="its served model name (root of the block keys)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between reports (default 1)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: never)")
    p.add_argument("--until-synced", action="store_true",
                   help="exit 0 at the first report where every replica is synced (1 if --duration ends first)")
    p.add_argument("--tokens", default=None,
                   help="comma-separated prompt token ids: also report each replica's leading blocks for it")
    return p


async def sources(args: argparse.Namespace) -> list[EventSource]:
    out: list[EventSource] = []
    if args.endpoint:
        out.append(EventSource(replica="direct", endpoint=args.endpoint, replay_endpoint=args.replay_endpoint,
                               topic=args.topic, block_size=args.block_size, model=args.model))
    if args.replica:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for url in args.replica:
                async with http.get(url.rstrip("/") + "/load") as resp:
                    load = await resp.json()
                src = EventSource.from_load(url, url, load)
                if src is None:
                    raise SystemExit(f"error: {url}/load advertises no kv_events")
                out.append(src)
    if not out:
        raise SystemExit("error: give --replica URL or --endpoint ZMQ")
    return out


async def run(args: argparse.Namespace) -> int:
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    srcs = await sources(args)
    loop = asyncio.get_running_loop()
    deadline = None if args.duration is None else loop.time() + args.duration
    async with KVEventHub() as hub:
        for src in srcs:
            hub.add(src)
        while True:
            await asyncio.sleep(args.interval)
            report = {"replicas": hub.index.snapshot()}
            if tokens is not None:
                report["match"] = {
                    src.replica: hub.index.match(token_block_hashes(tokens, src.block_size, src.model),
                                                 [src.replica])[src.replica].blocks
                    for src in srcs
                }
            print(json.dumps(report, sort_keys=True), flush=True)
            if args.until_synced and all(r["status"] == "synced" for r in report["replicas"].values()):
                return 0
            if deadline is not None and loop.time() >= deadline:
                return 1 if args.until_synced else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
