"""The two pages: /ui/sse (SSE test page) and /ui/dashboard (operators)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
