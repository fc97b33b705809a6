"""The app's identity: managed identity in Azure, developer credentials on a workstation."""
from __future__ import annotations

import os

from azure.core.credentials import TokenCredential
from azure.identity import DefaultAzureCredential, ManagedIdentityCredential


def app_credential(client_id: str | None) -> TokenCredential:
    # App Service / Functions (and our loopback endpoint) announce managed identity this way; going
    # straight to it avoids DefaultAzureCredential's probing of developer tools on every host.
    if os.environ.get("IDENTITY_ENDPOINT") and os.environ.get("IDENTITY_HEADER"):
        return ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    return DefaultAzureCredential(managed_identity_client_id=client_id, exclude_interactive_browser_credential=True)
