"""The GPU box's same-memory comparison tools, on the CPU: tools/lock_ram.py
(locks a little here; refuses clearly without the right; dies with its
parent) and tools/disk_tier_gpu.py --ram-left (its arguments, stock's
command line, llama-bench's output, the disk counters and bounds, and the
whole run in host mode with a stand-in llama-bench under a small lock)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from tools import disk_tier_gpu as dtg
from tools import lock_ram

LOCK_RAM = [sys.executable, str(ROOT / "tools" / "lock_ram.py")]
GIB = 1 << 30


# ------------------------------------------------------------------ lock_ram.py

def test_lock_ram_plans_its_pieces():
    assert lock_ram.mem_available("MemTotal: 100 kB\nMemAvailable:   2048 kB\n") == 2 << 20
    with pytest.raises(lock_ram.LockError, match="MemAvailable"):
        lock_ram.mem_available("MemTotal: 100 kB\n")
    # 90% of what is to be locked in whole pieces first, the rest topped up
    assert lock_ram.bulk_pieces(100 * GIB, 8 * GIB) == [GIB] * 82
    assert lock_ram.bulk_pieces(8 * GIB, 8 * GIB) == [] and lock_ram.bulk_pieces(GIB, 8 * GIB) == []
    assert lock_ram.top_up(10 * GIB, 8 * GIB) == GIB
    assert lock_ram.top_up(8 * GIB + (100 << 20), 8 * GIB) == 100 << 20
    assert lock_ram.top_up(8 * GIB + lock_ram.SLACK, 8 * GIB) == 0


def test_lock_ram_locks_and_releases():
    out = subprocess.run([*LOCK_RAM, "--lock", "0.01", "--exit"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("locked 0.01 GiB") and "MemAvailable now" in out.stdout


def test_lock_ram_without_the_right_fails_in_one_line():
    """Negative control: without CAP_IPC_LOCK (and a small ulimit -l) mlock is refused."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop CAP_IPC_LOCK")
    out = subprocess.run(["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", *LOCK_RAM,
                          "--lock", "0.1", "--exit"], capture_output=True, text=True, timeout=60)
    if out.returncode == 0:
        pytest.skip("this machine's ulimit -l allows 0.1 GiB without CAP_IPC_LOCK")
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "mlock of 0.10 GiB failed" in out.stderr
    assert "CAP_IPC_LOCK" in out.stderr


