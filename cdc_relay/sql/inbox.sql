-- The inbox of an idempotent consumer: one row per event it has applied.
-- Run once in the consumer's own database (psql -f inbox.sql). The relay delivers at least once;
-- a consumer that records the event id (the Kafka header `id`) in the same transaction as the
-- event's effects, with INSERT ... ON CONFLICT DO NOTHING, applies every event exactly once.
-- cdc_relay.inbox.claim() and process_once() do that insert.
-- `consumer` lets several consumers (one per subscribing service or handler) share the table.
CREATE TABLE IF NOT EXISTS public.processed_events (
    consumer     text        NOT NULL DEFAULT '',
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
-- Retention: rows are only needed while a duplicate can still arrive (the relay replays at most
-- what was in flight when it stopped, and Kafka consumers rewind to their committed offsets), so
-- something like DELETE ... WHERE processed_at < now() - interval '30 days' is safe.
