"""The arithmetic behind docs/deploy.md's cost model (scripts/cost_probe.py): Flex Consumption's
billing rounding, the busy periods of an instance, and reading durations from devhost's log lines."""
from __future__ import annotations

from pathlib import Path

import pytest

from scripts.cost_probe import Execution, billed, busy_periods, executions


@pytest.mark.parametrize("seconds,expected", [(0.118, 1.0), (0.999, 1.0), (1.0, 1.0), (1.01, 1.1),
                                              (5.693, 5.7), (8.2, 8.2), (8.21, 8.3)])
def test_an_execution_is_billed_at_least_a_second_then_in_tenths(seconds, expected):
    assert billed(seconds) == pytest.approx(expected)


def test_overlapping_executions_on_one_instance_are_one_busy_period():
    runs = [Execution("w", end=10.0, seconds=4.0), Execution("w", end=12.0, seconds=3.0),  # 6-10, 9-12
            Execution("w", end=20.0, seconds=1.0)]                                         # 19-20
    assert busy_periods(runs) == pytest.approx([6.0, 1.0])


def test_durations_come_from_the_executed_lines_only(tmp_path: Path):
    log = tmp_path / "devhost.log"
    log.write_text(
        "[2026-11-30T01:35:00.000Z] Executing 'Functions.provision_worker' (Reason='x', Id=a)\n"
        "[2026-11-30T01:35:05.693Z] Executed 'Functions.provision_worker' (Succeeded, Id=a, Duration=5693ms)\n"
        "[2026-11-30T01:35:06.000Z] Executed 'Functions.lease_upkeep' (Failed, Id=b, Duration=118ms)\n"
        "Traceback: Executed 'Functions.fake' (Succeeded, Id=c, Duration=1ms)\n")
    found = executions(log)
    assert [(e.name, e.seconds) for e in found] == [("provision_worker", 5.693), ("lease_upkeep", 0.118)]
    assert found[0].start == pytest.approx(found[0].end - 5.693)
