"""Which submits the fast path parses itself: exactly those FastAPI would accept (the rest go to
the FastAPI route, for its exact error)."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from tierq.contracts import JobRequest
from tierq.fastpath import _job_request
from tierq.web.bodies import BODY

JOB = {"service": "chat", "experience": "stream", "mode": "auto", "model": "sim",
       "input": {"prompt": "hi"}}  # fmt: skip


def submit(body: bytes | None, content_type: str | None) -> Request:
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "path": "/api/jobs", "headers": headers}
    if body is not None:
        scope[BODY] = body
    return Request(scope)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                     "application/vnd.tierq+json"],
)  # fmt: skip
def test_json_bodies_are_parsed_as_fastapi_would(content_type: str) -> None:
    job = _job_request(submit(json.dumps(JOB).encode(), content_type))
    assert job == JobRequest.model_validate(JOB)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (json.dumps(JOB).encode(), None),  # FastAPI refuses a body without a content type
        (json.dumps(JOB).encode(), "text/plain"),
        (b"service=chat", "application/x-www-form-urlencoded"),
        (b"{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"", "application/json"),
        (json.dumps({**JOB, "experience": "telepathy"}).encode(), "application/json"),
        (json.dumps({"service": "chat"}).encode(), "application/json"),
        (None, "application/json"),  # no body kept by BodyGuard: FastAPI reads it
    ],
)
def test_anything_else_is_left_to_fastapi(body: bytes | None, content_type: str | None) -> None:
    assert _job_request(submit(body, content_type)) is None
