"""The README's configuration table is the one generated from the settings model, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_relay.settings import ENV_PREFIX, Settings
from cdc_relay.settings_doc import END, START, render_table, replace_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one():
    text = README.read_text("utf-8")
    assert START in text and END in text
    documented = text.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert documented == render_table(), "README drifted from the settings: run make docs-config"


def test_the_table_has_every_setting_with_its_default():
    rows = {line.split(" | ")[0][3:-1]: line for line in render_table().splitlines()[2:]}
    assert set(rows) == {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert "| `CDC_RELAY_DATABASE_URL` | required |" in rows["CDC_RELAY_DATABASE_URL"]
    assert "| `9187` |" in rows["CDC_RELAY_HTTP_PORT"]
    assert "| `{}` |" in rows["CDC_RELAY_KAFKA_CONFIG"]
    assert "required by `run`" in rows["CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS"]


def test_replace_table_keeps_the_text_around_the_markers():
    text = f"before\n{START}\nold\n{END}\nafter\n"
    assert replace_table(text, "new") == f"before\n{START}\nnew\n{END}\nafter\n"
    with pytest.raises(ValueError):
        replace_table("no markers", "new")
