"""The OpenAI-compatible front door: ``/v1/chat/completions`` and ``/v1/models`` on the app,
authenticated by tierq API keys; every request is a tierq job on its named queue."""

from tierq.frontdoor.routes import router

__all__ = ["router"]
