-- The relay's two small control tables, beside the outbox (same schema). `cdc-relay setup`
-- creates them, with {schema} replaced by the outbox's schema; it is idempotent.
--
-- cdc_relay_kept: outbox rows whose dead-letter record went without the payload (too large for
--   Kafka). The outbox row is then the only full copy of the event, so `cdc-relay prune` keeps
--   it until you delete the kept row yourself. The relay (`run`) records rows through the
--   function cdc_relay_keep (SECURITY DEFINER, owned by the setup role), so the run role needs
--   no privilege on the table.
-- cdc_relay_skipped: events an operator told the relay to dead-letter instead of delivering
--   (`cdc-relay skip --lsn X/Y`, after a halt under CDC_RELAY_DEAD_LETTER_POLICY=halt). `run`
--   reads it: the run role needs SELECT; `skip` inserts: the setup role owns it.
CREATE TABLE IF NOT EXISTS {schema}.cdc_relay_kept (
    source_table text        NOT NULL,
    event_id     text        NOT NULL,
    source_lsn   pg_lsn,
    reason       text        NOT NULL,
    kept_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, event_id)
);
CREATE OR REPLACE FUNCTION {schema}.cdc_relay_keep(
    source_table text, event_id text, source_lsn pg_lsn, reason text
) RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO {schema}.cdc_relay_kept (source_table, event_id, source_lsn, reason)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT DO NOTHING
$$;
CREATE TABLE IF NOT EXISTS {schema}.cdc_relay_skipped (
    slot_name    text        NOT NULL,
    lsn          pg_lsn      NOT NULL,
    event_id     text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, lsn)
);
