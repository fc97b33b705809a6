"""Microsoft Entra ID callers admitted through App Service Authentication ("Easy Auth").

When Easy Auth validates a bearer token it passes the caller on to the app in request headers:
X-MS-CLIENT-PRINCIPAL (Base64 JSON `{"auth_typ", "claims": [{"typ", "val"}], "name_typ",
"role_typ"}`), X-MS-CLIENT-PRINCIPAL-ID, -NAME and -IDP. "External requests aren't allowed to set
these headers, so they're present only if set by App Service"; claim names go through the default
claim mapping, so a role may arrive under `role_typ`'s URI instead of `roles`.
https://learn.microsoft.com/azure/app-service/configure-authentication-user-identities

Easy Auth is configured to let unauthenticated requests through (infra/), so callers without an
Entra ID token keep using function keys or the HMAC signature; a request that carries a principal
must name an allowed client application (appid or azp claim) or hold an allowed app role.
The function key is still checked by the Functions host for every caller: the host does not grant
key-level access to Easy Auth identities (https://github.com/Azure/azure-functions-host/issues/11394).
"""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from pydantic import BaseModel, ValidationError

from shared.errors import RequestRejected
from shared.settings import Settings

PRINCIPAL_HEADER = "x-ms-client-principal"
# Every header Easy Auth sets for the caller; devhost strips them from clients, as the platform does.
PRINCIPAL_HEADERS = (PRINCIPAL_HEADER, "x-ms-client-principal-id", "x-ms-client-principal-name",
                     "x-ms-client-principal-idp")
APP_ID_CLAIMS = ("appid", "azp")  # v1.0 tokens carry appid, v2.0 tokens azp
ROLE_CLAIMS = frozenset({"roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"})
MAX_PRINCIPAL_CHARS = 16 * 1024


class Claim(BaseModel):
    typ: str
    val: str


class ClientPrincipal(BaseModel):
    auth_typ: str | None = None
    claims: list[Claim] = []
    name_typ: str | None = None
    role_typ: str | None = None

    def app_id(self) -> str | None:
        for wanted in APP_ID_CLAIMS:
            for claim in self.claims:
                if claim.typ == wanted:
                    return claim.val.lower()
        return None

    def roles(self) -> frozenset[str]:
        names = ROLE_CLAIMS | ({self.role_typ} if self.role_typ else set())
        return frozenset(c.val for c in self.claims if c.typ in names)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name), None)


def principal_of(headers: Mapping[str, str]) -> ClientPrincipal | None:
    """The decoded principal, None without one; RequestRejected(403) if it cannot be read."""
    raw = _header(headers, PRINCIPAL_HEADER)
    if raw is None:
        return None
    try:
        if len(raw) > MAX_PRINCIPAL_CHARS:
            raise ValueError("too long")
        return ClientPrincipal.model_validate_json(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error, ValidationError):
        raise RequestRejected(403, "UnreadableClientPrincipal",
                              f"the {PRINCIPAL_HEADER} header is not the Base64 JSON App Service Authentication "
                              "sends") from None


def caller_of(headers: Mapping[str, str], settings: Settings) -> str | None:
    """The calling application's client id (lower case) when Easy Auth is on and vouches for one;
    None for key or HMAC callers and whenever Easy Auth is off (the header is then nobody's word)."""
    if not settings.easy_auth_enabled:
        return None
    principal = principal_of(headers)
    return principal.app_id() if principal else None


def admit(headers: Mapping[str, str], settings: Settings) -> str | None:
    """The admitted caller's app id (None for key/HMAC callers); RequestRejected(403) for an Entra ID
    caller that is neither an allowed application nor holds an allowed role."""
    if not settings.easy_auth_enabled:
        return None
    principal = principal_of(headers)
    if principal is None:
        return None
    app_id = principal.app_id()
    if app_id in settings.allowed_client_app_ids or principal.roles() & settings.allowed_client_roles:
        return app_id
    raise RequestRejected(403, "CallerNotAllowed",
                          "this Microsoft Entra ID application may not call this API: it is not in "
                          "ALLOWED_CLIENT_APP_IDS and holds none of the roles in ALLOWED_CLIENT_ROLES",
                          [{"appId": app_id}] if app_id else None)
