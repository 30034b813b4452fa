"""The memory system: per-session hierarchies of compressed slots (store), their consolidation by
background workers over NATS JetStream (jobs, worker, service), snapshots, the bus wiring, and
the adapter that serves the engine's memory hooks (hooks).

Imports flow gateway -> memory -> model; only hooks.py imports engine/ (the hook types it
implements). Import the submodules directly: store.py and config.py need only torch, so GPU
benchmarks use them on machines without the NATS client.
"""
