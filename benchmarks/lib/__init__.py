"""The benchmarks' library: everything the `python -m benchmarks.<command>` modules share.

- `defaults`: paths, the sim model name, loopback host, session header, `cost` tuning per sim profile;
- `workloads`: seeded workloads, the oracle (pooled-cache hit rate) and KV sizing;
- `loadgen`: replays a workload against one endpoint (closed loop, Poisson, trace), plus `closed_loop`;
- `client`: the streaming HTTP client, warm-up requests and small scrapes (/health, /metrics);
- `fleet`: sim engines and our router as processes (or in-process for smoke tests);
- `routers`: any contender router (ours or a peer) started by its own command line;
- `cpu`: CPU seconds of processes and of the host;
- `stats` and `metrics`: percentiles, and the summary of one run; `acceptance`: compare's PASS/FAIL lines;
- `report`: machine info, tables, JSON output, the common `main` wrapper; `plots`; `cli_help`;
- reliability's `lab`, `fault_client` and `scenarios`; fidelity's `engine_process` and `fidelity_errors`.

Library modules never import a command module (tests/benchmarks/test_layout.py).
"""
