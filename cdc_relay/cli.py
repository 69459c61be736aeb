"""The ``cdc-relay`` command: argument parsing, exit codes, one-line errors.

Exit codes: 0 success, 2 configuration or usage error, 1 anything else; `status` also 3 when
the slot or the publication does not exist and 4 when the slot is lost. Errors are one line
on stderr; ``--debug`` adds the traceback and debug logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import psycopg

from cdc_relay import __version__
from cdc_relay.adapters import native_acks
from cdc_relay.adapters.database import connect, describe_psycopg_error
from cdc_relay.core import native
from cdc_relay.errors import ConfigError, RelayError
from cdc_relay.logs import REDACT, configure_logging
from cdc_relay.ops import admin
from cdc_relay.settings import Settings, is_secret_property, load_settings

log = logging.getLogger("cdc_relay")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# `status`, for monitoring scripts: nothing to watch here yet / the slot is gone for good.
EXIT_NOT_SET_UP, EXIT_SLOT_LOST = 3, 4
_STATUS_EXIT = {"ok": EXIT_OK, "not_set_up": EXIT_NOT_SET_UP, "lost": EXIT_SLOT_LOST}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logs and tracebacks",
    )
    parser = argparse.ArgumentParser(
        prog="cdc-relay",
        description="Transactional outbox relay: PostgreSQL WAL (pgoutput) to Kafka. "
        "Configured by CDC_RELAY_* environment variables.",
        parents=[common],
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"cdc-relay {__version__} ({native.describe()}; {native_acks.describe()})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    setup = commands.add_parser(
        "setup", parents=[common], help="check the database, create the publication and slot"
    )
    setup.add_argument(
        "--create-table", action="store_true", help="create the outbox table if it is missing"
    )
    commands.add_parser("run", parents=[common], help="relay outbox inserts to Kafka until stopped")
    status = commands.add_parser("status", parents=[common], help="show the slot and publication")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--watch",
        nargs="?",
        type=_positive_seconds,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    teardown = commands.add_parser(
        "teardown", parents=[common], help="drop the slot and the publication"
    )
    teardown.add_argument("--yes", action="store_true", help="confirm the teardown")
    prune = commands.add_parser(
        "prune", parents=[common], help="delete outbox rows the relay has confirmed, in batches"
    )
    prune.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 7d, 12h, 30m, 0s")
    prune.add_argument("--batch-size", default="1000", metavar="N", help="rows per transaction")
    prune.add_argument(
        "--wait", default="60s", metavar="AGE", help="how long to wait for the slot to catch up"
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    skip = commands.add_parser(
        "skip",
        parents=[common],
        help="dead-letter the one event that halted the relay, instead of delivering it",
    )
    skip.add_argument(
        "--lsn", required=True, metavar="X/Y", help="the event's WAL position, from the halt line"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    configure_logging(debug=debug)
    stop_requested = threading.Event()
    if args.command == "run":
        # Before anything slow: a SIGTERM during start-up then means "stop", not a crash.
        _install_stop_handlers(stop_requested)
    try:
        settings = load_settings()
        _register_secrets(settings)
        configure_logging(debug=debug, log_format=settings.log_format)
        if args.command == "run":
            return _run(settings, stop_requested)
        return _dispatch(args, settings)
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except RelayError as exc:
        return _fail(exc, EXIT_FAILURE, debug)
    except psycopg.Error as exc:
        return _fail(f"database error: {describe_psycopg_error(exc)}", EXIT_FAILURE, debug)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", EXIT_FAILURE, debug)


def _fail(error: BaseException | str, code: int, debug: bool) -> int:
    if debug and isinstance(error, BaseException):
        log.exception("cdc-relay failed")
    elif debug:
        log.debug("cdc-relay failed", exc_info=True)
    print(f"cdc-relay: error: {REDACT(str(error))}", file=sys.stderr)
    return code


def _register_secrets(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    # The settings already refused a URL that does not parse.
    password = psycopg.conninfo.conninfo_to_dict(url).get("password")
    REDACT.add(str(password) if password else None)
    for key, value in settings.kafka_config.items():
        if is_secret_property(key):
            REDACT.add(str(value))


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "prune":
        return _prune(args, settings)
    if args.command == "teardown" and not args.yes:
        raise ConfigError("teardown drops the slot and the publication: add --yes to confirm")
    with connect(settings.database_url.get_secret_value()) as conn:
        if args.command == "setup":
            admin.setup(conn, settings, create_table=args.create_table, say=print)
        elif args.command == "status" and args.watch is not None:
            _watch_status(conn, settings, args.json, args.watch)
        elif args.command == "status":
            report = admin.status(conn, settings)
            print(json.dumps(report) if args.json else admin.format_status(report))
            return _STATUS_EXIT[report["health"]]
        elif args.command == "teardown":
            admin.teardown(conn, settings, say=print)
        elif args.command == "skip":
            from cdc_relay.ops import skip

            skip.skip(conn, settings, args.lsn, say=print)
    return EXIT_OK


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _watch_status(conn: admin.Connection, settings: Settings, as_json: bool, every: float) -> None:
    """Refresh in place (on a terminal: home the cursor and clear the screen) until Ctrl-C or
    SIGTERM; with --json, one object per line.

    The signals only set a flag, checked between refreshes: an interrupt raised inside a query
    would make psycopg cancel it and fail with QueryCanceled, and one raised inside a blocked
    write to a full terminal would leave the goodbye newline blocked too."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    clear = sys.stdout.isatty() and not as_json
    while not stop.is_set():
        report = admin.status(conn, settings)
        if as_json:
            text = json.dumps(report)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = f"{admin.format_status(report)}\n\n{stamp}, every {every:g} s (Ctrl-C stops)"
        print(("\x1b[H\x1b[2J" if clear else "") + text, flush=True)
        stop.wait(every)


