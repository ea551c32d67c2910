"""Prefix-cache-aware router for vLLM fleets.

The decision core is pure and synchronous: `router.features` turns a request body into `RequestFeatures`,
`router.replica_view.ReplicaView` is the per-replica snapshot, `router.prefix_index` remembers which
replica has seen which prompt prefix, and `router.policies` picks a replica. No module here does I/O.
"""
