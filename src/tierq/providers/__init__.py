"""Model providers: the interface, the simulated model and the run-time registry."""

from tierq.providers.base import Chunk, Finish, Provider, ProviderError, ProviderRequest
from tierq.providers.registry import ProviderRegistry, build_provider
from tierq.providers.simulated import SimulatedProvider

__all__ = [
    "Chunk",
    "Finish",
    "Provider",
    "ProviderError",
    "ProviderRegistry",
    "ProviderRequest",
    "SimulatedProvider",
    "build_provider",
]
