"""The published JSON Schemas are generated from the models and have not drifted from them."""
import json

import pytest

from scripts.schemas import DIRECTORY, SCHEMAS, render


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_current(name):
    assert (DIRECTORY / name).read_text() == render(SCHEMAS[name]), "run `python -m scripts.schemas`"


def test_result_schema_names_the_documented_fields():
    schema = json.loads((DIRECTORY / "result.schema.json").read_text())
    documented = {"requestId", "correlationId", "servicePrincipalId", "jobId", "ruleId", "subject", "result",
                  "errorCode", "errorMessage", "action", "changeId", "reportableIdentifier", "startTime", "endTime",
                  "steps", "modifiedProperties", "attempts", "receivedAt", "completedAt", "resultId"}
    assert documented <= set(schema["properties"])
    assert {"resultId", "requestId", "result", "subject", "attempts", "receivedAt", "completedAt"} <= set(schema["required"])
