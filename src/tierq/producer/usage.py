"""``GET /api/usage``: the caller's own usage from the ledger; ``GET /api/admin/usage``: anyone's,
with filters (admin token). Both: ``from`` and ``to`` (UTC days, ``YYYY-MM-DD``, both included;
default the last 30 days), ``by`` (``day`` or ``month``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from tierq.errors import ClientError
from tierq.producer.api import runtime
from tierq.producer.auth import authenticate_user
from tierq.usage.ledger import MAX_DAYS, By, Row, totals

router = APIRouter()
DEFAULT_DAYS = 30
_DAY = r"^\d{4}-\d{2}-\d{2}$"


def period(start: str | None, end: str | None) -> tuple[dt.date, dt.date]:
    """The days asked for: 400 at most, ``from`` not after ``to``."""
    try:
        last = dt.date.fromisoformat(end) if end else dt.datetime.now(dt.UTC).date()
        first = dt.date.fromisoformat(start) if start else last - dt.timedelta(DEFAULT_DAYS - 1)
    except ValueError as exc:
        raise ClientError(f"not a date: {exc}", code="invalid_period") from None
    if first > last:
        raise ClientError("'from' is after 'to'", code="invalid_period")
    if (last - first).days + 1 > MAX_DAYS:
        raise ClientError(f"at most {MAX_DAYS} days at once", code="invalid_period")
    return first, last


def usage_view(first: dt.date, last: dt.date, by: By, rows: list[Row]) -> dict[str, Any]:
    return {
        "from": first.isoformat(),
        "to": last.isoformat(),
        "by": by,
        "rows": [row.view() for row in rows],
        "total": totals(rows).view(),
    }


FromDay = Annotated[str | None, Query(alias="from", pattern=_DAY)]
ToDay = Annotated[str | None, Query(alias="to", pattern=_DAY)]


@router.get("/api/usage")
async def own_usage(
    request: Request, start: FromDay = None, end: ToDay = None, by: By = "day"
) -> dict[str, Any]:
    """The caller's jobs, tokens, run seconds and failures per model, per day or month."""
    rt = runtime(request)
    user = authenticate_user(request, rt.settings)
    first, last = period(start, end)
    rows = await rt.ledger.rows(first, last, by=by, users=[user.id])
    return {"userId": user.id, **usage_view(first, last, by, rows)}


def admin_router(require_admin: Any) -> APIRouter:
    """``GET /api/admin/usage`` behind the admin API's own check."""
    admin = APIRouter(prefix="/api/admin", dependencies=[Depends(require_admin)])

    @admin.get("/usage")
    async def usage(
        request: Request,
        start: FromDay = None,
        end: ToDay = None,
        by: By = "day",
        user: Annotated[list[str] | None, Query(max_length=100)] = None,
        model: Annotated[list[str] | None, Query(max_length=100)] = None,
    ) -> dict[str, Any]:
        """Usage per (period, user, model), filtered to ``user``s and ``model``s when given."""
        rt = runtime(request)
        first, last = period(start, end)
        rows = await rt.ledger.rows(first, last, by=by, users=user, models=model)
        return usage_view(first, last, by, rows)

    return admin
