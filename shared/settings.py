"""All configuration, read once from the environment (app settings in Azure, local.settings.json
locally). Every name here is documented in local.settings.sample.json and the README."""
from __future__ import annotations

import logging
import re
from enum import Enum
from functools import lru_cache

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import SettingsError
from shared.models import GUID_RE

log = logging.getLogger(__name__)


class GraphCloud(str, Enum):
    GLOBAL = "Global"
    US_GOV_L4 = "USGovL4"
    US_GOV_L5 = "USGovL5"


# provisionOnDemand is not offered in China (21Vianet), per the API page's availability table.
GRAPH_ROOTS = {
    GraphCloud.GLOBAL: "https://graph.microsoft.com",
    GraphCloud.US_GOV_L4: "https://graph.microsoft.us",
    GraphCloud.US_GOV_L5: "https://dod-graph.microsoft.us",
}


SLOT_SLACK_SECONDS = 0.1


class ResultsSink(str, Enum):
    QUEUE = "queue"
    LOG_ANALYTICS = "loganalytics"
    BOTH = "both"


# Audience of Logs Ingestion tokens per cloud; Azure Government (L4 and L5) shares one.
MONITOR_AUDIENCES = {
    GraphCloud.GLOBAL: "https://monitor.azure.com",
    GraphCloud.US_GOV_L4: "https://monitor.azure.us",
    GraphCloud.US_GOV_L5: "https://monitor.azure.us",
}
DCR_ID_RE = re.compile(r"^dcr-[0-9A-Za-z]{8,64}$")
STREAM_RE = re.compile(r"^(Custom|Microsoft)-[A-Za-z0-9_]{1,200}$")


class RateLimitScope(str, Enum):
    TENANT = "tenant"
    SERVICE_PRINCIPAL = "servicePrincipal"
    JOB = "job"


TABLE_NAME = r"^[A-Za-z][A-Za-z0-9]{2,62}$"
HEADER_NAME = r"^[A-Za-z0-9-]{1,64}$"


class _DerivedValues:
    """Values computed from the settings (Settings inherits them): URIs, scopes, parsed lists, the
    slot spacing. Kept apart from the fields so that each part reads in one screen."""

    @property
    def queue_service_uri(self) -> str | None:
        if self.storage_queue_service_uri:
            return self.storage_queue_service_uri
        return f"https://{self.storage_account_name}.queue.core.windows.net" if self.storage_account_name else None

    @property
    def table_service_uri(self) -> str | None:
        if self.storage_table_service_uri:
            return self.storage_table_service_uri
        return f"https://{self.storage_account_name}.table.core.windows.net" if self.storage_account_name else None

    @property
    def allowed_client_app_ids(self) -> frozenset[str]:
        return frozenset(v.strip().lower() for v in self.allowed_client_app_ids_text.split(",") if v.strip())

    @property
    def allowed_client_roles(self) -> frozenset[str]:
        return frozenset(v.strip() for v in self.allowed_client_roles_text.split(",") if v.strip())

    @property
    def graph_root(self) -> str:
        return (self.graph_endpoint or GRAPH_ROOTS[GraphCloud(self.graph_cloud)]).rstrip("/")

    @property
    def callback_hosts(self) -> tuple[str, ...]:
        """CALLBACK_ALLOWED_HOSTS as lower-case names; `*.example.com` allows any subdomain."""
        return tuple(h.strip().lower().rstrip(".") for h in (self.callback_allowed_hosts or "").split(",") if h.strip())

    @property
    def logs_enabled(self) -> bool:
        return self.results_sink in (ResultsSink.LOG_ANALYTICS, ResultsSink.BOTH)

    @property
    def logs_scope(self) -> str:
        return MONITOR_AUDIENCES[GraphCloud(self.graph_cloud)] + "/.default"

    @property
    def graph_scope(self) -> str:
        # The token audience is the cloud's Graph root even when GRAPH_ENDPOINT points elsewhere.
        return GRAPH_ROOTS[GraphCloud(self.graph_cloud)] + "/.default"

    @property
    def slot_spacing(self) -> float:
        # A token comes back window + margin after its call; the small slack keeps a call that
        # starts a few milliseconds late from pushing its successor five slots on off its slot.
        return (self.rate_limit_window_seconds + self.rate_limit_margin_seconds + SLOT_SLACK_SECONDS) / self.rate_limit_calls



