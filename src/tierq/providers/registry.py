"""The model registry at run time: model id → one provider instance, built on first use."""

from __future__ import annotations

from tierq.config import ModelSettings
from tierq.errors import NotFound, NotSupported
from tierq.providers.base import Provider
from tierq.providers.simulated import SimulatedProvider


def build_provider(model: ModelSettings) -> Provider:
    """A new provider for ``model``.

    Raises :class:`~tierq.errors.NotSupported` for providers not implemented yet (``openai``).
    """
    if model.provider == "simulated":
        return SimulatedProvider(model)
    raise NotSupported(
        f"provider {model.provider!r} is not supported yet "
        "(the OpenAI-compatible provider arrives with issue 5)"
    )


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
            provider = self._providers[model_id] = build_provider(settings)
        return provider
