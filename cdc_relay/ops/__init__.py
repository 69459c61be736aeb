"""Operator commands: setup, status and teardown of the slot and publication, prune."""
