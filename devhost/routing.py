"""HTTP trigger route templates (ASP.NET Core syntax, as the Functions host uses).

Supported: literal segments (case-insensitive), `{name}`, `{name?}` (optional, trailing),
`{*rest}` catch-all, and constraints `{name:int}`, `long`, `alpha`, `guid`, `bool`, `decimal`,
`double`, `float`, `minlength(n)`, `maxlength(n)`, `length(n)`, `min(n)`, `max(n)`, `range(a,b)`,
`regex(...)`. Other constraints are accepted and ignored.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote

T = TypeVar("T")

_PARAM = re.compile(r"\{(?P<star>\*{1,2})?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<constraints>(?::[^{}?=]+(?:\([^)]*\))?)*)(?P<optional>\?)?\}")
_NUMBER = r"-?\d+(?:\.\d+)?"
_REGEX_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "alpha": r"[A-Za-z]+",
    "guid": r"\{?[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}\}?",
    "bool": r"(?i:true|false)",
    "decimal": _NUMBER,
    "double": _NUMBER,
    "float": _NUMBER,
}


class RouteError(ValueError):
    """The route template cannot be parsed."""


def _constraint_check(spec: str) -> Callable[[str], bool] | None:
    """A predicate for one `:constraint`, or None when it only needs the regex (or is ignored)."""
    name, _, args_text = spec.partition("(")
    name = name.lower()
    args = [a.strip() for a in args_text.rstrip(")").split(",")] if args_text else []
    try:
        if name == "regex" and args_text:
            pattern = re.compile(args_text[:-1] if args_text.endswith(")") else args_text)
            return lambda v: pattern.search(v) is not None
        if name in ("minlength", "maxlength", "length", "min", "max", "range"):
            numbers = [int(a) for a in args]
        else:
            return None
    except (ValueError, re.error) as exc:
        raise RouteError(f"bad route constraint {spec!r}: {exc}") from exc
    if name == "minlength":
        return lambda v: len(v) >= numbers[0]
    if name == "maxlength":
        return lambda v: len(v) <= numbers[0]
    if name == "length":
        return (lambda v: len(v) == numbers[0]) if len(numbers) == 1 else (lambda v: numbers[0] <= len(v) <= numbers[1])

    def in_bounds(v: str) -> bool:
        if not re.fullmatch(r"-?\d+", v):
            return False
        lo = numbers[0] if name in ("min", "range") else None
        hi = numbers[-1] if name in ("max", "range") else None
        return (lo is None or int(v) >= lo) and (hi is None or int(v) <= hi)

    return in_bounds


@dataclass
class Route(Generic[T]):
    """One compiled template; `target` is whatever the caller wants back on a match."""

    template: str
    methods: frozenset[str] | None  # None = any method
    target: T
    order: int = 0
    pattern: re.Pattern[str] = field(init=False)
    checks: dict[str, list[Callable[[str], bool]]] = field(init=False, default_factory=dict)
    precedence: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        regex, ranks = "", []
        segments = [s for s in self.template.strip("/").split("/")] if self.template.strip("/") else []
        for index, segment in enumerate(segments):
            if not segment:
                raise RouteError(f"route {self.template!r} has an empty segment")
            whole = _PARAM.fullmatch(segment)
            if whole and (whole.group("optional") or whole.group("star")):
                if index != len(segments) - 1:
                    raise RouteError(f"route {self.template!r}: optional/catch-all parameters must be last")
                name = whole.group("name")
                body = r".*" if whole.group("star") else self._param_regex(name, whole.group("constraints"))
                regex += f"(?:/(?P<{name}>{body}))?"
                ranks.append(5 if whole.group("star") else 4)
                continue
            regex += "/" + self._segment_regex(segment)
            ranks.append(1 if "{" not in segment else (2 if whole and whole.group("constraints") else 3))
        self.pattern = re.compile(f"^{regex}/?$", re.IGNORECASE)
        # ASP.NET prefers literal segments over parameters, then constrained over free ones.
        self.precedence = tuple(ranks)

    def _param_regex(self, name: str, constraints: str | None) -> str:
        body = r"[^/]+"
        for spec in filter(None, (constraints or "").split(":")):
            base = spec.partition("(")[0].lower()
            if base in _REGEX_CONSTRAINTS:
                body = _REGEX_CONSTRAINTS[base]
            check = _constraint_check(spec)
            if check is not None:
                self.checks.setdefault(name, []).append(check)
        return body

    def _segment_regex(self, segment: str) -> str:
        regex, position = "", 0
        for match in _PARAM.finditer(segment):
            if match.group("optional") or match.group("star"):
                raise RouteError(f"route {self.template!r}: optional parameter inside segment {segment!r}")
            regex += re.escape(segment[position:match.start()])
            regex += f"(?P<{match.group('name')}>{self._param_regex(match.group('name'), match.group('constraints'))})"
            position = match.end()
        if "{" in segment[position:] or "}" in segment[position:]:
            raise RouteError(f"route {self.template!r}: cannot parse segment {segment!r}")
        return regex + re.escape(segment[position:])

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.match(path)
        if not found:
            return None
        params = {name: unquote(value) for name, value in found.groupdict().items() if value is not None}
        for name, checks in self.checks.items():
            if name in params and not all(check(params[name]) for check in checks):
                return None
        return params


@dataclass
class RouteMatch(Generic[T]):
    target: T
    params: dict[str, str]


class Router(Generic[T]):
    """Finds the route for a path; tells 'no such path' (404) from 'wrong method' (405)."""

    def __init__(self, routes: Iterable[Route[T]] = ()) -> None:
        self._routes: list[Route[T]] = []
        for route in routes:
            self.add(route)

    def add(self, route: Route[T]) -> None:
        route.order = len(self._routes)
        self._routes.append(route)
        self._routes.sort(key=lambda r: (r.precedence, r.order))

    @property
    def routes(self) -> Sequence[Route[T]]:
        return tuple(self._routes)

    def resolve(self, path: str, method: str) -> tuple[RouteMatch[T] | None, set[str]]:
        """(match, allowed methods of path-matching routes). No match + empty set means 404."""
        allowed: set[str] = set()
        # Match on the raw (still percent-encoded) path so an encoded "/" stays inside one segment.
        for route in self._routes:
            params = route.match(path)
            if params is None:
                continue
            if route.methods is None or method.upper() in route.methods:
                return RouteMatch(route.target, params), allowed
            allowed |= route.methods
        return None, allowed
