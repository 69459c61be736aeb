-- Least privilege for cdc-relay: one role for `setup`, one for `run` (and `prune`).
-- Run as a superuser, connected to the outbox's database (psql -d app -f roles.sql); it is
-- idempotent. Then give each role a password (\password cdc_relay_run) and let it in through
-- pg_hba.conf: a logical replication connection matches a line for its database (not the
-- `replication` keyword, which is for physical replication).
--
-- cdc_relay_run, for `cdc-relay run`: LOGIN REPLICATION and nothing else. The walsender decodes
--   the outbox's inserts from the WAL through the slot, not through the table, so streaming
--   needs no privilege on the table (PostgreSQL checks SELECT only for a subscription's initial
--   table copy, which the relay never makes). Its start-up checks read pg_replication_slots,
--   pg_publication and pg_class, which every role may read.
--   For `cdc-relay prune` it also gets SELECT and DELETE on the outbox table (below); leave
--   those out, or give them to another role, if the sidecar should never delete.
-- cdc_relay_setup, for `cdc-relay setup` and `teardown`: REPLICATION (to create and drop the
--   slot), CREATE on the database (to create the publication), and ownership of the outbox
--   table (CREATE PUBLICATION ... FOR TABLE requires the table's owner). With
--   `setup --create-table` it creates the table and so owns it: for that it gets CREATE on
--   schema public. For an existing table, either make cdc_relay_setup its owner
--   (ALTER TABLE public.outbox OWNER TO cdc_relay_setup, then re-grant INSERT to your service's
--   role) or run `setup` once as the current owner with REPLICATION granted temporarily.
--   Neither role is a superuser.
-- Your services need INSERT on the outbox table (and EXECUTE on cdc_relay_add_event, which
-- PUBLIC has by default); they need no replication rights.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_relay_run') THEN
        CREATE ROLE cdc_relay_run LOGIN REPLICATION;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cdc_relay_setup') THEN
        CREATE ROLE cdc_relay_setup LOGIN REPLICATION;
    END IF;
    EXECUTE format('GRANT CREATE ON DATABASE %I TO cdc_relay_setup', current_database());
END
$$;

GRANT USAGE, CREATE ON SCHEMA public TO cdc_relay_setup;
GRANT USAGE ON SCHEMA public TO cdc_relay_run;

-- prune: on a table that setup creates later ...
ALTER DEFAULT PRIVILEGES FOR ROLE cdc_relay_setup IN SCHEMA public
    GRANT SELECT, DELETE ON TABLES TO cdc_relay_run;
-- ... and on one that exists already.
DO $$
BEGIN
    IF to_regclass('public.outbox') IS NOT NULL THEN
        GRANT SELECT, DELETE ON public.outbox TO cdc_relay_run;
    END IF;
END
$$;
