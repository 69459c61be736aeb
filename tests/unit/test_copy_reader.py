"""The C frame reader (cdc_relay/adapters/_copy_reader.c) against what ReplicationStream's
reference read gives for each answer of PQgetCopyData: here libpq's two functions are stood in
for by ctypes callbacks, so every answer, and a warning arriving inside the call, can be
staged; tests/integration/test_copy_reader.py reads a real stream both ways."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any, NoReturn

import pytest

from cdc_relay.adapters import native_acks

pytestmark = pytest.mark.compiled_core

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_LIBC.malloc.restype = ctypes.c_void_p
_LIBC.malloc.argtypes = [ctypes.c_size_t]
_LIBC.free.argtypes = [ctypes.c_void_p]

GET_COPY_DATA = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int
)
FREEMEM = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Ended(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _ended(code: int) -> NoReturn:
    raise Ended(code)


class FakeLibpq:
    """PQgetCopyData answering from ``answers`` (a frame, or 0, -1, -2; a callable runs first,
    as libpq runs the notice receiver inside the call), and a PQfreemem that counts."""

    def __init__(self, answers: list[bytes | int | Callable[[], object]]) -> None:
        self.answers = answers
        self.calls: list[int] = []  # the async argument of each call
        self.outstanding = 0  # buffers handed out and not freed

        def get_copy_data(conn: int, buffer: Any, async_: int) -> int:
            self.calls.append(async_)
            buffer[0] = None
            answer = self.answers.pop(0)
            while callable(answer):
                answer()
                answer = self.answers.pop(0)
            if isinstance(answer, int):
                return answer
            pointer = _LIBC.malloc(len(answer))
            ctypes.memmove(pointer, answer, len(answer))
            buffer[0] = pointer
            self.outstanding += 1
            return len(answer)

        def freemem(pointer: int) -> None:
            self.outstanding -= 1
            _LIBC.free(pointer)

        # Kept: the C side holds only their addresses.
        self._get = GET_COPY_DATA(get_copy_data)
        self._free = FREEMEM(freemem)

    def reader(self, on_end: Callable[[int], NoReturn] = _ended) -> Any:
        module, why = native_acks.load()
        assert module is not None, why
        address = ctypes.cast(self._get, ctypes.c_void_p).value
        free = ctypes.cast(self._free, ctypes.c_void_p).value
        return module.CopyReader(self, 0xC0FFEE, address, free, on_end)


def test_frames_come_as_bytes_none_when_nothing_is_buffered_and_never_blocking() -> None:
    libpq = FakeLibpq([b"w" + bytes(30), 0, b"k" + bytes(17)])
    reader = libpq.reader()
    first = reader.read()
    assert type(first) is bytes and first == b"w" + bytes(30)
    assert reader.read() is None
    assert reader.read() == b"k" + bytes(17)
    assert libpq.calls == [1, 1, 1]  # async: never waits
    assert libpq.outstanding == 0 and reader.frames() == 2


@pytest.mark.parametrize("answer, code", [(-1, -1), (-2, -2), (-3, -2)])
def test_an_ended_copy_or_a_failure_is_on_end_s_to_raise(answer: int, code: int) -> None:
    reader = FakeLibpq([answer]).reader()
    with pytest.raises(Ended) as caught:
        reader.read()
    assert caught.value.code == code


def test_a_warning_inside_the_read_drops_that_frame_and_every_later_one() -> None:
    """The notice handler stops the reader from inside PQgetCopyData, before the frame that
    follows the warning is handed out: that frame is freed, not returned."""
    libpq = FakeLibpq([b"w1", lambda: reader.stop(), b"w2", b"w3"])
    reader = libpq.reader()
    assert reader.read() == b"w1"
    with pytest.raises(Ended) as caught:
        reader.read()
    assert caught.value.code == 0
    with pytest.raises(Ended):
        reader.read()  # stopped: without calling libpq again
    assert libpq.calls == [1, 1] and libpq.outstanding == 0 and libpq.answers == [b"w3"]


def test_a_detached_reader_never_touches_the_connection_again() -> None:
    libpq = FakeLibpq([b"w1"])
    reader = libpq.reader()
    reader.detach()
    with pytest.raises(Ended) as caught:
        reader.read()
    assert caught.value.code == -2 and libpq.calls == []


def test_what_on_end_returns_is_read_s_answer() -> None:
    reader = FakeLibpq([-1]).reader(on_end=lambda code: None)  # type: ignore[arg-type,return-value]
    assert reader.read() is None


def test_a_reader_needs_a_connection_and_both_functions() -> None:
    module, _ = native_acks.load()
    assert module is not None
    with pytest.raises(ValueError, match="null"):
        module.CopyReader(object(), 0, 1, 1, _ended)
    with pytest.raises(TypeError, match="callable"):
        module.CopyReader(object(), 1, 1, 1, None)
