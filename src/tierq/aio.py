"""Small asyncio helpers every layer may use (a leaf: imports nothing of tierq)."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, ``asyncio.wait_for`` returns the result when a cancel lands just as the
    operation completes, and redis-py uses it to send every command: a task cancelled during
    a Redis call can go on as if nothing happened (seen in tests: about one call in ten when
    cancelled mid-command). The task still counts the request (``cancelling()``), so loops that
    must stop when cancelled call this after each such await."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
