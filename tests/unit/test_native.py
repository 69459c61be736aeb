"""The compiled core and its fallback: both implementations give the same results, the
pure-Python one can be forced, and a stale or partial build is never run.

``outcomes()`` lists what the core makes of the captured fixtures (tests/fixtures/pgoutput), of
every prefix and of seeded mutations of their messages, and of the benchmark's frames through
the pipeline: decoded messages, errors with their offsets, records and verdicts, confirmed
positions, as text. The compiled core (this process, when built) must list exactly what the
pure-Python core lists (a child process with CDC_RELAY_PURE_PYTHON=1).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import pytest

from cdc_relay import __version__, cli
from cdc_relay.adapters import native_acks
from cdc_relay.core import native
from cdc_relay.core.lsn import Lsn
from cdc_relay.core.mapping import ColumnMapping, OutboxRecord, TablePlan
from cdc_relay.core.pgoutput import Decoder, Insert, Relation
from cdc_relay.core.pipeline import Pipeline, PipelineConfig
from cdc_relay.errors import RelayError

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "pgoutput"


# --------------------------------------------------------------------------- the same results


def _decode(decoder: Decoder, raw: bytes) -> tuple[object, str]:
    """The message (or None) and what is compared of it: its repr, or the error's."""
    try:
        message = decoder.decode(raw)
    except Exception as exc:  # any other class than DecodeError is a difference too
        return None, f"{type(exc).__name__}: {exc} @ {getattr(exc, 'offset', None)}"
    return message, repr(message)


