// llama.cpp's CPU MUL_MAT_ID on ROWS tokens' 8 routed experts each of a Qwen3-30B-A3B layer (gate, up: 2048 ->
// 768; down: 768 -> 2048; 128 experts, Q4_K), repacked (CPU_REPACK) or plain: what stock --n-cpu-moe computes per
// layer for a generated token (ROWS 1) or, without op offload, for a prompt's ubatch (ROWS 512: what the CPU could
// take off PCIe while prompts stream). Experts change every run so they come from DRAM. Usage: llama_mul_mat_id
// THREADS REPACK(0|1) [ROWS]. Built and run by run.sh beside split_pool.c (the split's CPU part on the same work);
// BENCHMARKS.md, ninth session.
#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
ggml_backend_buffer_type_t ggml_backend_cpu_repack_buffer_type();
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
int main(int argc, char **argv) {
    int nth = argc > 1 ? atoi(argv[1]) : 1, repack = argc > 2 ? atoi(argv[2]) : 1, rows = argc > 3 ? atoi(argv[3]) : 1;
    int iters = rows > 1 ? 10 : 200;
    const int E = 2048, F = 768, X = 128, U = 8;
    ggml_init_params ip = {ggml_tensor_overhead() * 64 + ggml_graph_overhead(), NULL, true};
    ggml_context *ctx = ggml_init(ip);
    ggml_tensor *wg = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_K, E, F, X);
    ggml_tensor *wu = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_K, E, F, X);
    ggml_tensor *wd = ggml_new_tensor_3d(ctx, GGML_TYPE_Q4_K, F, E, X);
    ggml_context *ctx2 = ggml_init(ip);
    ggml_tensor *x = ggml_new_tensor_3d(ctx2, GGML_TYPE_F32, E, 1, rows);
    ggml_tensor *ids = ggml_new_tensor_2d(ctx2, GGML_TYPE_I32, U, rows);
    ggml_tensor *g = ggml_mul_mat_id(ctx2, wg, x, ids);
    ggml_tensor *u = ggml_mul_mat_id(ctx2, wu, x, ids);
    ggml_tensor *h = ggml_swiglu_split(ctx2, g, u);
    ggml_tensor *y = ggml_mul_mat_id(ctx2, wd, h, ids);
    ggml_cgraph *gf = ggml_new_graph(ctx2);
    ggml_build_forward_expand(gf, y);
    ggml_backend_t be = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(be, nth);
    ggml_backend_buffer_type_t bt = repack ? ggml_backend_cpu_repack_buffer_type() : ggml_backend_cpu_buffer_type();
    ggml_backend_buffer_t wb = ggml_backend_alloc_ctx_tensors_from_buft(ctx, bt);
    ggml_backend_buffer_t ab = ggml_backend_alloc_ctx_tensors(ctx2, be);
    std::mt19937 rng(1);
    for (ggml_tensor *w : {wg, wu, wd}) {
        size_t n = ggml_nbytes(w); std::vector<uint8_t> d(n);
        for (size_t i = 0; i < n; i += 4) { uint32_t r = rng(); memcpy(&d[i], &r, 4); }
        for (size_t b = 0; b < n; b += 144) { uint16_t one = 0x2000; memcpy(&d[b], &one, 2); memcpy(&d[b + 2], &one, 2); }
        ggml_backend_tensor_set(w, d.data(), 0, n);
    }
    std::vector<float> xv((size_t)E * rows); for (auto &v : xv) v = (rng() % 1000) / 1000.f - 0.5f;
    ggml_backend_tensor_set(x, xv.data(), 0, xv.size() * 4);
    double best = 1e9, tot = 0;
    std::vector<int32_t> idv((size_t)U * rows);
    std::vector<char> used(X);
    for (int it = 0; it < iters; it++) {
        // 8 distinct experts per row (13 is coprime with 128), spread over the experts as trained routing is
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < U; k++) used[idv[(size_t)r * U + k] = (it * 37 + r * 11 + k * 13) % X] = 1;
        ggml_backend_tensor_set(ids, idv.data(), 0, idv.size() * 4);
        double t0 = now();
        ggml_backend_graph_compute(be, gf);
        double dt = now() - t0; tot += dt; if (dt < best) best = dt;
    }
    int n_used = 0; for (char u : used) n_used += u;
    double bytes = 3.0 * (rows > 1 ? n_used : U) * ggml_nbytes(wg) / X, flops = 2.0 * 3 * rows * U * (double)E * F;
    printf("llama.cpp mul_mat_id repack=%d threads=%d rows=%d: mean %.3f ms best %.3f ms  (%.1f GB/s, %.0f GFLOPS mean)\n",
           repack, nth, rows, tot / iters * 1e3, best * 1e3, bytes / (tot / iters) / 1e9, flops / (tot / iters) / 1e9);
    return 0;
}
