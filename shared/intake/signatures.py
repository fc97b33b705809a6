"""Optional webhook signatures: HMAC-SHA256 over the request's method, path, query, time and body.

A sender with the shared secret (WEBHOOK_HMAC_SECRET) sends two headers:
  X-Timestamp: <epoch seconds>                                   (WEBHOOK_TIMESTAMP_HEADER)
  X-Signature: sha256=<hex of HMAC-SHA256(secret, string_to_sign)>   (WEBHOOK_SIGNATURE_HEADER)
with string_to_sign = timestamp LF METHOD LF path LF canonical query LF body (docs/security.md).
The method, path and query are signed so that a captured `?dryRun=true` request cannot be sent
again as a real run; the timestamp bounds how long a capture is any use (WEBHOOK_TOLERANCE_SECONDS)
and each signature is accepted once within that window. This complements the function key.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from typing import Mapping
from urllib.parse import quote

from shared.errors import RequestRejected
from shared.intake.idempotency import AnswerBook, Recalled
from shared.settings import Settings

PREFIX = "sha256="
# The function key may travel as ?code=; it is the host's, checked before us, and not signed.
UNSIGNED_PARAMETERS = {"code"}
SIGNATURE_SCOPE = "webhook-signature"


def canonical_query(params: Mapping[str, str] | None) -> str:
    """Parameters other than `code`, sorted, each name=value percent-encoded as RFC 3986
    unreserved characters only, joined by '&'; "" without any."""
    pairs = sorted((k, v) for k, v in (params or {}).items() if k.lower() not in UNSIGNED_PARAMETERS)
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in pairs)


def string_to_sign(timestamp: str | int, method: str, path: str, query: str, body: bytes) -> bytes:
    return f"{timestamp}\n{method.upper()}\n{path}\n{query}\n".encode("utf-8") + body


def sign(secret: str, timestamp: str | int, body: bytes, method: str = "POST", path: str = "/api/provision",
         params: Mapping[str, str] | None = None) -> str:
    """The header value a sender computes (also what the tests and docs use)."""
    message = string_to_sign(timestamp, method, path, canonical_query(params), body)
    return PREFIX + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _legacy_sign(secret: str, timestamp: str, body: bytes) -> str:
    # The first scheme, timestamp + "." + body: recognised only to say why it is refused.
    return PREFIX + hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def _rejected(code: str, message: str) -> RequestRejected:
    return RequestRejected(401, code, message)


def _signed_headers(headers: Mapping[str, str], settings: Settings) -> tuple[str, str]:
    lowered = {k.lower(): v for k, v in headers.items()}
    sig_name, ts_name = settings.webhook_signature_header, settings.webhook_timestamp_header
    signature, timestamp = lowered.get(sig_name.lower()), lowered.get(ts_name.lower())
    if not signature or not timestamp:
        missing = [n for n, v in ((sig_name, signature), (ts_name, timestamp)) if not v]
        raise _rejected("SignatureMissing", f"this endpoint requires signed requests: send {' and '.join(missing)} "
                                            f"({sig_name}: sha256=<hex HMAC-SHA256 of the string to sign>, see "
                                            "docs/security.md)")
    return signature.strip().lower(), timestamp.strip()


def _check_time(timestamp: str, settings: Settings, now: float) -> None:
    name = settings.webhook_timestamp_header
    # Digits only: float("nan"), "1e9" or a sign would make the tolerance check meaningless.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise _rejected("TimestampOutOfRange", f"{name} must be whole epoch seconds")
    if abs(now - int(timestamp)) > settings.webhook_tolerance_seconds:
        raise _rejected("TimestampOutOfRange",
                        f"{name} is more than {settings.webhook_tolerance_seconds} s from the server's clock "
                        "(WEBHOOK_TOLERANCE_SECONDS); sign each request when it is sent")


def _same(given: str, expected: str) -> bool:
    # Compare bytes of equal meaning: a non-ASCII header must fail, not raise in compare_digest.
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("ascii"))


def verify(body: bytes, headers: Mapping[str, str], settings: Settings, *, method: str, path: str,
           params: Mapping[str, str] | None, seen: AnswerBook | None, now: float | None = None) -> Recalled | None:
    """Raise RequestRejected(401) unless the request carries a valid, fresh signature not seen
    before. Returns the claim on the signature (None when WEBHOOK_HMAC_SECRET is not set): the
    caller forgets it when it did not act on the request, so that a verbatim retry (Logic Apps
    retry policies resend the same headers) is accepted. Messages name headers, never values."""
    secret = settings.webhook_hmac_secret
    if not secret:
        return None
    signature, timestamp = _signed_headers(headers, settings)
    now = time.time() if now is None else now
    _check_time(timestamp, settings, now)
    if not _same(signature, sign(secret, timestamp, body, method, path, params)):
        if _same(signature, _legacy_sign(secret, timestamp, body)):
            raise _rejected("SignatureVersionUnsupported",
                            f"{settings.webhook_signature_header} signs only timestamp.body; the string to sign "
                            "now covers the method, path and query too (docs/security.md)")
        raise _rejected("SignatureInvalid", f"{settings.webhook_signature_header} does not match the request "
                                            f"(method, path, query, {settings.webhook_timestamp_header} and body)")
    if seen is None:
        return None
    # Timestamps are accepted that far either side of now: a signature is any use for twice the tolerance.
    claim = seen.claim_once(signature.removeprefix(PREFIX), SIGNATURE_SCOPE, 2 * settings.webhook_tolerance_seconds)
    if claim is None:
        raise _rejected("SignatureReplayed", "this signature was already used; sign every new request with its own "
                                             f"{settings.webhook_timestamp_header}")
    return claim
