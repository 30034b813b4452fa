"""Long-context evals: seeded byte-level task generators (tasks.py) and the runner that streams
them through the engine (run.py). Generators never import torch or the engine."""

from model.evals.tasks import TASKS, Case, associative_recall, facts, parse_size, passkey

__all__ = ["TASKS", "Case", "associative_recall", "facts", "parse_size", "passkey"]
