"""A callback delivery the host gave up on (five crashed runs) is not lost: the poison sweep
dead-letters it as `source: "callback"`, replayable with the operator CLI. Against Azurite."""
from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

from azure.storage.queue import QueueServiceClient

from shared.models import CallbackMessage, DeadLetter
from shared.operations import poison_sweep
from shared.queues import Queues
from shared.settings import Settings
from tools.cli import _replay_target


def test_poisoned_callbacks_are_dead_lettered_and_replayable(azurite):
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(AzureWebJobsStorage=azurite.connection_string, CALLBACK_ALLOWED_HOSTS="hooks.contoso.com",
                        CALLBACK_QUEUE=f"cbp-{suffix}", DEADLETTER_QUEUE=f"cbp-dead-{suffix}",
                        WORK_QUEUE=f"cbp-work-{suffix}", INTAKE_QUEUE=f"cbp-in-{suffix}")
    queues = Queues(QueueServiceClient.from_connection_string(azurite.connection_string))
    message = CallbackMessage(url="https://hooks.contoso.com/x", resultId="r:0", requestId="r", result="{}", attempts=2)
    queues.get(f"{settings.callback_queue}-poison").send_message(message.model_dump_json())
    assert poison_sweep.sweep(SimpleNamespace(settings=settings, queues=queues)) == 1
    [dead] = queues.get(settings.deadletter_queue).receive_messages()
    letter = DeadLetter.model_validate(json.loads(dead.content))
    assert letter.source == "callback" and letter.reason.code == "RepeatedFailure"
    kind, text = _replay_target(letter)
    assert kind == "callback" and CallbackMessage.model_validate_json(text).resultId == "r:0"
