"""The fault-injection suite (marker ``faults``): each scenario attacks a running relay and
records what it measured; the figures go to build/faults-results.json at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import results
from tests.faults.scale import scale_name

_FAULTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _FAULTS_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    figures = results.collected()
    if not figures:
        return
    path = results.write(scale_name())
    terminalreporter.section(f"fault scenarios (scale {scale_name()})")
    terminalreporter.write_line(results.table(figures))
    terminalreporter.write_line(f"written to {path}")
