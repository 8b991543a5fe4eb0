"""The host copy engine (gs_copy, host-slot mode) alone: bytes, padding,
FIFO order, completion, drain. No engine, no llama.cpp."""
import time

import pytest

from gguf_stream._native import ffi, lib


class Host:
    """A host copy engine and the memory its copies read and write (kept alive)."""

    def __init__(self, n_slots=2, delay_us=0):
        out = ffi.new("gs_copy **")
        assert lib.gs_copy_create_host(n_slots, delay_us, out) == lib.GS_OK
        self.c, self._keep = out[0], []

    def pieces(self, *parts):
        """parts: (source bytes, alloc, offset); the pieces live as long as the engine."""
        arr = ffi.new("gs_piece[]", len(parts))
        for p, (data, alloc, offset) in zip(arr, parts):
            src = ffi.from_buffer(bytearray(data))
            self._keep.append(src)
            p.src, p.nbytes, p.alloc, p.offset = src, len(data), alloc, offset
        self._keep.append(arr)
        return arr, len(parts)

    def issue(self, slot, dst, *parts):
        assert lib.gs_copy_issue(self.c, slot, dst, *self.pieces(*parts)) == lib.GS_OK

    def done(self, slot):
        out = ffi.new("int *")
        assert lib.gs_copy_done(self.c, slot, out) == lib.GS_OK
        return bool(out[0])

    def wait(self, slot):
        assert lib.gs_copy_wait(self.c, slot) == lib.GS_OK

    def drain(self):
        assert lib.gs_copy_drain(self.c) == lib.GS_OK

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        lib.gs_copy_destroy(self.c)


def buffer(n, fill=0xAA):
    return ffi.new("char[]", bytes([fill]) * n)


@pytest.mark.parametrize("put", [False, True])
def test_a_copy_writes_each_piece_and_zeroes_its_padding(put):
    with Host() as h:
        dst = buffer(64)
        parts = [(b"abcdef", 8, 0), (b"XYZ", 3, 16), (b"12", 10, 32)]
        if put:  # outside the slots: done when it returns
            assert lib.gs_copy_put(h.c, dst, *h.pieces(*parts)) == lib.GS_OK
        else:
            h.issue(1, dst, *parts)
            h.wait(1)
        got = ffi.buffer(dst, 64)[:]
    pad = b"\xaa"
    assert got == (b"abcdef" + b"\0" * 2 + pad * 8 + b"XYZ" + pad * 13 + b"12" + b"\0" * 8 + pad * 22)


def test_copies_land_in_issue_order():
    """One worker, FIFO: a later copy to the same place wins, and a slot's
    copy has landed once a later slot's has."""
    with Host(n_slots=3, delay_us=2000) as h:
        dst = buffer(4)
        for slot, data in [(0, b"aaaa"), (1, b"bbbb"), (2, b"cccc"), (0, b"dddd")]:
            h.issue(slot, dst, (data, 4, 0))
        h.wait(0)          # its last copy, the fourth
        assert ffi.buffer(dst, 4)[:] == b"dddd"
        assert h.done(1) and h.done(2)


def test_done_and_wait_follow_the_slots_last_copy():
    with Host(n_slots=2, delay_us=100_000) as h:
        dst = buffer(4)
        assert h.done(0) and h.done(1)  # nothing issued yet
        h.issue(0, dst, (b"wxyz", 4, 0))
        assert not h.done(0)            # the worker sleeps 0.1 s after each copy
        assert h.done(1)
        t0 = time.perf_counter()
        h.wait(0)
        assert time.perf_counter() - t0 > 0.01 and h.done(0)


def test_drain_waits_for_every_copy_and_a_full_queue_waits_for_room():
    """The queue holds 4 * n_slots + 8 copies; issuing more blocks until there is room."""
    with Host(n_slots=1, delay_us=200) as h:
        dst = buffer(1)
        for k in range(40):
            h.issue(0, dst, (bytes([k]), 1, 0))
        h.drain()
        assert h.done(0) and ffi.buffer(dst, 1)[:] == bytes([39])


def test_destroy_lets_queued_copies_land():
    dst = buffer(1)
    with Host(n_slots=1, delay_us=5000) as h:
        for k in range(5):
            h.issue(0, dst, (bytes([k + 1]), 1, 0))
    assert ffi.buffer(dst, 1)[:] == b"\x05"


def test_bad_arguments():
    with Host(n_slots=2) as h:
        assert lib.gs_copy_wait(h.c, 2) == lib.GS_E_INVALID
        assert "slot 2 out of range" in ffi.string(lib.gs_last_error()).decode()
        assert lib.gs_copy_issue(h.c, -1, ffi.NULL, ffi.NULL, 0) == lib.GS_E_INVALID
    out = ffi.new("gs_copy **")
    assert lib.gs_copy_create_host(0, 0, out) == lib.GS_E_INVALID and out[0] == ffi.NULL


def test_cuda_engine_needs_the_cuda_runtime():
    from gguf_stream.config import load_native

    if load_native(want_cuda=True):
        pytest.skip("the CUDA runtime is loaded here")
    out = ffi.new("gs_copy **")
    assert lib.gs_copy_create_cuda(0, 2, out) == lib.GS_E_INVALID
    assert "CUDA runtime is not loaded" in ffi.string(lib.gs_last_error()).decode()
