"""Compact JWTs (HS256) minted by the identity simulator and verified by the Graph simulator.

Both simulators share one `TokenSigner` in-process (a random key per process by default), so a
token is only accepted by the Graph simulator if the identity simulator of the same process issued
it (or a test minted it with the same signer). Standard library only.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from typing import Any, Iterable, Mapping

# Fixed, recognisable identities of the simulated tenant (not real Azure objects).
SIM_TENANT_ID = "5f0c8a4e-2b7d-4c1e-9a3f-6d8e1b2c3a40"
SIM_CLIENT_ID = "a3d9e6f1-7c2b-4e85-b1a0-9f4c2d7e8b61"  # appid of the managed identity
SIM_OBJECT_ID = "e7b2c4d8-1f3a-4b6c-8d9e-0a1b2c3d4e52"  # oid of its service principal

DEFAULT_ROLES: tuple[str, ...] = ("Synchronization.ReadWrite.All",)
DEFAULT_LIFETIME = 3600  # seconds

# Audiences the Graph simulator accepts (the three national-cloud Graph roots the API supports,
# and Graph's well-known application id, which real tokens may carry as aud).
GRAPH_AUDIENCES = frozenset(
    {
        "https://graph.microsoft.com",
        "https://graph.microsoft.us",
        "https://dod-graph.microsoft.us",
        "00000003-0000-0000-c000-000000000000",
    }
)


class TokenError(Exception):
    """The token is malformed, badly signed, expired, not yet valid or for another audience."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def resource_to_audience(resource: str) -> str:
    """`https://graph.microsoft.com/.default` or `.../` -> `https://graph.microsoft.com`."""
    aud = resource.strip()
    if aud.endswith("/.default"):
        aud = aud[: -len("/.default")]
    return aud.rstrip("/")


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWT without checking anything (None if it does not parse)."""
    try:
        payload = json.loads(_b64url_decode(token.split(".")[1]))
    except Exception:
        return None
    return payload if isinstance(payload, dict) else None


class TokenSigner:
    """Mints and verifies HS256 JWTs with one secret key."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)

    def _sign(self, signing_input: bytes) -> str:
        return _b64url(hmac.new(self.key, signing_input, hashlib.sha256).digest())

    def encode(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
        )
        return signing_input + "." + self._sign(signing_input.encode("ascii"))

    def mint(
        self,
        *,
        aud: str = "https://graph.microsoft.com",
        tid: str = SIM_TENANT_ID,
        oid: str = SIM_OBJECT_ID,
        appid: str = SIM_CLIENT_ID,
        roles: Iterable[str] | None = None,
        lifetime: float = DEFAULT_LIFETIME,
        iat: int | None = None,
        exp: int | None = None,
        **extra: Any,
    ) -> str:
        """A token shaped like an Entra ID app-only (managed identity) access token."""
        now = int(time.time()) if iat is None else int(iat)
        claims: dict[str, Any] = {
            "aud": aud,
            "iss": f"https://sts.windows.net/{tid}/",
            "iat": now,
            "nbf": now,
            "exp": int(now + lifetime) if exp is None else int(exp),
            "appid": appid,
            "appidacr": "2",
            "idtyp": "app",
            "oid": oid,
            "sub": oid,
            "tid": tid,
            "roles": list(DEFAULT_ROLES if roles is None else roles),
            "uti": uuid.uuid4().hex[:22],
            "ver": "1.0",
        }
        claims.update(extra)
        return self.encode(claims)

    def decode(
        self,
        token: str,
        *,
        audiences: Iterable[str] | None = GRAPH_AUDIENCES,
        now: float | None = None,
        leeway: float = 0.0,
    ) -> dict[str, Any]:
        """Verify signature, lifetime and audience; return the claims or raise TokenError."""
        parts = token.split(".")
        if len(parts) != 3 or not all(parts):
            raise TokenError("IDX14100: JWT is not well formed, there are no dots (.) or too few parts.")
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
        except Exception as exc:  # noqa: BLE001 - any decoding problem is a malformed token
            raise TokenError(f"IDX14102: Unable to decode the token: {exc.__class__.__name__}.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenError("IDX14102: Unable to decode the token.")
        if header.get("alg") != "HS256":
            raise TokenError(f"IDX10511: Signature validation failed: unsupported alg {header.get('alg')!r}.")
        expected = self._sign(f"{parts[0]}.{parts[1]}".encode("ascii"))
        if not hmac.compare_digest(expected, parts[2]):
            raise TokenError("IDX10511: Signature validation failed. Token signature is invalid.")
        t = time.time() if now is None else now
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)) or t >= exp + leeway:
            raise TokenError("Lifetime validation failed, the token is expired.")
        nbf = claims.get("nbf")
        if isinstance(nbf, (int, float)) and t + leeway < nbf:
            raise TokenError("Lifetime validation failed, the token is not yet valid.")
        if audiences is not None and claims.get("aud") not in set(audiences):
            raise TokenError("Invalid audience.")
        return claims


_default_signer: TokenSigner | None = None
_default_lock = threading.Lock()


def default_signer() -> TokenSigner:
    """The process-wide signer (random key, created on first use)."""
    global _default_signer
    with _default_lock:
        if _default_signer is None:
            _default_signer = TokenSigner()
        return _default_signer
