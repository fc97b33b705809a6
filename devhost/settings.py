"""App settings, the way `func start` provides them: local.settings.json `Values` merged under the
real environment, plus `%NAME%` binding expressions resolved from the result."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

SETTINGS_FILES = ("local.settings.json", "local.settings.sample.json")
_EXPRESSION = re.compile(r"%([^%\s]+)%")


class SettingsError(RuntimeError):
    """A settings file or binding expression is unusable; the message says which and why."""


def find_settings_file(app_dir: Path, explicit: Path | None = None) -> Path | None:
    """The file Core Tools would read: an explicit one, else the first of SETTINGS_FILES present."""
    if explicit is not None:
        if not explicit.is_file():
            raise SettingsError(f"settings file {explicit} does not exist")
        return explicit
    for name in SETTINGS_FILES:
        candidate = app_dir / name
        if candidate.is_file():
            return candidate
    return None


def read_settings_file(path: Path) -> dict[str, Any]:
    """The whole document (`Values`, `Host`, ...); `Values` is checked to be a flat object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise SettingsError(f"settings file {path} must hold a JSON object")
    values = document.get("Values", {})
    if not isinstance(values, dict):
        raise SettingsError(f"'Values' in {path} must be a JSON object")
    return document


def apply_settings(values: Mapping[str, Any], environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Copy file values into the environment without overwriting what is already set there.

    Returns the names actually taken from the file. Variables set by the caller win so that a
    launcher or test can point one run at other resources without editing the file.
    """
    target = os.environ if environ is None else environ
    applied: dict[str, str] = {}
    for name, value in values.items():
        if name in target:
            continue
        # Core Tools passes every value as a string; JSON numbers/booleans arrive as text too.
        text = value if isinstance(value, str) else json.dumps(value)
        target[name] = text
        applied[name] = text
    return applied


def resolve_expressions(value: Any, environ: Mapping[str, str], where: str) -> Any:
    """Replace `%NAME%` app-setting references in strings (recursively in lists and dicts).

    `where` names the binding property for the error message, since a missing setting is the
    most common startup mistake and the host reports it the same way.
    """
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise SettingsError(f"{where} refers to app setting '{name}' (%{name}%), which is not set")
            return environ[name]

        return _EXPRESSION.sub(substitute, value)
    if isinstance(value, list):
        return [resolve_expressions(item, environ, where) for item in value]
    if isinstance(value, dict):
        return {key: resolve_expressions(item, environ, f"{where}.{key}") for key, item in value.items()}
    return value
