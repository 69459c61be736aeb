"""Fixtures of the integration tests: an outbox set up in a fresh database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from tests.integration.relay_process import cli, relay_env


@dataclass
class Outbox:
    """A database with the outbox set up, and the env that points the relay at it."""

    url: str
    env: dict[str, str]
    prefix: str

    def topic(self, aggregate_type: str = "order") -> str:
        return f"{self.prefix}.{aggregate_type}"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.prefix}.dead-letter"


def make_outbox(
    url: str, bootstrap: str, *, create_table: bool = True, **settings: object
) -> Outbox:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = relay_env(
        url,
        bootstrap,
        topic_template=f"{prefix}.{{aggregate_type}}",
        dead_letter_topic=f"{prefix}.dead-letter",
        **settings,
    )
    args = ["setup", "--create-table"] if create_table else ["setup"]
    done = cli(env, *args)
    assert done.returncode == 0, done.stderr
    return Outbox(url, env, prefix)


@pytest.fixture
def outbox(db: str, kafka: str) -> Outbox:
    return make_outbox(db, kafka)
