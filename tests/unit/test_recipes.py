"""The SQL recipes ship inside the package, and sql/ in the repository points at them."""

from __future__ import annotations

from pathlib import Path

from cdc_relay import recipes

ROOT = Path(__file__).resolve().parents[2]


def test_every_recipe_is_package_data_linked_from_sql():
    package_sql = ROOT / "cdc_relay" / "sql"
    for name in recipes.RECIPES:
        assert recipes.read(name).strip(), name
        link = ROOT / "sql" / name
        assert link.is_symlink(), f"sql/{name} should link to cdc_relay/sql/{name}"
        assert link.resolve() == (package_sql / name).resolve()
