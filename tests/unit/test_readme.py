"""The README's configuration table must match the settings model (names and defaults)."""

from __future__ import annotations

import re
from pathlib import Path

from cdc_relay.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_rows() -> dict[str, str]:
    rows = {}
    for line in README.read_text("utf-8").splitlines():
        match = re.match(r"^\| `(CDC_RELAY_[A-Z_]+)` \| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_every_setting_is_documented_with_its_default():
    rows = documented_rows()
    for name, field in Settings.model_fields.items():
        variable = f"{ENV_PREFIX}{name.upper()}"
        assert variable in rows, f"{variable} missing from the README configuration table"
        if field.is_required():
            assert rows[variable] == "required"
            continue
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        if default is None:
            assert rows[variable].startswith("required by"), variable
        else:
            shown = "{}" if default == {} else str(default)
            assert rows[variable] == f"`{shown}`", f"{variable}: README says {rows[variable]}"


def test_the_readme_documents_nothing_that_does_not_exist():
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert set(documented_rows()) <= known
