"""Fast intake's received markers (shared/status/received.py) deleted by the upkeep timer once no
message is left that could still admit their requests: the intake queue and its parked sibling are
empty. Their approximate counts include invisible messages and are never below the true count
(https://learn.microsoft.com/rest/api/storageservices/get-queue-metadata), so every envelope sent
before was admitted (its requests read from their request rows from then on) or dead-lettered. A
run that finds messages queued leaves the markers to a later run.
"""
from __future__ import annotations

import logging

from azure.core.exceptions import AzureError

from shared.errors import StatusStoreUnavailable
from shared.operations.readiness import PARKED_SUFFIX
from shared.runtime import Runtime

log = logging.getLogger(__name__)


def sweep(rt: Runtime) -> int:
    """Delete old markers when the intake queues are empty; returns how many went."""
    intake = rt.settings.intake_queue
    try:
        if any(rt.queues.get(name).get_queue_properties().approximate_message_count
               for name in (intake, intake + PARKED_SUFFIX)):
            return 0
        return rt.status.sweep_received()
    except (AzureError, StatusStoreUnavailable) as exc:
        log.warning("received markers not swept: %s", type(exc).__name__)
        return 0
