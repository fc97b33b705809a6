"""Write the JSON Schemas of the messages the app emits: `python -m scripts.schemas`.

The files in schemas/ are generated from the pydantic models; a test fails when they drift."""
from __future__ import annotations

import json
from pathlib import Path

from shared.models import DeadLetter, ResultMessage, WorkItem

SCHEMAS = {"result.schema.json": ResultMessage, "deadletter.schema.json": DeadLetter, "work-item.schema.json": WorkItem}
DIRECTORY = Path(__file__).resolve().parent.parent / "schemas"


def render(model) -> str:
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://provision-on-demand.invalid/schemas/{model.__name__}"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, model in SCHEMAS.items():
        (DIRECTORY / name).write_text(render(model))
        print(f"wrote schemas/{name}")


if __name__ == "__main__":
    main()
