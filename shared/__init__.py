"""The provisioning app, host-agnostic. function_app.py (bindings only) calls these entry points,
each imported inside the function that uses it so that indexing the app stays fast:

    shared.handlers            provision_http, request_status, intake_message, work_message,
                               callback_message, lease_upkeep: what each function does
    shared.operations.readiness  http_door, queue_door, unready_reply: invalid settings answer 503
                               or park messages instead of failing the import
    shared.intake.callers      caller_of: the Entra ID caller from Easy Auth's principal header
    shared.intake.cloudevents  abuse_protection: Event Grid's OPTIONS handshake
    shared.results.log_analytics  upload_message: rows to the Logs Ingestion API
    shared.operations.openapi  build_spec: the OpenAPI description
    shared.operations.preflight  health_reply, deep_health_reply
    shared.runtime             runtime(): the process's clients and stores, built on first use

A request's path through the stages: intake/ (validate, name, sign, dedupe) -> ratelimit/ (book a
slot, lease a token) -> graph/ (send, classify, decode) -> status/ (where it stands, coalescing) ->
results/ (queue, Log Analytics, callbacks). Errors: shared.errors holds the whole tree.
"""
