"""Which path counts Kafka's acknowledgements of the read loop's records: the C one
(_kafka_acks.c, a librdkafka interceptor plugin built with the compiled core, no Python object
per report) or confluent-kafka's per-record delivery callbacks (the reference, and the fallback).

The C path runs with the compiled core only: CDC_RELAY_PURE_PYTHON=1 gives the pure-Python core
and the callbacks together, the way the tests run both; CDC_RELAY_ACKS_BY_CALLBACKS=1 keeps the
compiled core with the callbacks (to compare the two, or to rule the C path out). Decided once,
at first use.

The same extension decodes, maps and produces plain outbox inserts (_outbox_rows.c, Rows):
with the C acknowledgement path, unless CDC_RELAY_ROWS_IN_PYTHON=1 leaves every insert to the
pipeline's decoder and TablePlan.map (the reference). And it reads the replication stream's
frames from libpq (_copy_reader.c, CopyReader), unless CDC_RELAY_READ_IN_PYTHON=1 leaves them
to psycopg's get_copy_data (the reference).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn, Protocol

from cdc_relay.core import native

log = logging.getLogger(__name__)

MODULE_NAME = "cdc_relay.adapters._kafka_acks"
CALLBACKS_ENV = "CDC_RELAY_ACKS_BY_CALLBACKS"
ROWS_IN_PYTHON_ENV = "CDC_RELAY_ROWS_IN_PYTHON"
READ_IN_PYTHON_ENV = "CDC_RELAY_READ_IN_PYTHON"
# Its sources; the compiled core's manifest keeps each one's digest under its name (setup.py).
SOURCES = tuple(
    Path(__file__).resolve().with_name(name)
    for name in ("_kafka_acks.c", "_outbox_rows.c", "_copy_reader.c", "_kafka_acks.h")
)


def stale() -> str | None:
    """The name of a C source that is there and differs from what the manifest says was
    compiled, else None."""
    present = [source for source in SOURCES if source.exists()]
    if not present:  # an installed wheel: built from its own sources
        return None
    try:
        manifest = json.loads((native.FOLDER / native.MANIFEST).read_text(encoding="utf-8"))
        digests = dict(manifest["sources"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return present[0].name
    for source in present:
        if digests.get(source.name) != native.source_digest(source):
            return source.name
    return None


@functools.cache
def load() -> tuple[ModuleType | None, str | None]:
    """(the C module, None) when it runs, else (None, why not)."""
    if not native.compiled():
        return None, "the pure-Python core runs"
    if os.environ.get(CALLBACKS_ENV, "") not in ("", "0"):
        return None, f"{CALLBACKS_ENV} is set"
    try:
        module = importlib.import_module(MODULE_NAME)
    except ImportError as exc:
        return None, f"not built ({exc})" if "No module named" in str(exc) else str(exc)
    stale_source = stale()
    if stale_source is not None:
        log.warning(
            "%s changed since it was compiled: Kafka acknowledgements go through "
            "confluent-kafka's callbacks (rebuild with `make install` or `pip install .`)",
            stale_source,
        )
        return None, f"stale build: {stale_source} changed since it was compiled"
    return module, None


def rows_in_c() -> bool:
    """Whether plain inserts go through the C row path (Publisher.rows())."""
    return load()[0] is not None and os.environ.get(ROWS_IN_PYTHON_ENV, "") in ("", "0")


def read_in_c() -> bool:
    """Whether the replication stream's frames are read from libpq in C (CopyReader)."""
    return load()[0] is not None and os.environ.get(READ_IN_PYTHON_ENV, "") in ("", "0")


def libpq_functions(pgconn: object) -> tuple[int, int] | None:
    """The addresses of PQgetCopyData and PQfreemem in the libpq that ``pgconn`` (a psycopg
    PGconn) runs on, or None when they cannot be told. They are looked up through psycopg's own
    extension module, whose dependencies hold its libpq (psycopg-binary bundles one), so
    another libpq in the process can never answer."""
    module = sys.modules.get(type(pgconn).__module__)
    path = getattr(module, "__file__", None) or ""
    if not path.endswith((".so", ".pyd", ".dylib")):  # the ctypes implementation: no module
        return None
    try:
        lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_LAZY)
        functions = (lib.PQgetCopyData, lib.PQfreemem)
    except (OSError, AttributeError):
        return None
    get, free = (ctypes.cast(f, ctypes.c_void_p).value for f in functions)
    return (get, free) if get and free else None


def copy_reader(pgconn: object, on_end: Callable[[int], NoReturn]) -> CopyReader | None:
    """A CopyReader over ``pgconn`` (a psycopg PGconn in COPY BOTH), or None: the frames are
    then read by psycopg's get_copy_data."""
    module, _ = load()
    if module is None or not read_in_c():
        return None
    conn = getattr(pgconn, "pgconn_ptr", None)
    functions = libpq_functions(pgconn)
    if not conn or functions is None:
        log.debug("frames read by psycopg: libpq's functions were not found")
        return None
    reader: CopyReader = module.CopyReader(pgconn, conn, *functions, on_end)
    return reader


class CopyReader(Protocol):
    """_copy_reader.c's CopyReader."""

    def read(self) -> bytes | None: ...

    def stop(self) -> None: ...

    def detach(self) -> None: ...

    def frames(self) -> int: ...


def label() -> str:
    """For the ``acks`` label of cdc_relay_info: ``C`` or ``callbacks``."""
    return "C" if load()[0] is not None else "callbacks"


def describe() -> str:
    """For --version (argparse wraps a long version line, so short): ``frames, rows and Kafka
    acks in C``, without ``frames`` (read in Python) or ``rows`` (decoded in Python) as the
    switches say, or ``Kafka acks by callbacks``."""
    module, _ = load()
    if module is None:
        return "Kafka acks by callbacks"
    in_c = [name for name, on in (("frames", read_in_c()), ("rows", rows_in_c())) if on]
    return f"{', '.join(in_c)} and Kafka acks in C" if in_c else "Kafka acks in C"


def describe_why() -> str:
    """``describe()``, with the reason when the callbacks count acknowledgements."""
    module, why = load()
    return describe() if module is not None else f"{describe()} ({why})"
