"""An installed wheel must carry the SQL that `setup --create-table` runs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from cdc_relay import recipes

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_the_outbox_sql_and_the_console_script(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("cdc_relay-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sql = archive.read("cdc_relay/sql/outbox.sql").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "CREATE TABLE IF NOT EXISTS {table}" in sql
    assert "cdc-relay = cdc_relay.cli:main" in scripts
    assert "cdc_relay/py.typed" in names
    for recipe in recipes.RECIPES:
        assert f"cdc_relay/sql/{recipe}" in names
