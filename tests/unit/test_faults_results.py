"""The reliability table: a scenario run in both delivery modes is one row with a duplicates
column per mode."""

from __future__ import annotations

from tests.faults.results import table


def test_a_scenario_run_in_both_modes_is_one_row_with_duplicates_per_mode() -> None:
    rendered = table(
        {
            "crash loop [at-least-once]": {
                "events": 100,
                "lost": 0,
                "duplicates": 7,
                "recovery_s": 1.25,
                "notes": "a",
            },
            "crash loop [exactly-once]": {
                "events": 100,
                "lost": 0,
                "duplicates": 0,
                "recovery_s": 2.0,
                "notes": "b",
            },
            "hostile rows": {"events": 53, "lost": 0, "duplicates": 0, "notes": "c"},
        }
    ).splitlines()
    assert len(rendered) == 4
    assert rendered[2] == (
        "| crash loop | 100 | - | 0 | 7 | 0 | 1.2 (ALO) / 2.0 (EOS) | ALO: a; EOS: b |"
    )
    assert rendered[3] == "| hostile rows | 53 | - | 0 | 0 | - | - | c |"


def test_a_scenario_run_only_in_exactly_once_leaves_the_at_least_once_column_empty() -> None:
    row = table({"x [exactly-once]": {"events": 1, "lost": 0, "duplicates": 0}}).splitlines()[2]
    assert row == "| x | 1 | - | 0 | - | 0 | - |  |"
