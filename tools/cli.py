"""Operator CLI: `python -m tools.cli --help`.

    send                 post an event to the function URL, or put it on the intake queue
                         (--callback-url to have each result POSTed back; --cloudevent-type and
                         --cloudevent-source to post it as a CloudEvent)
    status               where a request stands (GET /api/provision/{requestId}; --wait until it ends)
    results              show results (peek; --follow to tail, --consume to take them off)
    deadletters list     show dead-letter entries with the ids replay takes
    deadletters replay   put entries back (--id ... or --all) and only then delete them

Storage comes from --connection or $AzureWebJobsStorage; queue names from the same settings the
app reads (INTAKE_QUEUE, WORK_QUEUE, RESULTS_QUEUE, DEADLETTER_QUEUE) unless given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Callable, Iterable, TextIO

import httpx
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.queue import QueueClient
from pydantic import ValidationError

from shared.intake.cloudevents import STRUCTURED
from shared.models import CallbackMessage, DeadLetter, WorkItem
from shared.queues import DEV_STORAGE, NEVER_EXPIRE

QUEUE_DEFAULTS = {"intake": ("INTAKE_QUEUE", "provision-requests"), "work": ("WORK_QUEUE", "provision-work"),
                  "results": ("RESULTS_QUEUE", "provision-results"),
                  "deadletter": ("DEADLETTER_QUEUE", "provision-deadletter"),
                  "callback": ("CALLBACK_QUEUE", "provision-callbacks")}
# Read from the operator's shell, never by the app: not an app setting (tests/test_infra.py scans
# shared/ for os.environ reads of literal names to find app settings).
FUNCTION_KEY_ENV = "FUNCTION_KEY"
PEEK_LIMIT = 32  # the most a queue peek returns
# Long enough to re-send one batch; entries we fail to replay reappear when it ends.
REPLAY_HOLD_SECONDS = 120


class CliError(Exception):
    pass


def _connection(value: str | None) -> str:
    value = value or os.environ.get("AzureWebJobsStorage")
    if not value:
        raise CliError("give --connection or set AzureWebJobsStorage")
    return DEV_STORAGE if value.strip() == "UseDevelopmentStorage=true" else value


def _queue(args: argparse.Namespace, which: str) -> QueueClient:
    name = getattr(args, f"{which}_queue")
    return QueueClient.from_connection_string(_connection(args.connection), name)


def _ensure(queue: QueueClient) -> QueueClient:
    try:
        queue.create_queue()
    except ResourceExistsError:
        pass
    return queue


def _peek(queue: QueueClient) -> list[Any]:
    try:
        return list(queue.peek_messages(max_messages=PEEK_LIMIT))
    except ResourceNotFoundError:  # the app creates queues on first use
        return []


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"_unparsed": text}


# -- send -------------------------------------------------------------------------------------------
def _body(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.file:
        text = stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    elif args.data is not None:
        text = args.data
    else:
        raise CliError("give the event with --data JSON or --file PATH (- for stdin)")
    try:
        json.loads(text)
    except ValueError as exc:
        raise CliError(f"the event is not JSON: {exc}") from None
    return text


def _with_callback(text: str, url: str) -> str:
    document = json.loads(text)
    events = document if isinstance(document, list) else [document]
    if not all(isinstance(e, dict) for e in events):
        raise CliError("--callback-url needs the event (or each event of the array) to be a JSON object")
    stamped = [dict(e, callbackUrl=url) for e in events]
    return json.dumps(stamped if isinstance(document, list) else stamped[0])


def _as_cloudevent(text: str, args: argparse.Namespace) -> str:
    """Structured mode: the event becomes the CloudEvent's data (shared/intake/cloudevents.py)."""
    if not (args.cloudevent_type and args.cloudevent_source):
        raise CliError("a CloudEvent needs both --cloudevent-type and --cloudevent-source")
    event = {"specversion": "1.0", "id": args.cloudevent_id or str(uuid.uuid4()), "source": args.cloudevent_source,
             "type": args.cloudevent_type, "datacontenttype": "application/json", "data": json.loads(text)}
    if args.cloudevent_subject:
        event["subject"] = args.cloudevent_subject
    return json.dumps(event)


