"""The model registry at run time: model id → one provider instance, built on first use."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tierq.config import ModelSettings
from tierq.errors import NotFound, NotSupported
from tierq.providers.base import Provider
from tierq.providers.openai_compat import OpenAIProvider
from tierq.providers.simulated import SimulatedProvider


@runtime_checkable
class _Closable(Protocol):
    async def aclose(self) -> None: ...


def build_provider(model: ModelSettings, model_id: str = "") -> Provider:
    """A new provider for ``model``; ``model_id`` (its registry id) names it in error messages.

    Raises :class:`~tierq.errors.NotSupported` for a provider kind tierq does not know.
    """
    if model.provider == "simulated":
        return SimulatedProvider(model)
    if model.provider == "openai":
        return OpenAIProvider(model_id or model.upstream, model)
    raise NotSupported(f"provider {model.provider!r} is not supported")


class ProviderRegistry:
    """One provider per model id, built lazily and cached for the life of the registry."""

    def __init__(self, models: dict[str, ModelSettings]) -> None:
        self._models = dict(models)
        self._providers: dict[str, Provider] = {}

    def get(self, model_id: str) -> Provider:
        """The provider of ``model_id`` (the same instance on every call).

        Raises :class:`~tierq.errors.NotFound` for an unknown model id and
        :class:`~tierq.errors.NotSupported` when its provider is not implemented.
        """
        provider = self._providers.get(model_id)
        if provider is None:
            settings = self._models.get(model_id)
            if settings is None:
                raise NotFound(f"unknown model {model_id!r}", code="unknown_model")
            provider = self._providers[model_id] = build_provider(settings, model_id)
        return provider

    async def aclose(self) -> None:
        """Release what the providers built so far (HTTP clients); call once at shut-down."""
        providers, self._providers = list(self._providers.values()), {}
        for provider in providers:
            if isinstance(provider, _Closable):
                await provider.aclose()
