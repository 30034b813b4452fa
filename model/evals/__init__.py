"""Long-context evals: seeded byte-level task generators (tasks.py), the `bwr eval` flags
(args.py) and the mix of eval cases into training batches (mix.py). The runner that streams them
through the engine and the memory system lives in gateway/evals.py (it needs NATS). Generators
never import torch or the engine."""

from model.evals.tasks import TASKS, Case, associative_recall, facts, parse_size, passkey

__all__ = ["TASKS", "Case", "associative_recall", "facts", "parse_size", "passkey"]
