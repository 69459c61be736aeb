-- The scheduled events of cdc-relay: events a service writes now, to be published at a later
-- time (deliver_at). `cdc-relay setup --create-table` runs this file, rendered by
-- cdc_relay.scheduled.create_sql: {table} is the quoted, schema-qualified name from
-- CDC_RELAY_SCHEDULED_TABLE, the functions and indexes go into the same schema, and the payload
-- and headers columns get the outbox's own types, so that a moved row carries exactly the
-- bytes the outbox would have stored for the same event.
--
-- While the relay holds its replication slot, its mover takes the rows that fell due, oldest
-- deliver_at first, and moves each into the outbox (same id, aggregate, type, payload and
-- headers) in one transaction: DELETE ... RETURNING feeding the INSERT. The relay then
-- publishes the outbox INSERT from the WAL like any other event. This table is never in the
-- publication: scheduling, cancelling and moving emit nothing by themselves.
--
-- seq is the scheduling order: rows with the same deliver_at are moved in seq order, and a row
-- is never moved before an earlier row (by deliver_at, then seq) of its aggregate.
CREATE TABLE IF NOT EXISTS {table} (
    id             uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        {payload_type} NOT NULL,
    headers        {headers_type},
    deliver_at     timestamptz NOT NULL,
    seq            bigint      GENERATED ALWAYS AS IDENTITY,
    scheduled_at   timestamptz NOT NULL DEFAULT now()
);
-- The mover's scan (what is due, in order) and its next wake-up (min(deliver_at)).
CREATE INDEX IF NOT EXISTS {due_index} ON {table} (deliver_at, seq);

-- cdc_relay_schedule_event: schedule from SQL, for services not written in Python (Python:
-- cdc_relay.scheduled.schedule_event). Call it inside the transaction that writes the business
-- rows; it returns the event id:
--
--   BEGIN;
--   UPDATE subscriptions SET ...;
--   SELECT cdc_relay_schedule_event('subscription', 'sub-42', 'SubscriptionExpired',
--                                   '{"plan": "pro"}', now() + interval '30 days');
--   COMMIT;
--
-- SECURITY INVOKER (the default): callers need INSERT on the scheduled table.
CREATE OR REPLACE FUNCTION {schedule_function}(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        {payload_type},
    deliver_at     timestamptz,
    headers        {headers_type} DEFAULT NULL,
    event_id       uuid DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
VOLATILE
AS $$
    INSERT INTO {table} (id, aggregate_type, aggregate_id, event_type, payload, headers, deliver_at)
    VALUES (coalesce($7, gen_random_uuid()), $1, $2, $3, $4, $6, $5)
    RETURNING id
$$;

-- cdc_relay_cancel_scheduled_event: delete a scheduled event that has not been moved yet.
-- true: it was there and will never be published (once the caller's transaction commits);
-- false: it was already moved into the outbox (or never scheduled), and is (being) published.
-- Callers need DELETE on the scheduled table.
CREATE OR REPLACE FUNCTION {cancel_function}(event_id uuid) RETURNS boolean
LANGUAGE sql
VOLATILE
AS $$
    WITH gone AS (DELETE FROM {table} WHERE id = $1 RETURNING 1)
    SELECT count(*) > 0 FROM gone
$$;
