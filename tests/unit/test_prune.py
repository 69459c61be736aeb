"""prune's pure parts: durations, and the one-line usage errors of `cdc-relay prune`."""

from __future__ import annotations

from datetime import timedelta

import pytest

from cdc_relay import cli
from cdc_relay.ops.prune import delete_batch_sql, parse_duration
from cdc_relay.settings import Settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(days=14)),
        ("0s", timedelta(0)),
        (" 15m ", timedelta(minutes=15)),
    ],
)
def test_durations_are_a_whole_number_and_a_unit(text: str, expected: timedelta):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "-1d", "1.5h", "7 days", "7D", "1y", "1d2h"])
def test_anything_else_is_refused_naming_the_input(text: str):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "args",
    [
        ["--older-than", "7days"],
        ["--older-than", "7d", "--wait", "soon"],
        ["--older-than", "7d", "--batch-size", "0"],
        ["--older-than", "7d", "--batch-size", "many"],
    ],
)
def test_bad_prune_arguments_exit_2_with_one_line(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    # An unreachable database: the arguments must be refused before any connection attempt.
    monkeypatch.setenv("CDC_RELAY_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.chdir("/")
    assert cli.main(["prune", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cdc-relay: error: prune: ")
    assert err.count("\n") == 1


def test_a_batch_rechecks_the_condition_on_the_rows_it_deletes():
    settings = Settings(database_url="postgresql://x@localhost/db", outbox_table="ev.box")
    text = delete_batch_sql(settings, with_age=True).as_string(None)
    assert text.startswith('DELETE FROM "ev"."box" AS o WHERE o."id" = ANY (ARRAY(SELECT c."id"')
    # The picked ids are deleted only if their own row still meets both conditions.
    assert text.count("< %(horizon)s") == 2
    assert text.count('."created_at" < %(cutoff)s') == 2
    assert "LIMIT %(batch)s" in text
    assert "created_at" not in delete_batch_sql(settings, with_age=False).as_string(None)
