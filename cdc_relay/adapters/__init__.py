"""The I/O edges: the replication connection, the Kafka producer, ordinary database access,
the HTTP endpoint with its metrics, and the lag sampler. Thin: decisions live in the core."""
