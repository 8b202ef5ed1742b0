"""Fuzzing: schemathesis over the app's own OpenAPI, user and admin surfaces; never a 5xx.

The schema is the one the app serves at ``/openapi.json`` under dev settings
(``test_fuzzed_schema_is_served`` checks it against the running app's), so a route added to the
app is fuzzed without touching this file. schemathesis needs it at collection time to make one
test per operation (its ``from_fixture`` loader, the one that would read it from the running
app, fails under pytest 9.2: it reads ``Function._nodeid``, gone there), so it comes from
``create_app(...).openapi()``. What the schema cannot say, the fuzzed copy adds (``fuzzable``):
the services and models the dev settings configure, as enums, so valid jobs are admitted and
run; and the body of ``POST /v1/chat/completions`` (the front door parses it itself, so FastAPI
does not document it), from the front door's own model.

One whole system (broker + app on real HTTP, one real Redis) answers every case; its jobs give
up after ``JOB_TIMEOUT_S``, so what the fuzzer admits (a simulated job may ask for 10,000 tokens
a minute apart) ends soon. Each operation runs schemathesis' phases: the schema's examples, the
coverage phase's boundary and negative values, then ``MAX_EXAMPLES`` generated cases, valid and
invalid; derandomized, so ``make test`` sends the same requests every run. The checks:
``not_a_server_error`` (schemathesis' own), and every 4xx in tierq's error shape, ``{"error":
{"code": str, "message": str}}``; on ``/v1`` at least ``{"error": {"message": str}}``, what
OpenAI's clients read.

Left out: the worker routes (``/api/worker/...``: only QStash's signed deliveries get past
their check; ``test_worker_routes.py`` and the broker hardening tests cover them). The SSE
stream ``/api/jobs/{job_id}/events`` stays in: a fuzzed job id names no job, so it answers at
once, and ``REQUEST_TIMEOUT_S`` bounds every call regardless.

The module counts the cases it sent: at its end the totals, by surface, operation and status,
are printed (``-s`` or not) and written to ``fuzz-cases.json`` (in a ``fuzz`` directory under
pytest's base temp directory); a surface whose every operation ran must reach ``FLOOR``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import BaseSchema

from system import PAID, System, start_system
from tierq.app import create_app
from tierq.config import DEV_ADMIN_TOKEN, Settings
from tierq.frontdoor.translate import ROLE_LABELS, ChatRequest

# Modules schemathesis and Hypothesis import only once cases run, imported here instead. pytest
# rewrites the packages of its plugins (schemathesis, hypothesis, anyio) as it imports them,
# with ast.parse; two threads in ast.parse at once (this one, and the app's importing anyio's
# parts) can make CPython 3.11.7 raise "SystemError: AST constructor recursion depth mismatch"
# in either. Mid-case, that is a case failing once and passing on replay: a flaky failure.
for _module in (
    "hypothesis.internal.conjecture.optimiser",
    "hypothesis.strategies._internal.flatmapped",
    "hypothesis.strategies._internal.random",
    "hypothesis.strategies._internal.regex",
    "schemathesis.generation.body_overrides",
    "schemathesis.generation.dictionaries",
    "schemathesis.specs.openapi.coverage._operation",
    "schemathesis.transport.asgi",
    "schemathesis.transport.wsgi",
    "pyrate_limiter",
):
    with contextlib.suppress(ImportError):  # a later release may have moved it
        importlib.import_module(_module)

MAX_EXAMPLES = 30  # generated cases per operation (the fuzzing phase), beside the coverage phase
REQUEST_TIMEOUT_S = 10
JOB_TIMEOUT_S = 2.0
USER_PATHS = r"^/(api/jobs|v1/)"
ADMIN_PATHS = r"^/api/admin/"
IMAGE_URL = {
    "type": "object",
    "properties": {"url": {"type": "string", "pattern": "^(https?://|data:image/)"}},
    "required": ["url"],
}
FLOOR = {"user": 300, "admin": 400}  # fewer cases than this for a whole surface fails the module

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 10,  # derandomized anyway; a fixed seed also fixes the coverage phase's order
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {
            "mode": "all",  # valid and invalid data
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",  # nothing written under .hypothesis/
        },
        "phases": {"stateful": {"enabled": False}},
    }
)


def fuzzable(served: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``served`` plus what it cannot say, so that valid cases get past validation: configured
    names as enums, and the front door's body (from its own model, narrowed to what tierq runs:
    no tools, one choice, messages of a known role with text or ``text``/``image_url`` parts;
    invalid cases still send everything else)."""
    schema = copy.deepcopy(served)
    components = schema["components"]["schemas"]
    job = components["JobRequest"]["properties"]
    job["service"]["enum"] = sorted(settings.services)
    job["model"]["enum"] = sorted(settings.models)
    chat = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(chat.pop("$defs"))
    components["ChatRequest"] = chat
    chat["properties"].update(
        model={"type": "string", "enum": sorted(settings.models)},
        n={"type": ["integer", "null"], "minimum": 1, "maximum": 1},
        tools={"type": "null"},
        functions={"type": "null"},
    )
    part = {
        "oneOf": [
            {"properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
            {"properties": {"type": {"const": "image_url"}, "image_url": IMAGE_URL}},
        ],
        "type": "object",
        "required": ["type"],
    }
    components["ChatMessage"]["properties"].update(
        role={"type": "string", "enum": sorted(ROLE_LABELS)},
        content={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": part, "minItems": 1},
            ]
        },
    )
    body = {"$ref": "#/components/schemas/ChatRequest"}
    schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    return schema


