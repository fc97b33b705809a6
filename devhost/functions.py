"""Load the user's `function_app` module and describe its functions from their bindings.

Only what `FunctionApp.get_functions()` exposes is used (the same indexing the Python worker
does), so an app that runs here declares its bindings exactly as it must for Azure.
"""
from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import azure.functions as func

from devhost.settings import SettingsError, resolve_expressions

HTTP_TRIGGER = "httpTrigger"
QUEUE_TRIGGER = "queueTrigger"
TIMER_TRIGGER = "timerTrigger"
SUPPORTED_TRIGGERS = (HTTP_TRIGGER, QUEUE_TRIGGER, TIMER_TRIGGER)
SUPPORTED_OUTPUTS = ("http", "queue")
RETURN = "$return"


class AppLoadError(RuntimeError):
    """The app cannot be indexed; the message is meant for the person starting the host."""


@dataclass(frozen=True)
class Binding:
    type: str
    direction: str  # "in" | "out" | "inout", lower-cased
    name: str
    properties: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """Property lookup ignoring case: function.json is case-insensitive."""
        for name, value in self.properties.items():
            if name.lower() == key.lower():
                return value
        return default


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    func: Callable[..., Any]
    trigger: Binding
    outputs: tuple[Binding, ...]
    # The worker passes `context` to functions that declare a parameter of that name.
    wants_context: bool = False
    directory: str = ""

    @property
    def queue_outputs(self) -> tuple[Binding, ...]:
        return tuple(b for b in self.outputs if b.type == "queue")

    @property
    def http_output(self) -> Binding | None:
        return next((b for b in self.outputs if b.type == "http"), None)


def import_app(app_dir: Path) -> func.FunctionRegister:
    """Import `function_app` from app_dir and return its FunctionApp (`app`, else the only one)."""
    sys.path.insert(0, str(app_dir))
    try:
        module = importlib.import_module("function_app")
    except Exception as exc:
        raise AppLoadError(f"importing function_app from {app_dir} failed: {type(exc).__name__}: {exc}") from exc
    app = getattr(module, "app", None)
    if not isinstance(app, func.FunctionRegister):
        candidates = [v for v in vars(module).values() if isinstance(v, func.FunctionRegister)]
        if len(candidates) != 1:
            raise AppLoadError(f"{module.__file__} must define `app = azure.functions.FunctionApp(...)`")
        app = candidates[0]
    return app


def _binding(raw: Mapping[str, Any], function: str, environ: Mapping[str, str]) -> Binding:
    name = str(raw.get("name", ""))
    where = f"function '{function}', binding '{name}'"
    properties = {
        key: resolve_expressions(value, environ, f"{where} property '{key}'")
        for key, value in raw.items()
        if key not in ("type", "direction", "name")
    }
    return Binding(type=str(raw.get("type", "")), direction=str(raw.get("direction", "in")).lower(),
                   name=name, properties=properties)


def _check_parameters(spec_name: str, user_function: Callable[..., Any], bindings: Sequence[Binding]) -> bool:
    """Mirror the worker's indexing errors: every binding needs a parameter and vice versa."""
    parameters = inspect.signature(user_function).parameters
    bound = {b.name for b in bindings if b.name != RETURN}
    missing = bound - set(parameters)
    if missing:
        raise AppLoadError(f"function '{spec_name}': bindings {sorted(missing)} have no matching parameter")
    wants_context = "context" in parameters and "context" not in bound
    unbound = [p for p in parameters if p not in bound and not (p == "context" and wants_context)
               and parameters[p].default is inspect.Parameter.empty
               and parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if unbound:
        raise AppLoadError(f"function '{spec_name}': parameters {unbound} are not bound to anything")
    return wants_context


# The app setting that makes the host ignore a function's trigger
# (https://learn.microsoft.com/en-us/azure/azure-functions/disable-function): its queue is not
# polled, its timer does not fire, its route answers 404. Running a devhost per Flex Consumption
# scale group (HTTP triggers together, each other trigger on its own instances) uses it.
DISABLED_SETTING = "AzureWebJobs.{name}.Disabled"


def disabled(name: str, environ: Mapping[str, str]) -> bool:
    return environ.get(DISABLED_SETTING.format(name=name), "").strip().lower() in ("true", "1")


def describe_functions(app: func.FunctionRegister, environ: Mapping[str, str],
                       directory: str = "") -> tuple[list[FunctionSpec], list[str]]:
    """FunctionSpecs for the functions devhost can run, and warnings for those it cannot."""
    specs: list[FunctionSpec] = []
    skipped: list[str] = []
    for function in app.get_functions():
        name = function.get_function_name()
        if disabled(name, environ):
            skipped.append(f"function '{name}' is disabled ({DISABLED_SETTING.format(name=name)} is true)")
            continue
        spec = _describe(function, name, environ, directory)
        if isinstance(spec, str):
            skipped.append(spec)
        else:
            specs.append(spec)
    return specs, skipped


def _unsupported(trigger: Binding, others: list[Binding]) -> list[str]:
    if trigger.type not in SUPPORTED_TRIGGERS:
        return [trigger.type]
    return [f"{b.type} ({b.direction})" for b in others if b.direction == "in" or b.type not in SUPPORTED_OUTPUTS]


def _describe(function: Any, name: str, environ: Mapping[str, str], directory: str) -> FunctionSpec | str:
    """The function's spec, or why devhost skips it; raises AppLoadError for an app that cannot load."""
    document = json.loads(function.get_function_json())
    try:
        bindings = [_binding(raw, name, environ) for raw in document.get("bindings", [])]
    except SettingsError as exc:
        raise AppLoadError(str(exc)) from exc
    triggers = [b for b in bindings if b.type.endswith("Trigger")]
    if len(triggers) != 1:
        raise AppLoadError(f"function '{name}' must have exactly one trigger, has {len(triggers)}")
    trigger = triggers[0]
    others = [b for b in bindings if b is not trigger]
    what = _unsupported(trigger, others)
    if what:
        return f"function '{name}' skipped: devhost does not support {', '.join(what)}"
    user_function = function.get_user_function()
    wants_context = _check_parameters(name, user_function, bindings)
    return FunctionSpec(name=name, func=user_function, trigger=trigger, outputs=tuple(others),
                        wants_context=wants_context, directory=directory)