def _install_stop_handlers(stop_requested: threading.Event) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop_requested.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            raise SystemExit(EXIT_FAILURE)
        log.info("received %s: finishing in-flight deliveries", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _run(settings: Settings, stop_requested: threading.Event) -> int:
    from cdc_relay.adapters.http import MetricsServer  # the producer stack is only needed here
    from cdc_relay.adapters.metrics import registry_for
    from cdc_relay.runtime.relay import Relay

    log.debug(
        "cdc-relay %s, %s, %s", __version__, native.describe_why(), native_acks.describe_why()
    )
    relay = Relay(settings, stop_requested=stop_requested)
    server = None
    if settings.http_port:
        registry = registry_for(
            relay.stats,
            slot=settings.slot_name,
            publication=settings.publication_name,
            scheduled=relay.scheduled_stats if settings.scheduled else None,
        )
        server = MetricsServer(settings.http_host, settings.http_port, relay.stats, registry)
        server.start()
    try:
        relay.run()
    finally:
        if server is not None:
            server.stop()
    return EXIT_OK


def _prune(args: argparse.Namespace, settings: Settings) -> int:
    from cdc_relay.ops.prune import parse_duration, prune

    try:
        older_than, wait = parse_duration(args.older_than), parse_duration(args.wait)
    except ValueError as exc:
        raise ConfigError(f"prune: {exc}") from None
    if not args.batch_size.isdigit() or int(args.batch_size) < 1:
        raise ConfigError("prune: --batch-size must be a whole number of at least 1")
    batch_size = int(args.batch_size)
    tables = settings.per_table()
    if not tables:
        raise ConfigError(
            "prune: CDC_RELAY_OUTBOX_TABLE is empty; events written as messages leave nothing "
            "to prune"
        )
    with connect(settings.database_url.get_secret_value()) as conn:
        for table in tables:
            if len(tables) > 1:
                print(f"table {table.outbox_table}:")
            prune(
                conn,
                table,
                older_than=older_than,
                batch_size=batch_size,
                wait_seconds=wait.total_seconds(),
                dry_run=args.dry_run,
                say=print,
                claim_check_over_bytes=settings.claim_check_over_bytes,
                claim_check_retention=settings.claim_check_retention,
            )
    return EXIT_OK
