"""The disk tier's native parts alone: gs_file (identity checks, reads,
faults), and the copy engines reading file pieces into a slot: the host
engine's direct reads and the staged engine (the CUDA path's readers and
staging buffers, here over memcpy), with chunks smaller than a piece, one
reader or several. No engine, no llama.cpp."""
import os
import threading
import time

import pytest

from gguf_stream._native import ffi, lib

DATA = bytes(range(256)) * 64  # 16 KiB, every offset distinguishable


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(DATA)
    return path


def open_file(path, size=None, mtime_ns=None):
    st = os.stat(path) if size is None or mtime_ns is None else None
    out = ffi.new("gs_file **")
    rc = lib.gs_file_open(str(path).encode(), st.st_size if size is None else size,
                          st.st_mtime_ns if mtime_ns is None else mtime_ns, out)
    return rc, out[0]


def last_error() -> str:
    return ffi.string(lib.gs_last_error()).decode()


def read(f, n, offset):
    buf = ffi.new("char[]", max(n, 1))
    rc = lib.gs_file_read(f, buf, n, offset)
    return rc, ffi.buffer(buf, n)[:]


def test_reads_the_bytes_at_the_offset_and_counts_them(data_file):
    rc, f = open_file(data_file)
    assert rc == lib.GS_OK
    try:
        assert read(f, 1000, 4097) == (lib.GS_OK, DATA[4097:5097])
        assert read(f, len(DATA), 0) == (lib.GS_OK, DATA)
        reads, nbytes, seconds = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("double *")
        assert lib.gs_file_get_stats(f, reads, nbytes, seconds) == lib.GS_OK
        assert (reads[0], nbytes[0]) == (2, 1000 + len(DATA)) and seconds[0] >= 0
    finally:
        lib.gs_file_close(f)


def test_open_refuses_another_file(data_file):
    st = os.stat(data_file)
    for size, mtime in ((st.st_size + 1, st.st_mtime_ns), (st.st_size, st.st_mtime_ns + 1)):
        rc, f = open_file(data_file, size, mtime)
        assert rc == lib.GS_E_IO and f == ffi.NULL
        assert "changed while the model was loaded" in last_error() and str(data_file) in last_error()
    rc, _ = open_file(data_file.parent / "missing.bin", 1, 1)
    assert rc == lib.GS_E_IO and "No such file" in last_error()