class Settings(_DerivedValues, BaseSettings):
    # Empty values (as in local.settings.sample.json) mean "use the default".
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True, env_ignore_empty=True)

    storage_connection: str | None = Field(None, alias="AzureWebJobsStorage")
    storage_queue_service_uri: str | None = Field(None, alias="AzureWebJobsStorage__queueServiceUri")
    storage_table_service_uri: str | None = Field(None, alias="AzureWebJobsStorage__tableServiceUri")
    storage_account_name: str | None = Field(None, alias="AzureWebJobsStorage__accountName")
    azure_client_id: str | None = Field(None, alias="AZURE_CLIENT_ID")

    graph_cloud: str = Field("Global", alias="GRAPH_CLOUD")
    graph_api_version: str = Field("v1.0", alias="GRAPH_API_VERSION")
    graph_endpoint: str | None = Field(None, alias="GRAPH_ENDPOINT")
    graph_timeout_seconds: float = Field(30.0, alias="GRAPH_TIMEOUT_SECONDS", gt=0, le=120)

    default_service_principal_id: str | None = Field(None, alias="DEFAULT_SERVICE_PRINCIPAL_ID")
    default_job_id: str | None = Field(None, alias="DEFAULT_JOB_ID")
    default_rule_id: str | None = Field(None, alias="DEFAULT_RULE_ID")

    # At most 63 characters, with "-parked"/"-poison" (learn.microsoft.com/rest/api/storageservices/naming-queues-and-metadata)
    intake_queue: str = Field("provision-requests", alias="INTAKE_QUEUE", max_length=56)
    work_queue: str = Field("provision-work", alias="WORK_QUEUE", max_length=56)
    results_queue: str = Field("provision-results", alias="RESULTS_QUEUE")
    deadletter_queue: str = Field("provision-deadletter", alias="DEADLETTER_QUEUE")
    lease_queue: str = Field("provision-leases", alias="LEASE_QUEUE")
    # Tables: status and coalescing (shared/status/), keys and seen signatures (shared/intake/idempotency.py).
    status_table: str = Field("provisionstatus", alias="STATUS_TABLE", pattern=TABLE_NAME)
    coalesce_requests: bool = Field(True, alias="COALESCE_REQUESTS")
    # Off by default until a late-ETA regression seen under it is explained (BENCHMARKS.md "Intake speed").
    fast_intake: bool = Field(True, alias="FAST_INTAKE")
    idempotency_table: str = Field("provisionkeys", alias="IDEMPOTENCY_TABLE", pattern=TABLE_NAME)
    idempotency_retention_hours: float = Field(24.0, alias="IDEMPOTENCY_RETENTION_HOURS", gt=0, le=720)
    # The most of the rate high-priority calls may take while normal calls wait (shared/ratelimit/slot_timeline.py).
    high_priority_share: float = Field(0.8, alias="HIGH_PRIORITY_SHARE", gt=0, le=0.95)

    rate_limit_calls: int = Field(5, alias="RATE_LIMIT_CALLS", ge=1, le=32)
    rate_limit_window_seconds: int = Field(10, alias="RATE_LIMIT_WINDOW_SECONDS", ge=1, le=3600)
    rate_limit_margin_seconds: float = Field(0.5, alias="RATE_LIMIT_MARGIN_SECONDS", ge=0, le=60)
    rate_limit_scope: RateLimitScope = Field(RateLimitScope.TENANT, alias="RATE_LIMIT_SCOPE")
    schedule_lead_seconds: float = Field(3.0, alias="SCHEDULE_LEAD_SECONDS", ge=0, le=30)
    schedule_batch: int = Field(2, alias="SCHEDULE_BATCH", ge=1, le=16)
    max_slot_wait_seconds: float = Field(7.0, alias="MAX_SLOT_WAIT_SECONDS", ge=0, le=60)

    max_attempts: int = Field(10, alias="MAX_ATTEMPTS", ge=1, le=100)
    retry_base_seconds: float = Field(5.0, alias="RETRY_BASE_SECONDS", gt=0)
    retry_max_seconds: float = Field(900.0, alias="RETRY_MAX_SECONDS", gt=0)
    max_expected_wait_hours: float = Field(72.0, alias="MAX_EXPECTED_WAIT_HOURS", gt=0, le=167)
    max_body_bytes: int = Field(262144, alias="MAX_BODY_BYTES", ge=1024)
    max_calls_per_post: int = Field(1000, alias="MAX_CALLS_PER_POST", ge=1, le=100000)
    # Make a call again this many minutes after it came back out of scope (shared/graph/out_of_scope.py); 0 = off.
    out_of_scope_retry_minutes: float = Field(0.0, alias="OUT_OF_SCOPE_RETRY_MINUTES", ge=0, le=1440)

    # Optional webhook signatures (shared/intake/signatures.py): off while the secret is empty.
    webhook_hmac_secret: str | None = Field(None, alias="WEBHOOK_HMAC_SECRET", repr=False)
    webhook_signature_header: str = Field("X-Signature", alias="WEBHOOK_SIGNATURE_HEADER", pattern=HEADER_NAME)
    webhook_timestamp_header: str = Field("X-Timestamp", alias="WEBHOOK_TIMESTAMP_HEADER", pattern=HEADER_NAME)
    webhook_tolerance_seconds: int = Field(300, alias="WEBHOOK_TOLERANCE_SECONDS", ge=1, le=86400)
    # Personal values in results become salted hashes (shared/results/redaction.py).
    redact_pii: bool = Field(False, alias="REDACT_PII")
    redact_pii_salt: str | None = Field(None, alias="REDACT_PII_SALT", repr=False)

    # Rule discovery (shared/intake/rule_discovery.py) and the quarantine guard (shared/graph/job_guard.py).
    rule_cache_seconds: float = Field(600.0, alias="RULE_CACHE_SECONDS", ge=0, le=86400)
    # Subjects and applications by name (shared/intake/names.py): how long a unique answer is reused.
    name_cache_seconds: float = Field(600.0, alias="NAME_CACHE_SECONDS", ge=0, le=86400)
    auto_start_quarantined_job: bool = Field(False, alias="AUTO_START_QUARANTINED_JOB")
    # A queue message can hide for 7 days at most, and that hidden message is the cooldown.
    auto_start_cooldown_seconds: int = Field(3600, alias="AUTO_START_COOLDOWN_SECONDS", ge=1, le=604800)

    # Callbacks (shared/results/callbacks.py): off while no host is allowed.
    callback_allowed_hosts: str | None = Field(None, alias="CALLBACK_ALLOWED_HOSTS")
    callback_allow_loopback: bool = Field(False, alias="CALLBACK_ALLOW_LOOPBACK")  # local development only
    callback_max_attempts: int = Field(8, alias="CALLBACK_MAX_ATTEMPTS", ge=1, le=50)
    callback_timeout_seconds: float = Field(10.0, alias="CALLBACK_TIMEOUT_SECONDS", gt=0, le=60)
    callback_queue: str = Field("provision-callbacks", alias="CALLBACK_QUEUE", max_length=56)
    callback_table: str = Field("provisioncallbacks", alias="CALLBACK_TABLE", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$")

    results_sink: ResultsSink = Field(ResultsSink.QUEUE, alias="RESULTS_SINK")
    logs_ingestion_endpoint: str | None = Field(None, alias="LOGS_INGESTION_ENDPOINT")
    logs_dcr_immutable_id: str | None = Field(None, alias="LOGS_DCR_IMMUTABLE_ID")
    logs_stream_name: str = Field("Custom-ProvisioningResults_CL", alias="LOGS_STREAM_NAME")
    logs_queue: str = Field("provision-logs", alias="LOGS_QUEUE", max_length=56)
    logs_max_attempts: int = Field(10, alias="LOGS_MAX_ATTEMPTS", ge=1, le=100)
    logs_batch_size: int = Field(100, alias="LOGS_BATCH_SIZE", ge=1, le=1000)
    logs_timeout_seconds: float = Field(30.0, alias="LOGS_TIMEOUT_SECONDS", gt=0, le=120)

    # Entra ID callers (shared/intake/callers.py). The lists are comma-separated, as the template passes
    # them: kept as text, or pydantic-settings would read them as JSON.
    easy_auth_enabled: bool = Field(False, alias="EASY_AUTH_ENABLED")
    allowed_client_app_ids_text: str = Field("", alias="ALLOWED_CLIENT_APP_IDS")
    allowed_client_roles_text: str = Field("", alias="ALLOWED_CLIENT_ROLES")

    @field_validator("graph_cloud")
    @classmethod
    def _known_cloud(cls, value: str) -> str:
        if value.replace(" ", "").lower() in {"china", "21vianet", "chinacloud", "azurechinacloud"}:
            raise ValueError("GRAPH_CLOUD=China is not supported: Microsoft does not offer provisionOnDemand "
                             "in the national cloud operated by 21Vianet. Use Global, USGovL4 or USGovL5.")
        allowed = [c.value for c in GraphCloud]
        if value not in allowed:
            raise ValueError(f"GRAPH_CLOUD must be one of {allowed}, got {value!r}")
        return value

    @field_validator("graph_api_version")
    @classmethod
    def _known_version(cls, value: str) -> str:
        if value not in ("v1.0", "beta"):
            raise ValueError(f"GRAPH_API_VERSION must be 'v1.0' or 'beta', got {value!r}")
        return value

    @field_validator("results_sink", mode="before")
    @classmethod
    def _sink_any_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _log_analytics_configured(self) -> "Settings":
        # Checked at start-up: a typo here would otherwise only show as rows piling up on LOGS_QUEUE.
        given = {"LOGS_INGESTION_ENDPOINT": self.logs_ingestion_endpoint,
                 "LOGS_DCR_IMMUTABLE_ID": self.logs_dcr_immutable_id}
        missing = [name for name, value in given.items() if not value]
        if self.logs_enabled and missing:
            raise ValueError(f"RESULTS_SINK={self.results_sink.value} sends results to Log Analytics, which "
                             f"needs LOGS_INGESTION_ENDPOINT and LOGS_DCR_IMMUTABLE_ID; missing: {', '.join(missing)}")
        if not self.logs_enabled and len(missing) == 1:
            raise ValueError(f"Log Analytics is half configured: {missing[0]} is not set while "
                             f"{next(n for n in given if n not in missing)} is; set both (and RESULTS_SINK=both "
                             "or loganalytics) or neither")
        return self

    @model_validator(mode="after")
    def _log_analytics_well_formed(self) -> "Settings":
        if self.logs_ingestion_endpoint and not self.logs_ingestion_endpoint.startswith("https://"):
            raise ValueError("LOGS_INGESTION_ENDPOINT must be an https:// URL (the data collection endpoint or the "
                             "DCR's logsIngestion endpoint); Azure SDKs never send bearer tokens over http")
        if self.logs_dcr_immutable_id and not DCR_ID_RE.match(self.logs_dcr_immutable_id):
            raise ValueError("LOGS_DCR_IMMUTABLE_ID must be the DCR's immutableId (dcr-<32 hex digits>), "
                             "not its name or resource id")
        if not STREAM_RE.match(self.logs_stream_name):
            raise ValueError("LOGS_STREAM_NAME must name a stream of the DCR, such as Custom-ProvisioningResults_CL")
        return self

    @model_validator(mode="after")
    def _redaction_salted(self) -> "Settings":
        # Without a secret salt a hash of a name is reversed by hashing a list of names.
        if self.redact_pii and (not self.redact_pii_salt or len(self.redact_pii_salt) < 16):
            raise ValueError("REDACT_PII=true needs REDACT_PII_SALT: a secret of at least 16 characters")
        return self

    @model_validator(mode="after")
    def _callers_configured(self) -> "Settings":
        bad = [value for value in self.allowed_client_app_ids if not GUID_RE.match(value)]
        if bad:
            raise ValueError(f"ALLOWED_CLIENT_APP_IDS must list client application ids (GUIDs); {len(bad)} are not")
        # Easy Auth on with empty lists would refuse every Entra ID caller: surely a mistake.
        if self.easy_auth_enabled and not (self.allowed_client_app_ids or self.allowed_client_roles):
            raise ValueError("EASY_AUTH_ENABLED=true needs ALLOWED_CLIENT_APP_IDS or ALLOWED_CLIENT_ROLES (or none is admitted)")
        return self

    @model_validator(mode="after")
    def _storage_configured(self) -> "Settings":
        if not (self.storage_connection or self.storage_queue_service_uri or self.storage_account_name):
            raise ValueError(
                "Storage is not configured: set AzureWebJobsStorage (connection string, or "
                "UseDevelopmentStorage=true), or for identity-based access AzureWebJobsStorage__accountName "
                "or AzureWebJobsStorage__queueServiceUri"
            )
        return self


SETTING_NAMES = tuple(sorted({f.alias for f in Settings.model_fields.values() if f.alias}, key=len, reverse=True))


def _named_settings(message: str) -> list[str]:
    """App setting names a problem mentions, so that a 503 can name them without their values."""
    found: list[str] = []
    for name in SETTING_NAMES:  # longest first, each blanked once found: AzureWebJobsStorage__x is not AzureWebJobsStorage
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"
        if re.search(pattern, message):
            found.append(name)
            message = re.sub(pattern, " ", message)
    return sorted(found)


def load_settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, ")) for e in exc.errors()]
        names = sorted({name for loc, msg in problems for name in ([loc] if loc else _named_settings(msg))})
        text = "; ".join(f"{loc or 'settings'}: {msg}" for loc, msg in problems)
        raise SettingsError(f"Invalid configuration: {text}", settings=names) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


@lru_cache(maxsize=1)
def settings_problem() -> SettingsError | None:
    """None when the settings are valid; otherwise the error, logged as critical once per process
    (not once per message) so that a bad deployment shows at once without flooding the log."""
    try:
        get_settings()
    except SettingsError as problem:
        log.critical("%s. HTTP calls answer 503 and queue messages are parked until this is fixed and the app "
                     "restarted (settings: %s)", problem, ", ".join(problem.settings) or "see message")
        return problem
    return None
