"""The build (setup.py) never fails for want of the compiled core: without a compiler it says
why and installs the pure-Python core, and a compilation that fails leaves nothing of it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _setup_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cdc_relay_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: setup() is not called
    return module


def test_the_build_reads_the_modules_to_compile_from_native_py() -> None:
    from cdc_relay.core import native

    setup = _setup_module()
    assert setup.MODULES == native.COMPILED_MODULES
    assert f"{native.PACKAGE}.{native.GROUP_LIBRARY}" == setup.GROUP + "__mypyc"


def test_no_compiler_means_the_pure_python_core(monkeypatch: pytest.MonkeyPatch) -> None:
    setup = _setup_module()
    monkeypatch.delenv("CDC_RELAY_PURE_PYTHON", raising=False)
    monkeypatch.setenv("CC", "no-such-cc --flag")
    assert setup._why_not() == "no C compiler ('no-such-cc --flag' not found)"
    monkeypatch.setenv("CDC_RELAY_PURE_PYTHON", "1")
    assert setup._why_not() == "CDC_RELAY_PURE_PYTHON is set"


def _sources(into: Path) -> Path:
    """What `pip install .` needs of the project, copied (the build writes into its tree)."""
    into.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, into / name)
    shutil.copytree(
        ROOT / "cdc_relay",
        into / "cdc_relay",
        ignore=shutil.ignore_patterns("*.so", "native.json", "__pycache__"),
    )
    return into


@pytest.mark.parametrize(
    ("compiler", "said"),
    [
        ("no-such-cc", "the pure-Python core only: no C compiler"),
        # A compiler that is there but fails: mypyc generates the C, the compilation fails.
        ("false", "compiling the core failed, the pure-Python core only"),
    ],
)
def test_a_machine_without_a_working_compiler_installs_the_pure_python_core(
    tmp_path: Path, compiler: str, said: str
) -> None:
    project = _sources(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k != "CDC_RELAY_PURE_PYTHON"}
    env["CC"] = compiler
    # As a fresh machine installs it: pip, build isolation (setuptools, mypy from the index or
    # pip's cache), a wheel, then the wheel installed.
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), "."],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert said in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("cdc_relay-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cdc_relay/core/pgoutput.py" in names
    assert not [n for n in names if n.endswith(".so") or n.endswith("native.json")]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel],
        check=True,
        env=env,
    )
    code = "from cdc_relay.core import native, pgoutput; print(native.REASON, pgoutput.__file__)"
    ran = subprocess.run(
        [sys.executable, "-c", code],
        cwd=target,
        env={**env, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout.split() == ["not", "built", str(target / "cdc_relay/core/pgoutput.py")]
