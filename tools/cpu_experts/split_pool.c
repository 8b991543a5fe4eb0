/* The split's CPU part (native/gs_split_cpu.c: llama.cpp's vec_dot rows from the host copy, a pool of
 * THREADS - 1 workers and the calling thread) on one token's EXPERTS routed experts of a Qwen3-30B-A3B layer,
 * the work llama_mul_mat_id.cpp gives llama.cpp. With ROWS and PROMPT_CPU: a prompt's ubatch of ROWS rows
 * routed as llama_mul_mat_id.cpp routes them (8 each), the pool computing the rows routed to the last
 * PROMPT_CPU experts (--prompt-cpu-experts), timed beside llama.cpp's MUL_MAT_ID on every expert of the
 * ubatch (its time x PROMPT_CPU / 128 is what the pool would match). Usage: split_pool THREADS EXPERTS [ROWS
 * PROMPT_CPU]. Built by run.sh. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "gs_abi.h"
#include "gs_split.h"
#include "gs_util.h"
#include "gguf_stream.h"
size_t ggml_nbytes(const void *t);
static double now(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
    int nth = argc > 1 ? atoi(argv[1]) : 1, U = argc > 2 ? atoi(argv[2]) : 8, iters = 200;
    int rows = argc > 3 ? atoi(argv[3]) : 1, n_cpu = argc > 4 ? atoi(argv[4]) : 0;
    if (rows > 1) iters = 10;
    const int E = 2048, F = 768, X = 128;
    G.nbytes = (void *)ggml_nbytes;
    if (cpu_kernels_load()) { printf("load failed: %s\n", gs_last_error()); return 1; }
    size_t rg = 144 * (E / 256), rd = 144 * (F / 256);
    size_t eg = rg * F, ed = rd * E;
    char *w[3]; size_t sz[3] = {eg * X, eg * X, ed * X};
    unsigned s = 1;
    for (int m = 0; m < 3; m++) { w[m] = aligned_alloc(64, sz[m]);
        for (size_t i = 0; i < sz[m]; i += 4) { s = s * 1664525u + 1013904223u; memcpy(w[m] + i, &s, 4); }
        for (size_t b = 0; b < sz[m]; b += 144) { unsigned short one = 0x2000; memcpy(w[m] + b, &one, 2); memcpy(w[m] + b + 2, &one, 2); } }
    expert_mats mats = {0};
    for (int m = 0; m < 3; m++) { mats.src[m] = w[m]; mats.type[m] = 12; }
    mats.nb1[0] = mats.nb1[1] = rg; mats.nb2[0] = mats.nb2[1] = eg; mats.nb1[2] = rd; mats.nb2[2] = ed;
    mats.n_embd = E; mats.n_ff = F;
    float *x = malloc((size_t)E * rows * 4);
    for (size_t i = 0; i < (size_t)E * rows; i++) x[i] = (i % 1000) / 1000.f - 0.5f;
    split_pool *p; split_pool_create(nth - 1, &p);
    double tot = 0, best = 1e9;
    int n_jobs = 0;
    for (int it = 0; it < iters; it++) {
        cpu_job *j = split_pool_jobs(p, rows > 1 ? (size_t)rows * 8 : (size_t)U);
        n_jobs = 0;
        if (rows > 1) {   /* llama_mul_mat_id.cpp's routing; the rows of the last n_cpu experts */
            for (int r = 0; r < rows; r++)
                for (int k = 0; k < 8; k++) {
                    int ex = (it * 37 + r * 11 + k * 13) % X;
                    if (ex >= X - n_cpu) j[n_jobs++] = (cpu_job){ r, k, ex };
                }
        } else
            for (int k = 0; k < U; k++) j[n_jobs++] = (cpu_job){ 0, k, (it * 37 + k * 13) % X };
        double t0 = now();
        split_pool_post(p, &mats, x, rows, n_jobs);
        split_pool_finish(p);
        double dt = now() - t0; tot += dt; if (dt < best) best = dt;
    }
    double flops = 2.0 * 3 * n_jobs * (double)E * F;
    if (rows > 1)
        printf("our pool threads=%d rows=%d last %d experts (%d row-experts): mean %.3f ms best %.3f ms (%.0f GFLOPS "
               "mean)\n", nth, rows, n_cpu, n_jobs, tot / iters * 1e3, best * 1e3, flops / (tot / iters) / 1e9);
    else
        printf("our pool threads=%d experts=%d: mean %.3f ms best %.3f ms (%.1f GB/s mean)\n", nth, U, tot / iters * 1e3,
               best * 1e3, (double)U * (2 * eg + ed) / (tot / iters) / 1e9);
    split_pool_free(p);
    return 0;
}
