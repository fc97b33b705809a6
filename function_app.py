"""Azure Functions bindings only: each function hands off to shared/, which knows nothing of the host."""
import json
import re
from typing import List

import azure.functions as func

from shared import handlers
from shared.operations import openapi, preflight
from shared.results import log_analytics
from shared.runtime import runtime
from shared.settings import get_settings

# Fail at start-up, with a message naming the setting, rather than on the first event.
settings = get_settings()

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
JSON = "application/json"


def _reply(reply: handlers.HttpReply) -> func.HttpResponse:
    return func.HttpResponse(reply.json(), status_code=reply.status, headers=reply.headers, mimetype=JSON)


# Work due now goes out through an output binding: the host then polls the work queue at once.
@app.route(route="provision", methods=["POST"])
@app.queue_output(arg_name="work", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def provision(req: func.HttpRequest, work: func.Out[List[str]]) -> func.HttpResponse:
    reply = handlers.provision_http(req.get_body(), dict(req.headers), runtime(), params=dict(req.params))
    if reply.work:
        work.set(reply.work)
    return _reply(reply)


@app.route(route="provision/{requestId}", methods=["GET"])
def provision_status(req: func.HttpRequest) -> func.HttpResponse:
    return _reply(handlers.request_status(req.route_params.get("requestId", ""), runtime()))


@app.queue_trigger(arg_name="msg", queue_name="%INTAKE_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="work", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def intake_queue(msg: func.QueueMessage, work: func.Out[List[str]]) -> None:
    due = handlers.intake_message(msg.get_body(), runtime(), delivery=msg.dequeue_count or 1, message_id=msg.id)
    if due:
        work.set(due)


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def provision_worker(msg: func.QueueMessage) -> None:
    handlers.work_message(msg.get_body(), runtime())


# Rows for Log Analytics (RESULTS_SINK=loganalytics|both); failures go back on the queue, never raise.
# Registered only when used, so that no instance polls an unused queue.
if settings.logs_enabled:
    @app.queue_trigger(arg_name="msg", queue_name="%LOGS_QUEUE%", connection="AzureWebJobsStorage")
    def log_analytics_upload(msg: func.QueueMessage) -> None:
        log_analytics.upload_message(msg.get_body(), runtime())


@app.timer_trigger(arg_name="timer", schedule="*/30 * * * * *", run_on_startup=True)
def lease_upkeep(timer: func.TimerRequest) -> None:
    handlers.lease_upkeep(runtime())


# Anonymous: the API's shape is no secret, and Logic Apps custom connectors import it from here.
@app.route(route="openapi.json", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def openapi_description(req: func.HttpRequest) -> func.HttpResponse:
    origin = req.url.split("/api/", 1)[0]
    # The Host header is the caller's: reflect it only when it is a plain host[:port].
    origin = origin if re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin) else None
    return func.HttpResponse(json.dumps(openapi.build_spec(settings, origin)), mimetype=JSON)


# Anonymous, so it says nothing about the configuration; ?deep=true is pointed at health/deep.
@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    return _reply(preflight.health_reply(req.params))


# The preflight report names roles, job and queues: auth level is per function, hence its own route.
@app.route(route="health/deep", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
def health_deep(req: func.HttpRequest) -> func.HttpResponse:
    rt = runtime()
    return _reply(preflight.deep_health_reply(rt.settings, rt.graph, rt.queues.service))
