"""Settings: defaults, env parsing, and one-line errors that never echo a value."""

from __future__ import annotations

import pytest

from cdc_relay.errors import ConfigError
from cdc_relay.settings import load_settings, redact_kafka_config

URL = "postgresql://relay:s3cret-pw@db:5432/app"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in list(__import__("os").environ):
        if name.startswith("CDC_RELAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    monkeypatch.setenv("CDC_RELAY_DATABASE_URL", URL)


def test_defaults_match_the_documented_ones():
    s = load_settings()
    assert s.outbox_table == "public.outbox"
    assert s.slot_name == "cdc_relay" and s.publication_name == "cdc_relay"
    assert s.topic_template == "outbox.event.{aggregate_type}"
    assert s.dead_letter_policy == "dead-letter"
    assert s.dead_letter_topic == "outbox.dead-letter"
    assert (s.table_schema, s.table_name) == ("public", "outbox")
    assert s.kafka_config == {}


def test_missing_database_url_names_the_variable(monkeypatch):
    monkeypatch.delenv("CDC_RELAY_DATABASE_URL")
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_DATABASE_URL is required$"):
        load_settings()


def test_invalid_number_names_the_variable(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_MAX_IN_FLIGHT_EVENTS", "0")
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_MAX_IN_FLIGHT_EVENTS: "):
        load_settings()


def test_invalid_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_DEAD_LETTER_POLICY", "drop")
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_DEAD_LETTER_POLICY: "):
        load_settings()


def test_kafka_config_json_is_merged_over_safe_defaults(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv(
        "CDC_RELAY_KAFKA_CONFIG", '{"compression.type": "zstd", "linger.ms": 20, "acks": "all"}'
    )
    config = load_settings().producer_config()
    assert config["compression.type"] == "zstd"
    assert config["linger.ms"] == 20
    assert config["enable.idempotence"] is True
    assert config["bootstrap.servers"] == "k:9092"


@pytest.mark.parametrize(
    "raw",
    [
        '{"acks": "1"}',
        '{"acks": 1}',
        '{"enable.idempotence": false}',
        '{"request.required.acks": 0}',
    ],
)
def test_properties_that_weaken_delivery_are_refused(monkeypatch, raw):
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", raw)
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_KAFKA_CONFIG: .*weaken delivery"):
        load_settings()


def test_invalid_kafka_config_json_is_one_line_without_the_value(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", '{"sasl.password": "hunter22",')
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith("CDC_RELAY_KAFKA_CONFIG: is not valid JSON")
    assert "hunter22" not in text and "\n" not in text


def test_kafka_config_must_be_an_object(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", "[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_settings()


def test_bootstrap_servers_required_only_to_build_the_producer():
    s = load_settings()
    with pytest.raises(ConfigError, match="CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS is required"):
        s.producer_config()


@pytest.mark.parametrize("name", ["Bad-Slot", "x;drop", "", "a" * 64])
def test_slot_name_must_be_a_plain_identifier(monkeypatch, name):
    monkeypatch.setenv("CDC_RELAY_SLOT_NAME", name)
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_SLOT_NAME: "):
        load_settings()


def test_unknown_topic_placeholder_is_refused(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_TOPIC_TEMPLATE", "events.{aggregate}")
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_TOPIC_TEMPLATE: unknown placeholder"):
        load_settings()


def test_debezium_style_column_mapping(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_COLUMN_AGGREGATE_TYPE", "aggregatetype")
    monkeypatch.setenv("CDC_RELAY_COLUMN_AGGREGATE_ID", "aggregateid")
    monkeypatch.setenv("CDC_RELAY_COLUMN_EVENT_TYPE", "type")
    s = load_settings()
    assert (s.column_aggregate_type, s.column_aggregate_id, s.column_event_type) == (
        "aggregatetype",
        "aggregateid",
        "type",
    )


def test_two_roles_on_one_column_are_refused(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_COLUMN_EVENT_TYPE", "aggregate_type")
    with pytest.raises(ConfigError, match="same column"):
        load_settings()


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("CDC_RELAY_SLOT_NAME=from_dotenv\n")
    assert load_settings().slot_name == "from_dotenv"


def test_database_url_is_secret_in_repr():
    assert "s3cret-pw" not in repr(load_settings())


def test_redacted_kafka_config_hides_secrets():
    shown = redact_kafka_config({"sasl.password": "pw", "sasl.username": "u", "ssl.key.pem": "k"})
    assert shown == {"sasl.password": "***", "sasl.username": "u", "ssl.key.pem": "***"}


def test_malformed_database_url_is_a_config_error_without_the_password(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_DATABASE_URL", "postgresql://relay:p%zzTopSecret@db/app")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("CDC_RELAY_DATABASE_URL: is not a valid libpq URL")
    assert "TopSecret" not in str(info.value)


@pytest.mark.parametrize("template", ["outbox.{", "x.{aggregate_type}}", "x.{0}", "x.{table!z}"])
def test_malformed_topic_template_is_refused_at_start(monkeypatch, template):
    monkeypatch.setenv("CDC_RELAY_TOPIC_TEMPLATE", template)
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_TOPIC_TEMPLATE: "):
        load_settings()


@pytest.mark.parametrize(
    "template", ["outbox/{aggregate_type}", "outbox events.{event_type}", "{table}:{event_type}"]
)
def test_a_template_that_gives_an_illegal_topic_name_is_refused_at_start(monkeypatch, template):
    """Bug 5: the template formatted to an illegal name (a '/', a space) passed validation,
    and every event was then dead-lettered while the slot moved on."""
    monkeypatch.setenv("CDC_RELAY_TOPIC_TEMPLATE", template)
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_TOPIC_TEMPLATE: gives the illegal topic"):
        load_settings()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"message.timeout.ms": 300000}', "message.timeout.ms=0"),
        ('{"delivery.timeout.ms": 1000}', "delivery.timeout.ms=0"),
        ('{"enable.gapless.guarantee": false}', "enable.gapless.guarantee=true"),
        ('{"partitioner": "random"}', "per-aggregate order"),
        ('{"delivery.report.only.error": true}', "weaken delivery"),
        ('{"error_cb": "x"}', "managed by the relay"),
    ],
)
def test_properties_that_break_order_or_acks_are_refused(monkeypatch, raw, fragment):
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", raw)
    with pytest.raises(ConfigError, match=fragment):
        load_settings()


def test_librdkafka_queue_must_hold_the_in_flight_bound(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", '{"queue.buffering.max.messages": 20}')
    with pytest.raises(ConfigError, match=r"queue\.buffering\.max\.messages must be at least"):
        load_settings()
    monkeypatch.setenv("CDC_RELAY_MAX_IN_FLIGHT_EVENTS", "20")
    assert load_settings().max_in_flight_events == 20


def test_dead_letter_topic_must_be_legal(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_DEAD_LETTER_TOPIC", "dead letters")
    with pytest.raises(ConfigError, match=r"^CDC_RELAY_DEAD_LETTER_TOPIC: "):
        load_settings()


def test_observability_settings_have_safe_defaults_and_are_validated(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_DATABASE_URL", "postgresql://u@h/d")
    settings = load_settings()
    assert (settings.http_port, settings.http_host, settings.log_format) == (
        9187,
        "0.0.0.0",
        "auto",
    )
    assert settings.lag_sample_interval_seconds == 5.0
    monkeypatch.setenv("CDC_RELAY_HTTP_PORT", "0")
    assert load_settings().http_port == 0  # disabled
    for variable, value in [
        ("CDC_RELAY_HTTP_PORT", "70000"),
        ("CDC_RELAY_LOG_FORMAT", "xml"),
        ("CDC_RELAY_LAG_SAMPLE_INTERVAL_SECONDS", "0"),
    ]:
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError, match=variable):
            load_settings()
        monkeypatch.delenv(variable)


def test_producer_defaults_compress_with_lz4_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    assert load_settings().producer_config()["compression.type"] == "lz4"
    monkeypatch.setenv("CDC_RELAY_KAFKA_CONFIG", '{"compression.type": "none"}')
    assert load_settings().producer_config()["compression.type"] == "none"


# --------------------------------------------------------------------------- sources


def test_several_outbox_tables_share_the_mapping_unless_one_has_its_own(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_OUTBOX_TABLE", "public.outbox, billing.outbox ,outbox2")
    monkeypatch.setenv("CDC_RELAY_COLUMN_PAYLOAD", "body")
    monkeypatch.setenv(
        "CDC_RELAY_TABLE_COLUMNS",
        '{"billing.outbox": {"aggregate_type": "aggregatetype", "headers": "", "created_at": ""}}',
    )
    s = load_settings()
    assert s.tables == [("public", "outbox"), ("billing", "outbox"), ("public", "outbox2")]
    shared = s.table_mapping("public.outbox")
    assert shared.payload == "body" and shared.aggregate_type == "aggregate_type"
    own = s.table_mapping("billing.outbox")
    assert (own.aggregate_type, own.payload, own.headers, own.created_at) == (
        "aggregatetype",
        "body",
        None,
        None,
    )
    narrowed = s.for_table("billing.outbox")
    assert narrowed.qualified_table == "billing.outbox"
    assert narrowed.column_mapping() == own
    assert narrowed.control_schema == "public"  # beside the first table, for every table


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CDC_RELAY_OUTBOX_TABLE", "public.outbox,outbox", "lists public.outbox twice"),
        ("CDC_RELAY_OUTBOX_TABLE", "a.b.c", "'a.b.c' is not a table name"),
        ("CDC_RELAY_TABLE_COLUMNS", '{"other.box": {}}', "other.box is not a table of"),
        ("CDC_RELAY_TABLE_COLUMNS", '{"public.outbox": {"key": "k"}}', "unknown role 'key'"),
        ("CDC_RELAY_TABLE_COLUMNS", '{"public.outbox": {"payload": ""}}', "cannot be empty"),
        ("CDC_RELAY_TABLE_COLUMNS", '{"public.outbox": {"payload": "id"}}', "two roles"),
        ("CDC_RELAY_TABLE_COLUMNS", "[1]", "must be a JSON object"),
        ("CDC_RELAY_MESSAGE_PREFIX", "no spaces", "CDC_RELAY_MESSAGE_PREFIX: must be"),
        ("CDC_RELAY_TOPIC_TEMPLATE", "{shard}", "unknown placeholder {shard}"),
    ],
)
def test_source_settings_are_checked_with_one_line(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings()
    assert "\n" not in str(raised.value)


def test_no_table_is_fine_with_messages_and_refused_without(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_OUTBOX_TABLE", "")
    s = load_settings()
    assert s.tables == [] and s.messages and s.control_schema == "public"
    monkeypatch.setenv("CDC_RELAY_MESSAGE_PREFIX", "")
    with pytest.raises(ConfigError, match="no source of events"):
        load_settings()


def test_the_schema_placeholder_and_the_default_message_prefix(monkeypatch):
    monkeypatch.setenv("CDC_RELAY_TOPIC_TEMPLATE", "{schema}.{table}.{aggregate_type}")
    s = load_settings()
    assert s.message_prefix == "cdc_relay.outbox"


def test_a_scheduled_table_is_refused_among_the_outbox_tables_and_without_one():
    base = {"database_url": "postgresql://u@h/db"}
    on = load_settings(**base, scheduled_table="public.outbox_scheduled")
    assert on.scheduled == ("public", "outbox_scheduled")
    assert load_settings(**base).scheduled is None  # off by default
    with pytest.raises(ConfigError, match="must not be one of the outbox tables"):
        load_settings(**base, scheduled_table="public.outbox")
    with pytest.raises(ConfigError, match="needs an outbox table"):
        load_settings(**base, outbox_table="", scheduled_table="public.outbox_scheduled")
    with pytest.raises(ConfigError, match="is not a table name"):
        load_settings(**base, scheduled_table="a.b.c")


def test_the_documented_claim_check_retention_is_the_default():
    from cdc_relay.core.durations import parse_duration
    from cdc_relay.settings_doc import _DEFAULT_TEXT

    documented = _DEFAULT_TEXT["claim_check_retention"].strip("`")
    default = load_settings(database_url="postgresql://u@h/db").claim_check_retention
    assert parse_duration(documented) == default
