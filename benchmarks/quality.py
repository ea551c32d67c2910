"""Routing quality is now `compare`'s acceptance lines: this runs compare on quality's contenders, no peers."""
import sys

from benchmarks.compare import main

ARGS = ["--workloads", "gsp,multiturn", "--no-peers", "--name", "quality",
        "--policies", "cost,cost-tuned,cache_aware,round_robin,least_load,consistent_hash,pinned"]

if __name__ == "__main__":
    raise SystemExit(main([*ARGS, *sys.argv[1:]]))
