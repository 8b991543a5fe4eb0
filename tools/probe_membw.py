"""Probe: do the CPU path and the PCIe path share host memory bandwidth?

The hybrid bound min_x max(G + c(O-x), p*x) treats the CPU reading its
layers (c) and the DMA engine reading the streamed ones (p) as independent.
Both read host DRAM. This measures (torch only, no llama.cpp):
  cpu:  multi-threaded reads of a pageable host buffer (GB/s),
  dma:  pinned host -> device copies on a side stream (GB/s),
  both: the two at the same time.
`--hog SECONDS` only runs the DMA loop (to time another process under it).

    python3 tools/probe_membw.py            # table
    python3 tools/probe_membw.py --hog 30 & # background DMA load
"""
import argparse
import json
import threading
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=float, default=2.0, help="size of each buffer")
ap.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
ap.add_argument("--hog", type=float, default=0.0, help="only run the DMA loop this long")
ap.add_argument("-t", "--threads", type=int, default=None)
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
n = int(a.gib * 2**30)
pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
pinned.fill_(1)
device = torch.empty(n, dtype=torch.uint8, device="cuda")
host = torch.ones(n // 4, dtype=torch.float32)  # pageable, like llama.cpp's repacked CPU weights
stream = torch.cuda.Stream()


def dma(seconds, out):
    # Wait on blocking events: a spinning wait would take a core from the
    # CPU side (llama.cpp's OpenMP threads suffer badly from a missing core).
    done, t0 = 0, time.perf_counter()
    with torch.cuda.stream(stream):
        while time.perf_counter() - t0 < seconds:
            for _ in range(2):
                device.copy_(pinned, non_blocking=True)
            ev = torch.cuda.Event(blocking=True)
            ev.record(stream)
            ev.synchronize()
            done += 2 * n
    out["dma"] = done / (time.perf_counter() - t0) / 1e9


def cpu(seconds, out):
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        host.sum()
        done += n
    out["cpu"] = done / (time.perf_counter() - t0) / 1e9


if a.hog:
    r = {}
    print("ready", flush=True)
    dma(a.hog, r)
    print(json.dumps({"hog_dma_GBps": round(r["dma"], 1)}))
else:
    cpu(0.5, {})
    dma(0.5, {})
    alone_cpu, alone_dma, both = {}, {}, {}
    cpu(a.seconds, alone_cpu)
    dma(a.seconds, alone_dma)
    t = threading.Thread(target=dma, args=(a.seconds, both))  # copy_ and sync release the GIL
    t.start()
    cpu(a.seconds, both)
    t.join()
    print(json.dumps({"threads": torch.get_num_threads(), "cpu_alone_GBps": round(alone_cpu["cpu"], 1),
                      "dma_alone_GBps": round(alone_dma["dma"], 1), "cpu_with_dma_GBps": round(both["cpu"], 1),
                      "dma_with_cpu_GBps": round(both["dma"], 1)}))
