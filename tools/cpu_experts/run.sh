#!/usr/bin/env bash
# The CPU expert kernels side by side: the split pool against llama.cpp's MUL_MAT_ID (repacked and plain),
# at several thread counts; with PROMPT_ROWS=512 also llama.cpp's MUL_MAT_ID for a prompt's ubatch of that many
# rows (the CPU's prompt rate for experts, against PCIe's ~6 ms per Qwen3-30B-A3B layer) and the split pool on
# the rows routed to the last PROMPT_CPU experts (default 8 16: --prompt-cpu-experts; since the fifteenth session
# through llama.cpp's MUL_MAT_ID graph, GGUF_STREAM_PROMPT_CPU_KERNEL=pool for the pool's own rows).
# From the repository root: bash tools/cpu_experts/run.sh [GGML_INCLUDE_DIR]
# (ggml's headers: pip puts them in site-packages/include; the GPU box's prebuilt copy has none, pass
# vendor/llama.cpp/ggml/include of the matching source).
set -e
LIB=$(python3 -c "import os, llama_cpp; print(os.path.join(os.path.dirname(llama_cpp.__file__), 'lib'))")
INC=${1:-$(dirname "$(dirname "$LIB")")/include}
D=tools/cpu_experts; OUT=${TMPDIR:-/tmp}
g++ -O2 -std=c++17 $D/llama_mul_mat_id.cpp -I"$INC" -L"$LIB" -lggml -lggml-base -lggml-cpu -Wl,-rpath,"$LIB" \
    -o $OUT/llama_mul_mat_id
gcc -O2 -std=gnu11 -Inative $D/split_pool.c native/gs_split_cpu.c native/gs_split_graph.c native/gs_util.c native/gs_libs.c \
    -Wl,--no-as-needed -L"$LIB" -lggml-base -lggml-cpu -lggml -Wl,-rpath,"$LIB" -ldl -lpthread -lm -o $OUT/split_pool
for t in ${THREADS:-1 2 4 8 12 15 16}; do
    [ "$t" -le "$(nproc)" ] || continue
    $OUT/split_pool $t 8; $OUT/split_pool $t 5
    $OUT/llama_mul_mat_id $t 1 2>/dev/null; $OUT/llama_mul_mat_id $t 0 2>/dev/null
done
if [ -n "$PROMPT_ROWS" ]; then   # a prompt's ubatch: llama.cpp on every expert, the pool on the last N (x N/128)
    $OUT/llama_mul_mat_id "$(nproc)" 1 "$PROMPT_ROWS" 2>/dev/null; $OUT/llama_mul_mat_id "$(nproc)" 0 "$PROMPT_ROWS" 2>/dev/null
    for n in ${PROMPT_CPU:-8 16}; do $OUT/split_pool "$(nproc)" 8 "$PROMPT_ROWS" "$n"; done
fi
