"""Issue 13 N3: everything we write fits its limit, trimmed largest part first and marked.

Results (queue message, status row), dead letters and the posts that make them: any input within
the body limit yields writes within their limits, and nothing fails for size."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from shared.deadletters import DEAD_LETTER_LIMIT, dead_letter_for
from shared.errors import RequestRejected
from shared.intake.validation import accept
from shared.models import DeadLetter, ResultMessage, Step, Subject, utcnow
from shared.queues import MAX_MESSAGE_BYTES
from shared.results.sinks import RESULT_KEEP, fit_for_queue
from shared.results.sizing import fit_document, size
from shared.settings import Settings
from shared.status.rows import RESULT_CHARS

SP = "c8c95753-f628-48e1-9fab-76c2d4cf624c"
USER = "9bb0f679-a883-4a6f-8260-35b491b8b8c8"


def result(**parts) -> ResultMessage:
    base = dict(result="Success", resultId="r:0", requestId="r", servicePrincipalId=SP, jobId="job", ruleId="rule",
                subject=Subject(objectId=USER, objectTypeName="User"), callIndex=0, callCount=1, attempts=1,
                receivedAt=utcnow(), completedAt=utcnow())
    return ResultMessage(**{**base, **parts})


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def test_a_result_that_fits_is_written_whole():
    small = result(steps=[Step(name="EntryImport", details={"a": "b"})])
    assert json.loads(fit_for_queue(small)) == small.model_dump(mode="json", exclude_none=True)


def test_93_kb_of_steps_is_cut_first_and_marked_the_rest_kept():
    # The size seen in the field: a source system's attribute dump in every step.
    steps = [Step(name=f"step{i}", status="Success", details={f"attr{j}": "v" * 40 for j in range(40)}) for i in range(50)]
    big = result(steps=steps, rawKey="k" * 5000, errorMessage="boom")
    assert utf8(big.model_dump_json()) > 90_000
    text = fit_for_queue(big)
    written = ResultMessage.model_validate_json(text)
    assert utf8(text) <= MAX_MESSAGE_BYTES - 1024
    assert written.truncated and written.truncatedFields == ["steps"]
    assert written.rawKey == "k" * 5000 and written.errorMessage == "boom"   # smaller parts untouched
    assert [s.name for s in written.steps] == [s.name for s in steps[:len(written.steps)]]  # a prefix


def test_every_large_part_is_cut_in_order_of_size_until_it_fits():
    big = result(rawKey="k" * 40_000, rawValue="v" * 30_000, errorMessage="e" * 20_000,
                 steps=[Step(description="d" * 1000) for _ in range(10)])
    written = ResultMessage.model_validate_json(fit_for_queue(big, limit=20_000))
    assert written.truncatedFields[:2] == ["rawKey", "rawValue"]
    assert utf8(fit_for_queue(big, limit=20_000)) <= 20_000


def test_a_status_row_result_fits_a_table_property_in_utf16_units():
    # Non-ASCII costs more UTF-8 bytes than UTF-16 units, astral characters as many: bytes bound both.
    big = result(errorMessage="é" * 40_000, rawValue="😀" * 20_000)
    text = fit_for_queue(big, limit=RESULT_CHARS)
    assert utf8(text) <= RESULT_CHARS and utf16_units(text) <= 32 * 1024
    assert ResultMessage.model_validate_json(text).truncated


def test_an_attribute_dump_of_thousands_of_small_members_is_cut_in_one_pass():
    details = {f"a{i}": str(i) for i in range(20_000)}
    text = fit_for_queue(result(steps=[Step(name="EntryExportUpdate", details=details)]))
    written = ResultMessage.model_validate_json(text)
    assert written.steps[0].name == "EntryExportUpdate" and 0 < len(written.steps[0].details) < 20_000


def test_fields_kept_whole_are_never_cut_and_an_impossible_limit_says_so():
    document = {"id": "x" * 100, "blob": "y" * 1000}
    trimmed, cut = fit_document(document, 300, keep=frozenset({"id"}), marker="truncatedFields")
    assert trimmed["id"] == "x" * 100 and cut == ["blob"] and size(trimmed) <= 300
    with pytest.raises(ValueError):
        fit_document(document, 50, keep=frozenset({"id"}))


# Long texts built from a sample (drawing 70 000 characters one by one is what would be slow):
# ASCII, characters JSON escapes six-fold, two-byte, three-byte and astral ones.
long_text = st.builds(lambda sample, times: sample * times, st.text(min_size=1, max_size=8).filter(bool)
                      | st.sampled_from(["\x01", '"', "é", "€", "😀"]), st.integers(0, 12_000))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=50), long_text)
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=30), st.dictionaries(st.text(max_size=20), inner, max_size=30)), max_leaves=12)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_key=long_text, raw_value=long_text, message=long_text,
       details=st.lists(st.dictionaries(st.text(max_size=20), json_values, max_size=4), max_size=8),
       limit=st.sampled_from([RESULT_CHARS, MAX_MESSAGE_BYTES - 1024, 4096]))
def test_any_result_fits_any_limit_and_keeps_what_identifies_it(raw_key, raw_value, message, details, limit):
    original = result(rawKey=raw_key, rawValue=raw_value, errorMessage=message,
                      steps=[Step(name="s", details=d) for d in details])
    text = fit_for_queue(original, limit=limit)
    written = ResultMessage.model_validate_json(text)
    assert utf8(text) <= limit and utf16_units(text) <= limit
    dumped, before = written.model_dump(mode="json"), original.model_dump(mode="json")
    assert all(dumped[k] == before[k] for k in RESULT_KEEP - {"truncated"})
    assert written.truncated == bool(written.truncatedFields)
    assert written.rawKey is None or raw_key.startswith(written.rawKey)


BODY_LIMIT = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true").max_body_bytes


def refusal_of(text: str) -> RequestRejected:
    settings = Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=SP,
                        DEFAULT_JOB_ID="job", DEFAULT_RULE_ID="rule")
    with pytest.raises(RequestRejected) as info:
        accept(text, settings)
    return info.value


def long_unknown_fields(count: int, name_length: int) -> str:
    event = {"objectTypeName": "User", "objectId": USER}
    event.update({f"{i:04d}" + "x" * name_length: 1 for i in range(count)})
    return json.dumps(event)


def test_long_unknown_field_names_echoed_in_details_still_fit_a_dead_letter():
    # The reported case: a message under 64 KiB whose problems (each naming a long field) are over it.
    text = long_unknown_fields(44, 1430)
    assert utf8(text) < MAX_MESSAGE_BYTES
    letter = dead_letter_for(refusal_of(text), "intake", text)
    assert utf8(letter.model_dump_json(exclude_none=True)) <= DEAD_LETTER_LIMIT
    assert "reason" in letter.truncatedFields and letter.reason.code == "ValidationFailed"


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(count=st.integers(1, 60), name_length=st.integers(1, 4000), junk=st.text(max_size=2000))
def test_any_refused_body_within_the_body_limit_dead_letters_within_a_queue_message(count, name_length, junk):
    text = long_unknown_fields(count, name_length)[:-1] + f', "junk": {json.dumps(junk)}}}'
    if utf8(text) > BODY_LIMIT:
        text = text.encode()[:BODY_LIMIT].decode("utf-8", "ignore")
    letter = dead_letter_for(refusal_of(text), "intake", text)
    written = letter.model_dump_json(exclude_none=True)
    assert utf8(written) <= DEAD_LETTER_LIMIT
    again = DeadLetter.model_validate_json(written)
    assert text.startswith(again.original) and again.originalTruncated == (again.original != text)


def test_a_lone_surrogate_escaped_in_json_never_breaks_a_write():
    # JSON may escape half a surrogate pair ("\ud800"): Python reads it, but no UTF-8 store takes it.
    lone = json.loads('"x\\ud800y"')
    text = fit_for_queue(result(rawBody=lone * 30_000, steps=[Step(name=lone)]), limit=RESULT_CHARS)
    assert utf8(text) <= RESULT_CHARS and ResultMessage.model_validate_json(text).steps[0].name == "x?y"
    body = '{"objectTypeName": "User", "objectId": "%s", "\\ud800": 1}' % USER
    letter = dead_letter_for(refusal_of(body), "intake", json.loads(json.dumps(body)))
    assert utf8(letter.model_dump_json()) <= DEAD_LETTER_LIMIT


# -- a post's calls are bounded (MAX_CALLS_PER_POST) -------------------------------------------------
def group(members: int) -> dict:
    return {"objectTypeName": "Group", "objectId": USER,
            "links": {"members": [{"objectId": USER} for _ in range(members)]}}


def graph_body(parameters: int, subjects: list[dict]) -> str:
    return json.dumps({"parameters": [{"ruleId": "rule", "subjects": subjects} for _ in range(parameters)]})


def intake_settings(**extra) -> Settings:
    return Settings(AzureWebJobsStorage="UseDevelopmentStorage=true", DEFAULT_SERVICE_PRINCIPAL_ID=SP,
                    DEFAULT_JOB_ID="job", DEFAULT_RULE_ID="rule", **extra)


def test_the_reported_post_of_nested_lists_is_refused_naming_the_limit():
    # 100 parameters x 60 short Worker subjects fit in 256 KiB: 6000 calls, 3.6 h of everyone's timeline.
    body = json.dumps(json.loads(graph_body(100, [{"objectTypeName": "Worker", "objectId": "1"}] * 60)),
                      separators=(",", ":"))
    assert utf8(body) < BODY_LIMIT
    with pytest.raises(RequestRejected) as info:
        accept(body, intake_settings())
    assert info.value.status == 413 and info.value.info.code == "TooManyCalls"
    assert "MAX_CALLS_PER_POST" in info.value.info.message and info.value.info.details == [{"calls": 6000, "limit": 1000}]


def test_group_splits_count_toward_the_limit():
    # 3 groups of 500 members: 3 subjects, but 300 calls of five members.
    body = graph_body(1, [group(500)] * 3)
    assert sum(len(a.items) for a in accept(body, intake_settings(MAX_CALLS_PER_POST="300"))) == 300
    with pytest.raises(RequestRejected) as info:
        accept(body, intake_settings(MAX_CALLS_PER_POST="299"))
    assert info.value.info.details == [{"calls": 300, "limit": 299}]


@hsettings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.lists(st.integers(0, 30), min_size=1, max_size=5)), min_size=1, max_size=5))
def test_the_bound_counts_exactly_the_calls_a_post_becomes(shape):
    events = [json.loads(graph_body(p, [group(m) if m else {"objectTypeName": "User", "objectId": USER} for m in ms]))
              for p, ms in shape]
    accepted = accept(json.dumps(events), intake_settings(MAX_CALLS_PER_POST="100000"))
    expected = sum(p * sum(max(1, -(-m // 5)) for m in ms) for p, ms in shape)
    assert sum(len(a.items) for a in accepted) == expected
    if expected > 1:
        with pytest.raises(RequestRejected):
            accept(json.dumps(events), intake_settings(MAX_CALLS_PER_POST=str(expected - 1)))
