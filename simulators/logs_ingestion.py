"""Azure Monitor Logs Ingestion API simulator, on loopback over TLS.

    POST /dataCollectionRules/{dcr immutable id}/streams/{stream}?api-version=2023-01-01
    Authorization: Bearer <token for https://monitor.azure.com>   (or https://monitor.azure.us)
    Content-Encoding: gzip (optional)
    [ {row}, ... ]                      -> 204 No Content

TLS because azure-core's bearer-token policy refuses to send a token over http; the certificate is
self-signed, made at start with `cryptography`, and `env()` names a CA bundle (certifi's roots
plus this certificate) in REQUESTS_CA_BUNDLE so that the app's requests transport trusts it.

Checks, in the service's order: path and DCR id (404), api-version (400), bearer token signature,
lifetime and audience (401), body size (413: 1 MB), gzip and JSON array (400), then every row
against the table schema in infra/loganalytics/table.json (400). The schema check is stricter than
the service, which drops undeclared columns silently: here they are refused, so a mapping that
drifts from the table fails a test instead of losing data.

Faults for tests, as Python methods and `/_sim/...` JSON endpoints:
  fail(status, count=, seconds=, retry_after=, match=)   429/500/503/... or "reset" (drop the
      connection); lasts `count` requests and/or `seconds`, else until recover(); `match`
      ({column: value}) limits it to requests holding such a row.
  GET  /_sim/rows | /_sim/requests | /_sim/stats     POST /_sim/fault | /_sim/recover | /_sim/reset

Signature check: pass the identity simulator's `signer` (in-process, as the tests do). Without one
(`python -m simulators.logs_ingestion`, where the identity simulator runs in another process) the
token's claims are read unverified and only its lifetime and audience are checked.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gzip
import ipaddress
import json
import ssl
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, unquote, urlsplit

from .httpbase import SimHandler, SimServer, parse_json_body, serve_until_signalled
from .tokens import TokenError, TokenSigner, unverified_claims

ROOT = Path(__file__).resolve().parent.parent
TABLE_SCHEMA = ROOT / "infra" / "loganalytics" / "table.json"
API_VERSION = "2023-01-01"
MONITOR_AUDIENCES = frozenset({"https://monitor.azure.com", "https://monitor.azure.us"})
SIM_DCR_ID = "dcr-5e1a7c0de0000000000000000000a001"
DEFAULT_STREAM = "Custom-ProvisioningResults_CL"
MAX_BODY_BYTES = 1024 * 1024  # the service's 1 MB per call, compressed or not
FAULT_STATUSES = (400, 401, 403, 408, 413, 429, 500, 502, 503, 504)


def load_columns(path: Path | str = TABLE_SCHEMA) -> dict[str, str]:
    """Column name -> type from a table definition (table.json)."""
    table = json.loads(Path(path).read_text())
    return {c["name"]: c["type"].lower() for c in table["properties"]["schema"]["columns"]}


def _is_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and -2**31 <= v < 2**31,
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "real": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "datetime": _is_datetime,
    "dynamic": lambda v: True,
    "guid": lambda v: isinstance(v, str) and len(v) == 36,
}


def check_row(row: Any, columns: Mapping[str, str]) -> str | None:
    """Why the row does not fit the table (None when it does)."""
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    unknown = sorted(set(row) - set(columns))
    if unknown:
        return f"columns not in the table schema: {', '.join(unknown)}"
    if row.get("TimeGenerated") is None and "TimeGenerated" in columns:
        return "TimeGenerated is required"
    for name, value in row.items():
        if value is not None and not _TYPE_CHECKS.get(columns[name], lambda v: True)(value):
            return f"column {name} must be of type {columns[name]}, got {type(value).__name__} {json.dumps(value)[:60]}"
    return None


def make_certificate(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed server certificate for `host` (and localhost), valid for a week."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Logs Ingestion simulator")])
    now = dt.datetime.now(dt.timezone.utc)
    alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "logs-ingestion-sim.crt", directory / "logs-ingestion-sim.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class LogsIngestionSimulator(SimServer):
    """`endpoint` is the value for LOGS_INGESTION_ENDPOINT; `env()` gives every setting the app needs."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        signer: TokenSigner | None = None,
        dcr_id: str = SIM_DCR_ID,
        stream: str = DEFAULT_STREAM,
        audiences: Iterable[str] = MONITOR_AUDIENCES,
        schema: Path | str | Mapping[str, str] = TABLE_SCHEMA,
        cert_dir: Path | str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        verbose: bool = False,
    ) -> None:
        super().__init__(_LogsHandler, port, host, verbose=verbose)
        self.signer = signer
        self.dcr_id = dcr_id
        self.stream = stream
        self.audiences = frozenset(audiences)
        self.columns = dict(schema) if isinstance(schema, Mapping) else load_columns(schema)
        self.max_body_bytes = max_body_bytes
        self._tmp = None if cert_dir else tempfile.TemporaryDirectory(prefix="logs-sim-")
        self.cert_dir = Path(cert_dir or self._tmp.name)  # type: ignore[union-attr]
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        self.cert_file, key_file = make_certificate(self.cert_dir, host)
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.load_cert_chain(self.cert_file, key_file)
        self.ca_bundle = self._write_bundle()
        self._lock = threading.Lock()
        self._rows: list[dict[str, Any]] = []
        self._log: list[dict[str, Any]] = []
        self._faults: list[dict[str, Any]] = []

    def _write_bundle(self) -> Path:
        # The public roots stay trusted too: REQUESTS_CA_BUNDLE replaces the whole store of the process.
        try:
            import certifi

            roots = Path(certifi.where()).read_text()
        except ImportError:
            roots = ""
        bundle = self.cert_dir / "ca-bundle.pem"
        bundle.write_text(roots.rstrip("\n") + "\n" + self.cert_file.read_text())
        return bundle

    # --- TLS: the handshake runs in the request's thread, so a stalled client blocks nobody ----
    def get_request(self):  # type: ignore[override]
        sock, addr = super().get_request()
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address) -> None:  # type: ignore[override]
        if self.verbose:
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # --- properties ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return self.base_url

    def env(self) -> dict[str, str]:
        return {
            "LOGS_INGESTION_ENDPOINT": self.endpoint,
            "LOGS_DCR_IMMUTABLE_ID": self.dcr_id,
            "LOGS_STREAM_NAME": self.stream,
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
        }

    # --- controls ------------------------------------------------------------------------------
    def fail(self, status: int | str, *, count: int | None = None, seconds: float | None = None,
             retry_after: float | str | None = None, match: Mapping[str, Any] | None = None) -> None:
        """Answer `status` (or drop the connection: "reset") to the next matching requests."""
        if status != "reset":
            status = int(status)
            if status not in FAULT_STATUSES:
                raise ValueError(f"fault status must be one of {FAULT_STATUSES} or 'reset', not {status}")
        with self._lock:
            self._faults.append({
                "status": status,
                "remaining": None if count is None else int(count),
                "until": None if seconds is None else time.monotonic() + float(seconds),
                "retry_after": None if retry_after is None else str(retry_after),
                "match": dict(match) if match else None,
            })

    def recover(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._rows.clear()
            self._log.clear()

    def rows(self) -> list[dict[str, Any]]:
        """Every row accepted so far, in arrival order."""
        with self._lock:
            return copy.deepcopy(self._rows)

    def requests(self) -> list[dict[str, Any]]:
        """One entry per request: status, row count, ResultIds, gzip, sizes, token audience."""
        with self._lock:
            return copy.deepcopy(self._log)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            statuses: dict[str, int] = {}
            for entry in self._log:
                statuses[str(entry["status"])] = statuses.get(str(entry["status"]), 0) + 1
            return {"requests": len(self._log), "rows": len(self._rows), "statuses": statuses,
                    "faults": [{k: v for k, v in f.items() if k != "until"} for f in self._faults]}

    # --- internals -----------------------------------------------------------------------------
    def _take_fault(self, rows: list[Any]) -> dict[str, Any] | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults
                            if (f["until"] is None or now < f["until"]) and (f["remaining"] is None or f["remaining"] > 0)]
            for f in self._faults:
                if f["match"] and not any(isinstance(r, dict) and all(r.get(k) == v for k, v in f["match"].items())
                                          for r in rows):
                    continue
                if f["remaining"] is not None:
                    f["remaining"] -= 1
                return dict(f)
        return None

    def _record(self, entry: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> None:
        with self._lock:
            self._log.append(entry)
            if rows:
                self._rows.extend(rows)

    def check_token(self, header: str | None) -> tuple[dict[str, Any] | None, str | None]:
        if not header or not header.lower().startswith("bearer "):
            return None, "Authorization: Bearer <token> is required"
        token = header[7:].strip()
        try:
            if self.signer is not None:
                return self.signer.decode(token, audiences=self.audiences), None
            claims = unverified_claims(token)
            if claims is None:
                raise TokenError("the token is not a JWT")
            if not isinstance(claims.get("exp"), (int, float)) or time.time() >= claims["exp"]:
                raise TokenError("the token is expired")
            if claims.get("aud") not in self.audiences:
                raise TokenError("Invalid audience.")
            return claims, None
        except TokenError as exc:
            claims = unverified_claims(token) or {}
            return None, f"{exc} (aud {claims.get('aud')!r}; expected one of {sorted(self.audiences)})"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _LogsHandler(SimHandler):
    server: LogsIngestionSimulator

    def setup(self) -> None:
        self.request.settimeout(10)
        self.request.do_handshake()
        super().setup()

    # --- admin ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        sim = self.server
        path = urlsplit(self.path).path
        if path == "/_sim/rows":
            self.send_json(200, sim.rows())
        elif path == "/_sim/requests":
            self.send_json(200, sim.requests())
        elif path == "/_sim/stats":
            self.send_json(200, sim.stats())
        else:
            self.send_json(404, _error("NotFound", f"no such path {path}"))

    def _admin_post(self, path: str) -> None:
        sim = self.server
        try:
            body = parse_json_body(self.read_body())
            if path == "/_sim/fault":
                sim.fail(body["status"], count=body.get("count"), seconds=body.get("seconds"),
                         retry_after=body.get("retryAfter"), match=body.get("match"))
            elif path == "/_sim/recover":
                sim.recover()
            elif path == "/_sim/reset":
                sim.reset()
            else:
                self.send_json(404, _error("NotFound", f"no such path {path}"))
                return
        except (ValueError, KeyError, TypeError) as exc:
            self.send_json(400, _error("BadRequest", str(exc)))
            return
        self.send_json(200, sim.stats())

    # --- the API -------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802
        sim = self.server
        parts = urlsplit(self.path)
        if parts.path.startswith("/_sim/"):
            self._admin_post(parts.path)
            return
        raw = self.read_body()
        entry: dict[str, Any] = {"time": self.arrival_wall, "path": parts.path, "bytes": len(raw),
                                 "gzip": (self.headers.get("Content-Encoding") or "").lower() == "gzip",
                                 "rows": 0, "resultIds": []}

        def answer(status: int, code: str | None = None, message: str = "", headers: Mapping[str, Any] | None = None):
            entry.update(status=status, error=code)
            sim._record(entry)
            if status == 204:
                self.send_bytes(204, b"", content_type=None)
            else:
                self.send_json(status, _error(code or "Error", message), headers=headers)

        segments = [unquote(s) for s in parts.path.strip("/").split("/")]
        if len(segments) != 4 or segments[0] != "dataCollectionRules" or segments[2] != "streams":
            return answer(404, "NotFound", "expected /dataCollectionRules/{ruleId}/streams/{stream}")
        if segments[1] != sim.dcr_id:
            return answer(404, "DataCollectionRuleNotFound", f"data collection rule {segments[1]!r} not found")
        if segments[3] != sim.stream:
            return answer(400, "InvalidStream", f"stream {segments[3]!r} is not declared in the rule")
        versions = parse_qs(parts.query).get("api-version", [])
        if versions != [API_VERSION]:
            return answer(400, "InvalidApiVersion", f"api-version must be {API_VERSION}, got {versions}")
        claims, why = sim.check_token(self.headers.get("Authorization"))
        if claims is None:
            return answer(401, "InvalidToken", why or "invalid token")
        entry["aud"] = claims.get("aud")
        if len(raw) > sim.max_body_bytes:
            return answer(413, "ContentLengthLimitExceeded", f"the body is {len(raw)} bytes, over {sim.max_body_bytes}")
        body = raw
        if entry["gzip"]:
            try:
                body = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error):
                return answer(400, "InvalidContentEncoding", "Content-Encoding is gzip but the body is not")
        entry["rawBytes"] = len(body)
        if len(body) > sim.max_body_bytes:
            return answer(413, "ContentLengthLimitExceeded", f"the rows are {len(body)} bytes, over {sim.max_body_bytes}")
        try:
            rows = json.loads(body)
        except ValueError:
            return answer(400, "InvalidJson", "the body is not JSON")
        if not isinstance(rows, list):
            return answer(400, "InvalidJson", "the body must be a JSON array of rows")
        entry["rows"] = len(rows)
        entry["resultIds"] = [r.get("ResultId") for r in rows if isinstance(r, dict)]
        fault = sim._take_fault(rows)
        if fault is not None:
            entry["fault"] = True
            if fault["status"] == "reset":
                entry.update(status="reset")
                sim._record(entry)
                self.reset_connection()
                return None
            extra = {"Retry-After": fault["retry_after"]} if fault["retry_after"] is not None else None
            return answer(fault["status"], "SimulatedFault", f"simulated {fault['status']}", extra)
        for i, row in enumerate(rows):
            problem = check_row(row, sim.columns)
            if problem:
                return answer(400, "InvalidRow", f"row {i}: {problem}")
        entry.update(status=204, error=None)
        sim._record(entry, rows)
        self.send_bytes(204, b"", content_type=None)
        return None


def start_logs_ingestion(port: int = 0, host: str = "127.0.0.1", **kwargs: Any) -> LogsIngestionSimulator:
    return LogsIngestionSimulator(port, host, **kwargs).start()  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.logs_ingestion", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    p.add_argument("--dcr-id", default=SIM_DCR_ID)
    p.add_argument("--stream", default=DEFAULT_STREAM)
    p.add_argument("--cert-dir", default=None, help="where to write the certificate (default: a temporary directory)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    sim = start_logs_ingestion(args.port, args.host, dcr_id=args.dcr_id, stream=args.stream,
                               cert_dir=args.cert_dir, verbose=args.verbose)
    return serve_until_signalled(sim, "Logs ingestion simulator ready")

if __name__ == "__main__":
    sys.exit(main())
