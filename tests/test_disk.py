"""The disk tier (disk.py, the engine's file reads) in host-slot mode: the
planner's tiers under a host budget, exactness against stock llama.cpp with
part of the model read from the GGUF file, the counters, a negative control,
and a file truncated or rewritten underneath a running model. Each running
test goes through both readers: the host engine's direct reads, and the
staged reader the CUDA engine uses (preads into staging buffers, then the
upload; here over memcpy) with chunks smaller than a tensor, by one reader
thread and by several reading ahead in parallel."""
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import CPU, HYBRID, N_GEN
from gguf_stream import DecodeError, read_model
from gguf_stream.config import EngineConfig
from gguf_stream.disk import (DISK_READERS, READERS_ENV, STAGING_CHUNK, STAGING_ENV, STAGING_SPARE, assign_disk_tier,
                              disk_candidates, staging_bytes, staging_options, with_disk_layers)
from gguf_stream.errors import HostMemoryError
from gguf_stream.model import StreamedModel
from gguf_stream.planner import make_plan, with_generate_placement
from gguf_stream.placement import initial_plan
from gguf_stream.streamer import Streamer


def hybrid_plan(path):
    return initial_plan(read_model(path), EngineConfig(**CPU, **HYBRID), cuda=False)


def budget_for(plan, n_disk: int) -> int:
    """A host budget that puts exactly n_disk of the plan's streamed layers on disk (equal-sized layers)."""
    biggest = max(s.bytes for s in plan.layers if s.placement == "streamed")
    return plan.host_bytes - (n_disk - 1) * biggest - 1


# ------------------------------------------------------------------ planning (pure)

def test_tiers_follow_the_host_budget(tiny_path):
    plan = make_plan(read_model(tiny_path), n_streamed=6, n_slots=2)
    assert not assign_disk_tier(plan, plan.host_bytes).disk_layers  # fits: nothing on disk
    for n in (1, 3, 6):
        tiered = assign_disk_tier(plan, budget_for(plan, n))
        assert len(tiered.disk_layers) == n and set(tiered.disk_layers) <= set(plan.streamed)
        assert tiered.host_bytes <= tiered.host_budget
        assert tiered.pinned_bytes + tiered.disk_bytes == plan.streamed_bytes
        line = tiered.tiers_line()
        assert f"disk {n} (" in line and "tokens/s at most" in line and "(disk)" in tiered.table()
    spread = assign_disk_tier(plan, budget_for(plan, 3)).disk_layers
    assert spread != plan.streamed[:3]  # spread through the streamed layers, not bunched
    with pytest.raises(HostMemoryError, match="host budget .* is below .* with every streamed part on the disk"):
        assign_disk_tier(plan, 1)


def test_cpu_layers_never_go_to_disk(tiny_path):
    plan = make_plan(read_model(tiny_path), n_streamed=6, n_slots=2)
    cpu = plan.streamed[1::3]
    hybrid = with_generate_placement(plan, cpu)
    assert set(disk_candidates(hybrid)) == set(plan.streamed) - set(cpu)
    floor = hybrid.host_bytes - sum(s.bytes for s in hybrid.layers if s.layer in disk_candidates(hybrid))
    tiered = assign_disk_tier(hybrid, floor + 1)  # every candidate, no CPU layer
    assert set(tiered.disk_layers) == set(plan.streamed) - set(cpu)
    with pytest.raises(HostMemoryError):
        assign_disk_tier(hybrid, floor - 1)
    with pytest.raises(ValueError, match="cannot be on the disk tier"):
        with_disk_layers(hybrid, cpu[:1])


