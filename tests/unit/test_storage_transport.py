"""The storage clients read proxy and CA settings from the environment once (shared/queues.py
transport_options): what `requests` would have applied per request still applies."""
from __future__ import annotations

from shared.queues import transport_options

CLEAN = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
         "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def clean(monkeypatch) -> None:
    for name in CLEAN:
        monkeypatch.delenv(name, raising=False)


def test_without_a_proxy_the_environment_is_read_once_and_the_ca_bundle_kept(monkeypatch):
    clean(monkeypatch)
    transport = transport_options()["transport"]
    assert transport._use_env_settings is False and transport.connection_config.verify is True
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/curl.pem")
    assert transport_options()["transport"].connection_config.verify == "/etc/curl.pem"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/corp.pem")   # requests prefers it, and so do we
    assert transport_options()["transport"].connection_config.verify == "/etc/corp.pem"


def test_with_a_proxy_in_the_environment_requests_keeps_reading_it(monkeypatch):
    clean(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert transport_options() == {}
