"""One way to make anything we write fit its limit: trim the largest parts first and say which.

Queue messages hold 64 KiB; a table string property 32 K UTF-16 code units (64 KiB), an entity
1 MiB (https://learn.microsoft.com/rest/api/storageservices/understanding-the-table-service-data-model).
Sizes here are UTF-8 bytes of the JSON text, which is never fewer than its UTF-16 code units, so a
limit in bytes holds for both kinds of store.

`fit` never fails for size: strings are cut, lists lose their last entries, objects their largest
members, until the text fits. The names of the top-level fields it cut are returned (and written
into the `marker` field when the caller names one) so that a reader knows the record is partial.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

# Parts smaller than this are not worth cutting: the identifying fields of a record stay whole.
SMALL = 64


def size(value: Any) -> int:
    # A lone surrogate (JSON may escape one: "\ud800") counts its three bytes here, more than the
    # "?" that _text() writes for it.
    return len(json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


def _text(document: dict[str, Any]) -> str:
    """The JSON text, valid UTF-8: lone surrogates, which no store accepts, become "?"."""
    return json.dumps(document, ensure_ascii=False, default=str).encode("utf-8", "replace").decode("utf-8")


def _cut_text(text: str, excess: int) -> str:
    # A prefix, so that what is kept is exactly what came. JSON escaping can make one character
    # cost up to six bytes: cutting by the excess alone can fall short, which the caller's loop
    # corrects on its next pass.
    return text[:max(0, len(text) - max(excess, len(text) // 8, 1))]


def _largest(items: dict[Any, Any]) -> Any:
    return max(items, key=lambda k: size(items[k]))


def _drop_last(items: list[Any], excess: int) -> list[Any]:
    kept, freed = list(items), 0
    while kept and freed < excess:
        freed += size(kept.pop()) + 2
    return kept


def _cut_list(items: list[Any], excess: int) -> list[Any]:
    if len(items) == 1:
        return [_cut(items[0], excess)] if size(items[0]) > SMALL else []
    return _drop_last(items, excess)


def _cut_dict(members: dict[str, Any], excess: int) -> dict[str, Any]:
    if not members:
        return members
    name = _largest(members)
    if size(members[name]) > SMALL:
        return {**members, name: _cut(members[name], excess)}
    # Many small members (an attribute dump): the last ones go, in one pass.
    return dict(_drop_last(list(members.items()), excess))


def _cut(value: Any, excess: int) -> Any:
    if isinstance(value, str):
        return _cut_text(value, excess)
    if isinstance(value, list):
        return _cut_list(value, excess)
    if isinstance(value, dict):
        return _cut_dict(value, excess)
    return None


def fit_document(document: dict[str, Any], limit: int, keep: frozenset[str] = frozenset(),
                 marker: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """`document` cut to at most `limit` bytes of JSON, and the names of the fields that were cut.
    Fields named in `keep` are never cut; the marker field, when given, lists the cut fields."""
    trimmed, cut = dict(document), []
    room = limit - (size({marker: list(document)}) if marker else 0)
    while size(trimmed) > room:
        candidates = {k: v for k, v in trimmed.items() if k not in keep and v not in (None, "", [], {})}
        if not candidates:
            raise ValueError(f"the fields that must be kept whole are over {limit} bytes on their own")
        name = _largest(candidates)
        trimmed[name] = _cut(trimmed[name], size(trimmed) - room)
        if name not in cut:
            cut.append(name)
    if cut and marker:
        trimmed[marker] = cut
    return trimmed, cut


def fit(model: BaseModel, limit: int, keep: frozenset[str] = frozenset(), marker: str | None = "truncatedFields",
        flag: str | None = None) -> tuple[str, list[str]]:
    """The model as JSON text of at most `limit` UTF-8 bytes, and the fields that were cut.

    The text is the model's JSON (None fields left out) with its largest parts trimmed first; when
    anything was cut, the `marker` field lists what and the boolean `flag` field is set true."""
    document = model.model_dump(mode="json", exclude_none=True)
    if size(document) <= limit:
        return _text(document), []
    if marker:
        document.pop(marker, None)
    if flag:
        document[flag] = True
    trimmed, cut = fit_document(document, limit, keep, marker)
    return _text(trimmed), cut
