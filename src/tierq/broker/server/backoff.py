"""Retry policy: how long to wait before the next attempt. Pure; one loop applies it.

``Upstash-Retry-Delay`` is a math expression in milliseconds over ``retried`` (0 before the first
retry) with ``pow sqrt abs exp floor ceil round min max``. Without it QStash waits
``min(1 day, e^(2.5·n))`` seconds where n is the number of the retry (1 for the first).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

MAX_DELAY_S = 86400.0

_BIN_OPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_FUNCS: dict[str, Callable[..., float]] = {
    "pow": math.pow,
    "sqrt": math.sqrt,
    "abs": abs,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
    "round": round,
    "min": min,
    "max": max,
}
_MAX_EXPR_LEN = 256


def default_delay_s(retry_number: int) -> float:
    """QStash's default wait before retry number ``retry_number`` (1-based)."""
    exponent = 2.5 * retry_number
    return MAX_DELAY_S if exponent > math.log(MAX_DELAY_S) else min(MAX_DELAY_S, math.exp(exponent))


def compile_expression(expr: str) -> ast.Expression:
    """Parse and check a retry-delay expression; ``ValueError`` says what is wrong."""
    if len(expr) > _MAX_EXPR_LEN:
        raise ValueError("retry delay expression is too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"invalid retry delay expression {expr!r}") from exc
    callees = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        _check_node(node, expr, is_callee=id(node) in callees)
    try:
        _evaluate(tree.body, 0)  # fail now on e.g. unknown arity or 1/0, not at retry time
    except (ZeroDivisionError, OverflowError) as exc:
        raise ValueError(f"retry delay expression {expr!r} cannot be evaluated: {exc}") from exc
    return tree


def _check_node(node: ast.AST, expr: str, *, is_callee: bool) -> None:
    """Only numbers, arithmetic, ``retried`` and calls of the listed functions."""
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Call, ast.Name, ast.Constant, ast.Load)
    ok = isinstance(node, (*allowed, *_BIN_OPS, ast.USub, ast.UAdd))
    if isinstance(node, ast.Name):
        ok = node.id in _FUNCS if is_callee else node.id == "retried"
    if isinstance(node, ast.Constant) and (
        isinstance(node.value, bool) or not isinstance(node.value, int | float)
    ):
        ok = False
    if isinstance(node, ast.Call) and not (
        isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords
    ):
        ok = False
    if not ok:
        raise ValueError(f"unsupported syntax in retry delay expression {expr!r}")


def _evaluate(node: ast.expr, retried: int) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(retried)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, retried)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, retried), _evaluate(node.right, retried)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large in retry delay expression")
        return float(_BIN_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args: list[Any] = [_evaluate(arg, retried) for arg in node.args]
        try:
            return float(_FUNCS[node.func.id](*args))
        except TypeError as exc:
            raise ValueError(f"bad arguments to {node.func.id}()") from exc
    raise ValueError("unsupported expression")


def expression_delay_s(expr: str, retried: int) -> float:
    """Seconds to wait given the expression (in ms) and the retries done so far."""
    try:
        millis = _evaluate(compile_expression(expr).body, retried)
    except (ValueError, ZeroDivisionError, OverflowError):
        return default_delay_s(retried + 1)
    return min(MAX_DELAY_S, max(0.0, millis / 1000.0))


def next_delay_s(*, retried: int, expression: str | None, response_wait_s: float | None) -> float:
    """Wait before the next attempt after ``retried`` retries have already happened.

    A usable wait from the failed response wins, then the message's expression, then the default.
    """
    if response_wait_s is not None:
        return response_wait_s
    if expression:
        return expression_delay_s(expression, retried)
    return default_delay_s(retried + 1)


STORAGE_RETRY_FIRST_S = 0.05
STORAGE_RETRY_MAX_S = 1.0


def storage_retry_delay_s(failures: int) -> float:
    """Wait before writing to Redis again after ``failures`` failed tries (1 for the first):
    doubling from 50 ms, at most 1 s, so a write lands within a second of Redis's return."""
    return min(STORAGE_RETRY_MAX_S, STORAGE_RETRY_FIRST_S * 2.0 ** max(0, failures - 1))
