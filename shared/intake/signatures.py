"""Optional webhook signatures: HMAC-SHA256 over `timestamp + "." + body`.

A sender with the shared secret (WEBHOOK_HMAC_SECRET) sends two headers:
  X-Timestamp: <epoch seconds>                    (WEBHOOK_TIMESTAMP_HEADER)
  X-Signature: sha256=<hex of HMAC-SHA256(secret, timestamp + "." + body)>   (WEBHOOK_SIGNATURE_HEADER)
The timestamp is inside the MAC, so a captured request cannot be replayed once it is older than
WEBHOOK_TOLERANCE_SECONDS. This complements the function key; it does not replace it.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from typing import Mapping

from shared.errors import RequestRejected
from shared.settings import Settings

PREFIX = "sha256="


def sign(secret: str, timestamp: str | int, body: bytes) -> str:
    """The header value a sender computes (also what the tests and docs use)."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return PREFIX + mac.hexdigest()


def _rejected(code: str, message: str) -> RequestRejected:
    return RequestRejected(401, code, message)


def verify(body: bytes, headers: Mapping[str, str], settings: Settings, now: float | None = None) -> None:
    """Raise RequestRejected(401) unless the request carries a valid, fresh signature. A no-op when
    WEBHOOK_HMAC_SECRET is not set. Messages name headers, never values: the secret stays out."""
    secret = settings.webhook_hmac_secret
    if not secret:
        return
    lowered = {k.lower(): v for k, v in headers.items()}
    sig_name, ts_name = settings.webhook_signature_header, settings.webhook_timestamp_header
    signature = lowered.get(sig_name.lower())
    timestamp = lowered.get(ts_name.lower())
    if not signature or not timestamp:
        missing = [n for n, v in ((sig_name, signature), (ts_name, timestamp)) if not v]
        raise _rejected("SignatureMissing", f"this endpoint requires signed requests: send {' and '.join(missing)} "
                                            f"({sig_name}: sha256=<hex HMAC-SHA256 of timestamp + '.' + body>)")
    timestamp = timestamp.strip()
    # Digits only: float("nan"), "1e9" or a sign would make the tolerance check meaningless.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise _rejected("TimestampOutOfRange", f"{ts_name} must be whole epoch seconds")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > settings.webhook_tolerance_seconds:
        raise _rejected("TimestampOutOfRange",
                        f"{ts_name} is more than {settings.webhook_tolerance_seconds} s from the server's clock "
                        "(WEBHOOK_TOLERANCE_SECONDS); sign each request when it is sent")
    expected = sign(secret, timestamp, body)
    given = signature.strip().lower()
    # Compare bytes of equal meaning: a non-ASCII header must fail, not raise in compare_digest.
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("ascii")):
        raise _rejected("SignatureInvalid", f"{sig_name} does not match the body and {ts_name}")
