"""Sample app for tests/devhost/test_devhost.py: one function per devhost feature under test.

Queue names come from app settings (%NAME%) so every test run uses its own queues.
"""
import json
import logging
import os
import time

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="items/{id:int}/{name?}", methods=["GET", "POST"])
def items(req: func.HttpRequest) -> func.HttpResponse:
    payload = {
        "method": req.method,
        "route_params": dict(req.route_params),
        "params": dict(req.params),
        "body": req.get_body().decode("utf-8"),
        "header": req.headers.get("x-test"),
        "principal": req.headers.get("x-ms-client-principal"),
    }
    return func.HttpResponse(json.dumps(payload), mimetype="application/json",
                             headers={"X-Function": "items"})


@app.route(route="items/special", methods=["GET"])
def special(req: func.HttpRequest) -> str:
    return "special"


@app.route(route="settings", methods=["GET"])
def settings(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps({"GREETING": os.environ.get("GREETING"), "TARGET": os.environ.get("TARGET")}),
                             mimetype="application/json")


@app.route(route="boom")
def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError("kaboom")


@app.route(route="secure", auth_level=func.AuthLevel.FUNCTION)
def secure(req: func.HttpRequest) -> str:
    return "secret"


@app.route(route="enqueue", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%OUTBOX_QUEUE%", connection="AzureWebJobsStorage")
def enqueue(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    """Body is a JSON list (one message per item) or plain text (one message)."""
    try:
        items = req.get_json()
    except ValueError:
        items = req.get_body().decode("utf-8")
    out.set(items)
    return func.HttpResponse(status_code=202)


@app.route(route="submit", methods=["POST"])
@app.queue_output(arg_name="out", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def submit(req: func.HttpRequest, out: func.Out[str]) -> func.HttpResponse:
    out.set(req.get_body().decode("utf-8"))
    return func.HttpResponse(status_code=202)


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="result", queue_name="%RESULT_QUEUE%", connection="AzureWebJobsStorage")
def work(msg: func.QueueMessage, result: func.Out[str]) -> None:
    time.sleep(float(os.environ.get("WORK_DELAY_SECONDS", "0")))
    result.set(json.dumps({
        "body": msg.get_body().decode("utf-8"),
        "id": msg.id,
        "dequeue_count": msg.dequeue_count,
        "pid": os.getpid(),
    }))


@app.queue_trigger(arg_name="msg", queue_name="%FAIL_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="never", queue_name="%RESULT_QUEUE%", connection="AzureWebJobsStorage")
def always_fails(msg: func.QueueMessage, never: func.Out[str]) -> None:
    never.set("must not be sent: the function raises")
    logging.info("always_fails attempt %s", msg.dequeue_count)
    raise RuntimeError("always fails")


@app.timer_trigger(schedule="%TIMER_SCHEDULE%", arg_name="timer", run_on_startup=True)
@app.queue_output(arg_name="fired", queue_name="%TIMER_QUEUE%", connection="AzureWebJobsStorage")
def tick(timer: func.TimerRequest, fired: func.Out[str]) -> None:
    fired.set(json.dumps({"past_due": timer.past_due, "pid": os.getpid()}))
