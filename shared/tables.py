"""The storage account's table service, for every table the app keeps (status, remembered answers):
the same account and credential as the queues (AzureWebJobsStorage)."""
from __future__ import annotations

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import TableClient, TableServiceClient

from shared.settings import Settings


def table_service(settings: Settings) -> TableServiceClient:
    from shared.queues import connection_string, transport_options

    conn = connection_string(settings)
    if conn:
        return TableServiceClient.from_connection_string(conn, **transport_options())
    from shared.graph.credentials import app_credential

    return TableServiceClient(settings.table_service_uri, credential=app_credential(settings.azure_client_id),
                              **transport_options())


def create_table(table: TableClient) -> None:
    """Idempotent, as for queues: many instances may race to create it."""
    try:
        table.create_table()
    except ResourceExistsError:
        pass
