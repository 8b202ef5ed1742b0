"""tierq: tiered named QStash queues, Redis concurrency guards and live SSE job events."""

__version__ = "0.1.0"
