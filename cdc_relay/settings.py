"""Every knob of the relay, read once from ``CDC_RELAY_*`` environment variables (and ``.env``).

Validation errors become one ConfigError line naming the variable; input values are never
echoed, because they may hold secrets.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from string import Formatter
from typing import Annotated, Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from cdc_relay.core.durations import parse_duration
from cdc_relay.core.mapping import ColumnMapping, legal_topic
from cdc_relay.core.names import split_table_name
from cdc_relay.errors import ConfigError

ENV_PREFIX = "CDC_RELAY_"

# Postgres identifiers we create or look up (slot, publication): keep them to the safe,
# unquoted form so they can never inject SQL and always mean the same object.
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOPIC_PLACEHOLDERS = {"aggregate_type", "event_type", "table", "schema"}
# A message prefix is also what {table} gives for message events: keep it a topic fragment.
_MESSAGE_PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,100}$")
DEFAULT_MESSAGE_PREFIX = "cdc_relay.outbox"
# The roles CDC_RELAY_TABLE_COLUMNS may map, as ColumnMapping names them.
_ROLES = ("id", "aggregate_type", "aggregate_id", "event_type", "payload", "headers", "created_at")
_OPTIONAL_ROLES = ("headers", "created_at")

# librdkafka properties whose other values would break the delivery guarantee: acks from all
# replicas, idempotence (order through retries), a delivery report per record (the slot only
# advances on acks), no gap in a partition's series after a failed batch (a later record of a
# key must not land before an earlier one that is replayed), and no final timeout (which the
# gapless guarantee does not cover: an outage is backpressure, never a reason to give up).
_GUARANTEE_PROPERTIES = {
    "acks": {"all", "-1"},
    "request.required.acks": {"all", "-1"},
    "enable.idempotence": {"true"},
    "delivery.report.only.error": {"false"},
    "enable.gapless.guarantee": {"true"},
    "message.timeout.ms": {"0"},
    "delivery.timeout.ms": {"0"},
}
# Key-ignoring partitioners would scatter an aggregate's events and lose per-key order.
_KEY_IGNORING_PARTITIONERS = {"random"}
_RELAY_OWNED_PROPERTIES = {
    "bootstrap.servers",
    "on_delivery",
    "error_cb",
    "dr_cb",
    "dr_msg_cb",
    "logger",
    "transactional.id",
}


def relay_producer_defaults(bootstrap_servers: str) -> dict[str, Any]:
    """The safe producer configuration the user's CDC_RELAY_KAFKA_CONFIG is merged over."""
    return {
        "bootstrap.servers": bootstrap_servers,
        "client.id": "cdc-relay",
        "enable.idempotence": True,
        "acks": "all",
        # A failed batch stops the producer (a fatal error, then a new producer and a replay
        # from the slot) instead of letting later batches of its partition land first.
        "enable.gapless.guarantee": True,
        # Never give up on a record: a broker outage holds the relay back (backpressure) until
        # Kafka answers, and per-key order survives it (docs/reliability.md).
        "message.timeout.ms": 0,
        # Java clients hash keys with murmur2: match them, so a key lands on the same partition
        # whichever producer wrote it.
        "partitioner": "murmur2_random",
        # 5 ms fills batches under load without costing a quiet stream more than that
        # (docs/performance.md); lz4 cut the broker's CPU per event by a third, at no latency.
        "linger.ms": 5,
        "compression.type": "lz4",
    }


