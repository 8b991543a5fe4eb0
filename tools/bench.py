#!/usr/bin/env python3
"""Streamed vs stock llama.cpp at equal VRAM budgets; see gguf_stream/bench.py.

    python tools/bench.py -m llama3-8b --vram-budget 2.5GiB,0.75x,all
    python tools/bench.py --device host -p 64 -n 16 -b 64 -ub 64   # CPU-only reduced mode
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gguf_stream.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