def test_staging_options_and_their_host_memory(tiny_path):
    mf = read_model(tiny_path)
    biggest = max(t.nbytes for t in mf.tensors if t.layer is not None)
    assert staging_options(True, {}) == {"staging_bytes": STAGING_CHUNK, "host_staging": False,
                                         "disk_readers": DISK_READERS}
    assert staging_options(False, {STAGING_ENV: "on"})["host_staging"]
    assert staging_options(False, {STAGING_ENV: "16KiB", READERS_ENV: " 7 "}) == {
        "staging_bytes": 16384, "host_staging": True, "disk_readers": 7}
    for bad in ("lots", "0"):
        if bad == "0":  # "0" means off
            assert not staging_options(False, {STAGING_ENV: bad})["host_staging"]
            continue
        with pytest.raises(ValueError, match=STAGING_ENV):
            staging_options(False, {STAGING_ENV: bad})
    for bad in ("0", "-1", "four", "2.5", "65"):
        with pytest.raises(ValueError, match=f"{READERS_ENV}=.*from 1 to 64") as exc:
            staging_options(True, {READERS_ENV: bad})
        assert "\n" not in str(exc.value)
    off = staging_options(False, {})
    assert staging_bytes(mf, off, cuda=False) == 0  # host mode's direct reads stage nothing
    # CUDA: a buffer a reader and two more, a chunk no larger than the largest tensor (page-rounded)
    assert staging_bytes(mf, off, cuda=True) == (DISK_READERS + STAGING_SPARE) * (-(-biggest // 4096) * 4096)
    assert staging_bytes(mf, staging_options(False, {STAGING_ENV: "16KiB", READERS_ENV: "1"}), cuda=False) \
        == (1 + STAGING_SPARE) * 16384


def test_the_staging_buffers_count_against_the_host_budget(tiny_path):
    plan = make_plan(read_model(tiny_path), n_streamed=6, n_slots=2)
    layer = max(s.bytes for s in plan.layers if s.placement == "streamed")
    budget = budget_for(plan, 2)  # 2 layers on disk without staging ...
    assert len(assign_disk_tier(plan, budget).disk_layers) == 2
    assert len(assign_disk_tier(plan, budget, staging=layer).disk_layers) == 3  # ... 3 with a layer of staging
    assert not assign_disk_tier(plan, plan.host_bytes, staging=layer).disk_layers  # no disk tier, no staging
    with pytest.raises(HostMemoryError, match="of staging buffers"):
        assign_disk_tier(plan, plan.host_bytes - plan.streamed_bytes + 1, staging=layer)


# ------------------------------------------------------------------ running (host-slot mode)

# the disk tier's reader: the host engine's direct reads, or the staged one
# (the CUDA path's code) as (chunk, reader threads): one reader in 16 KiB
# chunks, smaller than most tensors, or 6 in parallel in 4 KiB chunks (many
# chunks in flight, read ahead across layers)
READERS = {"direct": None, "staged": (16384, 1), "parallel": (4096, 6)}


@pytest.fixture(params=READERS)
def reader(request, monkeypatch):
    staged = READERS[request.param]
    monkeypatch.setenv(STAGING_ENV, str(staged[0]) if staged else "off")
    monkeypatch.setenv(READERS_ENV, str(staged[1]) if staged else "")
    return request.param


def check_reader(c, reader):
    """The reader asked for is the one that ran."""
    staged = READERS[reader]
    assert c.disk_readers == (staged[1] if staged else 0)
    assert c.staging_bytes == ((staged[1] + STAGING_SPARE) * staged[0] if staged else 0)

def run_with_disk(path, prompt, n_disk, **options):
    budget = budget_for(hybrid_plan(path), n_disk)
    with StreamedModel(path, **CPU, **HYBRID, host_budget=budget, **options) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        return tokens, logits, m.stats.counters, m.plan


def test_disk_tier_is_bit_identical_to_stock(case, reader):
    path, prompt, ref_tokens, ref_logits = case
    tokens, logits, c, plan = run_with_disk(path, prompt, 3)
    assert len(plan.disk_layers) == 3 and plan.host_bytes <= plan.host_budget
    check_reader(c, reader)
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits), f"max |diff| {np.abs(logits - ref_logits).max()}"
    # every evaluation reads the disk tier from the file (the last may have prefetched into the next one)
    evaluations = 1 + N_GEN
    assert c.evaluations == evaluations and c.disk_tier_bytes == plan.disk_bytes
    assert (evaluations - 1) * c.disk_tier_bytes <= c.disk_bytes <= (evaluations + 1) * c.disk_tier_bytes
    assert c.disk_reads > 0 and c.disk_read_seconds > 0 and 0.0 <= c.disk_overlap <= 1.0
    assert c.disk_readaheads > 0  # the early trigger asked the kernel for disk-tier layers ahead
    # llama.cpp's copy of the disk tier was handed back (reading it now would give zeros)
    assert 0 < c.released_host_bytes <= c.disk_tier_bytes


def test_reading_the_wrong_file_offsets_changes_the_output(case, reader, monkeypatch):
    """Negative control: the disk tier's bytes are what the model computes with."""
    path, prompt, ref_tokens, ref_logits = case
    n_layer = read_model(path).n_layer
    right = Streamer.file_offset

    def wrong(self, name):  # each disk-tier tensor read from the next layer's
        layer = int(name.split(".")[1])
        return right(self, name.replace(f"blk.{layer}.", f"blk.{(layer + 1) % n_layer}.", 1))

    monkeypatch.setattr(Streamer, "file_offset", wrong)
    tokens, logits, c, plan = run_with_disk(path, prompt, 3)
    assert c.disk_reads > 0 and not np.array_equal(logits, ref_logits)
    check_reader(c, reader)


def test_disk_tier_with_a_slow_link_waits_and_stays_exact(case, reader):
    path, prompt, ref_tokens, ref_logits = case
    # 50 ms a copy: longer than a layer's compute even on a loaded CI box, so adoptions wait
    tokens, logits, c, plan = run_with_disk(path, prompt, 6, host_copy_delay_us=50000)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    check_reader(c, reader)
    assert c.adopted_waited > 0 and c.disk_wait_seconds > 0


def test_moe_experts_on_disk_match_stock(tiny_moe_path, reader):
    from gguf_stream.model import StockModel

    with StockModel(tiny_moe_path, n_gpu_layers=0, **CPU) as stock:
        prompt = stock.tokenize("The quick brown fox")
        ref_tokens, ref_logits = stock.generate(prompt, N_GEN, with_logits=True)
    mf = read_model(tiny_moe_path)
    plan = initial_plan(mf, EngineConfig(**CPU, n_streamed=mf.n_layer, n_slots=2), cuda=False)
    assert plan.part == "experts"
    with StreamedModel(tiny_moe_path, **CPU, n_streamed=mf.n_layer, n_slots=2,
                       host_budget=budget_for(plan, 2)) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        c = m.stats.counters
        assert len(m.plan.disk_layers) == 2 and c.disk_reads > 0
        check_reader(c, reader)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)


