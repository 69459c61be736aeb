"""The build of cdc-relay: the package that pyproject.toml describes plus, when it can be built,
the compiled core: the modules that cdc_relay/core/native.py names, compiled by mypyc into one
extension group.

An install never fails for want of it. Without mypyc, a C compiler or Python's headers, or when
the compilation fails, the package installs with its pure-Python core (the same modules,
interpreted) and this script says why (pip shows it with -v). ``CDC_RELAY_PURE_PYTHON=1`` at
build time skips the compilation on purpose.

The extensions come with a manifest (native.json: the hash of each source compiled), which the
loader checks at import, so that a source edited since the build is never shadowed by a stale
extension (cdc_relay/core/native.py). ``pip install -e`` (``make install``) builds them into the
source tree, where setuptools puts editable extensions.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CORE = Path("cdc_relay", "core")
NATIVE = CORE / "native.py"
GROUP = "cdc_relay.core.native"  # mypyc names its shared library GROUP + "__mypyc"
MANIFEST = "native.json"


def _say(message: str) -> None:
    print(f"cdc-relay build: {message}", file=sys.stderr)


def _constant(name: str) -> Any:
    """A literal assigned at the top of native.py, read without importing the package."""
    for node in ast.parse((HERE / NATIVE).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                assert node.value is not None
                return ast.literal_eval(node.value)
    raise LookupError(f"{NATIVE} has no {name}")


MODULES: tuple[str, ...] = _constant("COMPILED_MODULES")
SOURCES = [str(CORE / f"{name}.py") for name in MODULES]
# The C acknowledgement path (cdc_relay/adapters/native_acks.py), built with the compiled core;
# if it alone fails to compile, the core stays compiled and the callbacks count acknowledgements.
ACKS_FOLDER = Path("cdc_relay", "adapters")
ACKS_SOURCES = [
    ACKS_FOLDER / name for name in ("_kafka_acks.c", "_outbox_rows.c", "_copy_reader.c")
]
ACKS_HEADER = ACKS_FOLDER / "_kafka_acks.h"
ACKS_NAME = "cdc_relay.adapters._kafka_acks"


def _why_not() -> str | None:
    """Why the compiled core cannot be built here, or None."""
    if os.environ.get(_constant("PURE_PYTHON_ENV"), "") not in ("", "0"):
        return "CDC_RELAY_PURE_PYTHON is set"
    if sys.implementation.name != "cpython":
        return f"mypyc compiles for CPython, not {sys.implementation.name}"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy)"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    command = shlex.split(compiler)[:1]
    if not command or shutil.which(command[0]) is None:
        return f"no C compiler ({compiler!r} not found)"
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        return f"Python's C headers are missing ({include}/Python.h; Debian: python3-dev)"
    return None


# What the manifest says of each source: its hash as mypyc read it.
DIGESTS = {
    name: hashlib.sha256((HERE / CORE / f"{name}.py").read_bytes()).hexdigest() for name in MODULES
}
for _source in (*ACKS_SOURCES, ACKS_HEADER):
    DIGESTS[_source.name] = hashlib.sha256((HERE / _source).read_bytes()).hexdigest()


def _extensions() -> list[Any]:
    why = _why_not()
    if why is None:
        from mypyc.build import mypycify

        try:
            # C sources into build/ (mypyc's default), compiled by build_ext below.
            core = list(mypycify(SOURCES, opt_level="3", group_name=GROUP))
        except (Exception, SystemExit) as exc:  # mypyc exits on a type error
            why = f"mypyc failed: {exc!r}"
        else:
            from setuptools import Extension

            # optional: if it alone fails, build_ext warns and goes on without it.
            acks = Extension(
                ACKS_NAME,
                [str(source) for source in ACKS_SOURCES],
                depends=[str(ACKS_HEADER)],
                optional=True,
            )
            return [*core, acks]
    _say(f"the pure-Python core only: {why}")
    return []


class OptionalBuildExt(build_ext):
    """build_ext that leaves the pure-Python core when the compilation fails, and writes the
    manifest next to the extensions when it succeeds."""

    def run(self) -> None:
        if not self.extensions:
            return
        # In place: an editable install (setuptools copies the extensions into the source tree
        # after building them in build_lib).
        inplace = bool(self.inplace)
        try:
            super().run()
        except Exception as exc:  # compiler or linker errors, whatever their class
            _say(f"compiling the core failed, the pure-Python core only: {exc}")
            self._remove_outputs(inplace)
            return
        self._write_manifest(inplace)

    def _folders(self, inplace: bool) -> list[Path]:
        return [Path(self.build_lib, CORE), *([HERE / CORE] if inplace else [])]

    def _write_manifest(self, inplace: bool) -> None:
        import mypy.version

        manifest = {
            "compiler": "mypyc",
            "mypy": mypy.version.__version__,
            "python": sys.version.split()[0],
            "sources": DIGESTS,
        }
        text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        for folder in self._folders(inplace):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / MANIFEST).write_text(text, encoding="utf-8")

    def _remove_outputs(self, inplace: bool) -> None:
        """All or none: no extension of a failed build may be installed (or stay in the source
        tree of an editable install), nor the manifest of an earlier one."""
        for ext in self.extensions:
            path = Path(self.get_ext_filename(ext.name))
            for folder in (Path(self.build_lib), *([HERE] if inplace else [])):
                (folder / path).unlink(missing_ok=True)
        for folder in self._folders(inplace):
            (folder / MANIFEST).unlink(missing_ok=True)


if __name__ == "__main__":  # as setuptools runs it (tests import it to check _why_not)
    setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
