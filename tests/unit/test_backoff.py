"""Retry policy: QStash's default backoff, Upstash-Retry-Delay expressions and their precedence."""

from __future__ import annotations

import contextlib
import math

import pytest

from tierq.broker.server.backoff import (
    MAX_DELAY_S,
    compile_expression,
    default_delay_s,
    expression_delay_s,
    next_delay_s,
)

# --- default backoff: min(1 day, e^(2.5 n)) ------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_number", "seconds"),
    [
        (1, 12.18),  # 12 s
        (2, 148.41),  # 2m28s
        (3, 1808.04),  # 30m8s
        (4, 22026.47),  # 6h7m6s
        (5, MAX_DELAY_S),  # e^12.5 > one day: capped
        (6, MAX_DELAY_S),
        (20, MAX_DELAY_S),
        (10_000, MAX_DELAY_S),  # no OverflowError for absurd retry numbers
    ],
)
def test_default_delay(retry_number: int, seconds: float) -> None:
    assert default_delay_s(retry_number) == pytest.approx(seconds, abs=0.01)


def test_default_delay_grows_until_cap() -> None:
    delays = [default_delay_s(n) for n in range(1, 8)]
    assert delays == sorted(delays)
    assert max(delays) == MAX_DELAY_S == 86400.0


# --- compile_expression: a tiny, safe math language ---------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "1000",
        "1000.5",
        "retried",
        "1000 * retried",
        "1000 * (1 + retried)",
        "pow(2, retried) * 1000",
        "sqrt(retried) * 1000",
        "abs(-5000)",
        "exp(retried) * 1000",
        "floor(1.9) * 1000",
        "ceil(1.1) * 1000",
        "round(1.5) * 1000",
        "min(5000, 1000 * retried)",
        "max(1000, 10, 100)",
        "-retried + 5000",
        "+5000",
        "10 % 3",
        "2 ** 10",
        "1000 / 4",
        "  1000  ",
    ],
)
def test_compile_accepts(expr: str) -> None:
    compile_expression(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "1000 *",
        "retried.real",  # attribute access
        "(1).__class__",
        "__import__('os')",
        "__import__",
        "os",
        "x * 1000",
        "Retried",  # names are case-sensitive
        "'1000'",  # strings
        "b'1'",
        "lambda: 1",
        "(lambda x: x)(1)",
        "[1000][0]",  # subscript / list
        "{1: 2}",
        "1 if retried else 2",
        "retried > 1",
        "retried and 1",
        "not retried",
        "1000 // 3",  # floor division is not in the language
        "1 ^ 2",
        "1 << 2",
        "~1",
        "1j",
        "round(1.5, ndigits=1)",  # keywords
        "max(*[1, 2])",
        "retried(1)",  # calling a non-function
        "print(1)",
        "eval('1')",
        "open('x')",
        "pow(2)",  # wrong arity fails at publish time, not at retry time
        "sqrt()",
        "max()",
        "2 ** 100",  # exponent bound
        "pow(retried, 2); 1",
        "x := 1",
        "f'{1}'",
        "1000" + " + 1" * 200,  # too long
        "abs",  # a function name is not a value
        "min + 1",
        "1000 * max",
    ],
)
def test_compile_rejects(expr: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        compile_expression(expr)


@pytest.mark.parametrize("expr", ["1/0", "10 % 0", "1000 / (retried - retried)"])
def test_compile_reports_division_by_zero_as_value_error(expr: str) -> None:
    """Callers (the publish handler) turn ValueError into 400; nothing else may escape."""
    with pytest.raises(ValueError, match=r"\S"):
        compile_expression(expr)


@pytest.mark.parametrize("expr", ["exp(1000)", "pow(10, 1000)", "floor(1e308 * 10)"])
def test_compile_never_raises_other_than_value_error(expr: str) -> None:
    with contextlib.suppress(ValueError):
        compile_expression(expr)


# --- expression_delay_s: milliseconds over `retried` -------------------------------------------


@pytest.mark.parametrize(
    ("expr", "retried", "seconds"),
    [
        ("1000", 0, 1.0),
        ("1000", 7, 1.0),
        ("500", 0, 0.5),
        ("0", 3, 0.0),
        ("retried", 2500, 2.5),
        ("1000 * retried", 0, 0.0),
        ("1000 * retried", 3, 3.0),
        ("1000 * (1 + retried)", 2, 3.0),
        ("pow(2, retried) * 1000", 0, 1.0),
        ("pow(2, retried) * 1000", 3, 8.0),
        ("2 ** retried * 1000", 4, 16.0),
        ("min(5000, 1000 * retried)", 10, 5.0),
        ("max(1000, 10 * retried)", 1, 1.0),
        ("sqrt(retried) * 1000", 9, 3.0),
        ("floor(retried / 2) * 1000", 5, 2.0),
        ("ceil(retried / 2) * 1000", 5, 3.0),
        ("abs(retried - 10) * 1000", 4, 6.0),
        ("-5000", 0, 0.0),  # negative waits are clamped to 0
        ("1000 - 1000 * retried", 5, 0.0),
        ("1e12", 0, MAX_DELAY_S),  # capped at one day
        ("exp(retried) * 1000", 50, MAX_DELAY_S),
    ],
)
def test_expression_delay(expr: str, retried: int, seconds: float) -> None:
    assert expression_delay_s(expr, retried) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("expr", "retried"),
    [
        ("__import__('os')", 0),
        ("retried.real", 2),
        ("not a formula", 1),
        ("'1000'", 3),
        ("1/0", 0),
    ],
)
def test_expression_delay_falls_back_to_default(expr: str, retried: int) -> None:
    assert expression_delay_s(expr, retried) == pytest.approx(default_delay_s(retried + 1))


# --- next_delay_s: response wait > expression > default ----------------------------------------


@pytest.mark.parametrize(
    ("retried", "expression", "response_wait", "seconds"),
    [
        (0, None, None, math.exp(2.5)),
        (1, None, None, math.exp(5.0)),
        (2, None, None, math.exp(7.5)),
        (9, None, None, MAX_DELAY_S),
        (0, "", None, math.exp(2.5)),  # an empty expression is no expression
        (0, "1000", None, 1.0),
        (3, "1000 * retried", None, 3.0),
        (3, "1000 * retried", 42.0, 42.0),
        (0, None, 7.5, 7.5),
        (5, None, 0.0, 0.0),  # Retry-After: 0 means "now", not "no wait given"
        (5, "60000", 0.0, 0.0),
        (1, "bogus(", None, math.exp(5.0)),
    ],
)
def test_next_delay_precedence(
    retried: int, expression: str | None, response_wait: float | None, seconds: float
) -> None:
    got = next_delay_s(retried=retried, expression=expression, response_wait_s=response_wait)
    assert got == pytest.approx(seconds)
