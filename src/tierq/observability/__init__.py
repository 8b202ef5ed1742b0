"""Metrics and logs: a leaf every layer may import; it imports nothing of tierq."""
