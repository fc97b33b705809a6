"""Followers carry their own callbackUrl, CloudEvent and subject name (shared/results/callbacks.py,
shared/intake/cloudevents.py, shared/intake/names.py): joins stop before the group row's followers
outgrow a table property or the leader's work message; the rest get calls of their own."""
from __future__ import annotations

import time
import uuid

from scripts.local_stack import EXAMPLE_JOB, EXAMPLE_RULE, EXAMPLE_SP
from shared.models import CloudEventRef, Subject, SubjectName, WorkItem, utcnow
from shared.queues import MAX_MESSAGE_BYTES
from shared.status.admission import JOINED
from shared.status.rows import FOLLOWERS_CHARS, OPEN
from tests.integration.test_status import lead, store  # noqa: F401 - the status store fixture, on Azurite

OBJECT = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"
LONG = "x" * 500


def large_item() -> WorkItem:
    """As large as intake lets a request be: a 2 KB callbackUrl, 512-character event attributes."""
    return WorkItem(requestId=str(uuid.uuid4()), servicePrincipalId=EXAMPLE_SP, jobId=EXAMPLE_JOB,
                    ruleId=EXAMPLE_RULE, receivedAt=utcnow(), correlationId="c" * 128,
                    subject=Subject(objectId=OBJECT, objectTypeName="User",
                                    name=SubjectName(property="userPrincipalName", value="u" * 256)),
                    callbackUrl="https://hooks.contoso.com/" + "p" * 2000,
                    event=CloudEventRef(type=LONG, subject=LONG, source=LONG, id=LONG))


def test_large_followers_stop_joining_before_the_limits(store):
    items = [large_item() for _ in range(30)]
    leader = lead(store, items[0], slot=time.time() + 60)  # joinable once its work is queued
    admitted = store.admit(items[1:])
    joined = sum(1 for a in admitted if a.role == JOINED)
    assert 1 <= joined < 29, "some join, and the rest lead calls of their own"
    group = store.table.get_entity(leader.coalesceKey, OPEN)
    assert len(group["followers"]) <= FOLLOWERS_CHARS
    going = store.start_call(leader)
    assert len(going.followers) == joined
    assert len(going.model_dump_json(exclude_none=True).encode()) < MAX_MESSAGE_BYTES
