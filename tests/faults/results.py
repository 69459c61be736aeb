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


_MODES = ("at-least-once", "exactly-once")


def _split(name: str) -> tuple[str, str | None]:
    """("crash loop", "exactly-once") of "crash loop [exactly-once]"; no mode: (name, None)."""
    for mode in _MODES:
        suffix = f" [{mode}]"
        if name.endswith(suffix):
            return name[: -len(suffix)], mode
    return name, None


def _both(runs: dict[str | None, dict[str, Any]], key: str) -> str:
    """One figure of a scenario's runs: once if equal (or run once), else per mode."""
    values = {mode: _fmt(run.get(key)) for mode, run in runs.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return " / ".join(f"{v} ({_short(mode)})" for mode, v in values.items())


def _short(mode: str | None) -> str:
    return {"at-least-once": "ALO", "exactly-once": "EOS"}.get(mode or "", "-")


def table(scenarios: dict[str, dict[str, Any]]) -> str:
    """One row per scenario; a scenario run in both delivery modes (named "... [mode]") shows
    each mode's duplicates in its own column, the other figures per mode where they differ.
    A scenario run once, in the default mode, counts as at-least-once."""
    grouped: dict[str, dict[str | None, dict[str, Any]]] = {}
    for name, figures in scenarios.items():
        base, mode = _split(name)
        grouped.setdefault(base, {})[mode] = figures
    rows = [
        "| scenario | events | faults injected | lost | duplicates, at-least-once "
        "| duplicates, exactly-once | recovery time (s) | notes |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in sorted(grouped):
        runs = dict(sorted(grouped[name].items(), key=lambda kv: _MODES.index(kv[0] or _MODES[0])))
        alo = runs.get("at-least-once", runs.get(None))
        eos = runs.get("exactly-once")
        notes = (
            "; ".join(f"{_short(m)}: {_fmt(r.get('notes', ''))}" for m, r in runs.items())
            if len(runs) > 1
            else _fmt(next(iter(runs.values())).get("notes", ""))
        )
        cells = [
            name,
            _both(runs, "events"),
            _both(runs, "faults"),
            _both(runs, "lost"),
            _fmt(alo.get("duplicates")) if alo else "-",
            _fmt(eos.get("duplicates")) if eos else "-",
            _both(runs, "recovery_s"),
            notes,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_PATH
    data = json.loads(path.read_text())
    print(f"Scale `{data['scale']}`, {data['written_at']}, {data['machine']}.\n")
    print(table(data["scenarios"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