def test_read_past_the_end_is_refused(data_file):
    rc, f = open_file(data_file)
    try:
        rc, _ = read(f, 100, len(DATA) - 50)
        assert rc == lib.GS_E_IO and "past the end" in last_error()
    finally:
        lib.gs_file_close(f)


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_file_changed_underneath_fails_every_later_read(data_file, change):
    rc, f = open_file(data_file)
    try:
        assert read(f, 64, 0)[0] == lib.GS_OK
        st = os.stat(data_file)
        if change == "truncate":
            os.truncate(data_file, len(DATA) // 2)
        else:  # same size, other bytes: only the modification time tells
            data_file.write_bytes(bytes(len(DATA)))
            os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        rc, _ = read(f, 64, 0)  # even a read of bytes that are still there
        assert rc == lib.GS_E_IO and "changed while the model was loaded" in last_error()
        assert "reload the model" in last_error() and "\n" not in last_error()
    finally:
        lib.gs_file_close(f)


# the engines under test: the host one, and the staged one as (chunk bytes,
# reader threads, staging buffers); 48-byte chunks: every piece below is cut
# into chunks and the staging buffers are reused many times within one copy;
# more readers than buffers: reads wait for buffers, not only for uploads
ENGINES = {"host": None, "staged": (4096, 1, 2), "staged-small-chunks": (48, 1, 2),
           "parallel-small-chunks": (48, 4, 6), "parallel-few-buffers": (48, 8, 3)}


class HostWithFile:
    """A host copy engine (direct or staged) whose file pieces read data_file."""

    def __init__(self, f, n_slots=2, chunk=None):
        out = ffi.new("gs_copy **")
        if isinstance(chunk, int):
            chunk = (chunk, 1, 2)
        rc = (lib.gs_copy_create_host(n_slots, 0, out) if chunk is None
              else lib.gs_copy_create_host_staged(n_slots, chunk[0], chunk[2], chunk[1], 0, out))
        assert rc == lib.GS_OK, last_error()
        self.c, self.f, self._keep = out[0], f, []

    def pieces(self, *parts):
        """parts: (file offset, nbytes, alloc, slot offset), or (bytes, alloc, slot offset) from memory."""
        arr = ffi.new("gs_piece[]", len(parts))
        for p, part in zip(arr, parts):
            if isinstance(part[0], bytes):
                src = ffi.new("char[]", part[0])
                self._keep.append(src)
                p.src, p.nbytes, (p.alloc, p.offset) = src, len(part[0]), part[1:]
            else:
                p.file, p.file_offset, p.nbytes, p.alloc, p.offset = self.f, *part
        self._keep.append(arr)
        return arr, len(parts)

    def close(self):
        lib.gs_copy_destroy(self.c)


@pytest.fixture(params=ENGINES)
def chunk(request):
    return ENGINES[request.param]


def test_host_copy_reads_file_pieces_into_the_slot(data_file, chunk):
    rc, f = open_file(data_file)
    h = HostWithFile(f, chunk=chunk)
    try:
        dst = ffi.new("char[]", 256)
        ffi.memmove(dst, b"\xff" * 256, 256)
        assert lib.gs_copy_issue(h.c, 0, dst, *h.pieces((300, 100, 128, 0), (5000, 64, 64, 128))) == lib.GS_OK
        assert lib.gs_copy_wait(h.c, 0) == lib.GS_OK
        got = ffi.buffer(dst, 256)[:]
        assert got[:100] == DATA[300:400] and got[100:128] == bytes(28)  # padding zeroed
        assert got[128:192] == DATA[5000:5064] and got[192:] == b"\xff" * 64
        put = ffi.new("char[]", 64)
        assert lib.gs_copy_put(h.c, put, *h.pieces((7, 64, 64, 0))) == lib.GS_OK
        assert ffi.buffer(put, 64)[:] == DATA[7:71]
    finally:
        h.close()
        lib.gs_file_close(f)


def test_a_failed_read_fails_the_copy_engine_with_its_message(data_file, chunk):
    rc, f = open_file(data_file)
    h = HostWithFile(f, chunk=chunk)
    try:
        dst = ffi.new("char[]", 128)
        os.truncate(data_file, 1000)
        assert lib.gs_copy_issue(h.c, 1, dst, *h.pieces((0, 64, 64, 0))) == lib.GS_OK  # queued: fails in the worker
        assert lib.gs_copy_wait(h.c, 1) == lib.GS_E_IO
        assert "changed while the model was loaded" in last_error()  # the worker's message, on this thread
        done = ffi.new("int *")
        assert lib.gs_copy_done(h.c, 0, done) == lib.GS_E_IO  # sticky: every later call says it
        assert lib.gs_copy_issue(h.c, 0, dst, *h.pieces((0, 8, 8, 0))) == lib.GS_E_IO
        assert lib.gs_copy_drain(h.c) == lib.GS_E_IO
    finally:
        h.close()  # no hang: the failed copy still completed its ticket
        lib.gs_file_close(f)


def within(seconds, fn):
    """fn() on a thread; fails (instead of hanging the suite) if it has not returned in time."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a hang"
    return out[0]


@pytest.mark.parametrize("readers,buffers", [(4, 6), (8, 3)])
def test_a_file_truncated_under_parallel_reads_fails_cleanly(big_file, readers, buffers):
    """Many chunks in flight in several readers when the file is truncated:
    every wait ends (its copy landed before, or the engine's failure), the
    engine stays failed, a destroy with copies queued returns."""
    path, big = big_file
    rc, f = open_file(path)
    h = HostWithFile(f, n_slots=3, chunk=(4096, readers, buffers))
    dst = [ffi.new("char[]", len(big)) for _ in range(3)]
    try:
        for k in range(9):
            assert lib.gs_copy_issue(h.c, k % 3, dst[k % 3], *h.pieces((0, len(big), len(big), 0))) == lib.GS_OK
        os.truncate(path, 1000)
        waits, message = within(30, lambda: ([lib.gs_copy_wait(h.c, s) for s in range(3)], last_error()))
        assert set(waits) <= {lib.GS_OK, lib.GS_E_IO} and lib.GS_E_IO in waits
        assert "changed while the model was loaded" in message or "ended after" in message, message
        assert lib.gs_copy_issue(h.c, 0, dst[0], *h.pieces((0, 8, 8, 0))) == lib.GS_E_IO
        assert within(30, lambda: lib.gs_copy_drain(h.c)) == lib.GS_E_IO
    finally:
        within(30, h.close)
        lib.gs_file_close(f)


@pytest.mark.parametrize("readers", [1, 4])
def test_staged_copies_stay_in_issue_order(data_file, readers):
    """Memory and file pieces into the same slots, many copies in flight
    through the readers (reading ahead across copies): each slot ends with
    its last copy's bytes, and a put lands in order with them."""
    rc, f = open_file(data_file)
    h = HostWithFile(f, n_slots=3, chunk=(100, readers, readers + 2))
    try:
        slots = [ffi.new("char[]", 512) for _ in range(3)]
        last = {}
        for k in range(30):
            s = k % 3
            if k % 2:
                parts, want = [((bytes([k]) * 300), 300, 0)], bytes([k]) * 300
            else:
                parts, want = [(97 * k, 300, 300, 0)], DATA[97 * k:97 * k + 300]
            assert lib.gs_copy_issue(h.c, s, slots[s], *h.pieces(*parts)) == lib.GS_OK
            last[s] = want
        for s in range(3):
            assert lib.gs_copy_wait(h.c, s) == lib.GS_OK
            assert ffi.buffer(slots[s], 300)[:] == last[s]
        put = ffi.new("char[]", 1000)
        assert lib.gs_copy_put(h.c, put, *h.pieces((1234, 1000, 1000, 0))) == lib.GS_OK
        assert ffi.buffer(put, 1000)[:] == DATA[1234:2234]  # host: landed when put returns
        assert lib.gs_copy_drain(h.c) == lib.GS_OK
    finally:
        h.close()
        lib.gs_file_close(f)


def test_staged_engine_refuses_bad_arguments():
    out = ffi.new("gs_copy **")
    for n_slots, chunk, n_staging, readers in ((0, 64, 2, 1), (2, 0, 2, 1), (2, 64, 1, 1), (2, 64, 2, 0),
                                               (2, 64, 2, lib.GS_DISK_READERS_MAX + 1)):
        assert lib.gs_copy_create_host_staged(n_slots, chunk, n_staging, readers, 0, out) == lib.GS_E_INVALID
        assert out[0] == ffi.NULL and "staged" in last_error()
    rc = lib.gs_copy_create_cuda_staged(0, 2, 64, 2, 1, out)
    if rc == lib.GS_OK:  # a process that loaded the CUDA runtime (the GPU suite)
        lib.gs_copy_destroy(out[0])
    else:  # without it, a clear refusal
        assert out[0] == ffi.NULL and "CUDA runtime is not loaded" in last_error()


@pytest.fixture
def big_file(tmp_path):
    path = tmp_path / "big.bin"
    big = os.urandom(1 << 20) * 8
    path.write_bytes(big)
    return path, big


def test_parallel_reads_count_their_time_once(big_file):
    """The file's read seconds are the time it was being read: 8 threads
    reading it at once stay within the wall time (a sum of every read's own
    time would be several times it on this machine's few cores), so bytes /
    seconds is the file's rate, not one reader's."""
    path, big = big_file
    rc, f = open_file(path)
    buffers = [ffi.new("char[]", len(big)) for _ in range(8)]

    def work(buf):
        for _ in range(4):
            assert lib.gs_file_read(f, buf, len(big), 0) == lib.GS_OK

    try:
        threads = [threading.Thread(target=work, args=(b,)) for b in buffers]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        reads, nbytes, seconds = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("double *")
        lib.gs_file_get_stats(f, reads, nbytes, seconds)
        assert (reads[0], nbytes[0]) == (32, 32 * len(big))
        assert 0 < seconds[0] <= wall
        assert all(ffi.buffer(b, len(big))[:] == big for b in buffers)
    finally:
        lib.gs_file_close(f)


def test_parallel_staged_reads_are_counted_exactly(big_file):
    """Through the staged engine's 8 readers: every chunk read and counted
    once, within the copies' wall time, the slots right."""
    path, big = big_file
    rc, f = open_file(path)
    h = HostWithFile(f, n_slots=2, chunk=(64 << 10, 8, 10))
    try:
        dst = [ffi.new("char[]", len(big)) for _ in range(2)]
        t0 = time.perf_counter()
        for k in range(6):
            assert lib.gs_copy_issue(h.c, k % 2, dst[k % 2], *h.pieces((0, len(big), len(big), 0))) == lib.GS_OK
        assert lib.gs_copy_drain(h.c) == lib.GS_OK
        wall = time.perf_counter() - t0
        reads, nbytes, seconds = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("double *")
        lib.gs_file_get_stats(f, reads, nbytes, seconds)
        assert (reads[0], nbytes[0]) == (6 * len(big) // (64 << 10), 6 * len(big))
        assert 0 < seconds[0] <= wall
        assert ffi.buffer(dst[0], len(big))[:] == big and ffi.buffer(dst[1], len(big))[:] == big
    finally:
        h.close()
        lib.gs_file_close(f)


def test_reads_from_several_threads_at_once_are_right(data_file):
    """gs_file itself from several threads (the readers share one): every read
    gets its bytes and is counted."""
    rc, f = open_file(data_file)
    bad = []

    def work(seed):
        for k in range(200):
            offset, n = (seed * 7919 + k * 131) % 8000, 1 + (k * 37) % 8000
            rc, got = read(f, n, offset)
            if rc != lib.GS_OK or got != DATA[offset:offset + n]:
                bad.append((seed, k))

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        reads = ffi.new("uint64_t *")
        lib.gs_file_get_stats(f, reads, ffi.new("uint64_t *"), ffi.new("double *"))
        assert not bad and reads[0] == 6 * 200
    finally:
        lib.gs_file_close(f)


def direct_file(path):
    """path opened with O_DIRECT reads on; skips where its filesystem refuses them."""
    rc, f = open_file(path)
    active = ffi.new("int *")
    assert lib.gs_file_set_direct(f, 1, active) == lib.GS_OK
    if not active[0]:
        lib.gs_file_close(f)
        pytest.skip(f"no O_DIRECT on the filesystem of {path}")
    return f


def test_direct_reads_give_the_bytes_at_any_offset(data_file):
    f = direct_file(data_file)
    try:
        assert lib.gs_file_is_direct(f) == 1
        buf = ffi.new("char[]", len(DATA) + 3 * lib.GS_DIRECT_ALIGN)
        aligned = ffi.cast("char *", (int(ffi.cast("uintptr_t", buf)) + lib.GS_DIRECT_ALIGN - 1)
                           // lib.GS_DIRECT_ALIGN * lib.GS_DIRECT_ALIGN)
        at = ffi.new("size_t *")
        for offset, n in ((0, 4096), (4097, 1000), (100, len(DATA) - 100), (len(DATA) - 7, 7)):
            assert lib.gs_file_read_span(f, aligned, n, offset, at) == lib.GS_OK, last_error()
            assert at[0] == offset % lib.GS_DIRECT_ALIGN
            assert ffi.buffer(aligned + at[0], n)[:] == DATA[offset:offset + n]
        # an unaligned destination cannot take an O_DIRECT read: the plain read refuses
        assert lib.gs_file_read(f, buf, 8, 0) == lib.GS_E_INVALID and "O_DIRECT" in last_error()
        os.truncate(data_file, 5000)
        assert lib.gs_file_read_span(f, aligned, 64, 0, at) == lib.GS_E_IO
        assert "changed while the model was loaded" in last_error()
    finally:
        lib.gs_file_close(f)


def test_staged_engine_reads_with_o_direct(data_file):
    f = direct_file(data_file)
    h = HostWithFile(f, chunk=(4000, 3, 5))  # chunks not aligned: each read is the aligned span around one
    try:
        dst = ffi.new("char[]", 9000)
        assert lib.gs_copy_issue(h.c, 0, dst, *h.pieces((333, 8000, 9000, 0))) == lib.GS_OK
        assert lib.gs_copy_wait(h.c, 0) == lib.GS_OK, last_error()
        got = ffi.buffer(dst, 9000)[:]
        assert got[:8000] == DATA[333:8333] and got[8000:] == bytes(1000)
    finally:
        h.close()
        lib.gs_file_close(f)


def test_direct_reads_fall_back_where_the_filesystem_refuses():
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    path = os.path.join(shm, f"gs_direct_{os.getpid()}.bin")
    with open(path, "wb") as fp:
        fp.write(DATA)
    try:
        rc, f = open_file(path)
        active = ffi.new("int *")
        assert lib.gs_file_set_direct(f, 1, active) == lib.GS_OK
        if active[0]:
            lib.gs_file_close(f)
            pytest.skip("this tmpfs allows O_DIRECT")
        assert lib.gs_file_is_direct(f) == 0  # buffered reads, as without the option
        assert read(f, 100, 50) == (lib.GS_OK, DATA[50:150])
        lib.gs_file_close(f)
    finally:
        os.unlink(path)
