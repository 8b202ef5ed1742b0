from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from system import System, start_system


@pytest.fixture
def make_system(redis_url: str) -> Iterator[Callable[..., System]]:
    """Start a whole system (broker + app) with settings overrides; stopped after the test."""
    started: list[System] = []

    def make(**overrides: Any) -> System:
        system = start_system(redis_url, **overrides)
        started.append(system)
        return system

    yield make
    for system in started:
        system.close()


@pytest.fixture
def system(make_system: Callable[..., System]) -> System:
    return make_system()
