"""Signing keys and delegation tokens for the identity tests.

Keys are generated per test session with ``cryptography``; tokens are signed
with PyJWT exactly as an identity provider would sign them.
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support import DEFAULT_NOW

ISSUER = "https://idp.example.test"
AUDIENCE = "kynara:support-bot"
# The tests' clock (support.SettableClock's default), in epoch seconds.
NOW = int(datetime.datetime.fromisoformat(DEFAULT_NOW).timestamp())
TOKEN_LIFETIME = 300


class SigningKey:
    """A private key an issuer signs with, and its public JWK."""

    def __init__(self, algorithm: str, kid: str):
        self.algorithm = algorithm
        self.kid = kid
        if algorithm == "RS256":
            self.private = rsa.generate_private_key(
                public_exponent=65537, key_size=2048
            )
        elif algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
        algo = jwt.get_algorithm_by_name(algorithm)
        self.jwk = {**json.loads(algo.to_jwk(self.private.public_key())), "kid": kid}

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(
            claims,
            self.private,
            algorithm=self.algorithm,
            headers={"kid": self.kid, **headers},
        )


def claims(
    sub: str = "alice",
    *actors: str,
    iss: str = ISSUER,
    aud: str = AUDIENCE,
    exp: float = NOW + TOKEN_LIFETIME,
    **extra: Any,
) -> dict[str, Any]:
    """Claims for ``sub`` delegating through ``actors``, earliest first."""
    out: dict[str, Any] = {"iss": iss, "aud": aud, "sub": sub, "exp": exp, **extra}
    act = None
    for actor in actors:
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    if act is not None:
        out["act"] = act
    return out


def unsigned(payload: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature."""

    def part(value: dict[str, Any]) -> str:
        raw = json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [key.jwk for key in keys]}
