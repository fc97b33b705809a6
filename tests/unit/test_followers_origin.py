"""A coalesced call serves several requests: each keeps its own CloudEvent, subject name and
callbackUrl in its result (the Follower carries them through the status store). Fakes for the
sinks, status store, queues and callback ledger; the worker's own code runs as is."""
from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

from shared import worker
from shared.models import (
    CloudEventRef,
    Follower,
    Outcome,
    Subject,
    SubjectName,
    WorkItem,
)
from shared.settings import Settings

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
OBJECT = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"


class Recorder:
    def __init__(self) -> None:
        self.items: list = []

    def emit(self, result) -> None:
        self.items.append(result)

    def send_json(self, name, body, *, delay=0) -> None:
        self.items.append(body)

    def record(self, request_id, state) -> None:
        self.items.append(state)


def test_each_request_served_by_one_call_keeps_its_own_origin():
    leader_subject = Subject(objectId=OBJECT, objectTypeName="User")
    follower_subject = leader_subject.model_copy(update={"name": SubjectName(property="mail", value="ada@contoso.com")})
    leader = WorkItem(requestId="a", servicePrincipalId="sp", jobId="j", ruleId="r", subject=leader_subject,
                      receivedAt=NOW, callbackUrl="https://hooks.contoso.com/a",
                      event=CloudEventRef(type="t", source="/s", id="1"))
    follower = Follower(**WorkItem(requestId="b", servicePrincipalId="sp", jobId="j", ruleId="r",
                                   subject=follower_subject, receivedAt=NOW, callbackUrl="https://hooks.contoso.com/b",
                                   event=CloudEventRef(type="t", source="/s", id="2")).model_dump(
        include=set(Follower.model_fields)))
    sink, queues, ledger = Recorder(), Recorder(), Recorder()
    rt = SimpleNamespace(settings=Settings(AzureWebJobsStorage="UseDevelopmentStorage=true",
                                           CALLBACK_ALLOWED_HOSTS="hooks.contoso.com"),
                         sinks=[sink], status=SimpleNamespace(finish=lambda item, results: None),
                         queues=queues, callbacks=ledger)
    worker._emit(leader.model_copy(update={"followers": [follower]}), rt, Outcome(result="Success"))
    first, second = sink.items
    assert (first.event.id, second.event.id) == ("1", "2")
    assert (first.subject.name, second.subject.name) == (None, follower_subject.name)
    assert [m.url for m in queues.items] == ["https://hooks.contoso.com/a", "https://hooks.contoso.com/b"]
    assert [m.resultId for m in queues.items] == ["a:0", "b:0"]
