"""Loopback simulators of the services the app calls: Microsoft Graph (provisionOnDemand) and the
App Service managed identity endpoint. Standard library only; never deployed.

    sims = start_simulators(graph_port=0, identity_port=0)
    os.environ.update(sims.env())   # GRAPH_ENDPOINT, IDENTITY_ENDPOINT, IDENTITY_HEADER
    ...
    sims.stop()

Or as a process: `python -m simulators --help`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .graph import GraphSimulator
from .identity import IdentitySimulator
from .ratelimit import SlidingWindowLimiter, max_in_window
from .responses import load_golden
from .tokens import (
    DEFAULT_ROLES,
    GRAPH_AUDIENCES,
    SIM_CLIENT_ID,
    SIM_OBJECT_ID,
    SIM_TENANT_ID,
    TokenError,
    TokenSigner,
    default_signer,
)

__all__ = [
    "DEFAULT_ROLES",
    "GRAPH_AUDIENCES",
    "GraphSimulator",
    "IdentitySimulator",
    "SIM_CLIENT_ID",
    "SIM_OBJECT_ID",
    "SIM_TENANT_ID",
    "Simulators",
    "SlidingWindowLimiter",
    "TokenError",
    "TokenSigner",
    "default_signer",
    "load_golden",
    "max_in_window",
    "start_simulators",
]


@dataclass
class Simulators:
    """A running pair of simulators sharing one token signer."""

    graph: GraphSimulator
    identity: IdentitySimulator

    @property
    def graph_endpoint(self) -> str:
        """e.g. http://127.0.0.1:PORT (no version suffix)."""
        return self.graph.endpoint

    @property
    def identity_endpoint(self) -> str:
        """e.g. http://127.0.0.1:PORT/msi/token."""
        return self.identity.endpoint

    @property
    def identity_header(self) -> str:
        return self.identity.identity_header

    def env(self) -> dict[str, str]:
        return {
            "GRAPH_ENDPOINT": self.graph_endpoint,
            "IDENTITY_ENDPOINT": self.identity_endpoint,
            "IDENTITY_HEADER": self.identity_header,
        }

    def mint_token(self, resource: str = "https://graph.microsoft.com", **claims: Any) -> str:
        """A token the Graph simulator accepts (override roles=, exp=, aud=, lifetime=, ...)."""
        return self.identity.mint_token(resource, **claims)

    def stop(self) -> None:
        for server in (self.graph, self.identity):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - stop both even if one fails
                pass

    def __enter__(self) -> "Simulators":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_simulators(
    graph_port: int = 0,
    identity_port: int = 0,
    *,
    host: str = "127.0.0.1",
    identity_header: str | None = None,
    roles: Iterable[str] | None = None,
    tenant_id: str = SIM_TENANT_ID,
    client_id: str = SIM_CLIENT_ID,
    object_id: str = SIM_OBJECT_ID,
    token_lifetime: float = 3600,
    latency: Any = None,
    rate_calls: int | None = 5,
    rate_window: float = 10.0,
    count_throttled: bool = True,
    clock_skew: float = 0.0,
    known_jobs: Iterable[tuple[str, str]] | None = None,
    signer: TokenSigner | None = None,
    seed: int | None = None,
    verbose: bool = False,
) -> Simulators:
    """Start both simulators on loopback (port 0 = any free port) in background threads."""
    signer = signer or default_signer()
    identity = IdentitySimulator(
        identity_port, host, identity_header=identity_header, signer=signer, roles=roles,
        tenant_id=tenant_id, client_id=client_id, object_id=object_id, token_lifetime=token_lifetime,
        verbose=verbose,
    )
    try:
        graph = GraphSimulator(
            graph_port, host, signer=signer, latency=latency, rate_calls=rate_calls, rate_window=rate_window,
            count_throttled=count_throttled, clock_skew=clock_skew, known_jobs=known_jobs, seed=seed,
            verbose=verbose,
        )
    except BaseException:
        identity.server_close()
        raise
    identity.start()
    graph.start()
    return Simulators(graph=graph, identity=identity)
