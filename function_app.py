"""Azure Functions bindings only: each function hands off to shared/, which knows nothing of the host.

Nothing from shared/ is imported here at module level, and nothing reads the settings: the host
indexes the functions from this import, so it must be fast (cold start, scripts/cold_start.py)
and must succeed whatever the settings say. A failed import loads no function at all: every route
answers 404 and no queue is processed (azure-functions-host#9679). With invalid settings the HTTP
routes answer 503 naming them and the queue functions park their messages
(shared/operations/readiness.py)."""
import json
import re
from typing import TYPE_CHECKING, List
from urllib.parse import urlsplit

import azure.functions as func

if TYPE_CHECKING:
    from shared.replies import HttpReply

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
JSON = "application/json"
CONNECTION = "AzureWebJobsStorage"


def _reply(reply: "HttpReply") -> func.HttpResponse:
    return func.HttpResponse(reply.json(), status_code=reply.status, headers=reply.headers, mimetype=JSON)


# Work due now goes out through an output binding: the host then polls the work queue at once.
@app.route(route="provision", methods=["POST"])
@app.queue_output(arg_name="work", queue_name="%WORK_QUEUE%", connection=CONNECTION)
def provision(req: func.HttpRequest, work: func.Out[List[str]]) -> func.HttpResponse:
    from shared import handlers
    from shared.intake.callers import caller_of
    from shared.operations.readiness import http_door

    headers = dict(req.headers)
    # The signature covers the method and path; Idempotency-Keys are scoped to the Entra ID caller.
    reply = http_door(headers, lambda rt: handlers.provision_http(
        req.get_body(), headers, rt, params=dict(req.params), method=req.method, path=urlsplit(req.url).path,
        caller=caller_of(headers, rt.settings)))
    if reply.work:
        work.set(reply.work)
    return _reply(reply)


# Azure Event Grid's CloudEvents webhook validation (shared/intake/cloudevents.py).
@app.route(route="provision", methods=["OPTIONS"])
def provision_handshake(req: func.HttpRequest) -> func.HttpResponse:
    from shared.intake.cloudevents import abuse_protection

    return _reply(abuse_protection(dict(req.headers)))


@app.route(route="provision/{requestId}", methods=["GET"])
def provision_status(req: func.HttpRequest) -> func.HttpResponse:
    from shared import handlers
    from shared.operations.readiness import http_door

    request_id = req.route_params.get("requestId", "")
    return _reply(http_door(dict(req.headers), lambda rt: handlers.request_status(request_id, rt, dict(req.params))))


@app.queue_trigger(arg_name="msg", queue_name="%INTAKE_QUEUE%", connection=CONNECTION)
@app.queue_output(arg_name="work", queue_name="%WORK_QUEUE%", connection=CONNECTION)
@app.queue_output(arg_name="parked", queue_name="%INTAKE_QUEUE%-parked", connection=CONNECTION)
def intake_queue(msg: func.QueueMessage, work: func.Out[List[str]], parked: func.Out[str]) -> None:
    from shared import handlers
    from shared.operations.readiness import queue_door

    due = queue_door(lambda: parked.set(_text(msg)),
                     lambda rt: handlers.intake_message(msg.get_body(), rt, delivery=msg.dequeue_count or 1,
                                                             message_id=msg.id))
    if due:
        work.set(due)


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection=CONNECTION)
@app.queue_output(arg_name="parked", queue_name="%WORK_QUEUE%-parked", connection=CONNECTION)
def provision_worker(msg: func.QueueMessage, parked: func.Out[str]) -> None:
    from shared import handlers
    from shared.operations.readiness import queue_door

    queue_door(lambda: parked.set(_text(msg)), lambda rt: handlers.work_message(msg.get_body(), rt))


# Rows for Log Analytics (RESULTS_SINK=loganalytics|both); failures go back on the queue, never raise.
# Registered whatever RESULTS_SINK says (an idle queue costs a poll, a missing function costs a
# silent backlog); rows that arrive while the sink is off are parked, not lost.
@app.queue_trigger(arg_name="msg", queue_name="%LOGS_QUEUE%", connection=CONNECTION)
@app.queue_output(arg_name="parked", queue_name="%LOGS_QUEUE%-parked", connection=CONNECTION)
def log_analytics_upload(msg: func.QueueMessage, parked: func.Out[str]) -> None:
    from shared.operations.readiness import queue_door
    from shared.results import log_analytics

    queue_door(lambda: parked.set(_text(msg)), lambda rt: log_analytics.upload_message(msg.get_body(), rt),
               for_logs=True)


# Results POSTed to callbackUrl (shared/results/callbacks.py); failures go back on the queue with a delay.
@app.queue_trigger(arg_name="msg", queue_name="%CALLBACK_QUEUE%", connection=CONNECTION)
@app.queue_output(arg_name="parked", queue_name="%CALLBACK_QUEUE%-parked", connection=CONNECTION)
def callback_delivery(msg: func.QueueMessage, parked: func.Out[str]) -> None:
    from shared import handlers
    from shared.operations.readiness import queue_door

    queue_door(lambda: parked.set(_text(msg)), lambda rt: handlers.callback_message(msg.get_body(), rt))


def _text(msg: func.QueueMessage) -> str:
    # host.json's messageEncoding is "none": the body is the text that was sent, and goes back as is.
    return msg.get_body().decode("utf-8", "replace")


# Every 5 minutes, not at start-up: on Flex Consumption each run is billed at least 1 s of instance
# memory, and a 30 s timer alone outspends the monthly free grant. A fresh pool is seeded by the
# first worker that needs it (shared/ratelimit/token_gate.py RateGate.acquire), not by this timer.
@app.timer_trigger(arg_name="timer", schedule="0 */5 * * * *", run_on_startup=False)
def lease_upkeep(timer: func.TimerRequest) -> None:
    from shared import handlers
    from shared.operations.readiness import queue_door

    queue_door(lambda: None, handlers.lease_upkeep)


# Anonymous: the API's shape is no secret, and Logic Apps custom connectors import it from here.
@app.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi_description(req: func.HttpRequest) -> func.HttpResponse:
    from shared.operations import openapi
    from shared.operations.readiness import unready_reply
    from shared.settings import get_settings

    unready = unready_reply()
    if unready is not None:
        return _reply(unready)
    origin = req.url.split("/api/", 1)[0]
    # The Host header is the caller's: reflect it only when it is a plain host[:port].
    origin = origin if re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin) else None
    return func.HttpResponse(json.dumps(openapi.build_spec(get_settings(), origin)), mimetype=JSON)


# Anonymous, so it names bad settings but shows no values; ?deep=true is pointed at health/deep.
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    from shared.operations import preflight

    return _reply(preflight.health_reply(req.params))


# The preflight report names roles, job and queues: auth level is per function, hence its own route.
@app.route(route="health/deep", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def health_deep(req: func.HttpRequest) -> func.HttpResponse:
    from shared.operations import preflight
    from shared.operations.readiness import unready_reply
    from shared.runtime import runtime

    unready = unready_reply(detailed=True)
    if unready is not None:
        return _reply(unready)
    rt = runtime()
    return _reply(preflight.deep_health_reply(rt.settings, rt.graph, rt.queues.service))
