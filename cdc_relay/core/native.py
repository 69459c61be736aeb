"""The compiled core: which of the core's modules setup.py compiles with mypyc, and which
implementation this process runs, decided once when cdc_relay.core is first imported.

The pure-Python sources stay beside the extensions, as the reference and the fallback. An
extension module wins over a .py of the same name in the same folder, so running the pure-Python
modules while extensions exist takes an import hook (``_PurePython``, first on sys.meta_path).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

log = logging.getLogger(__name__)

# The modules compiled together into one extension group, in cdc_relay/core/. Adding a module
# to the compiled core is one line here (setup.py reads this tuple). All or none of them run
# compiled: compiled modules reach each other's classes natively, so a compiled mapping cannot
# work with an interpreted pgoutput's Relation.
COMPILED_MODULES: Final = (
    "lsn",
    "verdicts",
    "copydata",
    "pgoutput",
    "mapping",
    "acks",
    "pipeline",
    "stats",
    "transactions",
    "progress",
)

PURE_PYTHON_ENV: Final = "CDC_RELAY_PURE_PYTHON"
MANIFEST: Final = "native.json"  # written by setup.py next to the extensions it built
GROUP_LIBRARY: Final = "native__mypyc"  # mypyc's shared library of the group (setup.py)
PACKAGE: Final = "cdc_relay.core"
MYPYC: Final = "mypyc"
PURE_PYTHON: Final = "pure-Python"

FOLDER: Final = Path(__file__).resolve().parent


def source_digest(path: Path) -> str:
    """What the manifest records of a compiled module's source."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def forced_pure(environ: Mapping[str, str] = os.environ) -> bool:
    """CDC_RELAY_PURE_PYTHON set to anything but "" or "0"."""
    return environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def _extension(folder: Path, name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def check_build(folder: Path, modules: Sequence[str] = COMPILED_MODULES) -> tuple[bool, str]:
    """Whether the compiled modules in ``folder`` may run: each built for this Python, and from
    the source that is there now. (True, compiler) or (False, why not)."""
    extensions = [_extension(folder, name) for name in (*modules, GROUP_LIBRARY)]
    if not any(extensions):
        return False, "not built"
    if not all(extensions):
        missing = [n for n, e in zip((*modules, GROUP_LIBRARY), extensions, strict=True) if not e]
        return False, "incomplete build, no extension for " + ", ".join(missing)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        digests: dict[str, str] = manifest["sources"]
        compiler = str(manifest["compiler"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"extensions without a readable {MANIFEST} (an unknown build)"
    stale = [
        f"{name}.py"
        for name in modules
        if digests.get(name) != source_digest(folder / f"{name}.py")
    ]
    if stale:
        return False, "stale build: " + ", ".join(stale) + " changed since it was compiled"
    return True, compiler


class _PurePython(importlib.abc.MetaPathFinder):
    """Finds the pure-Python source of each compiled module, ahead of its extension."""

    def __init__(self, folder: Path, modules: Sequence[str]) -> None:
        self._paths = {f"{PACKAGE}.{name}": folder / f"{name}.py" for name in modules}

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _select() -> tuple[str, str | None]:
    """(implementation, why the pure-Python one when it is that)."""
    if forced_pure():
        usable, why = False, f"{PURE_PYTHON_ENV} is set"
    else:
        usable, why = check_build(FOLDER)
        if usable:
            try:
                importlib.import_module(f"{PACKAGE}.{GROUP_LIBRARY}")
            except ImportError as exc:
                usable, why = False, f"the compiled modules do not load: {exc}"
                log.warning("compiled core unusable, running the pure-Python core: %s", why)
        elif why.startswith(("stale", "incomplete", "extensions without")):
            log.warning(
                "compiled core not used, running the pure-Python core: %s (rebuild it with "
                "`make install` or `pip install .`)",
                why,
            )
    if usable:
        return why, None
    if _extension(FOLDER, GROUP_LIBRARY) or any(_extension(FOLDER, m) for m in COMPILED_MODULES):
        sys.meta_path.insert(0, _PurePython(FOLDER, COMPILED_MODULES))
    return PURE_PYTHON, why


IMPLEMENTATION: str
"""``mypyc`` when the compiled modules run, else ``pure-Python``."""
REASON: str | None
"""Why the pure-Python core runs ("not built", "CDC_RELAY_PURE_PYTHON is set", …)."""
IMPLEMENTATION, REASON = _select()


def compiled() -> bool:
    return IMPLEMENTATION != PURE_PYTHON


def describe() -> str:
    """For --version, logs and metrics: ``compiled core: mypyc``, ``pure-Python core``."""
    return f"compiled core: {IMPLEMENTATION}" if compiled() else "pure-Python core"


def describe_why() -> str:
    """``describe()``, with the reason when the pure-Python core runs."""
    return describe() if REASON is None else f"{describe()} ({REASON})"
