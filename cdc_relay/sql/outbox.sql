-- The default outbox table of cdc-relay. `cdc-relay setup --create-table` runs this file with
-- {table} replaced by the quoted, schema-qualified name from CDC_RELAY_OUTBOX_TABLE.
-- Services insert one row per event in the same transaction as their business rows; the relay
-- publishes the INSERTs from the WAL. Deleting rows later never emits anything.
CREATE TABLE IF NOT EXISTS {table} (
    id             uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
