"""One exception tree, in one module (bug 10: error classes were spread over several modules,
and MissingEventId derived from ValueError)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import cdc_relay
from cdc_relay import errors

PACKAGE = Path(cdc_relay.__file__).parent


def test_every_error_class_is_defined_in_errors_py():
    elsewhere = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(base) for base in node.bases}
                if any(b.endswith(("Error", "Exception")) or "Error" in b for b in bases):
                    elsewhere.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert elsewhere == []


def test_every_error_derives_from_relay_error_and_nothing_else():
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ == errors.__name__ and cls is not errors.RelayError:
            assert issubclass(cls, errors.RelayError), name
            assert not issubclass(cls, ValueError), name


def test_client_helpers_raise_from_the_same_tree():
    from cdc_relay.inbox import MissingEventId, event_id_of
    from cdc_relay.outbox import NotInTransaction

    assert MissingEventId is errors.MissingEventId
    assert NotInTransaction is errors.NotInTransaction
    try:
        event_id_of([("x", b"1")])
    except errors.RelayError as exc:
        assert "no `id` header" in str(exc)
