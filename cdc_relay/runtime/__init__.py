"""The driver of `cdc-relay run`: a replication session that feeds the core's pipeline and
performs its actions, and the outer loop of sessions, reconnects and waits."""
