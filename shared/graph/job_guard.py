"""Quarantine and pause guard.

When a call fails in a way that points at the synchronization job rather than at the subject
(404 on the job's path, a 400/409 whose code speaks of quarantine, or an answer whose errorCode is
a quarantine reason), the job's status is read and reported in the result (`jobStatus`), so an
operator sees "the job is in quarantine" instead of a puzzling per-user error.

With AUTO_START_QUARANTINED_JOB=true a quarantined job is started, at most once per
AUTO_START_COOLDOWN_SECONDS across every instance. Microsoft warns: "Don't create scripts to call
the start job continuously while it's running because that can cause the service to stop
running." So the start is guarded by a durable lease, one token message per job in a storage
queue: taking it hides it for the cooldown and it is never given back early. An instance that
finds no visible token does not start.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any, Callable

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.storage.queue import QueueClient

from shared.errors import GraphFailure
from shared.models import JobStatus, Outcome, WorkItem
from shared.runtime import Runtime

log = logging.getLogger(__name__)

# Quarantine reasons (status.quarantine.reason) that can surface as a call's errorCode.
QUARANTINE_REASONS = frozenset({"EncounteredQuarantineException", "EncounteredEscrowProportionThreshold",
                                "QuarantineOnDemand", "EncounteredBaseEscrowThreshold",
                                "EncounteredTotalEscrowThreshold", "TooManyDeletes", "IngestionInterrupted"})
# Only quarantine: a Paused job was paused by someone (an admin, a change freeze), and starting it
# behind their back would undo a decision. Its status is still reported.
STARTABLE = ("Quarantine",)
SEED_VISIBLE_AFTER = 1  # seconds; longer than a seed takes, so racing seeders settle on one epoch


def _mentions_job_state(*texts: str | None) -> bool:
    joined = " ".join(t for t in texts if t).lower()
    return "quarantin" in joined or "paused" in joined


def points_at_job(outcome: Outcome, failure: GraphFailure | None) -> bool:
    if failure is not None:
        if failure.status == 404:
            return True
        if failure.status in (400, 409) and _mentions_job_state(failure.code, failure.message):
            return True
        return False
    code = outcome.errorCode or ""
    return code in QUARANTINE_REASONS or _mentions_job_state(code)


def status_from_job(job: dict[str, Any]) -> JobStatus:
    status = job.get("status") if isinstance(job.get("status"), dict) else {}
    quarantine = status.get("quarantine") if isinstance(status.get("quarantine"), dict) else None
    error = quarantine.get("error") if quarantine and isinstance(quarantine.get("error"), dict) else None
    return JobStatus(code=str(status.get("code") or "Unknown"),
                     quarantineReason=quarantine.get("reason") if quarantine else None,
                     quarantineError=error)


def read_status(item: WorkItem, rt: Runtime) -> JobStatus:
    try:
        job = rt.graph.get_job(item.servicePrincipalId, item.jobId, rt.graph.token())
    except GraphFailure as failure:
        if failure.status == 404:
            return JobStatus(code="NotFound", detail=f"{failure.code}: {failure.message}")
        return JobStatus(code="Unknown", detail=f"could not read the job: {failure.code}: {failure.message}")
    return status_from_job(job)


def inspect(item: WorkItem, rt: Runtime, outcome: Outcome, failure: GraphFailure | None = None) -> JobStatus | None:
    """The job's status when this outcome points at the job, else None. Never raises: the result
    must be written whatever happens here, and a raise would make the host repeat the Graph call."""
    if not points_at_job(outcome, failure):
        return None
    try:
        status = read_status(item, rt)
        if rt.settings.auto_start_quarantined_job and status.code in STARTABLE:
            status.autoStart = _auto_start(item, rt)
        log.warning("job %s of %s is %s (%s)", item.jobId, item.servicePrincipalId, status.code,
                    status.quarantineReason or status.detail or "no reason given")
        return status
    except Exception as exc:  # noqa: BLE001 - reporting must not cost the result
        log.exception("could not inspect job %s", item.jobId)
        return JobStatus(code="Unknown", detail=f"{type(exc).__name__} while reading the job")


def _auto_start(item: WorkItem, rt: Runtime) -> str:
    guard = StartGuard(rt.queues.get(guard_queue_name(rt.settings.lease_queue, item.servicePrincipalId, item.jobId)),
                       rt.settings.auto_start_cooldown_seconds)
    try:
        if not guard.take():
            return "cooldown"
    except AzureError as exc:
        # Without the lease we cannot know whether someone else just started it: do not.
        return f"failed: lease unavailable ({type(exc).__name__})"
    try:
        rt.graph.start_job(item.servicePrincipalId, item.jobId, rt.graph.token())
    except GraphFailure as failure:
        # The token stays hidden for the cooldown: a failed start is not retried in a loop either.
        return f"failed: {failure.code}"
    log.warning("started job %s of %s (AUTO_START_QUARANTINED_JOB)", item.jobId, item.servicePrincipalId)
    return "started"


def guard_queue_name(lease_queue: str, service_principal_id: str, job_id: str) -> str:
    digest = hashlib.sha256(f"{service_principal_id}/{job_id}".encode()).hexdigest()[:16]
    return f"{lease_queue[:40].rstrip('-')}-start-{digest}"


class StartGuard:
    """One token message per job. Holding it (hidden for the cooldown) is the right to call start.

    Seeding can race between instances: the queue metadata names the one valid epoch, a token of
    another epoch is deleted on sight, and new tokens stay hidden SEED_VISIBLE_AFTER seconds so
    every racing seeder has written its metadata before any token can be taken."""

    def __init__(self, queue: QueueClient, cooldown: int, sleep: Callable[[float], None] = time.sleep):
        self.queue = queue
        self.cooldown = int(cooldown)
        self.sleep = sleep
        try:
            queue.create_queue()
        except ResourceExistsError:
            pass

    def _state(self) -> tuple[str | None, int]:
        props = self.queue.get_queue_properties()
        return (props.metadata or {}).get("epoch"), int(props.approximate_message_count or 0)

    def _seed(self) -> None:
        epoch = uuid.uuid4().hex
        self.queue.set_queue_metadata({"epoch": epoch})
        self.queue.send_message(json.dumps({"epoch": epoch}), visibility_timeout=SEED_VISIBLE_AFTER, time_to_live=-1)
        log.info("start guard %s seeded (epoch %s)", self.queue.queue_name, epoch)

    def take(self) -> bool:
        seeded = False
        for _ in range(4):
            messages = list(self.queue.receive_messages(max_messages=1, visibility_timeout=self.cooldown))
            if not messages:
                epoch, count = self._state()
                if (epoch and count > 0) or seeded:
                    return False  # the token is out: someone started within the cooldown
                self._seed()
                seeded = True
                self.sleep(SEED_VISIBLE_AFTER + 0.3)
                continue
            message = messages[0]
            epoch, _ = self._state()
            try:
                mine = json.loads(message.content).get("epoch")
            except (ValueError, AttributeError):
                mine = None
            if mine and mine == epoch:
                return True  # stays hidden for the cooldown: that is the "at most once"
            self.queue.delete_message(message)
        return False
