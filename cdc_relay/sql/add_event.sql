-- cdc_relay_add_event: the producer helper for services that are not written in Python.
-- Run once (psql -f add_event.sql) as the owner of the outbox table; it is written for the
-- default table public.outbox and columns: edit the INSERT if CDC_RELAY_OUTBOX_TABLE or the
-- CDC_RELAY_COLUMN_* settings differ. Call it inside the transaction that writes the business
-- rows; it returns the new event id:
--
--   BEGIN;
--   INSERT INTO orders ...;
--   SELECT cdc_relay_add_event('order', 'order-42', 'OrderPlaced', '{"total": 12.5}');
--   COMMIT;
--
-- SECURITY INVOKER (the default): callers need INSERT on the outbox table, nothing more.
CREATE OR REPLACE FUNCTION public.cdc_relay_add_event(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
VOLATILE
AS $$
    INSERT INTO public.outbox (id, aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (gen_random_uuid(), $1, $2, $3, $4, $5)
    RETURNING id
$$;
