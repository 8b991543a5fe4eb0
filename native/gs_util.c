/* Errors, the clock, name parsing and the pointer map. */
#include "gs_util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gguf_stream.h"
#include "gs_abi.h"

/* ---- errors --------------------------------------------------------------- */

static __thread char g_err[512];

int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return code;
}

int cuda_fail(const char *call, int err) {
    return fail(GS_E_CUDA, "%s: %s (cudaError %d)", call,
                C.GetErrorString ? C.GetErrorString(err) : "?", err);
}

const char *gs_last_error(void) { return g_err; }

const char *gs_strerror(int code) {
    switch (code) {
    case GS_OK:         return "ok";
    case GS_E_INVALID:  return "invalid argument or state";
    case GS_E_NOMEM:    return "out of host memory";
    case GS_E_DLOPEN:   return "library or symbol not found";
    case GS_E_GGML:     return "ggml call failed";
    case GS_E_CUDA:     return "CUDA runtime call failed";
    case GS_E_THREAD:   return "thread creation failed";
    case GS_E_GRAPH:    return "graph order violated";
    case GS_E_IO:       return "model file read failed";
    default:            return "unknown error";
    }
}

/* ---- clock and names ---------------------------------------------------------- */

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int parse_index(const char *name, const char *prefix, char end) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    char *stop;
    long v = strtol(name + n, &stop, 10);
    if (stop == name + n || *stop != end || v < 0 || v > 1 << 20) return -1;
    return (int)v;
}

/* ---- pointer -> index map (open addressing) -------------------------------- */

static size_t ptr_hash(const void *p, size_t cap) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return (size_t)x & (cap - 1);
}

int ptrmap_get(const ptrmap *m, const void *key) {
    if (!m->cap) return -1;
    for (size_t i = ptr_hash(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i]) return -1;
        if (m->keys[i] == key) return m->vals[i];
    }
}

int ptrmap_put(ptrmap *m, const void *key, int val, size_t count) {
    if ((count + 1) * 2 > m->cap) {      /* keep load <= 1/2 */
        size_t ncap = m->cap ? m->cap * 2 : 256;
        ptrmap n = { calloc(ncap, sizeof(void *)), calloc(ncap, sizeof(int)), ncap };
        if (!n.keys || !n.vals) { free(n.keys); free(n.vals); return GS_E_NOMEM; }
        for (size_t i = 0; i < m->cap; i++)
            if (m->keys[i]) ptrmap_put(&n, m->keys[i], m->vals[i], 0);
        free(m->keys); free(m->vals);
        *m = n;
    }
    size_t i = ptr_hash(key, m->cap);
    while (m->keys[i] && m->keys[i] != key) i = (i + 1) & (m->cap - 1);
    m->keys[i] = key;
    m->vals[i] = val;
    return GS_OK;
}

void ptrmap_free(ptrmap *m) { free(m->keys); free(m->vals); memset(m, 0, sizeof *m); }