class Settings(BaseSettings):
    """cdc-relay configuration. Field names map to ``CDC_RELAY_<NAME>`` variables."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )
    # Set by for_table(): the control schema of the settings it narrowed.
    _control_schema: str | None = PrivateAttr(default=None)

    database_url: SecretStr = Field(
        description="libpq URL or key=value DSN of the database that holds the outbox. With a "
        "primary and standbys, name them all and ask for the writable one "
        "(`postgresql://u@primary:5432,standby:5432/app?target_session_attrs=read-write`): every "
        "connection of the relay then finds the current primary by itself after a failover."
    )
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Kafka bootstrap servers, `host:port[,host:port]`."
    )
    kafka_config: Annotated[dict[str, str | int | float | bool], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of extra librdkafka producer properties (SASL, TLS, compression, "
        "…) merged over the relay's safe defaults. Properties that would weaken delivery or order "
        "are refused: `acks` other than `all`, `enable.idempotence=false`, "
        "`enable.gapless.guarantee=false`, `message.timeout.ms` other than 0 (unlimited), "
        "`delivery.report.only.error=true`, `partitioner=random`, queue limits below the "
        "in-flight bounds.",
    )
    outbox_table: str = Field(
        default="public.outbox",
        description="The outbox tables, schema-qualified, separated by commas "
        "(`public.outbox,billing.outbox`): one relay, slot and publication for all of them. "
        "Empty for none, when every event is a logical decoding message "
        "(`CDC_RELAY_MESSAGE_PREFIX`). Each table uses the `CDC_RELAY_COLUMN_*` mapping unless "
        "`CDC_RELAY_TABLE_COLUMNS` gives it its own.",
    )
    table_columns: Annotated[dict[str, dict[str, str]], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of per-table column mappings, for tables whose columns differ "
        'from the `CDC_RELAY_COLUMN_*` ones: `{"billing.outbox": {"aggregate_type": '
        '"aggregatetype", "headers": ""}}`. Keys are tables of `CDC_RELAY_OUTBOX_TABLE`; roles '
        "are `id`, `aggregate_type`, `aggregate_id`, `event_type`, `payload`, `headers`, "
        '`created_at` (`""` turns an optional one off); a role not given keeps the shared '
        "column.",
    )
    message_prefix: str = Field(
        default=DEFAULT_MESSAGE_PREFIX,
        description="Prefix of the logical decoding messages that are events "
        "(`pg_logical_emit_message(true, prefix, content)`, written by `emit_event` and "
        "`cdc_relay_emit_event`; README, Events as messages); messages with other prefixes are "
        "ignored. Empty to stream no messages. Letters, digits, `.`, `_`, `-`.",
    )
    scheduled_table: str = Field(
        default="",
        description="Scheduled events (`add_event(..., deliver_at=...)`, `schedule_event`; "
        "README, Events for later): the table they wait in, schema-qualified, for example "
        "`public.outbox_scheduled` (what `setup --create-table` creates and the helpers write "
        "to by default). The relay that holds the slot moves each due row into the first "
        "outbox table in one transaction, and the WAL path publishes it. Empty: off.",
    )
    scheduled_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="The mover's longest sleep: an event scheduled (or committed) less than "
        "this before its due time is up to this late; others are moved when due.",
    )
    scheduled_batch: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="Most scheduled rows moved in one transaction.",
    )
    scheduled_overdue_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long past its due time a scheduled row counts as overdue "
        "(`status`, `cdc_relay_scheduled_overdue_events`).",
    )
    claim_check_over_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Claim-check (README, Events by reference): an outbox row whose payload is "
        "larger than this many bytes is published as a reference (value "
        "`cdc-relay-claim-check:v1 {...}`, header `cdc-relay-claim-check: v1`); consumers fetch "
        "the payload from the outbox with `cdc_relay.claimcheck`. Keep it below the broker's "
        "and the topic's message size limits. Unset: off.",
    )
    claim_check_retention: timedelta = Field(
        default=timedelta(days=7),
        description="How long `prune` keeps claim-checked rows after their `created_at` "
        "(`90s`, `30m`, `12h`, `7d`, `2w`): longer than the relay's lag plus the slowest "
        "consumer's lag plus how far back consumers may re-read (docs/claim-check.md).",
    )
    slot_name: str = Field(default="cdc_relay", description="Logical replication slot name.")
    slot_failover: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Whether `setup` makes the slot a failover slot, synchronised to standbys "
        "that run `sync_replication_slots = on` (PostgreSQL 17+): `auto` where the server "
        "supports it, `on` (refused before 17), `off`. `setup` also turns it on or off for an "
        "existing slot (with the relay stopped).",
    )
    publication_name: str = Field(default="cdc_relay", description="Publication name.")
    topic_template: str = Field(
        default="outbox.event.{aggregate_type}",
        description="Topic of each event; placeholders `{aggregate_type}`, `{event_type}`, "
        "`{table}`.",
    )
    column_id: str = Field(default="id", description="Column with the event id (header `id`).")
    column_aggregate_type: str = Field(
        default="aggregate_type", description="Column with the aggregate type (routing)."
    )
    column_aggregate_id: str = Field(
        default="aggregate_id", description="Column with the aggregate id (the Kafka key)."
    )
    column_event_type: str = Field(
        default="event_type", description="Column with the event type (header `event_type`)."
    )
    column_payload: str = Field(
        default="payload", description="Column with the payload (the Kafka value, as stored)."
    )
    column_headers: str = Field(
        default="headers",
        description="Optional jsonb column whose keys become Kafka headers; empty to disable.",
    )
    column_created_at: str = Field(
        default="created_at",
        description="Optional timestamp column used as the Kafka timestamp; empty to disable.",
    )
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        default="at-least-once",
        description="`at-least-once`: events are produced with an idempotent producer and the "
        "slot confirmed after Kafka's acks; a crash or restart resends some (consumers "
        "deduplicate on `id`). `exactly-once`: Kafka transactions cover whole PostgreSQL "
        "transactions and carry the relay's position (the progress topic), so a "
        "`read_committed` consumer sees every event once (README, Delivery guarantees).",
    )
    transactional_id: str = Field(
        default="",
        description="Exactly-once: the Kafka transactional.id of this pipeline; empty derives "
        "`cdc-relay-<system identifier>-<slot>`. A relay that starts with the same id fences "
        "the previous one.",
    )
    progress_topic: str = Field(
        default="cdc-relay.progress",
        description="Exactly-once: the compacted, single-partition topic of the relay's "
        "progress records (created at start if missing), keyed by transactional.id.",
    )
    transaction_max_events: int = Field(
        default=20_000,
        ge=1,
        description="Exactly-once: events per Kafka transaction, at most (a larger PostgreSQL "
        "transaction is split over several, each recording how far it got).",
    )
    transaction_max_seconds: float = Field(
        default=0.1,
        gt=0,
        le=60,
        description="Exactly-once: how long a Kafka transaction stays open at most while events "
        "keep coming; it is committed at once when the stream is idle.",
    )
    dead_letter_policy: Literal["dead-letter", "halt"] = Field(
        default="dead-letter",
        description="What to do with a row that can never be delivered: `dead-letter` or `halt`.",
    )
    dead_letter_topic: str = Field(
        default="outbox.dead-letter", description="Topic for rows that cannot be delivered."
    )
    max_in_flight_events: int = Field(
        default=20_000,
        ge=1,
        description="Events produced but not yet acknowledged, at most; when reached the relay "
        "stops reading the WAL until acks drain.",
    )
    max_in_flight_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Bytes of record values (payloads) produced but not yet acknowledged, at most.",
    )
    status_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="Least interval between status updates that move the confirmed position "
        "(an update goes out at least every 10 s regardless, well within `wal_sender_timeout`).",
    )
    reconnect_max_backoff_seconds: float = Field(
        default=30.0, gt=0, description="Cap of the exponential backoff between reconnects."
    )
    standby_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often a relay whose slot is held by another process retries.",
    )
    shutdown_timeout_seconds: float = Field(
        default=30.0, ge=0, description="How long shutdown waits for in-flight acks."
    )
    http_port: int = Field(
        default=9187,
        ge=0,
        le=65535,
        description="Port of the HTTP endpoint of `run` (`/metrics`, `/healthz`, `/readyz`); "
        "`0` disables it.",
    )
    http_host: str = Field(
        default="0.0.0.0",
        min_length=1,
        description="Address the HTTP endpoint binds to; all interfaces by default, so that "
        "probes and Prometheus reach it on the pod IP.",
    )
    lag_sample_interval_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often `run` samples the slot's lag and `wal_status` for the metrics "
        "(one query over its connection pool).",
    )
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto",
        description="`text`, `json` (one object per line) or `auto`: text when stderr is a "
        "terminal, JSON otherwise.",
    )

    @field_validator("kafka_config", mode="before")
    @classmethod
    def _parse_kafka_config(cls, value: object) -> object:
        value = _json_text(value)
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object of librdkafka properties")
        for key, item in value.items():
            if isinstance(item, dict | list) or item is None:
                raise ValueError(f"property {key!r} must be a string, number or boolean")
            wanted = _GUARANTEE_PROPERTIES.get(key)
            if wanted is not None and str(item).lower() not in wanted:
                raise ValueError(
                    f"property {key!r} would weaken delivery guarantees; the relay requires "
                    f"{key}={sorted(wanted)[0]}"
                )
            if key in _RELAY_OWNED_PROPERTIES:
                raise ValueError(f"property {key!r} is managed by the relay and cannot be set")
            if key == "partitioner" and str(item) in _KEY_IGNORING_PARTITIONERS:
                raise ValueError(
                    f"property 'partitioner'={item} ignores the key and would break per-aggregate "
                    "order; use murmur2_random (the default), consistent_random or fnv1a_random"
                )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        try:
            conninfo_to_dict(value.get_secret_value())
        except psycopg.ProgrammingError:
            # libpq's message quotes the offending text, which may be the password.
            raise ValueError("is not a valid libpq URL or key=value connection string") from None
        return value

    @field_validator("dead_letter_topic", "progress_topic")
    @classmethod
    def _check_dead_letter_topic(cls, value: str) -> str:
        if not legal_topic(value):
            raise ValueError("is not a legal Kafka topic name (1-249 characters of [A-Za-z0-9._-])")
        return value

    @field_validator("slot_name", "publication_name")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(
                "must be a lower-case identifier: letters, digits and _, at most 63 characters"
            )
        return value

    @field_validator("claim_check_retention", mode="before")
    @classmethod
    def _parse_retention(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("outbox_table")
    @classmethod
    def _check_table(cls, value: str) -> str:
        seen: set[tuple[str, str]] = set()
        for name in _table_list(value):
            try:
                qualified = split_table_name(name)
            except ValueError:
                raise ValueError(
                    f"{name!r} is not a table name: list tables as schema.table, separated by "
                    "commas"
                ) from None
            if qualified in seen:
                raise ValueError(f"lists {'.'.join(qualified)} twice")
            seen.add(qualified)
        return value

    @field_validator("table_columns", mode="before")
    @classmethod
    def _parse_table_columns(cls, value: object) -> object:
        value = _json_text(value)
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object: {"schema.table": {"role": "column"}}')
        for table, roles in value.items():
            if not isinstance(roles, dict):
                raise ValueError(f"{table}: must map roles to column names")
            for role, column in roles.items():
                if role not in _ROLES:
                    raise ValueError(
                        f"{table}: unknown role {role!r}; roles are {', '.join(_ROLES)}"
                    )
                if not isinstance(column, str):
                    raise ValueError(f"{table}: the column of {role} must be a string")
        return value

    @field_validator("message_prefix")
    @classmethod
    def _check_message_prefix(cls, value: str) -> str:
        if not _MESSAGE_PREFIX.match(value):
            raise ValueError("must be at most 100 letters, digits, '.', '_' or '-' (or empty)")
        return value

    @field_validator("topic_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            fields = [field for _, field, _, _ in Formatter().parse(value) if field is not None]
        except ValueError as exc:
            raise ValueError(
                f"is not a valid template ({exc}); write braces as {{{{ }}}}"
            ) from None
        for field in fields:
            if field not in _TOPIC_PLACEHOLDERS:
                raise ValueError(
                    f"unknown placeholder {{{field}}}; use {{aggregate_type}}, {{event_type}} "
                    "or {table}"
                )
        try:
            sample = value.format(
                aggregate_type="order", event_type="OrderPlaced", schema="public", table="outbox"
            )
        except (ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"is not a valid template ({exc})") from None
        if not legal_topic(sample):
            # Every event would be dead-lettered while the slot moves on: refuse it now.
            raise ValueError(
                f"gives the illegal topic name {sample!r} for aggregate type 'order': Kafka "
                "allows 1-249 characters of [A-Za-z0-9._-]"
            )
        return value

    @model_validator(mode="after")
    def _check_columns(self) -> Settings:
        required = [
            self.column_id,
            self.column_aggregate_type,
            self.column_aggregate_id,
            self.column_event_type,
            self.column_payload,
        ]
        if any(not name for name in required):
            raise ValueError(
                "the id, aggregate type, aggregate id, event type and payload "
                "columns cannot be empty"
            )
        named = [*required, self.column_headers, self.column_created_at]
        named = [name for name in named if name]
        if len(set(named)) != len(named):
            raise ValueError("two CDC_RELAY_COLUMN_* settings name the same column")
        self._check_sources()
        # librdkafka's queue must hold everything the relay lets be in flight, or produce()
        # would block before the relay's own backpressure engages.
        queue_messages = self.kafka_config.get("queue.buffering.max.messages")
        if queue_messages is not None and int(queue_messages) < self.max_in_flight_events:
            raise ValueError(
                "CDC_RELAY_KAFKA_CONFIG: queue.buffering.max.messages must be at least "
                "CDC_RELAY_MAX_IN_FLIGHT_EVENTS"
            )
        queue_kbytes = self.kafka_config.get("queue.buffering.max.kbytes")
        if queue_kbytes is not None and int(queue_kbytes) * 1024 < self.max_in_flight_bytes:
            raise ValueError(
                "CDC_RELAY_KAFKA_CONFIG: queue.buffering.max.kbytes must cover "
                "CDC_RELAY_MAX_IN_FLIGHT_BYTES"
            )
        return self

    def _check_sources(self) -> None:
        tables = self.tables
        over = self.claim_check_over_bytes
        max_bytes = self.kafka_config.get("message.max.bytes")
        if over is not None and max_bytes is not None and over >= int(max_bytes):
            raise ValueError(
                "CDC_RELAY_CLAIM_CHECK_OVER_BYTES must be below message.max.bytes "
                f"({max_bytes}, CDC_RELAY_KAFKA_CONFIG): payloads between the two would be "
                "refused before they could go by reference"
            )
        if self.scheduled_table:
            try:
                scheduled = split_table_name(self.scheduled_table)
            except ValueError:
                raise ValueError(
                    f"CDC_RELAY_SCHEDULED_TABLE: {self.scheduled_table!r} is not a table name "
                    "(schema.table)"
                ) from None
            if not tables:
                raise ValueError(
                    "CDC_RELAY_SCHEDULED_TABLE needs an outbox table to move due events into: "
                    "CDC_RELAY_OUTBOX_TABLE is empty"
                )
            if scheduled in tables:
                raise ValueError(
                    "CDC_RELAY_SCHEDULED_TABLE must not be one of the outbox tables: its rows "
                    "would be published before they are due"
                )
        if not tables and not self.message_prefix:
            raise ValueError(
                "no source of events: CDC_RELAY_OUTBOX_TABLE and CDC_RELAY_MESSAGE_PREFIX are "
                "both empty"
            )
        listed = {".".join(t) for t in tables}
        for table, roles in self.table_columns.items():
            try:
                qualified = ".".join(split_table_name(table))
            except ValueError:
                qualified = table
            if qualified not in listed:
                raise ValueError(
                    f"CDC_RELAY_TABLE_COLUMNS: {table} is not a table of CDC_RELAY_OUTBOX_TABLE"
                )
            mapping = self._mapping_with(roles)
            if not all(mapping.required):
                raise ValueError(
                    f"CDC_RELAY_TABLE_COLUMNS: {table}: the id, aggregate type, aggregate id, "
                    "event type and payload columns cannot be empty"
                )
            named = [c for c in (*mapping.required, mapping.headers, mapping.created_at) if c]
            if len(set(named)) != len(named):
                raise ValueError(f"CDC_RELAY_TABLE_COLUMNS: {table}: two roles name one column")
        if self.message_prefix:
            sample = self.topic_template.format(
                aggregate_type="order",
                event_type="OrderPlaced",
                schema="message",
                table=self.message_prefix,
            )
            if not legal_topic(sample):
                raise ValueError(
                    f"CDC_RELAY_TOPIC_TEMPLATE gives the illegal topic name {sample!r} for a "
                    "message event (for messages {schema} is `message` and {table} the "
                    "message prefix)"
                )

    @property
    def tables(self) -> list[tuple[str, str]]:
        """The outbox tables, as (schema, table), in the order listed."""
        return [split_table_name(name) for name in _table_list(self.outbox_table)]

    @property
    def scheduled(self) -> tuple[str, str] | None:
        """The scheduled-events table, when scheduled events are on."""
        return split_table_name(self.scheduled_table) if self.scheduled_table else None

    @property
    def qualified_tables(self) -> list[str]:
        return [".".join(t) for t in self.tables]

    def _mapping_with(self, roles: dict[str, str]) -> ColumnMapping:
        base = self.column_mapping()
        values: dict[str, str | None] = {role: getattr(base, role) for role in _ROLES}
        for role, column in roles.items():
            values[role] = column or (None if role in _OPTIONAL_ROLES else "")
        return ColumnMapping(**values)  # type: ignore[arg-type]

    def table_mapping(self, table: str) -> ColumnMapping:
        """The column mapping of one outbox table (``schema.table``): its own, or the shared."""
        qualified = ".".join(split_table_name(table))
        for name, roles in self.table_columns.items():
            if ".".join(split_table_name(name)) == qualified:
                return self._mapping_with(roles)
        return self.column_mapping()

    def for_table(self, table: str) -> Settings:
        """These settings narrowed to one outbox table, with its own column mapping: what the
        per-table parts of setup, status, prune and skip work on. The control tables stay
        where they are (``control_schema``)."""
        mapping = self.table_mapping(table)
        narrowed = self.model_copy(
            update={
                "outbox_table": table,
                "table_columns": {},
                "column_id": mapping.id,
                "column_aggregate_type": mapping.aggregate_type,
                "column_aggregate_id": mapping.aggregate_id,
                "column_event_type": mapping.event_type,
                "column_payload": mapping.payload,
                "column_headers": mapping.headers or "",
                "column_created_at": mapping.created_at or "",
            }
        )
        narrowed._control_schema = self.control_schema
        return narrowed

    def per_table(self) -> list[Settings]:
        return [self.for_table(name) for name in self.qualified_tables]

    @property
    def control_schema(self) -> str:
        """Where the relay's control tables and functions live: beside the first outbox table,
        or in public when there is none."""
        if self._control_schema is not None:
            return self._control_schema
        tables = self.tables
        return tables[0][0] if tables else "public"

    @property
    def messages(self) -> bool:
        """Whether logical decoding messages are a source of events."""
        return bool(self.message_prefix)

    def column_mapping(self) -> ColumnMapping:
        """Which outbox column plays which role, as configured (shared by every table without
        its own in CDC_RELAY_TABLE_COLUMNS)."""
        return ColumnMapping(
            id=self.column_id,
            aggregate_type=self.column_aggregate_type,
            aggregate_id=self.column_aggregate_id,
            event_type=self.column_event_type,
            payload=self.column_payload,
            headers=self.column_headers or None,
            created_at=self.column_created_at or None,
        )

    @property
    def exactly_once(self) -> bool:
        return self.delivery == "exactly-once"

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka configuration: safe defaults, then the user's properties."""
        if not self.kafka_bootstrap_servers:
            raise ConfigError(f"{ENV_PREFIX}KAFKA_BOOTSTRAP_SERVERS is required by `run`")
        defaults = relay_producer_defaults(self.kafka_bootstrap_servers)
        if self.exactly_once:
            # A transaction that fails is aborted and replayed, never left with a gap; and its
            # records must time out within the transaction's timeout (librdkafka sets it).
            del defaults["enable.gapless.guarantee"], defaults["message.timeout.ms"]
        return {
            **defaults,
            # Room for everything the relay lets be in flight, or produce() would block before
            # the relay's own backpressure engages.
            "queue.buffering.max.messages": max(100_000, 2 * self.max_in_flight_events),
            **self.kafka_config,
        }

    def _first_table(self) -> tuple[str, str]:
        tables = self.tables
        if not tables:
            raise ConfigError(f"{ENV_PREFIX}OUTBOX_TABLE is empty: this needs an outbox table")
        return tables[0]

    @property
    def qualified_table(self) -> str:
        """``schema.table`` of the (first) outbox, the schema spelled out (as events name it)."""
        return ".".join(self._first_table())

    @property
    def table_schema(self) -> str:
        return self._first_table()[0]

    @property
    def table_name(self) -> str:
        return self._first_table()[1]


def _json_text(value: object) -> object:
    """A setting given as JSON text, parsed (blank: an empty object); anything else as is."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return {}
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at position {exc.pos})") from None


def _table_list(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


_SECRET_WORDS = ("password", "secret", "key.pem", "sasl.oauthbearer.config", "token")


def is_secret_property(key: str) -> bool:
    """Whether a librdkafka property holds a secret (its value must never be shown)."""
    return any(word in key.lower() for word in _SECRET_WORDS)


def redact_kafka_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy safe to log: values of secret-bearing properties replaced."""
    return {
        key: "***" if is_secret_property(key) else value
        for key, value in config.items()
        if not callable(value)
    }


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment, turning every failure into one ConfigError line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    except SettingsError as exc:
        # Raised before validation when a source cannot parse a value; never echo the value.
        field = re.search(r'field "([^"]+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "a CDC_RELAY_ variable"
        raise ConfigError(f"{name}: could not be parsed") from None


def _describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors(include_input=False, include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc:
        return f"invalid configuration: {message}"
    variable = f"{ENV_PREFIX}{loc[0].upper()}"
    if first["type"] == "missing":
        return f"{variable} is required"
    return f"{variable}: {message}"
