"""The admin API under /api/admin (see docs/admin-api.md)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/admin")
