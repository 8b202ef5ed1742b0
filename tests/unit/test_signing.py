"""Upstash-Signature: exact claims, and acceptance by the official Python SDK's Receiver."""

from __future__ import annotations

import base64
import hashlib
import string
import time
from collections import Counter

import jwt
import pytest
from qstash import Receiver
from qstash.errors import SignatureError

from tierq.broker.server.signing import (
    TOKEN_LIFETIME_S,
    body_hash,
    new_signing_key,
    random_id,
    sign,
    signature_claims,
)

# The public dev-server keys (contract §9): 32 bytes, so PyJWT does not warn about key length.
CURRENT = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r"
NEXT = "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs"
OTHER = "sig_7GVPjvuwsfqF65iC8fSrs1dfYruM"
URL = "https://example.com/hook?a=1"
NOW_S = 1_700_000_000


def _unverified(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # sha256("") = e3b0c442..., url-safe alphabet ('-', '_') and '=' padding kept
        (b"", "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="),
        (b"hello", "LPJNul-wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="),
    ],
)
def test_body_hash_known_values(body: bytes, expected: str) -> None:
    assert body_hash(body) == expected


@pytest.mark.parametrize("body", [b"", b"x", b'{"a": 1}', "héllo".encode(), bytes(range(256))])
def test_body_hash_is_padded_base64url_sha256(body: bytes) -> None:
    got = body_hash(body)
    assert got == base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode()
    assert len(got) == 44
    assert got.endswith("=")
    assert "+" not in got
    assert "/" not in got


@pytest.mark.parametrize(
    ("url", "body", "now_s"),
    [
        (URL, b"hi", NOW_S),
        ("http://127.0.0.1:9000/cb", b"", 0),
        ("https://ex.com/a", b"\xff\xfe", 1_234_567_890),
    ],
)
def test_signature_claims_exact(url: str, body: bytes, now_s: int) -> None:
    claims = signature_claims(url, body, now_s, "jwt_abc")
    assert claims == {
        "iss": "Upstash",
        "sub": url,
        "exp": now_s + 300,
        "nbf": 0,
        "iat": now_s,
        "jti": "jwt_abc",
        "body": body_hash(body),
    }
    assert TOKEN_LIFETIME_S == 300


@pytest.mark.parametrize(("url", "body"), [(URL, b"hi"), ("https://ex.com/", b"")])
def test_sign_produces_hs256_jwt_with_exact_claims(url: str, body: bytes) -> None:
    token = sign(CURRENT, url, body, NOW_S)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "JWT"}
    claims = _unverified(token)
    assert set(claims) == {"iss", "sub", "exp", "nbf", "iat", "jti", "body"}  # no "aud"
    assert claims["iss"] == "Upstash"
    assert claims["sub"] == url
    assert claims["iat"] == NOW_S
    assert claims["exp"] == NOW_S + 300
    assert claims["nbf"] == 0
    assert claims["body"] == body_hash(body)
    assert isinstance(claims["jti"], str)
    assert claims["jti"].startswith("jwt_")
    assert len(claims["jti"]) > len("jwt_")


def test_sign_uses_key_utf8_bytes_as_hmac_secret() -> None:
    token = sign(CURRENT, URL, b"hi", NOW_S)
    decoded = jwt.decode(
        token,
        CURRENT.encode(),
        algorithms=["HS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert decoded["sub"] == URL


def test_jti_is_unique_per_signature() -> None:
    jtis = {_unverified(sign(CURRENT, URL, b"hi", NOW_S))["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_new_signing_key_shape() -> None:
    keys = {new_signing_key() for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        assert key.startswith("sig_")
        assert len(key) >= 32  # HS256 secret of at least 256 bits
        assert key[4:].isalnum()


# --- the official Receiver ----------------------------------------------------------------------


@pytest.mark.parametrize("signing_key", [CURRENT, NEXT], ids=["current", "next"])
@pytest.mark.parametrize(
    ("url", "body"),
    [
        (URL, "hi"),
        ("https://ex.com/a", ""),
        ("http://127.0.0.1:8000/x", '{"prompt": "héllo wörld ✓"}'),
    ],
)
@pytest.mark.parametrize("check_url", [True, False])
def test_receiver_accepts(signing_key: str, url: str, body: str, check_url: bool) -> None:
    token = sign(signing_key, url, body.encode(), int(time.time()))
    receiver = Receiver(current_signing_key=CURRENT, next_signing_key=NEXT)
    receiver.verify(signature=token, body=body, url=url if check_url else None)


def test_receiver_accepts_token_signed_a_little_while_ago() -> None:
    token = sign(CURRENT, URL, b"hi", int(time.time()) - 250)
    Receiver(current_signing_key=CURRENT, next_signing_key=NEXT).verify(
        signature=token, body="hi", url=URL
    )


@pytest.mark.parametrize(
    ("signing_key", "signed_url", "signed_body", "verify_url", "verify_body", "age_s"),
    [
        (CURRENT, URL, "hi", "https://example.com/hook", "hi", 0),  # wrong url (query dropped)
        (CURRENT, URL, "hi", "https://example.com/other", "hi", 0),
        (NEXT, URL, "hi", "https://evil.example/hook?a=1", "hi", 0),
        (CURRENT, URL, "hi", URL, "hi!", 0),  # wrong body
        (NEXT, URL, "hi", URL, "", 0),
        (CURRENT, URL, '{"a":1}', URL, '{"a": 1}', 0),  # re-serialized JSON
        (OTHER, URL, "hi", URL, "hi", 0),  # wrong key
        (OTHER, URL, "hi", None, "hi", 0),
        (CURRENT, URL, "hi", URL, "hi", 400),  # expired: exp = iat + 300
        (NEXT, URL, "hi", URL, "hi", 301 + 60),
    ],
)
def test_receiver_rejects(
    signing_key: str,
    signed_url: str,
    signed_body: str,
    verify_url: str | None,
    verify_body: str,
    age_s: int,
) -> None:
    token = sign(signing_key, signed_url, signed_body.encode(), int(time.time()) - age_s)
    receiver = Receiver(current_signing_key=CURRENT, next_signing_key=NEXT)
    with pytest.raises(SignatureError):
        receiver.verify(signature=token, body=verify_body, url=verify_url)


def test_random_ids_are_letters_and_digits_drawn_evenly() -> None:
    ids = [random_id("msg_") for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("msg_") and len(i) == 4 + 24 and i[4:].isalnum() for i in ids)
    counts = Counter("".join(i[4:] for i in ids))
    assert set(counts) <= set(string.ascii_letters + string.digits)
    assert len(counts) == 62
    expected = 5000 * 24 / 62  # ~1935 each; a mapping with modulo bias would skew 8 of them
    assert max(abs(n - expected) for n in counts.values()) < 0.12 * expected
    assert random_id("sig_", 28)[4:].isalnum()
    assert len(random_id("sig_", 28)) == 32