def test_lock_ram_refuses_what_cannot_be_left_or_locked():
    out = subprocess.run([*LOCK_RAM, "--leave", "1000000"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "less than the 1000000.00 GiB to leave" in out.stderr
    out = subprocess.run([*LOCK_RAM, "--lock", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "above 0" in out.stderr


def test_lock_ram_dies_with_its_parent(tmp_path):
    """A driver stopped by a timeout must not leave RAM locked behind it."""
    log = tmp_path / "child.log"
    parent = subprocess.run([sys.executable, "-c", f"""
import subprocess, sys, time
c = subprocess.Popen({LOCK_RAM!r} + ['--lock', '0.01'], stdout=open({str(log)!r}, 'w'))
for _ in range(300):
    if 'holding' in open({str(log)!r}).read():
        break
    time.sleep(0.1)
print(c.pid)
"""], capture_output=True, text=True, timeout=60)
    pid = int(parent.stdout.strip())
    assert "holding" in log.read_text()
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}") or "State:\tZ" in open(f"/proc/{pid}/status").read():
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("lock_ram outlived its parent")


# ------------------------------------------------------------------ disk_tier_gpu.py's parts

def test_arguments_of_the_same_memory_comparison():
    a = dtg.parse_args(["--model", "m.gguf", "--out", "o", "--ram-left", "8", "--host-budget", "6GiB"])
    assert a.ram_left == 8.0 and a.llama_bench == "llama-bench" and a.stock_timeout == 300
    assert dtg.parse_args(["--model", "m.gguf", "--out", "o"]).ram_left is None  # the correctness run as before
    for bad, why in ((["--ram-left", "2", "--host-budget", "2GiB"], "must be below --ram-left"),
                     (["--ram-left", "0"], "above 0")):
        with pytest.raises(SystemExit) as exc:
            dtg.parse_args(["--model", "m.gguf", "--out", "o", *bad])
        assert exc.value.code == 2


def test_stock_command_line_and_its_output():
    cmd = dtg.llama_bench_command("llama-bench", "/m/x.gguf", 12, 2048, 8)
    joined = " ".join(cmd)
    assert cmd[0] == "llama-bench" and "-m /m/x.gguf" in joined and "-ngl 12" in joined
    assert "-lm mmap" in joined and "-p 2048 -n 8" in joined and "-r 1" in joined and "-o json" in joined
    assert "-b 2048 -ub 2048" in joined and "-fa 1" in joined
    out = ('build: x\n[\n {"n_prompt": 2048, "n_gen": 0, "avg_ts": 3343.6},\n'
           ' {"n_prompt": 0, "n_gen": 8, "avg_ts": 24.65}\n]\n')
    assert dtg.parse_llama_bench(out) == {"pp": 3343.6, "tg": 24.65}
    assert dtg.parse_llama_bench('[{"n_prompt": 2048, "n_gen": 0, "avg_ts": 1.5}]') == {"pp": 1.5, "tg": None}
    with pytest.raises(ValueError):
        dtg.parse_llama_bench("error: no model")


def test_disk_bytes_count_whole_physical_devices_once():
    stats = "\n".join([
        " 259       0 nvme0n1 100 0 2000 0 0 0 0 0 0 0 0",
        " 259       1 nvme0n1p1 90 0 1800 0 0 0 0 0 0 0 0",  # a partition: inside nvme0n1's count
        "   7       0 loop0 5 0 999 0 0 0 0 0 0 0 0",
        " 253       0 dm-0 9 0 1800 0 0 0 0 0 0 0 0",
        "   8       0 sda 1 0 10 0 0 0 0 0 0 0 0",
    ])
    assert dtg.disk_read_bytes(stats, ["nvme0n1", "loop0", "dm-0", "sda"]) == (2000 + 10) * 512
    assert dtg.disk_read_bytes(stats, []) == 0
    assert dtg.disk_read_bytes() >= 0  # this machine's own counters parse


def test_disk_bounds():
    b = dtg.disk_bound(2e9, 1_000_000_000, 2048)  # 1 GB a pass at 2 GB/s: 0.5 s a pass
    assert b["pp"] == pytest.approx(4096) and b["tg"] == pytest.approx(2)
    assert dtg.disk_bound(2e9, 0, 2048) == {"pp": None, "tg": None}  # nothing on disk: no disk bound
    assert dtg.disk_bound(None, 10, 2048) == {"pp": None, "tg": None}


def test_stock_split_at_the_vram_budget(tiny_path):
    from gguf_stream import read_model

    mf = read_model(tiny_path)
    ngls = [dtg.stock_ngl(mf, budget, 512, 64) for budget in (1 << 20, 20 << 20, 24 << 20, 1 << 30)]
    assert ngls[0] == 0 and ngls[-1] == mf.n_layer and ngls == sorted(ngls)
    output = mf.tensor("output.weight") or mf.tensor("token_embd.weight")
    assert dtg.stock_cpu_bytes(mf, 0) == sum(mf.layer_bytes) + output.nbytes
    assert dtg.stock_cpu_bytes(mf, 3) == sum(mf.layer_bytes[:mf.n_layer - 3]) + output.nbytes
    assert dtg.stock_cpu_bytes(mf, mf.n_layer + 1) == 0  # all offloaded, output too


# ------------------------------------------------------------------ the whole comparison, host mode

FAKE_BENCH = """#!{python}
import json, sys
open({args!r}, "w").write(json.dumps(sys.argv[1:]))
if {fail!r}:
    sys.exit("error: failed to load model")
print("llama-bench's log line")
print(json.dumps([{{"n_prompt": 64, "n_gen": 0, "avg_ts": 123.5}}, {{"n_prompt": 0, "n_gen": 4, "avg_ts": 7.25}}]))
"""


def run_comparison(tmp_path, monkeypatch, tiny_path, fail=False, lock=("--lock", "0.01")):
    bench = tmp_path / "llama-bench"
    bench.write_text(FAKE_BENCH.format(python=sys.executable, args=str(tmp_path / "args.json"), fail=fail))
    bench.chmod(0o755)
    model = tmp_path / "model.gguf"  # tmp_path: a disk filesystem, whose reads diskstats may count
    shutil.copyfile(tiny_path, model)
    # here: a small lock (the real one takes all RAM but --ram-left), the file's pages dropped (not the machine's)
    monkeypatch.setattr(dtg.RamLock, "command", lambda self: [*LOCK_RAM, *lock])
    monkeypatch.setattr(dtg, "drop_page_cache", lambda path: (dtg.drop_cache(path), "file")[1])
    monkeypatch.setattr(dtg.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM alone
    out = tmp_path / "out"
    out.mkdir()
    rc = dtg.main(["--model", str(model), "--device", "host", "--vram-budget", "20MiB", "--host-budget", "1MiB",
                   "--n-prompt", "64", "--n-gen", "4", "--ram-left", "4", "--read-limit", "1MiB",
                   "--llama-bench", str(bench), "--out", str(out)])
    return rc, json.loads((out / "disk_tier_gpu.json").read_text()), tmp_path / "args.json"


def test_the_comparison_runs_both_sides_under_the_lock(tmp_path, monkeypatch, tiny_path, capsys):
    rc, res, args = run_comparison(tmp_path, monkeypatch, tiny_path)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert res["lock"].startswith("locked 0.01 GiB") and res["ram_left_gib"] == 4.0
    stock, ours = res["sides"]["stock"], res["sides"]["gguf-stream"]
    assert (stock["pp"], stock["tg"]) == (123.5, 7.25) and stock["lock_held"]
    got = json.loads(args.read_text())
    assert got[got.index("-lm") + 1] == "mmap" and got[got.index("-ngl") + 1] == str(stock["ngl"])
    assert ours["pp"] > 0 and ours["tg"] > 0 and ours["disk_tier_used"] and ours["lock_held"]
    assert ours["pass_bytes"] > 0 and ours["bound"]["tg"] == pytest.approx(res["disk_rate"] / ours["pass_bytes"])
    assert stock["bound"]["tg"] == pytest.approx(res["disk_rate"] / stock["pass_bytes"])
    assert "| stock | -ngl" in printed and "| gguf-stream | host budget 1MiB, disk tier" in printed


def test_a_failed_side_or_lock_fails_the_comparison(tmp_path, monkeypatch, tiny_path, capsys):
    """Negative controls: stock failing, and a lock that cannot be had, exit 1 with the reason."""
    (tmp_path / "a").mkdir()
    rc, res, _ = run_comparison(tmp_path / "a", monkeypatch, tiny_path, fail=True)
    assert rc == 1 and "failed to load model" in res["sides"]["stock"]["error"]
    assert res["sides"]["gguf-stream"]["pp"] > 0  # the other side still measured
    (tmp_path / "b").mkdir()
    rc, res, _ = run_comparison(tmp_path / "b", monkeypatch, tiny_path, lock=("--leave", "1000000"))
    assert rc == 1 and "the RAM lock did not start" in res["error"] and "to leave" in res["error"]
    assert res["sides"] == {}
