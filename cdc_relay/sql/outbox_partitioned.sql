-- A time-partitioned outbox: daily range partitions on created_at (UTC days), so that retention
-- is DROP TABLE of a whole day instead of DELETEs. Run once instead of `setup --create-table`
-- (psql -f outbox_partitioned.sql), then `cdc-relay setup`: it sees a partitioned table and
-- creates the publication WITH (publish_via_partition_root = true), so that events carry the
-- root table's name whichever partition a row lands in. Written for public.outbox.
--
-- Schedule the maintenance once a day (pg_cron, cron + psql, or your job runner):
--   SELECT * FROM cdc_relay_outbox_maintain(days_ahead => 3, keep_days => 7);
-- It creates the partitions of yesterday through today + days_ahead (a transaction that began
-- before midnight stamps created_at with yesterday) and drops those older than keep_days.
-- An insert for a day without a partition fails loudly: keep days_ahead above your scheduling
-- gaps. Dropping a partition emits nothing (the publication carries inserts only). Drop only
-- what the relay has confirmed: keep_days far above the relay's lag (`cdc-relay status`).
CREATE TABLE IF NOT EXISTS public.outbox (
    id             uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- A partitioned table's unique keys must contain the partition key.
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

-- Create the daily partitions outbox_YYYYMMDD for first_day .. last_day (UTC) that are missing.
CREATE OR REPLACE FUNCTION public.cdc_relay_outbox_create_partitions(first_day date, last_day date)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    name text;
BEGIN
    FOR day IN SELECT d::date FROM generate_series(first_day, last_day, interval '1 day') AS d LOOP
        name := 'outbox_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE public.%I PARTITION OF public.outbox FOR VALUES FROM (%L) TO (%L)',
                name, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            RETURN NEXT 'created ' || name;
        END IF;
    END LOOP;
END
$$;

-- Drop the daily partitions of days before (today - keep_days), UTC. keep_days >= 1.
CREATE OR REPLACE FUNCTION public.cdc_relay_outbox_drop_partitions(keep_days int)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    part record;
BEGIN
    IF keep_days < 1 THEN
        RAISE EXCEPTION 'keep_days must be at least 1 (yesterday''s partition is still written to)';
    END IF;
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'public.outbox'::regclass
          AND c.relname ~ '^outbox_[0-9]{8}$'
          AND to_date(substr(c.relname, 8), 'YYYYMMDD')
              < (now() AT TIME ZONE 'UTC')::date - keep_days
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE public.%I', part.relname);
        RETURN NEXT 'dropped ' || part.relname;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION public.cdc_relay_outbox_maintain(days_ahead int DEFAULT 3, keep_days int DEFAULT 7)
RETURNS SETOF text
LANGUAGE sql AS $$
    SELECT public.cdc_relay_outbox_create_partitions(
        (now() AT TIME ZONE 'UTC')::date - 1, (now() AT TIME ZONE 'UTC')::date + days_ahead)
    UNION ALL
    SELECT public.cdc_relay_outbox_drop_partitions(keep_days)
$$;

SELECT public.cdc_relay_outbox_maintain();
