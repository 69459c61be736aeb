-- A hash-partitioned outbox, to scale out past one replication slot. N partitions
-- outbox_p0 .. outbox_p<N-1> by hash of aggregate_id: every event of an aggregate lands in the
-- same partition, so one relay per partition keeps per-aggregate order. Each relay streams one
-- partition through its own publication and slot; PostgreSQL publishes a partition's inserts
-- under the partition's own name (publish_via_partition_root only names the root when the root
-- itself is in the publication), so each relay's CDC_RELAY_OUTBOX_TABLE names its partition.
-- Written for public.outbox. Services insert into public.outbox as usual.
--
-- Run once, as the role that will own the table (e.g. cdc_relay_setup), instead of
-- `setup --create-table`. N comes from the setting cdc_relay.partitions (default 4; run again
-- without it, the script keeps the partitions the table has):
--   psql -d app -c 'SET cdc_relay.partitions = 8' -f sql/outbox_hash.sql
-- Then, for each partition i in 0 .. N-1, one relay with its own three settings
--   CDC_RELAY_OUTBOX_TABLE=public.outbox_p<i>
--   CDC_RELAY_SLOT_NAME=cdc_relay_p<i>  CDC_RELAY_PUBLICATION_NAME=cdc_relay_p<i>
-- runs `cdc-relay setup` (publication FOR TABLE public.outbox_p<i>, its slot) and
-- `cdc-relay run`; `cdc-relay prune` and `status` with the same settings work per partition.
-- Keep every relay's CDC_RELAY_TOPIC_TEMPLATE the same and free of {table}: an aggregate's
-- events then go to one topic with one key, whichever relay carries them.
--
-- N is fixed while rows are published: a different modulus moves aggregates between
-- partitions, hence between relays, and their order would then depend on two slots. The
-- function below refuses to mix moduli. Events of one transaction that touch aggregates of
-- different partitions are published by different relays, each in commit order, with no order
-- between them.
CREATE TABLE IF NOT EXISTS public.outbox (
    id             uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- A partitioned table's unique keys must contain the partition key.
    PRIMARY KEY (id, aggregate_id)
) PARTITION BY HASH (aggregate_id);

-- Create the missing partitions outbox_p0 .. outbox_p<partitions-1> (MODULUS partitions);
-- partitions NULL: the modulus the table already has, or 4 for a table without partitions.
CREATE OR REPLACE FUNCTION public.cdc_relay_outbox_hash_partitions(partitions int DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
    other text;
    bound text;
    remainder int;
    name text;
BEGIN
    IF partitions IS NULL THEN
        SELECT coalesce(max((regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                          'modulus (\d+)', 'i'))[1]::int), 4)
        INTO partitions
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'public.outbox'::regclass;
    END IF;
    IF partitions < 1 THEN
        RAISE EXCEPTION 'partitions must be at least 1, not %', partitions;
    END IF;
    SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) INTO other, bound
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'public.outbox'::regclass
      AND pg_get_expr(c.relpartbound, c.oid) !~* ('\mmodulus ' || partitions || ',')
    LIMIT 1;
    IF other IS NOT NULL THEN
        RAISE EXCEPTION 'public.outbox already has partition % of another modulus (%)', other, bound
            USING HINT = 'the number of partitions is fixed once events flow: see outbox_hash.sql';
    END IF;
    FOR remainder IN 0 .. partitions - 1 LOOP
        name := 'outbox_p' || remainder;
        IF to_regclass(format('public.%I', name)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE public.%I PARTITION OF public.outbox '
                'FOR VALUES WITH (MODULUS %s, REMAINDER %s)', name, partitions, remainder);
            RETURN NEXT 'created ' || name;
        END IF;
    END LOOP;
END
$$;

-- Which partition (and so which relay) carries an aggregate's events, e.g. for a support
-- question: SELECT cdc_relay_outbox_partition_for('order-42');
CREATE OR REPLACE FUNCTION public.cdc_relay_outbox_partition_for(aggregate_id text)
RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    'modulus (\d+), remainder (\d+)', 'i') AS bound
    WHERE i.inhparent = 'public.outbox'::regclass
      AND satisfies_hash_partition('public.outbox'::regclass, bound[1]::int, bound[2]::int,
                                   aggregate_id)
$$;

SELECT public.cdc_relay_outbox_hash_partitions(
    nullif(current_setting('cdc_relay.partitions', true), '')::int);
