"""Who may call the broker, and with which signing keys their deliveries are signed.

The official QStash dev server's four users, tokens and key pairs are public, fixed and
documented; we accept them so tools built for that server (the TS SDK's dev mode, its health
check on ``GET /v2/keys``) work against ours unchanged — but, being public, only while no private
``QSTASH_TOKEN`` is configured (unless explicitly told otherwise). A configured ``QSTASH_TOKEN``
adds one more user whose keys come from configuration.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Account:
    user: str
    token: str
    current_key: str
    next_key: str


DEV_ACCOUNTS: tuple[Account, ...] = (
    Account(
        "defaultUser",
        "eyJVc2VySUQiOiJkZWZhdWx0VXNlciIsIlBhc3N3b3JkIjoiZGVmYXVsdFBhc3N3b3JkIn0=",
        "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r",
        "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs",
    ),
    Account(
        "testUser1",
        "eyJVc2VySUQiOiJ0ZXN0VXNlcjEiLCJQYXNzd29yZCI6InRlc3RQYXNzd29yZCJ9",
        "sig_7GVPjvuwsfqF65iC8fSrs1dfYruM",
        "sig_5NoELc3EFnZn4DVS5bDs2Nk4b7Ua",
    ),
    Account(
        "testUser2",
        "eyJVc2VySUQiOiJ0ZXN0VXNlcjIiLCJQYXNzd29yZCI6InRlc3RQYXNzd29yZCJ9",
        "sig_6jWGaWRxHsw4vMSPJprXadyvrybF",
        "sig_7qHbvhmahe5GwfePDiS5Lg3pi6Qx",
    ),
    Account(
        "testUser3",
        "eyJVc2VySUQiOiJ0ZXN0VXNlcjMiLCJQYXNzd29yZCI6InRlc3RQYXNzd29yZCJ9",
        "sig_5T8FcSsynBjn9mMLBsXhpacRovJf",
        "sig_7GFR4YaDshFcqsxWRZpRB161jguD",
    ),
)
DEV_TOKEN = DEV_ACCOUNTS[0].token
DEV_CURRENT_SIGNING_KEY = DEV_ACCOUNTS[0].current_key
DEV_NEXT_SIGNING_KEY = DEV_ACCOUNTS[0].next_key
DEV_TOKENS = frozenset(a.token for a in DEV_ACCOUNTS)
PUBLIC_VALUES = frozenset(
    value for a in DEV_ACCOUNTS for value in (a.token, a.current_key, a.next_key)
)
"""Every published dev credential: safe to print, worthless as a secret."""


def printable(value: str) -> str:
    """``value`` when it is a published dev credential; otherwise a placeholder (a secret is
    never printed, not even in part)."""
    return value if value in PUBLIC_VALUES else "<as configured; not shown>"


def user_of_token(token: str) -> str:
    """The user id a configured token stands for: its ``UserID`` when it is QStash-shaped."""
    try:
        decoded = json.loads(base64.b64decode(token, validate=True))
        user = decoded.get("UserID") if isinstance(decoded, dict) else None
    except (binascii.Error, ValueError, UnicodeDecodeError):
        user = None
    return str(user) if user else "configured"


def dev_tokens_accepted(flag: bool | None, token: str | None) -> bool:
    """``flag`` when set; otherwise only while no private token is configured."""
    if flag is not None:
        return flag
    return not token or token in DEV_TOKENS


def build_accounts(
    *,
    dev_accounts: bool | None,
    token: str | None,
    current_key: str | None,
    next_key: str | None,
) -> dict[str, Account]:
    """Token → account. The dev accounts as :func:`dev_tokens_accepted` decides (``None``:
    automatically); a configured token without keys gets the default dev pair."""
    accept_dev = dev_tokens_accepted(dev_accounts, token)
    accounts = {a.token: a for a in DEV_ACCOUNTS} if accept_dev else {}
    if token:
        accounts[token] = Account(
            user_of_token(token),
            token,
            current_key or DEV_CURRENT_SIGNING_KEY,
            next_key or DEV_NEXT_SIGNING_KEY,
        )
    return accounts
