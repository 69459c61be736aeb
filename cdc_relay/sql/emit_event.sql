-- cdc_relay_emit_event: write an outbox event as a logical decoding message, for services that
-- are not written in Python (cdc_relay.outbox.emit_event writes the same bytes). No table: the
-- event exists only in the WAL, inside the caller's transaction, and the relay publishes it
-- when, and only when, that transaction commits. `cdc-relay setup` installs these functions
-- beside the control tables, with {schema} and {prefix} replaced (CDC_RELAY_MESSAGE_PREFIX),
-- and replaces them when the prefix changes. Call them inside the business transaction:
--
--   BEGIN;
--   INSERT INTO orders ...;
--   SELECT cdc_relay_emit_event('order', 'order-42', 'OrderPlaced', '{"total": 12.5}');  -- uuid
--   SELECT cdc_relay_emit_event_bytes('order', 'order-42', 'Raw', '\x00ff'::bytea);   -- any bytes
--   COMMIT;
--
-- The content is the framing of cdc_relay/core/framing.py, version 1 (README, Events as
-- messages). The payload of cdc_relay_emit_event is the jsonb's text as PostgreSQL prints it (as a
-- jsonb outbox column sends it); cdc_relay_emit_event_bytes sends its bytes untouched. A NULL
-- payload is a tombstone. Header values: a JSON string as its text, any other value as its JSON
-- text as PostgreSQL prints it. SECURITY INVOKER (the default): pg_logical_emit_message needs no
-- privilege but EXECUTE, which PUBLIC has.
CREATE OR REPLACE FUNCTION {schema}.cdc_relay_event_frame(
    event_id       text,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        bytea,
    headers        jsonb
) RETURNS bytea
LANGUAGE plpgsql
STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    frame  bytea;
    part   text;
    raw    bytea;
    header record;
BEGIN
    IF aggregate_type IS NULL OR aggregate_id IS NULL OR event_type IS NULL THEN
        RAISE EXCEPTION 'cdc_relay_emit_event: aggregate type, aggregate id and event type must not be NULL';
    END IF;
    IF headers IS NOT NULL AND jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'cdc_relay_emit_event: headers must be a JSON object';
    END IF;
    -- version 1; flags: bit 0 = null payload; the timestamp: the transaction's start, in ms
    frame := '\x01'::bytea
        || CASE WHEN payload IS NULL THEN '\x01'::bytea ELSE '\x00'::bytea END
        || int8send(floor(extract(epoch FROM now()) * 1000)::bigint);
    FOREACH part IN ARRAY ARRAY[event_id, aggregate_type, aggregate_id, event_type] LOOP
        raw := convert_to(part, 'UTF8');
        IF length(raw) > 65535 THEN
            RAISE EXCEPTION 'cdc_relay_emit_event: a field is % bytes, at most 65535 fit', length(raw);
        END IF;
        frame := frame || substring(int4send(length(raw)) FROM 3 FOR 2) || raw;
    END LOOP;
    frame := frame || substring(
        int4send(coalesce((SELECT count(*) FROM jsonb_object_keys(headers)), 0)::int) FROM 3 FOR 2);
    FOR header IN SELECT key, value FROM jsonb_each(coalesce(headers, '{{}}'::jsonb)) LOOP
        raw := convert_to(header.key, 'UTF8');
        frame := frame || substring(int4send(length(raw)) FROM 3 FOR 2) || raw;
        raw := convert_to(
            CASE jsonb_typeof(header.value) WHEN 'string' THEN header.value #>> '{{}}'
                 ELSE header.value::text END,
            'UTF8');
        frame := frame || int4send(length(raw)) || raw;
    END LOOP;
    RETURN frame || coalesce(payload, ''::bytea);
END
$$;

CREATE OR REPLACE FUNCTION {schema}.cdc_relay_emit_event_bytes(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        bytea,
    headers        jsonb DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prefix constant text := {prefix};
    event_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, prefix, {schema}.cdc_relay_event_frame(
        event_id::text, aggregate_type, aggregate_id, event_type, payload, headers));
    RETURN event_id;
END
$$;

CREATE OR REPLACE FUNCTION {schema}.cdc_relay_emit_event(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT NULL
) RETURNS uuid
LANGUAGE sql
VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT {schema}.cdc_relay_emit_event_bytes($1, $2, $3, convert_to($4::text, 'UTF8'), $5)
$$;
