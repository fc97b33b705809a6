"""devhost: a local stand-in for Azure Functions Core Tools (`func start`) for Python v2 apps.

Run `python -m devhost --app-dir DIR --port 7071`. The host serves HTTP triggers, listens to
Storage queues (via the real SDK, e.g. against Azurite) with the Functions queue extension's
retry/poison semantics, and runs NCRONTAB timer triggers. See devhost.host for the wiring.

The app under test never imports this package; it only declares bindings with azure.functions.
"""
