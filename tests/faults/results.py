"""The figures each fault scenario measured, collected into build/faults-results.json and
rendered as the markdown table of docs/reliability.md (``python -m tests.faults.results``)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).resolve().parents[2] / "build" / "faults-results.json"

_collected: dict[str, dict[str, Any]] = {}


def record(scenario: str, **figures: Any) -> None:
    """Keep the figures of one scenario (events, faults, lost, duplicates, recovery_s, ...)."""
    _collected[scenario] = {"scenario": scenario, **figures}


def collected() -> dict[str, dict[str, Any]]:
    return dict(_collected)


def write(scale: str) -> Path | None:
    """Merge this run's figures into the results file (scenarios of other runs are kept, so a
    partial run updates only its rows)."""
    if not _collected:
        return None
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    previous: dict[str, Any] = {}
    if RESULTS_PATH.exists():
        try:
            previous = json.loads(RESULTS_PATH.read_text())
        except json.JSONDecodeError:
            previous = {}
    if previous.get("scale") != scale:
        previous = {}
    scenarios = dict(previous.get("scenarios", {}))
    scenarios.update(_collected)
    data = {
        "scale": scale,
        "written_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "scenarios": scenarios,
    }
    RESULTS_PATH.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return RESULTS_PATH


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| scenario | events | faults injected | lost | duplicates | recovery time (s) | notes |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for name in sorted(scenarios):
        s = scenarios[name]
        rows.append(
            "| "
            + " | ".join(
                [
                    name,
                    _fmt(s.get("events")),
                    _fmt(s.get("faults")),
                    _fmt(s.get("lost")),
                    _fmt(s.get("duplicates")),
                    _fmt(s.get("recovery_s")),
                    _fmt(s.get("notes", "")),
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_PATH
    data = json.loads(path.read_text())
    print(f"Scale `{data['scale']}`, {data['written_at']}, {data['machine']}.\n")
    print(table(data["scenarios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
