"""cdc-relay: a transactional-outbox relay from PostgreSQL logical replication to Kafka."""

__version__ = "0.1.0"