DEV = Settings().with_dev_defaults()
SERVED = create_app(DEV).openapi()
SCHEMA = schemathesis.openapi.from_dict(fuzzable(SERVED, DEV), config=CONFIG)
user = SCHEMA.include(path_regex=USER_PATHS)
admin = SCHEMA.include(path_regex=ADMIN_PATHS)


@dataclass
class Tally:
    statuses: dict[str, Counter[int]] = field(default_factory=dict)  # by operation label
    slowest: dict[str, float] = field(default_factory=dict)  # seconds, by operation label

    def add(self, case: Case[Any], response: Response) -> None:
        label = case.operation.label
        self.statuses.setdefault(label, Counter())[response.status_code] += 1
        self.slowest[label] = max(self.slowest.get(label, 0.0), response.elapsed)

    @property
    def cases(self) -> int:
        return sum(counter.total() for counter in self.statuses.values())

    def summary(self) -> dict[str, Any]:
        def counts(counter: Counter[int]) -> dict[str, int]:
            return {str(status): n for status, n in sorted(counter.items())}

        return {
            "cases": self.cases,
            "statuses": counts(sum(self.statuses.values(), Counter())),
            "operations": {
                label: {
                    "cases": counter.total(),
                    "statuses": counts(counter),
                    "slowest_s": round(self.slowest[label], 3),
                }
                for label, counter in sorted(self.statuses.items())
            },
        }


@dataclass
class Fuzzed:
    system: System
    tallies: dict[str, Tally]


def labels(schema: BaseSchema) -> set[str]:
    """The labels (``GET /path``) of the operations ``schema`` holds."""
    return {result.ok().label for result in schema.get_all_operations()}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def fuzzed(
    redis_url: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fuzzed]:
    """The system under fuzzing (one for the module) and the count of cases sent to it."""
    system = start_system(redis_url, job_timeout_s=JOB_TIMEOUT_S)
    tallies = {"user": Tally(), "admin": Tally()}
    yield Fuzzed(system, tallies)
    system.close()
    summary = {surface: tally.summary() for surface, tally in tallies.items()}
    (tmp_path_factory.mktemp("fuzz") / "fuzz-cases.json").write_text(json.dumps(summary, indent=1))
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown with or without -s
            reporter.write_sep("-", "schemathesis")
            for surface, counts in summary.items():
                reporter.write_line(
                    f"fuzz {surface}: {counts['cases']} cases over {len(counts['operations'])}"
                    f" operations, statuses {counts['statuses']}"
                )
    for surface, schema in (("user", user), ("admin", admin)):
        tally = tallies[surface]
        if set(tally.statuses) == labels(schema):  # the whole surface ran (not a -k selection)
            assert tally.cases >= FLOOR[surface], f"too few {surface} cases: {summary[surface]}"


def error_shape(ctx: CheckContext, response: Response, case: Case[Any]) -> None:
    """A 4xx carries ``{"error": {"code": str, "message": str}}``; on ``/v1`` (OpenAI's shape
    where the front door answers) at least ``{"error": {"message": str}}``."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{response.status_code} without a JSON body: {response.content[:200]!r}"
        ) from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"{response.status_code} without an error object: {body!r}"
    assert isinstance(error.get("message"), str), f"error without a message: {body!r}"
    if case.operation.path.startswith("/v1/"):  # OpenAI's shape: a type (code may be null)
        assert isinstance(error.get("type"), str), f"OpenAI error without a type: {body!r}"
    else:
        assert isinstance(error.get("code"), str), f"error without a code: {body!r}"


def call(case: Case[Any], fuzzed: Fuzzed, surface: str) -> None:
    token = {"user": PAID, "admin": fuzzed.system.settings.admin_token}[surface]
    base_url = fuzzed.system.app.url
    headers = {"Authorization": f"Bearer {token}"}
    response = case.call(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)
    fuzzed.tallies[surface].add(case, response)
    case.validate_response(
        response,
        checks=[not_a_server_error, error_shape],
        headers=headers,
        transport_kwargs={"base_url": base_url, "headers": headers},
    )


def test_fuzzed_schema_is_served(fuzzed: Fuzzed) -> None:
    """The schema fuzzed above is the one the running app serves."""
    res = fuzzed.system.http.get("/openapi.json")
    assert res.status_code == 200
    assert res.json() == SERVED
    assert fuzzed.system.settings.admin_token == DEV_ADMIN_TOKEN
    assert labels(user)
    assert labels(admin)
    assert not any("/api/worker/" in label for label in labels(user) | labels(admin))


# The one-value parametrization also gives each operation's test a node id of its own under
# pytest 9.2 (schemathesis' items otherwise all get the function's: ``test_user_surface``).
@pytest.mark.timeout(60)
@user.parametrize()
@pytest.mark.parametrize("surface", ["user"])
def test_user_surface(case: Case[Any], fuzzed: Fuzzed, surface: str) -> None:
    call(case, fuzzed, surface)


@pytest.mark.timeout(60)
@admin.parametrize()
@pytest.mark.parametrize("surface", ["admin"])
def test_admin_surface(case: Case[Any], fuzzed: Fuzzed, surface: str) -> None:
    call(case, fuzzed, surface)
