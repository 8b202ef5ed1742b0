"""Every error tierq raises on purpose is a ``TierqError``; the ones with their own answer (an
exit code, OpenAI's shape, a broker refusal, a sim that cannot start) stay apart from the two
classes the apps' exception handlers answer for."""

from __future__ import annotations

import pytest
from starlette.exceptions import HTTPException

from tierq.app import create_app
from tierq.broker.server.destinations import InvalidDestinationError
from tierq.cli_ops import CliError
from tierq.config import Settings
from tierq.errors import ClientError, TierqError, UpstreamError
from tierq.frontdoor.errors import OpenAIError
from tierq.ops.sim import SimError

APART = [CliError, SimError, InvalidDestinationError, OpenAIError]


@pytest.mark.parametrize("error", APART)
def test_in_the_tree_but_not_a_client_or_upstream_error(error: type[Exception]) -> None:
    assert issubclass(error, TierqError)
    assert not issubclass(error, (ClientError, UpstreamError))


@pytest.mark.parametrize("error", [SimError, InvalidDestinationError])
def test_argument_errors_stay_value_errors(error: type[Exception]) -> None:
    assert issubclass(error, ValueError)  # callers that catch ValueError keep working


@pytest.mark.parametrize("error", APART)
def test_no_app_handler_answers_for_them(error: type[Exception]) -> None:
    handlers = create_app(Settings(), sync_queues=False).exception_handlers
    caught = [cls for cls in error.__mro__ if cls in handlers]
    assert caught in ([], [Exception]), caught  # Exception: starlette's 500, as before
    assert HTTPException not in error.__mro__