def _fixture_outcomes(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    proto = data["proto_version"]
    raws = [bytes.fromhex(m["hex"]) for m in data["messages"]]
    out = [f"== {path.stem}"]
    decoder = Decoder(proto)
    plans: dict[int, TablePlan | str] = {}
    states = []
    for raw in raws:
        states.append(decoder.in_stream)
        message, text = _decode(decoder, raw)
        out.append(text)
        if type(message) is Relation:
            try:
                plans[message.relid] = TablePlan(
                    message, ColumnMapping(), "outbox.event.{aggregate_type}"
                )
            except RelayError as exc:
                plans[message.relid] = f"{type(exc).__name__}: {exc}"
        elif type(message) is Insert:
            plan = plans.get(message.relid)
            out.append(repr(plan.map(message.new)) if isinstance(plan, TablePlan) else str(plan))
    # Hostile inputs: every strict prefix, and seeded mutations (the errors' text and offsets
    # are part of the behaviour, and the compiled decoder reads TupleData its own way).
    rng = random.Random(path.stem)
    for raw, in_stream in zip(raws, states, strict=True):
        for cut in range(len(raw)):
            d = Decoder(proto)
            d._in_stream = in_stream
            out.append(_decode(d, raw[:cut])[1])
        for _ in range(40):
            buf = bytearray(raw)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            d = Decoder(proto)
            d._in_stream = in_stream
            out.append(_decode(d, bytes(buf) + rng.randbytes(rng.randint(0, 3)))[1])
    return out


def _pipeline_outcomes() -> list[str]:
    """The benchmark's frames through the pipeline (records, then every one acknowledged)."""
    from bench.hotpath import make_frames

    rng = random.Random(7)
    with mock.patch("uuid.uuid4", lambda: uuid.UUID(int=rng.getrandbits(128), version=4)):
        frames = make_frames(30)
    pipeline = Pipeline(PipelineConfig(outbox_table=("public", "outbox")), start=Lsn(0))
    out, deliveries = [], []
    for frame in frames:
        result = pipeline.feed(frame)
        if type(result) is OutboxRecord:
            out.append(repr(result))
            deliveries.append((pipeline.delivery, result))
        elif result is not None:
            out.append(repr(result))

    class Ack:
        def __init__(self, record: OutboxRecord) -> None:
            self.record = record

        def key(self) -> bytes | None:
            return self.record.key

        def value(self) -> bytes | None:
            return self.record.value

        def __len__(self) -> int:
            return len(self.record.value or b"")

    for delivery, record in deliveries:
        assert delivery is not None
        delivery(None, Ack(record))
        out.append(f"confirmed {pipeline.confirmed} in flight {pipeline.tracker.in_flight_bytes}")
    return out


def outcomes() -> list[str]:
    lines: list[str] = [native.describe()]
    for path in sorted(FIXTURES.glob("*.json")):
        lines += _fixture_outcomes(path)
    return lines + _pipeline_outcomes()


def _run_python(code: str, *, pure: bool, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_PYTHON_ENV}
    env["PYTHONPATH"] = str(root)
    if pure:
        env[native.PURE_PYTHON_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=root,  # first on sys.path for -c: cdc_relay comes from root
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.compiled_core
def test_the_compiled_and_the_pure_python_core_give_the_same_results() -> None:
    code = "import json; from tests.unit.test_native import outcomes; print(json.dumps(outcomes()))"
    pure = json.loads(_run_python(code, pure=True).stdout)
    compiled = outcomes()
    assert pure[0] == "pure-Python core" and compiled[0] == "compiled core: mypyc"
    assert len(compiled) > 10_000
    assert pure[1:] == compiled[1:]


@pytest.mark.compiled_core
def test_every_module_of_the_compiled_core_runs_compiled() -> None:
    for name in native.COMPILED_MODULES:
        module = sys.modules.get(f"cdc_relay.core.{name}") or __import__(
            f"cdc_relay.core.{name}", fromlist=["_"]
        )
        assert module.__file__ is not None
        assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), name


def test_cdc_relay_pure_python_forces_the_interpreted_modules() -> None:
    code = (
        "from cdc_relay.core import native, pgoutput, mapping, acks\n"
        "print(native.IMPLEMENTATION, native.REASON, pgoutput.__file__, mapping._COMPILED)"
    )
    implementation, *reason, path, compiled = _run_python(code, pure=True).stdout.split()
    assert implementation == "pure-Python"
    assert " ".join(reason) == "CDC_RELAY_PURE_PYTHON is set"
    assert path.endswith("pgoutput.py") and compiled == "False"


def _copy_with_edited_source(tmp_path: Path, relative: str, addition: str) -> None:
    """A copy of the built package in ``tmp_path``, one of whose compiled sources is then
    edited (``addition`` appended)."""
    shutil.copytree(ROOT / "cdc_relay", tmp_path / "cdc_relay")
    source = tmp_path / "cdc_relay" / relative
    source.write_text(source.read_text(encoding="utf-8") + addition, encoding="utf-8")


@pytest.mark.compiled_core
def test_an_edited_source_is_never_shadowed_by_its_stale_extension(tmp_path: Path) -> None:
    _copy_with_edited_source(tmp_path, "core/mapping.py", "\nEDITED = True\n")
    code = "from cdc_relay.core import native, mapping; print(native.REASON, '|', mapping.EDITED)"
    result = _run_python(code, pure=False, root=tmp_path)
    assert result.stdout.strip() == "stale build: mapping.py changed since it was compiled | True"
    assert "compiled core not used, running the pure-Python core: stale build" in result.stderr


def test_version_names_the_core(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps it at the terminal's width
    assert out == f"cdc-relay {__version__} ({native.describe()}; {native_acks.describe()})"


# --------------------------------------------------------------------------- the C ack path


@pytest.mark.compiled_core
def test_the_compiled_core_counts_acknowledgements_in_c() -> None:
    module, why = native_acks.load()
    assert (module is not None, why) == (True, None)
    assert native_acks.describe() == "frames, rows and Kafka acks in C"


@pytest.mark.compiled_core
@pytest.mark.parametrize(
    "switches, described",
    [
        ({"CDC_RELAY_READ_IN_PYTHON": "1"}, "rows and Kafka acks in C"),
        ({"CDC_RELAY_ROWS_IN_PYTHON": "1"}, "frames and Kafka acks in C"),
        ({"CDC_RELAY_READ_IN_PYTHON": "1", "CDC_RELAY_ROWS_IN_PYTHON": "1"}, "Kafka acks in C"),
    ],
)
def test_the_version_says_what_the_switches_leave_to_python(
    monkeypatch: pytest.MonkeyPatch, switches: dict[str, str], described: str
) -> None:
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    assert native_acks.describe() == described


def test_the_pure_python_core_counts_acknowledgements_by_callbacks() -> None:
    code = "from cdc_relay.adapters import native_acks; print(native_acks.describe_why())"
    result = _run_python(code, pure=True)
    assert result.stdout.strip() == "Kafka acks by callbacks (the pure-Python core runs)"


@pytest.mark.compiled_core
@pytest.mark.parametrize(
    "source", ["_kafka_acks.c", "_outbox_rows.c", "_copy_reader.c", "_kafka_acks.h"]
)
def test_an_edited_c_source_is_never_run_from_its_stale_extension(
    tmp_path: Path, source: str
) -> None:
    _copy_with_edited_source(tmp_path, f"adapters/{source}", "\n/* edited */\n")
    code = "from cdc_relay.adapters import native_acks; print(native_acks.load()[1])"
    result = _run_python(code, pure=False, root=tmp_path)
    assert result.stdout.strip() == f"stale build: {source} changed since it was compiled"
    assert f"{source} changed since it was compiled" in result.stderr


# --------------------------------------------------------------------------- the build check


def _fake_build(folder: Path, *, manifest: bool = True, skip: str | None = None) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    digests = {}
    for name in ("a", "b"):
        (folder / f"{name}.py").write_text(f"X = {name!r}\n")
        digests[name] = native.source_digest(folder / f"{name}.py")
    for name in ("a", "b", native.GROUP_LIBRARY):
        if name != skip:
            (folder / f"{name}{suffix}").write_bytes(b"")
    if manifest:
        record = {"compiler": "mypyc", "sources": digests}
        (folder / native.MANIFEST).write_text(json.dumps(record))


def test_a_current_build_is_used(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    assert native.check_build(tmp_path, ("a", "b")) == (True, "mypyc")


def test_no_extensions_means_not_built(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("")
    assert native.check_build(tmp_path, ("a",)) == (False, "not built")


def test_a_source_changed_since_the_build_makes_it_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    (tmp_path / "b.py").write_text("X = 'changed'\n")
    assert native.check_build(tmp_path, ("a", "b")) == (
        False,
        "stale build: b.py changed since it was compiled",
    )


def test_a_missing_extension_makes_the_build_incomplete(tmp_path: Path) -> None:
    _fake_build(tmp_path, skip="b")
    usable, why = native.check_build(tmp_path, ("a", "b"))
    assert not usable and why == "incomplete build, no extension for b"


def test_extensions_without_a_manifest_are_not_trusted(tmp_path: Path) -> None:
    _fake_build(tmp_path, manifest=False)
    usable, why = native.check_build(tmp_path, ("a", "b"))
    assert not usable and why.startswith("extensions without a readable native.json")


@pytest.mark.parametrize(
    ("value", "forced"), [("1", True), ("yes", True), ("0", False), ("", False)]
)
def test_the_variable_forces_the_fallback_unless_empty_or_zero(value: str, forced: bool) -> None:
    assert native.forced_pure({native.PURE_PYTHON_ENV: value}) is forced
    assert native.forced_pure({}) is False
