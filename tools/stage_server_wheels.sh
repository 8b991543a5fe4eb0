#!/usr/bin/env bash
# Run locally after ../shared/device/stage.sh: adds llama-cpp-python's server
# packages (uvicorn, fastapi, pydantic-settings, sse-starlette,
# starlette-context and their dependencies) for the GPU box's Python 3.12 to
# .device/, so that `gguf-stream serve` and tools/serve_batch_bench.py run
# there (the box has no package index; .device/setup.sh installs every wheel
# in .device/). About 4 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .device ] || { echo "no .device/: run bash ../shared/device/stage.sh first" >&2; exit 1; }
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .device \
    uvicorn fastapi pydantic-settings sse-starlette starlette-context
ls .device/*.whl