def cmd_send(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    text = _body(args, stdin)
    if args.callback_url:
        text = _with_callback(text, args.callback_url)
    cloudevent = bool(args.cloudevent_type or args.cloudevent_source)
    if cloudevent and not args.url:
        raise CliError("CloudEvents are taken over HTTP only: give --url")
    if args.url:
        headers = {"Content-Type": STRUCTURED if cloudevent else "application/json"}
        text = _as_cloudevent(text, args) if cloudevent else text
        if args.key:
            headers["x-functions-key"] = args.key
        params = {"dryRun": "true"} if args.dry_run else {}
        response = httpx.post(args.url, content=text.encode("utf-8"), headers=headers, params=params,
                              timeout=args.timeout)
        out.write(f"HTTP {response.status_code}\n{response.text}\n")
        return 0 if response.status_code < 400 else 1
    if args.dry_run:
        raise CliError("--dry-run needs --url: the intake queue has no way to answer")
    queue = _ensure(_queue(args, "intake"))
    sent = queue.send_message(text, time_to_live=NEVER_EXPIRE)
    out.write(f"queued on {queue.queue_name} as message {sent.id}\n")
    return 0


FINAL_STATES = {"succeeded", "skipped", "failed", "dead-lettered"}


def cmd_status(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    headers = {"x-functions-key": args.key} if args.key else {}
    url = f"{args.url.rstrip('/')}/{args.request_id}"
    deadline = time.monotonic() + args.timeout
    shown = None
    while True:
        response = httpx.get(url, headers=headers, timeout=30)
        if response.status_code != 200:
            out.write(f"HTTP {response.status_code}\n{response.text}\n")
            return 1
        body = response.json()
        if not args.wait or body["state"] != shown:  # when waiting, a line per change of state
            out.write(json.dumps(body) + "\n")
            shown = body["state"]
        if not args.wait or body["state"] in FINAL_STATES:
            return 0
        if time.monotonic() > deadline:
            return 3
        time.sleep(args.interval)


# -- results ----------------------------------------------------------------------------------------
def _matches(args: argparse.Namespace) -> Callable[[Any], bool]:
    wanted = set(args.request_id or [])
    return lambda body: not wanted or (isinstance(body, dict) and body.get("requestId") in wanted)


def cmd_results(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    queue = _queue(args, "results")
    matches = _matches(args)
    seen: set[str] = set()
    shown = 0
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        if args.consume:
            # The CLI is the consumer here: what it shows is taken off the queue.
            try:
                batch = list(queue.receive_messages(max_messages=PEEK_LIMIT, visibility_timeout=30))
            except ResourceNotFoundError:
                batch = []
        else:
            batch = _peek(queue)
        for message in batch:
            if message.id in seen:
                continue
            seen.add(message.id)
            body = _json(message.content)
            if matches(body):
                out.write(json.dumps(body) + "\n")
                out.flush()
                shown += 1
                if args.consume:
                    queue.delete_message(message)
            elif args.consume:
                queue.update_message(message, visibility_timeout=0)  # not ours: give it back at once
        done = args.count is not None and shown >= args.count
        if not args.follow or done or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(args.interval)
    if not args.follow and not args.consume and len(seen) >= PEEK_LIMIT:
        print(f"(peek shows the first {PEEK_LIMIT} messages only; --follow --consume drains the queue)",
              file=sys.stderr)
    return 0


# -- dead letters -----------------------------------------------------------------------------------
def _letter(content: str) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate_json(content)
    except ValidationError:
        return None


def cmd_deadletters_list(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    for message in _peek(_queue(args, "deadletter")):
        letter = _letter(message.content)
        if letter is None:
            out.write(json.dumps({"id": message.id, "unreadable": message.content[:200]}) + "\n")
            continue
        if args.source and letter.source != args.source:
            continue
        entry = {"id": message.id, "deadLetteredAt": letter.deadLetteredAt.isoformat(), "source": letter.source,
                 "code": letter.reason.code, "message": letter.reason.message, "requestId": letter.requestId,
                 "attempts": letter.attempts, "replayable": _replay_target(letter)[0] is not None}
        if args.full:
            entry["original"] = letter.original
        out.write(json.dumps({k: v for k, v in entry.items() if v is not None}) + "\n")
    return 0


def _replay_target(letter: DeadLetter) -> tuple[str | None, str]:
    """(queue kind, text to send) or (None, why not)."""
    if letter.originalTruncated:
        return None, "the original was truncated when it was dead-lettered; resend it from its source"
    if letter.source == "intake":
        return "intake", letter.original
    if letter.source == "work":
        try:
            item = WorkItem.model_validate_json(letter.original)
        except ValidationError:
            return None, "the original is not a work item"
        # A fresh start: the attempts that exhausted MAX_ATTEMPTS (or met a permanent error) are
        # history, and the old slot is long gone; the worker books a new one if it must wait.
        fresh = item.model_copy(update={"attempts": 0, "deferrals": 0, "notBefore": None})
        return "work", fresh.model_dump_json(exclude_none=True)
    if letter.source == "callback":
        try:
            message = CallbackMessage.model_validate_json(letter.original)
        except ValidationError:
            return None, "the original is not a callback message"
        # Delivery checks the URL again, so a host taken off CALLBACK_ALLOWED_HOSTS stays uncalled.
        return "callback", message.model_copy(update={"attempts": 0}).model_dump_json()
    return None, f"entries from {letter.source!r} are not replayed by this command"


def _candidates(queue: QueueClient, ids: set[str] | None) -> Iterable[Any]:
    """Receive dead letters batch by batch (hidden while we work on them). Entries not asked for
    stay hidden until the search ends, so that later batches reach further into the queue, and
    are then made visible again."""
    seen: set[str] = set()
    passed_over: list[Any] = []
    try:
        while True:
            try:
                batch = list(queue.receive_messages(max_messages=PEEK_LIMIT,
                                                    visibility_timeout=REPLAY_HOLD_SECONDS))
            except ResourceNotFoundError:
                return
            fresh = [m for m in batch if m.id not in seen]
            if not fresh:
                return
            for message in fresh:
                seen.add(message.id)
                if ids is None or message.id in ids:
                    yield message
                else:
                    passed_over.append(message)
            if ids is not None and ids <= seen:
                return
    finally:
        for message in passed_over:
            try:
                queue.update_message(message, visibility_timeout=0)
            except Exception:  # noqa: BLE001 - it reappears when its hold ends anyway
                pass


def cmd_deadletters_replay(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> int:
    if not args.all and not args.id:
        raise CliError("give --id ID (repeatable) or --all")
    dead = _queue(args, "deadletter")
    targets = {kind: _queue(args, kind) for kind in ("intake", "work", "callback")}
    ids = None if args.all else set(args.id)
    replayed, skipped = 0, 0
    found: set[str] = set()
    held: list[Any] = []
    for message in _candidates(dead, ids):
        found.add(message.id)
        letter = _letter(message.content)
        kind, text = _replay_target(letter) if letter else (None, "not a dead-letter entry")
        if kind is None:
            out.write(f"skipped {message.id}: {text}\n")
            held.append(message)  # released after the search, or --all would meet it again
            skipped += 1
            continue
        _ensure(targets[kind]).send_message(text, time_to_live=NEVER_EXPIRE)
        # Only now: a crash between the two lines leaves a duplicate, never a loss.
        dead.delete_message(message)
        out.write(f"replayed {message.id} onto {targets[kind].queue_name} ({letter.reason.code})\n")
        replayed += 1
    for message in held:
        dead.update_message(message, visibility_timeout=0)
    for missing in sorted((ids or set()) - found):
        out.write(f"not found {missing}: no such entry, or another replay holds it\n")
        skipped += 1
    out.write(f"{replayed} replayed, {skipped} not\n")
    return 0 if skipped == 0 else 1


# -- wiring -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.cli", description="Operate the provisioning app.")
    parser.add_argument("--connection", help="storage connection string (default: $AzureWebJobsStorage)")
    for kind, (setting, default) in QUEUE_DEFAULTS.items():
        parser.add_argument(f"--{kind}-queue", default=os.environ.get(setting) or default,
                            help=f"default: ${setting} or {default}")
    commands = parser.add_subparsers(dest="command", required=True)

    send = commands.add_parser("send", help="post an event to the function URL, or queue it on the intake queue")
    send.add_argument("--url", help="the function URL, e.g. https://<app>.azurewebsites.net/api/provision; "
                                    "without it the event goes onto the intake queue")
    send.add_argument("--key", default=os.environ.get(FUNCTION_KEY_ENV), help="function key (default: $FUNCTION_KEY)")
    send.add_argument("--dry-run", action="store_true", help="ask for the Graph calls only (?dryRun=true)")
    send.add_argument("--data", help="the event as JSON text")
    send.add_argument("--file", help="a file holding the event, - for stdin")
    send.add_argument("--timeout", type=float, default=30)
    send.add_argument("--callback-url", help="POST each result to this https URL (its host must be on "
                                             "CALLBACK_ALLOWED_HOSTS)")
    send.add_argument("--cloudevent-type", help="send as a CloudEvents 1.0 event of this type (with --url)")
    send.add_argument("--cloudevent-source", help="the CloudEvent's source; source + id make its idempotency key")
    send.add_argument("--cloudevent-id", help="the CloudEvent's id (default: a new UUID)")
    send.add_argument("--cloudevent-subject", help="the CloudEvent's subject, carried into the results")
    send.set_defaults(handler=cmd_send)

    status = commands.add_parser("status", help="where a request stands, from the status API")
    status.add_argument("request_id", help="the requestId from the 202 answer")
    status.add_argument("--url", required=True, help="the provision URL, e.g. https://<app>.azurewebsites.net/api/provision")
    status.add_argument("--key", default=os.environ.get(FUNCTION_KEY_ENV), help="function key (default: $FUNCTION_KEY)")
    status.add_argument("--wait", action="store_true", help="poll until the request has ended; a line per new state")
    status.add_argument("--timeout", type=float, default=600, help="stop waiting after this many seconds (exit 3)")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between polls when waiting")
    status.set_defaults(handler=cmd_status)

    results = commands.add_parser("results", help="show results as JSON lines")
    results.add_argument("--request-id", action="append", help="only this requestId (repeatable)")
    results.add_argument("--follow", action="store_true", help="keep watching for new results")
    results.add_argument("--consume", action="store_true",
                         help="take shown results off the queue (when nothing else consumes it)")
    results.add_argument("--count", type=int, help="stop after this many results")
    results.add_argument("--timeout", type=float, help="stop following after this many seconds")
    results.add_argument("--interval", type=float, default=1.0, help="seconds between polls when following")
    results.set_defaults(handler=cmd_results)

    dead = commands.add_parser("deadletters", help="list or replay dead-letter entries")
    dead_commands = dead.add_subparsers(dest="action", required=True)
    listing = dead_commands.add_parser("list", help="show entries (the first 32) as JSON lines")
    listing.add_argument("--source", choices=["intake", "work", "loganalytics", "callback"])
    listing.add_argument("--full", action="store_true", help="include the original message")
    listing.set_defaults(handler=cmd_deadletters_list)
    replay = dead_commands.add_parser("replay", help="re-send entries, then delete them from the dead-letter queue")
    which = replay.add_mutually_exclusive_group()
    which.add_argument("--id", action="append", help="an entry id from `deadletters list` (repeatable)")
    which.add_argument("--all", action="store_true", help="every replayable entry")
    replay.set_defaults(handler=cmd_deadletters_replay)
    return parser


def main(argv: list[str] | None = None, out: TextIO | None = None, stdin: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, out or sys.stdout, stdin or sys.stdin)
    except CliError as exc:
        parser.error(str(exc))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
