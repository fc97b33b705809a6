"""All configuration, read once from the environment (app settings in Azure, local.settings.json
locally). Every name here is documented in local.settings.sample.json and the README."""
from __future__ import annotations

from enum import Enum
from functools import lru_cache

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


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


class RateLimitScope(str, Enum):
    TENANT = "tenant"
    SERVICE_PRINCIPAL = "servicePrincipal"
    JOB = "job"


class Settings(BaseSettings):
    # Empty values (as in local.settings.sample.json) mean "use the default".
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True)

    storage_connection: str | None = Field(None, alias="AzureWebJobsStorage")
    storage_queue_service_uri: str | None = Field(None, alias="AzureWebJobsStorage__queueServiceUri")
    storage_account_name: str | None = Field(None, alias="AzureWebJobsStorage__accountName")
    azure_client_id: str | None = Field(None, alias="AZURE_CLIENT_ID")

    graph_cloud: str = Field("Global", alias="GRAPH_CLOUD")
    graph_api_version: str = Field("v1.0", alias="GRAPH_API_VERSION")
    graph_endpoint: str | None = Field(None, alias="GRAPH_ENDPOINT")
    graph_timeout_seconds: float = Field(30.0, alias="GRAPH_TIMEOUT_SECONDS", gt=0, le=120)

    default_service_principal_id: str | None = Field(None, alias="DEFAULT_SERVICE_PRINCIPAL_ID")
    default_job_id: str | None = Field(None, alias="DEFAULT_JOB_ID")
    default_rule_id: str | None = Field(None, alias="DEFAULT_RULE_ID")

    intake_queue: str = Field("provision-requests", alias="INTAKE_QUEUE")
    work_queue: str = Field("provision-work", alias="WORK_QUEUE")
    results_queue: str = Field("provision-results", alias="RESULTS_QUEUE")
    deadletter_queue: str = Field("provision-deadletter", alias="DEADLETTER_QUEUE")
    lease_queue: str = Field("provision-leases", alias="LEASE_QUEUE")

    rate_limit_calls: int = Field(5, alias="RATE_LIMIT_CALLS", ge=1, le=32)
    rate_limit_window_seconds: int = Field(10, alias="RATE_LIMIT_WINDOW_SECONDS", ge=1, le=3600)
    rate_limit_margin_seconds: float = Field(0.5, alias="RATE_LIMIT_MARGIN_SECONDS", ge=0, le=60)
    rate_limit_scope: RateLimitScope = Field(RateLimitScope.TENANT, alias="RATE_LIMIT_SCOPE")

    max_attempts: int = Field(10, alias="MAX_ATTEMPTS", ge=1, le=100)
    retry_base_seconds: float = Field(5.0, alias="RETRY_BASE_SECONDS", gt=0)
    retry_max_seconds: float = Field(900.0, alias="RETRY_MAX_SECONDS", gt=0)
    max_expected_wait_hours: float = Field(72.0, alias="MAX_EXPECTED_WAIT_HOURS", gt=0, le=167)
    max_body_bytes: int = Field(262144, alias="MAX_BODY_BYTES", ge=1024)

    @field_validator("graph_cloud")
    @classmethod
    def _known_cloud(cls, value: str) -> str:
        if value.replace(" ", "").lower() in {"china", "21vianet", "chinacloud", "azurechinacloud"}:
            raise ValueError(
                "GRAPH_CLOUD=China is not supported: Microsoft does not offer provisionOnDemand "
                "in the national cloud operated by 21Vianet. Use Global, USGovL4 or USGovL5."
            )
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

    @model_validator(mode="after")
    def _storage_configured(self) -> "Settings":
        if not (self.storage_connection or self.storage_queue_service_uri or self.storage_account_name):
            raise ValueError(
                "Storage is not configured: set AzureWebJobsStorage (connection string, or "
                "UseDevelopmentStorage=true), or for identity-based access AzureWebJobsStorage__accountName "
                "or AzureWebJobsStorage__queueServiceUri"
            )
        return self

    @property
    def queue_service_uri(self) -> str | None:
        if self.storage_queue_service_uri:
            return self.storage_queue_service_uri
        return f"https://{self.storage_account_name}.queue.core.windows.net" if self.storage_account_name else None

    @property
    def graph_root(self) -> str:
        return (self.graph_endpoint or GRAPH_ROOTS[GraphCloud(self.graph_cloud)]).rstrip("/")

    @property
    def graph_scope(self) -> str:
        # The token audience is the cloud's Graph root even when GRAPH_ENDPOINT points elsewhere.
        return GRAPH_ROOTS[GraphCloud(self.graph_cloud)] + "/.default"

    @property
    def rate_per_second(self) -> float:
        return self.rate_limit_calls / self.rate_limit_window_seconds


class SettingsError(RuntimeError):
    """Raised at start-up when configuration is missing or invalid; the message says what to fix."""


def load_settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise SettingsError(f"Invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
