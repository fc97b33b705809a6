"""NCRONTAB schedules as the Functions timer trigger reads them.

Six fields: `second minute hour day month day-of-week` (five-field expressions get second 0).
Each field accepts `*`, `n`, `a-b`, `*/n`, `a-b/n`, `a/n` and comma lists; months and days of the
week also accept three-letter names. As in NCrontab (and unlike Vixie cron) a time matches only
when *both* day-of-month and day-of-week match.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
# (name, low, high, names mapped to numbers)
_FIELDS: list[tuple[str, int, int, dict[str, int]]] = [
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day", 1, 31, {}),
    ("month", 1, 12, {name: i + 1 for i, name in enumerate(_MONTHS)}),
    ("day-of-week", 0, 6, {name: i for i, name in enumerate(_DAYS)}),
]
# Longer than any real gap (Feb 29 on a Sunday recurs within 28 years); guards impossible dates.
_SEARCH_LIMIT = timedelta(days=366 * 30)


class CronError(ValueError):
    """The expression is not a valid NCRONTAB schedule."""


def _value(text: str, low: int, high: int, names: dict[str, int], field: str) -> int:
    token = text.strip().upper()
    number = names[token] if token in names else None
    if number is None:
        if not token.isdigit():
            raise CronError(f"{field}: {text!r} is not a number")
        number = int(token)
    if not low <= number <= high:
        raise CronError(f"{field}: {number} is outside {low}-{high}")
    return number


def _parse_field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"{field}: empty list item in {text!r}")
        range_text, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{field}: bad step {step_text!r}")
            step = int(step_text)
        if range_text == "*":
            start, end = low, high
        elif "-" in range_text:
            first, _, last = range_text.partition("-")
            start, end = _value(first, low, high, names, field), _value(last, low, high, names, field)
            if start > end:
                raise CronError(f"{field}: range {range_text!r} runs backwards")
        else:
            start = _value(range_text, low, high, names, field)
            # `a/n` means "from a to the end in steps of n"; a bare `a` is just a.
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]

    @classmethod
    def parse(cls, expression: str) -> "CronSchedule":
        fields = expression.split()
        if len(fields) == 5:
            fields = ["0", *fields]
        if len(fields) != 6:
            raise CronError(f"{expression!r} has {len(fields)} fields; NCRONTAB needs 6 "
                            "(second minute hour day month day-of-week)")
        parsed = [_parse_field(text, *spec) for text, spec in zip(fields, _FIELDS)]
        return cls(expression, *parsed)

    def _day_matches(self, moment: datetime) -> bool:
        # Python: Monday=0..Sunday=6; cron: Sunday=0..Saturday=6.
        return moment.day in self.days and (moment.weekday() + 1) % 7 in self.weekdays

    def next_after(self, moment: datetime) -> datetime:
        """The first matching time strictly after `moment` (same tzinfo, whole seconds)."""
        candidate = moment.replace(microsecond=0) + timedelta(seconds=1)
        limit = moment + _SEARCH_LIMIT
        # Jump field by field instead of ticking seconds, so yearly schedules stay cheap.
        while candidate <= limit:
            if candidate.month not in self.months:
                year, month = (candidate.year + 1, 1) if candidate.month == 12 else (candidate.year, candidate.month + 1)
                candidate = candidate.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
            elif not self._day_matches(candidate):
                candidate = (candidate + timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif candidate.hour not in self.hours:
                candidate = (candidate + timedelta(hours=1)).replace(minute=0, second=0)
            elif candidate.minute not in self.minutes:
                candidate = (candidate + timedelta(minutes=1)).replace(second=0)
            elif candidate.second not in self.seconds:
                candidate += timedelta(seconds=1)
            else:
                return candidate
        raise CronError(f"{self.expression!r} never matches")
