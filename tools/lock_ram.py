"""Lock host RAM so that a benchmark gets only what is left (issue #19: the
disk tier against stock llama.cpp with mmap, both with the same RAM).

    python3 tools/lock_ram.py --leave 8      # lock all of MemAvailable but 8 GiB, hold until killed
    python3 tools/lock_ram.py --lock 0.01    # lock exactly 0.01 GiB (is mlock allowed here?)

Anonymous memory is mapped and mlock'ed (ctypes) in 1 GiB pieces, several
at once (the kernel zeroes every page it faults in: threads make 100 GiB a
matter of seconds), then topped up one piece at a time until MemAvailable
is within 64 MiB of --leave. Locked pages cannot be swapped or reclaimed, so
the page cache and every process share what is left. Prints one line with
what it locked and MemAvailable after it, then `holding` (the line a driver
waits for, see tools/disk_tier_gpu.py), and sleeps until killed (SIGTERM,
SIGINT), its parent exits (so a driver killed by a timeout leaves no RAM
locked behind it), or --hold-max seconds pass: the kernel frees the memory
with the process.

Exits 1 with one line when mlock is not permitted (it needs root or
CAP_IPC_LOCK, or `ulimit -l` at least the size), or when less than --leave
is available to begin with.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

GIB = 1 << 30
PIECE = GIB
SLACK = 64 << 20      # close enough to --leave
THREADS = 8


class LockError(Exception):
    """mlock refused (or the memory is not there)."""


def mem_available(meminfo: str | None = None) -> int:
    """MemAvailable in bytes, from /proc/meminfo's text (read when not given)."""
    text = meminfo if meminfo is not None else open("/proc/meminfo").read()
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise LockError("/proc/meminfo has no MemAvailable line")


def bulk_pieces(available: int, leave: int) -> list[int]:
    """The first, parallel phase: whole pieces up to 90% of what is to be
    locked (MemAvailable drops as locking evicts cache; the rest is topped up
    while watching it)."""
    return [PIECE] * max(0, int((available - leave) * 0.9) // PIECE)


def top_up(available: int, leave: int) -> int:
    """The next piece of the second phase: 0 when within SLACK of leave."""
    excess = available - leave
    if excess <= SLACK:
        return 0
    return min(PIECE, excess) // mmap.PAGESIZE * mmap.PAGESIZE


class Locker:
    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        self.maps: list[mmap.mmap] = []
        self.locked = 0
        self._mu = threading.Lock()  # lock() runs on several threads

    def lock(self, n: int) -> None:
        """Map and mlock n bytes (kept until the process ends)."""
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if self.libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) != 0:
            err = ctypes.get_errno()
            m.close()
            raise LockError(f"mlock of {n / GIB:.2f} GiB failed after {self.locked / GIB:.2f} GiB: "
                            f"{os.strerror(err)}; it needs root or CAP_IPC_LOCK (or `ulimit -l` above the size)")
        with self._mu:
            self.maps.append(m)  # kept: unmapping would unlock it
            self.locked += n


def die_with_parent() -> None:
    """SIGKILL when the parent process exits (Linux prctl PR_SET_DEATHSIG; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (AttributeError, OSError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        sys.exit(1)


def lock_all_but(locker: Locker, leave: int, threads: int = THREADS) -> None:
    available = mem_available()
    if available < leave:
        raise LockError(f"only {available / GIB:.2f} GiB is available, less than the {leave / GIB:.2f} GiB "
                        "to leave: nothing to lock")
    with ThreadPoolExecutor(threads) as pool:  # ctypes releases the GIL: the page faults run in parallel
        list(pool.map(locker.lock, bulk_pieces(available, leave)))
    while n := top_up(mem_available(), leave):
        locker.lock(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 tools/lock_ram.py", description=__doc__.split("\n\n")[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--leave", type=float, metavar="GIB", help="lock all of MemAvailable but this many GiB")
    what.add_argument("--lock", type=float, metavar="GIB", help="lock exactly this many GiB")
    ap.add_argument("--exit", action="store_true", help="release and exit at once instead of holding (a check)")
    ap.add_argument("--hold-max", type=float, default=0, metavar="S", help="release after S seconds (0: until killed)")
    a = ap.parse_args(argv)
    size = a.leave if a.leave is not None else a.lock
    if not size > 0:
        ap.error(f"give a size above 0 GiB (got {size})")
    die_with_parent()
    locker = Locker()
    t0 = time.perf_counter()
    try:
        if a.leave is not None:
            lock_all_but(locker, int(a.leave * GIB))
        else:
            locker.lock(max(mmap.PAGESIZE, int(a.lock * GIB) // mmap.PAGESIZE * mmap.PAGESIZE))
    except (LockError, OSError) as exc:
        print(f"lock_ram: {exc}", file=sys.stderr)
        return 1
    print(f"locked {locker.locked / GIB:.2f} GiB in {time.perf_counter() - t0:.1f} s; "
          f"MemAvailable now {mem_available() / GIB:.2f} GiB", flush=True)
    if a.exit:
        return 0
    print("holding", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if a.hold_max > 0:
            time.sleep(a.hold_max)
        else:
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
