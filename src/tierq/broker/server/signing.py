"""``Upstash-Signature``: the JWT QStash puts on every delivery. Pure functions.

Claims exactly as QStash: ``iss`` "Upstash", ``sub`` the destination URL, ``iat`` now, ``exp``
iat+300, ``nbf`` 0, ``jti`` unique, ``body`` base64url(SHA-256(raw body)) with padding; no ``aud``.
The HMAC secret is the signing key's UTF-8 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string

import jwt

TOKEN_LIFETIME_S = 300
_ALPHABET = string.ascii_letters + string.digits


def body_hash(body: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()


_UNBIASED = 256 - 256 % len(_ALPHABET)
"""Random bytes at or above this are skipped: the others map onto the alphabet evenly."""


def random_id(prefix: str, length: int = 24) -> str:
    """``prefix`` and ``length`` characters drawn uniformly from letters and digits (from one
    ``os.urandom`` call, not one per character as ``SystemRandom.choices`` does: 18 -> 3 µs)."""
    picked: list[str] = []
    while len(picked) < length:
        size = len(_ALPHABET)
        picked += [_ALPHABET[b % size] for b in secrets.token_bytes(length + 8) if b < _UNBIASED]
    return prefix + "".join(picked[:length])


def signature_claims(url: str, body: bytes, now_s: int, jti: str) -> dict[str, object]:
    return {
        "iss": "Upstash",
        "sub": url,
        "exp": now_s + TOKEN_LIFETIME_S,
        "nbf": 0,
        "iat": now_s,
        "jti": jti,
        "body": body_hash(body),
    }


def sign(key: str, url: str, body: bytes, now_s: int) -> str:
    claims = signature_claims(url, body, now_s, random_id("jwt_"))
    return jwt.encode(claims, key.encode(), algorithm="HS256", headers={"typ": "JWT"})


def new_signing_key() -> str:
    return random_id("sig_", 28)
