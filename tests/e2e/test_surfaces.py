"""The app's own surfaces under ``tierq serve``: /metrics and the API docs need a token, the
pages are off unless configured; each can be opened, put behind the admin token or turned off;
``tierq dev`` leaves all of them open. Whole systems on real HTTP (``dev_mode=False`` is what
``tierq serve`` runs with)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from system import PAID, System
from tierq.config import DEV_ADMIN_TOKEN, Settings
from tierq.web.access import presented_token, surfaces

DOCS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]
PAGES = ["/ui", "/ui/sse", "/ui/dashboard", "/ui/config.json", "/ui/static/common.js"]
METRICS_TOKEN = "tq-scraper-token"


def serve(make_system: Callable[..., System], **overrides: Any) -> System:
    """A system whose app runs as under ``tierq serve`` (not dev mode)."""
    return make_system(dev_mode=False, **overrides)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(password: str, user: str = "admin") -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def get(system: System, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return system.http.get(path, headers=headers or {}, follow_redirects=False)


def assert_error(res: httpx.Response, status: int, code: str) -> None:
    assert res.status_code == status, (res.request.url, res.status_code, res.text[:200])
    error = res.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)


def test_serve_protects_metrics_and_docs_and_has_no_pages(
    make_system: Callable[..., System],
) -> None:
    system = serve(make_system)
    missing = get(system, "/metrics")
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "tierq_" not in missing.text
    assert_error(get(system, "/metrics", bearer(PAID)), 403, "forbidden")
    assert_error(get(system, "/metrics", basic("wrong")), 403, "forbidden")
    for headers in (bearer(DEV_ADMIN_TOKEN), basic(DEV_ADMIN_TOKEN)):
        res = get(system, "/metrics", headers)
        assert res.status_code == 200
        assert "tierq_jobs_submitted_total" in res.text

    for path in DOCS:
        res = get(system, path)
        assert_error(res, 401, "unauthorized")
        assert res.headers["www-authenticate"].startswith('Basic realm="tierq"')
        assert_error(get(system, path, bearer(PAID)), 403, "forbidden")
        assert get(system, path, bearer(DEV_ADMIN_TOKEN)).status_code == 200, path
        assert get(system, path, basic(DEV_ADMIN_TOKEN)).status_code == 200, path
    spec = get(system, "/openapi.json", basic(DEV_ADMIN_TOKEN)).json()
    assert "/api/jobs" in spec["paths"]

    for path in PAGES:
        assert_error(get(system, path, basic(DEV_ADMIN_TOKEN)), 404, "not_found")
    # what a load balancer and a client need stays open
    assert get(system, "/healthz").status_code == 200
    assert get(system, "/readyz").status_code == 200
    assert system.submit(PAID).status_code == 202


def test_gated_paths_cannot_be_reached_around_the_gate(
    make_system: Callable[..., System],
) -> None:
    system = serve(make_system, pages_access="token")
    for path in ("/metrics?format=text", "/openapi.json?x=1", "/ui/static/common.js?v=2"):
        assert get(system, path).status_code == 401, path
    assert system.http.head("/metrics").status_code == 401
    assert system.http.post("/metrics").status_code == 401
    # the same surface under another spelling is no route at all, never the content
    for path in ("/metrics/", "/METRICS", "//metrics", "/docs/", "/ui%2Fsse", "/%75i/sse"):
        res = get(system, path)
        assert res.status_code in (401, 404, 307), (path, res.status_code)
        assert "tierq_" not in res.text
        assert "<html" not in res.text.lower()
    # a Basic header that is not valid base64, or has no password, is no token
    for header in (
        "Basic !!!",
        "Basic " + base64.b64encode(b"admin").decode(),
        "Bearer",
        "Token x",
    ):
        assert get(system, "/metrics", {"Authorization": header}).status_code == 401, header


def test_metrics_token_is_a_scraper_credential(make_system: Callable[..., System]) -> None:
    system = serve(make_system, metrics_token=METRICS_TOKEN)
    assert get(system, "/metrics", bearer(METRICS_TOKEN)).status_code == 200
    assert get(system, "/metrics", basic(METRICS_TOKEN, user="prometheus")).status_code == 200
    assert get(system, "/metrics", bearer(DEV_ADMIN_TOKEN)).status_code == 200
    # it opens /metrics only: not the docs, the admin API or the pages
    assert_error(get(system, "/openapi.json", bearer(METRICS_TOKEN)), 403, "forbidden")
    res = system.http.get("/api/admin/queues", headers=bearer(METRICS_TOKEN))
    assert_error(res, 403, "forbidden")
    assert METRICS_TOKEN in system.settings.secret_values()


def test_pages_behind_the_admin_token(make_system: Callable[..., System]) -> None:
    system = serve(make_system, pages_access="token")
    for path in PAGES:
        res = get(system, path)
        assert_error(res, 401, "unauthorized")
        assert res.headers["www-authenticate"].startswith("Basic")
        assert_error(get(system, path, basic("wrong")), 403, "forbidden")
    for path in PAGES[1:]:
        assert get(system, path, basic(DEV_ADMIN_TOKEN)).status_code == 200, path
    config = get(system, "/ui/config.json", basic(DEV_ADMIN_TOKEN)).json()
    assert config["devMode"] is False
    assert config["adminToken"] is None


def test_each_surface_can_be_opened_or_turned_off(make_system: Callable[..., System]) -> None:
    opened = serve(make_system, metrics_access="open", docs_access="open", pages_access="open")
    for path in ["/metrics", *DOCS, *PAGES[1:]]:
        assert get(opened, path).status_code == 200, path
    off = serve(make_system, metrics_access="off", docs_access="off", pages_access="off")
    for path in ["/metrics", *DOCS[:3], *PAGES]:
        assert_error(get(off, path, bearer(DEV_ADMIN_TOKEN)), 404, "not_found")


def test_dev_mode_leaves_every_surface_open(system: System) -> None:
    assert system.settings.dev_mode
    for path in ["/metrics", *DOCS, *PAGES[1:]]:
        assert get(system, path).status_code == 200, path


@pytest.mark.parametrize(
    ("dev_mode", "overrides", "expected"),
    [
        (True, {}, ("open", "open", "open")),
        (False, {}, ("token", "token", "off")),
        (False, {"pages_access": "token"}, ("token", "token", "token")),
        (True, {"metrics_access": "token", "docs_access": "off"}, ("token", "off", "open")),
        (False, {"metrics_access": "open", "docs_access": "open"}, ("open", "open", "off")),
    ],
)
def test_auto_resolves_by_mode(dev_mode: bool, overrides: dict[str, str], expected: Any) -> None:
    served = surfaces(Settings.model_validate({"dev_mode": dev_mode, **overrides}))
    assert (served.metrics, served.docs, served.pages) == expected


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic " + base64.b64encode(b"u:p:w").decode(), "p:w"),
        ("Basic " + base64.b64encode(b":pw").decode(), "pw"),
        ("Basic " + base64.b64encode(b"user").decode(), None),
        ("Basic " + base64.b64encode(b"u:").decode(), None),
        ("Basic not-base64!", None),
        ("Basic " + base64.b64encode(b"u:\xff").decode(), None),
        ("Digest abc", None),
        ("Bearer", None),
        ("", None),
    ],
)
def test_presented_token(header: str, token: str | None) -> None:
    assert presented_token(httpx.Headers({"authorization": header} if header else {})) == token