def test_o_direct_reads_match_stock(case, tmp_path):
    """--disk-direct: the disk tier read with O_DIRECT (aligned spans into the
    staging buffers, no read-ahead hints), where the filesystem allows it."""
    path, prompt, ref_tokens, ref_logits = case
    copy = tmp_path / "model.gguf"  # tmp_path: a disk filesystem, as a model's would be
    shutil.copyfile(path, copy)
    tokens, logits, c, plan = run_with_disk(copy, prompt, 3, disk_direct=True)
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    assert c.staging_bytes > 0 and c.disk_reads > 0  # the staged reader, also in host mode
    try:
        os.close(os.open(copy, os.O_RDONLY | os.O_DIRECT))
        allowed = True
    except OSError:
        allowed = False
    assert c.disk_direct == int(allowed)
    if c.disk_direct:
        assert c.disk_readaheads == 0  # no page cache to fill
    else:
        assert c.disk_readaheads > 0  # the filesystem refused O_DIRECT: buffered reads, read-ahead as usual


@pytest.mark.parametrize("change", ["truncate", "rewrite"])
def test_a_model_file_changed_underneath_is_a_clear_error(tiny_path, tmp_path, change, reader):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_path, path)
    budget = budget_for(hybrid_plan(path), 3)
    with StreamedModel(path, **CPU, **HYBRID, host_budget=budget) as m:
        prompt = m.tokenize("The quick brown fox")
        m.generate(prompt, 2)
        st = os.stat(path)
        if change == "truncate":
            os.truncate(path, st.st_size // 2)
        else:  # same size, other bytes
            with open(path, "r+b") as f:
                f.seek(st.st_size // 2)
                f.write(bytes(4096))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(DecodeError, match="changed while the model was loaded") as exc:
            m.generate(prompt, N_GEN)
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
        with pytest.raises(DecodeError):  # and it stays failed: no later decode computes with wrong weights
            m.generate(prompt, 1)


def test_a_file_changed_before_loading_is_refused(tiny_path, tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_path, path)
    from gguf_stream import disk, streamer

    real = disk.file_identity
    monkeypatch.setattr(streamer, "file_identity", lambda p: (real(p)[0], real(p)[1] - 1))  # as if planned earlier
    with pytest.raises(Exception, match="changed while the model was loaded") as exc:
        StreamedModel(path, **CPU, **HYBRID, host_budget=budget_for(hybrid_plan(path), 2))
    assert "\n" not in str(exc.value)


PEAK_CHILD = """
import json, sys
import gguf_stream
from gguf_stream.model import StreamedModel
path, budget = sys.argv[1], int(sys.argv[2])
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
with StreamedModel(path, **json.loads(sys.argv[3]), host_budget=budget or None) as m:
    m.generate(m.tokenize("Hello"), 2)
    print(json.dumps({"hwm": hwm(), "disk": m.plan.disk_bytes, "at_load": m.streamer.disk_released_at_load}))
"""


def test_the_disk_tier_never_sits_in_host_memory(gemma_path):
    """The process's peak resident memory (VmHWM), loading included, drops by
    about the disk tier's bytes: llama.cpp's copy is handed back as it loads."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    mf = read_model(gemma_path)
    options = dict(CPU, n_streamed=mf.n_layer, n_slots=2)
    plan = initial_plan(mf, EngineConfig(**options), cuda=False)
    every_layer = plan.host_bytes - plan.streamed_bytes + 1

    def peak(budget):
        out = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(gemma_path), str(budget), json.dumps(options)],
                             capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    pinned, disk = peak(0), peak(every_layer)
    assert pinned["disk"] == 0 and disk["disk"] == plan.streamed_bytes
    assert disk["at_load"] >= 0.9 * disk["disk"]
    assert pinned["hwm"] - disk["hwm"] >= 0.7 * disk["disk"], (pinned, disk)


def test_plan_and_run_on_the_command_line(capsys, tiny_path):
    from gguf_stream import cli

    mf = read_model(tiny_path)
    plan = make_plan(mf, n_streamed=6, n_slots=2, n_ctx=256, n_ubatch=64)
    small = ["-c", "256", "-b", "64", "-ub", "64"]
    budget = str(budget_for(plan, 2))
    # --exact: plan shows a CUDA run's placement, whose default gives the CPU
    # layers (never on the disk tier) a repacked copy in host memory; its
    # staging buffers count against the budget (host mode's direct reads have
    # none): 2 layers' worth over it (the staging is less than that here)
    cuda_staging = staging_bytes(mf, staging_options(True), cuda=True)
    assert cuda_staging < 2 * max(mf.layer_bytes)
    assert cli.main(["plan", str(tiny_path), "--n-streamed", "6", "--n-slots", "2", "--host-budget",
                     str(plan.host_bytes + cuda_staging - 2 * max(mf.layer_bytes)), "--exact", *small]) == 0
    out = capsys.readouterr().out
    assert sum("| streamed (disk) |" in line for line in out.splitlines()) == 2
    assert "tiers (host budget" in out and "pinned host 4 (" in out and "disk 2 (" in out
    assert cli.main(["run", str(tiny_path), "-p", "hello", "-n", "3", "--device", "host", "--n-streamed", "6",
                     "--n-slots", "2", "--host-budget", budget, "-t", str(CPU["n_threads"]), *small]) == 0
    assert "disk tier" in capsys.readouterr().err
    assert cli.main(["plan", str(tiny_path), "--n-streamed", "6", "--host-budget", "1KiB", "--exact", *small]) == 1
    err = capsys.readouterr().err
    assert "host budget" in err and "raise the host budget" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ one decision for plan and load (host_tiers)

SMALL = ["-c", "256", "-b", "64", "-ub", "64"]


def fake_meminfo(tmp_path, monkeypatch, available: int) -> None:
    """/proc/meminfo as a file saying MemAvailable is `available` bytes."""
    from gguf_stream import config

    f = tmp_path / "meminfo"
    f.write_text(f"MemTotal:       {4 * available >> 10} kB\nMemFree:        1024 kB\n"
                 f"MemAvailable:   {available >> 10} kB\nBuffers:        0 kB\n")
    monkeypatch.setattr(config, "MEMINFO", str(f))


def available_for(budget: int) -> int:
    """A MemAvailable whose default budget (disk.spare_host_memory) is `budget` or up to 1 KiB below (meminfo's unit)."""
    from gguf_stream.disk import HOST_MARGIN_MIN

    assert budget < 9 * HOST_MARGIN_MIN  # under 10 GiB the margin is 1 GiB
    return (budget + HOST_MARGIN_MIN) // 1024 * 1024


def test_default_host_budget_from_a_faked_meminfo(tmp_path, monkeypatch):
    from gguf_stream.config import available_host_memory
    from gguf_stream.disk import spare_host_memory
    from gguf_stream.placement import host_budget_of

    GiB = 1 << 30
    assert spare_host_memory(8 * GiB) == 7 * GiB  # margin 1 GiB
    assert spare_host_memory(100 * GiB) == 90 * GiB  # margin 10%
    assert spare_host_memory(GiB // 2) == 0
    fake_meminfo(tmp_path, monkeypatch, 20 * GiB)
    assert available_host_memory() == 20 * GiB
    default = host_budget_of(EngineConfig())
    assert default.nbytes == 18 * GiB and default.available == 20 * GiB and "MemAvailable 20.00 GiB" in default.source
    assert host_budget_of(EngineConfig(host_budget="3GiB")).nbytes == 3 * GiB  # given: no measurement
    assert host_budget_of(EngineConfig(host_budget="none")).nbytes is None  # off
    assert host_budget_of(EngineConfig(host_memory_check=False)).nbytes is None  # the check off: no measured one
    monkeypatch.setenv("GGUF_STREAM_HOST_MEMORY_CHECK", "0")
    assert host_budget_of(EngineConfig()).nbytes is None
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")  # no MemAvailable: no budget
    monkeypatch.delenv("GGUF_STREAM_HOST_MEMORY_CHECK")
    assert available_host_memory() is None and host_budget_of(EngineConfig()).nbytes is None
    with pytest.raises(ValueError, match="host_budget: .*or 'none'"):
        EngineConfig(host_budget="lots")


def test_auto_on_cuda_tiers_without_cpu_layers_then_the_split_within_the_room(tiny_path):
    """The 8B case of issue 19 on the tiny model: with the measured split
    (auto on CUDA) the old view counted every overflow layer as a CPU layer
    (never on disk, each with a repacked copy) and refused a budget the run
    fits; the tiers are now chosen without CPU layers, and the split keeps
    to the pinned overflow layers and the budget's room (pure: no GPU)."""
    from gguf_stream.placement import HostBudget, expected_generate_plan, host_tiers

    mf = read_model(tiny_path)
    config = EngineConfig(n_streamed=6, n_slots=2, n_ctx=256, n_batch=64, n_ubatch=64, generate_resident="none")
    plan = initial_plan(mf, config, cuda=False)
    budget = budget_for(plan, 3)
    with pytest.raises(HostMemoryError):  # negative control: the old view
        assign_disk_tier(expected_generate_plan(mf, plan, config, cuda=True), budget)
    asked = []
    t = host_tiers(mf, plan, config, True, HostBudget(budget), lookup=lambda c, n: asked.append((c, n)))
    exact = assign_disk_tier(plan, budget)
    assert t.plan.disk_layers == exact.disk_layers and len(exact.disk_layers) == 3  # as without CPU layers
    assert t.choices == tuple(i for i in plan.streamed if i not in exact.disk_layers)
    assert t.most == 0 and not t.plan.cpu_layers and "no room" in t.split and not asked  # less than a layer left
    # a budget with room for two CPU layers' copies (and no disk tier)
    layer = max(mf.layer_bytes)
    roomy = with_generate_placement(plan, plan.streamed[:2]).host_bytes + layer // 2
    t = host_tiers(mf, plan, config, True, HostBudget(roomy), lookup=lambda c, n: asked.append((c, n)))
    assert not t.plan.disk_layers and t.most == 2 and asked == [(plan.streamed, 2)]
    assert "measured at load" in t.split and "up to 2 of 6" in t.split
    assert t.most_plan.host_bytes <= roomy < with_generate_placement(plan, plan.streamed[:3]).host_bytes
    cached = plan.streamed[1:3]
    t = host_tiers(mf, plan, config, True, HostBudget(roomy), lookup=lambda c, n: cached)
    assert t.cached and t.plan.cpu_layers == cached and "cached by an earlier load" in t.split
    assert t.plan.host_bytes == with_generate_placement(plan, cached).host_bytes
    # no budget: every overflow layer may go to the CPU (the host-memory check counts them all, as before)
    t = host_tiers(mf, plan, config, True, HostBudget(None))
    assert t.most == 6 and t.most_plan.cpu_layers == plan.streamed


def loaded_tiers(m) -> dict:
    """The tiers' bytes as the loaded engine found them (attach's tally, the C engine's disk tier size)."""
    s = m.streamer
    assert s.tier_bytes["disk"] == m.stats.counters.disk_tier_bytes
    return dict(s.tier_bytes, disk_layers=m.plan.disk_layers, cpu_layers=m.plan.cpu_layers,
                host_bytes=m.plan.host_bytes)


def planned_tiers(t) -> dict:
    p = t.plan
    return dict(resident=p.resident_bytes, host=p.pinned_bytes, disk=p.disk_bytes, disk_layers=p.disk_layers,
                cpu_layers=p.cpu_layers, host_bytes=p.host_bytes)


@pytest.fixture(params=["gemma", "tiny"])
def model_path(request):
    return request.getfixturevalue(f"{request.param}_path")


@pytest.mark.parametrize("split", [None, "auto", "given"])
@pytest.mark.parametrize("n_disk", [0, 1, 3])
def test_plan_shows_the_tiers_the_load_makes(capsys, model_path, split, n_disk):
    """`plan --device host` prints the tiers the loaded engine has, byte for
    byte (one function decides both), for several host budgets and splits;
    a plan for one layer's less budget does not (the check can fail)."""
    from gguf_stream import cli
    from gguf_stream.placement import run_tiers

    mf = read_model(model_path)
    hybrid = hybrid_plan(model_path)
    cpu = hybrid.streamed[2::3] if split == "given" else None
    floor = with_generate_placement(hybrid, cpu or ())
    budget = floor.host_bytes + 1 if n_disk == 0 else budget_for(floor, n_disk)
    options = dict(CPU, **HYBRID, host_budget=budget,
                   generate_cpu_layers=cpu if split == "given" else split)
    config = EngineConfig(**options)
    planned = run_tiers(mf, initial_plan(mf, config, cuda=False), config, False)
    flags = ["--generate-cpu-layers", ",".join(map(str, cpu)) if cpu else split] if split else []
    assert cli.main(["plan", str(model_path), "--device", "host", "--n-streamed", "6", "--n-slots", "2",
                     "--host-budget", str(budget), "-t", str(CPU["n_threads"]), *flags, *SMALL]) == 0
    out = capsys.readouterr().out
    with StreamedModel(model_path, **options) as m:
        loaded = loaded_tiers(m)
        assert m.plan.tiers_line() in out.splitlines()
    assert planned_tiers(planned) == loaded
    assert len(loaded["disk_layers"]) == n_disk and set(loaded["cpu_layers"]) == set(cpu or ())
    assert f"generate split: {planned.split}" in out and "bounds (" in out
    # negative control: the plan for one layer's less budget differs from what this load made
    tighter = replace(config, host_budget=budget - max(mf.layer_bytes))
    assert planned_tiers(run_tiers(mf, initial_plan(mf, tighter, cuda=False), tighter, False)) != loaded


def test_the_default_budget_sends_the_rest_to_disk_and_says_so(case, tmp_path, monkeypatch, capsys):
    """Without --host-budget, what the (faked) meminfo leaves to spare is the
    budget: the streamed parts beyond it go to the disk tier, one line says
    so and how to change it (run and plan print the same line), results stay
    exact; --host-budget none keeps every part in host memory."""
    from gguf_stream import cli

    path, prompt, ref_tokens, ref_logits = case
    budget = budget_for(hybrid_plan(path), 2)
    fake_meminfo(tmp_path, monkeypatch, available_for(budget))
    with StreamedModel(path, **CPU, **HYBRID) as m:
        tokens, logits = m.generate(prompt, N_GEN, with_logits=True)
        assert len(m.plan.disk_layers) == 2 and m.stats.counters.disk_tier_bytes == m.plan.disk_bytes
        notice = m.streamer.tiers.notice()
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "host budget" in line]
    assert len(lines) == 1 and lines[0].endswith(notice)
    assert "MemAvailable" in notice and "--host-budget SIZE" in notice and "--host-budget none" in notice
    assert cli.main(["plan", str(path), "--device", "host", "--n-streamed", "6", "--n-slots", "2",
                     "-t", str(CPU["n_threads"]), *SMALL]) == 0
    assert notice in capsys.readouterr().out.splitlines()
    with StreamedModel(path, **CPU, **HYBRID, host_budget="none") as m:  # off: nothing on disk, no line
        assert not m.plan.disk_layers and m.streamer.tiers.notice() is None
    assert "host budget" not in capsys.readouterr().err
    fake_meminfo(tmp_path, monkeypatch, 1 << 20)  # nothing to spare: refused in one line, before loading
    with pytest.raises(HostMemoryError, match=r"host budget 0\.0 MiB \(what this machine can spare: MemAvailable "
                       r"1\.0 MiB less a margin of 1\.00 GiB\) is below .* free host memory") as exc:
        StreamedModel(path, **CPU, **HYBRID)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ on a GPU (skipped without CUDA)

GPU_OPTS = dict(n_ctx=512, n_batch=64, n_ubatch=64)


def cuda_or_skip():
    from gguf_stream.config import cuda_available

    if not cuda_available():
        pytest.skip("needs a CUDA build of llama-cpp-python and a GPU")


def cuda_budget(path, n_disk: int) -> int:
    """A host budget that puts at least n_disk of 6 streamed layers on the disk tier in a CUDA run."""
    from gguf_stream.placement import expected_generate_plan

    mf = read_model(path)
    config = EngineConfig(n_streamed=6, n_slots=2, exact=True, **GPU_OPTS)
    host = expected_generate_plan(mf, initial_plan(mf, config, cuda=True), config, True).host_bytes
    return host - n_disk * max(mf.layer_bytes) - 1


@pytest.mark.gpu
@pytest.mark.parametrize("staging,direct", [("off", False), ("16KiB", False), ("16KiB", True)])
def test_cuda_disk_tier_matches_all_in_vram(tiny_path, tmp_path, monkeypatch, staging, direct):
    """The CUDA engine's staged reader (pinned staging, an event per buffer):
    bit-identical to all-in-VRAM, in 16 KiB chunks (smaller than a tensor)
    and with O_DIRECT too."""
    cuda_or_skip()
    from gguf_stream.model import StockModel

    monkeypatch.setenv(STAGING_ENV, staging)  # on CUDA: the chunk size ("off": the default, capped per model)
    copy = tmp_path / "model.gguf"
    shutil.copyfile(tiny_path, copy)
    with StockModel(copy, n_gpu_layers=-1, **GPU_OPTS) as s:
        prompt = s.tokenize("Once upon a time")
        ref_tokens, ref_logits = s.generate(prompt, 16, with_logits=True)
    with StreamedModel(copy, n_streamed=6, n_slots=2, exact=True, host_budget=cuda_budget(copy, 3),
                       disk_direct=direct, **GPU_OPTS) as m:
        tokens, logits = m.generate(prompt, 16, with_logits=True)
        c = m.stats.counters
        assert len(m.plan.disk_layers) >= 3 and c.disk_reads > 0 and c.staging_bytes > 0
        assert c.released_host_bytes > 0  # llama.cpp's copy of the disk tier was handed back
        assert c.disk_readers == DISK_READERS
        if staging != "off":
            assert c.staging_bytes == (DISK_READERS + STAGING_SPARE) * 16384
        assert direct or c.disk_direct == 0
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() == 0.0


@pytest.mark.gpu
def test_cuda_disk_tier_file_truncated_is_a_clear_error(tiny_path, tmp_path):
    cuda_or_skip()
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_path, path)
    with StreamedModel(path, n_streamed=6, n_slots=2, exact=True, host_budget=cuda_budget(path, 3),
                       **GPU_OPTS) as m:
        prompt = m.tokenize("Once upon a time")
        m.generate(prompt, 2)
        os.truncate(path, os.path.getsize(path) // 2)
        with pytest.raises(DecodeError, match="changed while the model was loaded") as exc:
            m.generate(prompt, 8)
        assert "\n" not in str(exc.value)
        with pytest.raises(DecodeError):
            m.generate(prompt, 1)


def test_tier_bounds_follow_the_rates(tiny_path):
    """The bounds `plan` prints: symbolic without measured rates, numbers with
    them (a ubatch moves every streamed byte over PCIe and reads the disk tier
    once; a token reads the disk tier once)."""
    from gguf_stream.disk import tier_bounds
    from gguf_stream.perfmodel import Rates

    plan = make_plan(read_model(tiny_path), n_streamed=6, n_slots=2)
    tiered = assign_disk_tier(plan, budget_for(plan, 2))
    line = tier_bounds(tiered, 64)
    assert "no rates measured" in line and "(PCIe rate)" in line and "(disk read rate)" in line
    rates = Rates(pcie_bytes_per_s=tiered.streamed_bytes * 10.0, cpu_bytes_per_s=1e9, gpu_token_seconds=1e-3)
    line = tier_bounds(tiered, 64, rates, disk_rate=tiered.disk_bytes * 4.0)
    assert "at most 256 t/s" in line  # 64 tokens per max(0.1 s PCIe, 0.25 s disk)
    assert "at most 4.00 t/s" in line  # the disk tier every token
    line = tier_bounds(plan, 64, rates)  # no disk tier: PCIe alone bounds a ubatch
    assert "at most 640 t/s" in line and "no disk tier" in line and "disk read rate" not in line
