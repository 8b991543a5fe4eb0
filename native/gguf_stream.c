/* gguf-stream native helper. See gguf_stream.h for the contract. */
#define _GNU_SOURCE
#include "gguf_stream.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- the slice of ggml's ABI we rely on (llama-cpp-python 0.3.36) -------- */

/* Mirror of struct ggml_tensor (ggml.h). The Python side checks names and
 * shapes read through it against the GGUF file before anything is re-homed. */
struct gs_tensor {
    int32_t type;
    void   *buffer;
    int64_t ne[4];
    size_t  nb[4];
    int32_t op;
    int32_t op_params[16];
    int32_t flags;
    struct gs_tensor *src[10];
    struct gs_tensor *view_src;
    size_t  view_offs;
    void   *data;
    char    name[64];
    void   *extra;
    char    padding[8];
};
_Static_assert(offsetof(struct gs_tensor, buffer) == 8, "ggml_tensor.buffer");
_Static_assert(offsetof(struct gs_tensor, src) == 152, "ggml_tensor.src");
_Static_assert(offsetof(struct gs_tensor, view_src) == 232, "ggml_tensor.view_src");
_Static_assert(offsetof(struct gs_tensor, data) == 248, "ggml_tensor.data");
_Static_assert(offsetof(struct gs_tensor, name) == 256, "ggml_tensor.name");
_Static_assert(sizeof(struct gs_tensor) == 336, "sizeof ggml_tensor");

/* Mirror of struct ggml_object (ggml.c): the header right before every
 * tensor of a ggml context, chaining them in creation order. Used to find
 * the per-stream views llama.cpp allocates next to each KV cache tensor. */
struct gs_object {
    size_t offs;
    size_t size;
    struct gs_object *next;
    int32_t type;             /* GGML_OBJECT_TYPE_TENSOR = 0 */
    char    padding[4];
};
_Static_assert(sizeof(struct gs_object) == 32, "sizeof ggml_object");

#define GGML_USAGE_WEIGHTS 1

static struct {
    int    loaded;
    void  *(*dev_by_name)(const char *);
    void  *(*dev_buffer_type)(void *);
    void  *(*dev_host_buffer_type)(void *);
    void   (*dev_memory)(void *, size_t *, size_t *);
    void  *(*buft_alloc_buffer)(void *, size_t);
    size_t (*buft_get_alignment)(void *);
    size_t (*buft_get_alloc_size)(void *, const void *);
    const char *(*buft_name)(void *);
    const char *(*buffer_name)(void *);
    void   (*buffer_free)(void *);
    void  *(*buffer_get_base)(void *);
    size_t (*buffer_get_size)(void *);
    void   (*buffer_clear)(void *, uint8_t);
    void   (*buffer_set_usage)(void *, int);
    int    (*buffer_get_usage)(void *);
    int    (*tensor_alloc)(void *, void *, void *);
    void   (*tensor_set)(void *, const void *, size_t, size_t);
    void   (*tensor_get)(const void *, void *, size_t, size_t);
    size_t (*nbytes)(const void *);
    const char *(*op_name)(int);
    void  *(*dev_backend_reg)(void *);
    void  *(*reg_get_proc_address)(void *, const char *);
} G;

/* CUDA runtime entry points; handles are opaque pointers, errors ints. */
#define CUDA_SUCCESS 0
#define CUDA_NOT_READY 600
#define CUDA_H2D 1
#define CUDA_STREAM_NON_BLOCKING 1
#define CUDA_EVENT_DISABLE_TIMING 2
static struct {
    int loaded;
    int (*SetDevice)(int);
    int (*StreamCreateWithFlags)(void **, unsigned);
    int (*StreamDestroy)(void *);
    int (*StreamSynchronize)(void *);
    int (*EventCreateWithFlags)(void **, unsigned);
    int (*EventDestroy)(void *);
    int (*EventRecord)(void *, void *);
    int (*EventQuery)(void *);
    int (*EventSynchronize)(void *);
    int (*MemcpyAsync)(void *, const void *, size_t, int, void *);
    int (*MemsetAsync)(void *, int, size_t, void *);
    int (*DeviceSynchronize)(void);
    const char *(*GetErrorString)(int);
} C;

/* ---- errors --------------------------------------------------------------- */

static __thread char g_err[512];

static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return code;
}

static int cuda_fail(const char *call, int err) {
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
    default:            return "unknown error";
    }
}

/* ---- library loading ------------------------------------------------------ */

static void *open_loaded(const char *path) {
    /* Prefer the copy already in the process; fall back to loading it. */
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    return h ? h : dlopen(path, RTLD_NOW);
}

static int resolve(void *h1, void *h2, const char *name, void **slot) {
    void *p = h1 ? dlsym(h1, name) : NULL;
    if (!p && h2) p = dlsym(h2, name);
    if (!p) return fail(GS_E_DLOPEN, "symbol %s not found in the loaded ggml/cudart libraries", name);
    *slot = p;
    return GS_OK;
}

#define RESOLVE(h1, h2, field, sym) \
    do { int rc_ = resolve(h1, h2, sym, (void **)&field); if (rc_) return rc_; } while (0)

int gs_libs_load(const char *ggml_base, const char *ggml, const char *cudart) {
    if (!ggml_base || !ggml) return fail(GS_E_INVALID, "gs_libs_load: ggml library paths are required");
    if (!G.loaded) {
        void *hb = open_loaded(ggml_base);
        if (!hb) return fail(GS_E_DLOPEN, "dlopen(%s): %s", ggml_base, dlerror());
        void *hg = open_loaded(ggml);
        if (!hg) return fail(GS_E_DLOPEN, "dlopen(%s): %s", ggml, dlerror());
        RESOLVE(hg, hb, G.dev_by_name, "ggml_backend_dev_by_name");
        RESOLVE(hb, hg, G.dev_buffer_type, "ggml_backend_dev_buffer_type");
        RESOLVE(hb, hg, G.dev_host_buffer_type, "ggml_backend_dev_host_buffer_type");
        RESOLVE(hb, hg, G.dev_memory, "ggml_backend_dev_memory");
        RESOLVE(hb, hg, G.buft_alloc_buffer, "ggml_backend_buft_alloc_buffer");
        RESOLVE(hb, hg, G.buft_get_alignment, "ggml_backend_buft_get_alignment");
        RESOLVE(hb, hg, G.buft_get_alloc_size, "ggml_backend_buft_get_alloc_size");
        RESOLVE(hb, hg, G.buft_name, "ggml_backend_buft_name");
        RESOLVE(hb, hg, G.buffer_name, "ggml_backend_buffer_name");
        RESOLVE(hb, hg, G.buffer_free, "ggml_backend_buffer_free");
        RESOLVE(hb, hg, G.buffer_get_base, "ggml_backend_buffer_get_base");
        RESOLVE(hb, hg, G.buffer_get_size, "ggml_backend_buffer_get_size");
        RESOLVE(hb, hg, G.buffer_clear, "ggml_backend_buffer_clear");
        RESOLVE(hb, hg, G.buffer_set_usage, "ggml_backend_buffer_set_usage");
        RESOLVE(hb, hg, G.buffer_get_usage, "ggml_backend_buffer_get_usage");
        RESOLVE(hb, hg, G.tensor_alloc, "ggml_backend_tensor_alloc");
        RESOLVE(hb, hg, G.tensor_set, "ggml_backend_tensor_set");
        RESOLVE(hb, hg, G.tensor_get, "ggml_backend_tensor_get");
        RESOLVE(hb, hg, G.nbytes, "ggml_nbytes");
        RESOLVE(hb, hg, G.op_name, "ggml_op_name");
        RESOLVE(hb, hg, G.dev_backend_reg, "ggml_backend_dev_backend_reg");
        RESOLVE(hb, hg, G.reg_get_proc_address, "ggml_backend_reg_get_proc_address");
        G.loaded = 1;
    }
    if (cudart && !C.loaded) {
        void *hc = open_loaded(cudart);
        if (!hc) return fail(GS_E_DLOPEN, "dlopen(%s): %s", cudart, dlerror());
        RESOLVE(hc, NULL, C.SetDevice, "cudaSetDevice");
        RESOLVE(hc, NULL, C.StreamCreateWithFlags, "cudaStreamCreateWithFlags");
        RESOLVE(hc, NULL, C.StreamDestroy, "cudaStreamDestroy");
        RESOLVE(hc, NULL, C.StreamSynchronize, "cudaStreamSynchronize");
        RESOLVE(hc, NULL, C.EventCreateWithFlags, "cudaEventCreateWithFlags");
        RESOLVE(hc, NULL, C.EventDestroy, "cudaEventDestroy");
        RESOLVE(hc, NULL, C.EventRecord, "cudaEventRecord");
        RESOLVE(hc, NULL, C.EventQuery, "cudaEventQuery");
        RESOLVE(hc, NULL, C.EventSynchronize, "cudaEventSynchronize");
        RESOLVE(hc, NULL, C.MemcpyAsync, "cudaMemcpyAsync");
        RESOLVE(hc, NULL, C.MemsetAsync, "cudaMemsetAsync");
        RESOLVE(hc, NULL, C.DeviceSynchronize, "cudaDeviceSynchronize");
        RESOLVE(hc, NULL, C.GetErrorString, "cudaGetErrorString");
        C.loaded = 1;
    }
    return GS_OK;
}

int gs_device_bufts(const char *name, void **buft, void **host_buft) {
    if (!G.loaded) return fail(GS_E_INVALID, "gs_device_bufts: libraries not loaded");
    void *dev = G.dev_by_name(name);
    if (!dev) return fail(GS_E_INVALID, "ggml has no device named %s", name);
    if (buft) *buft = G.dev_buffer_type(dev);
    if (host_buft) *host_buft = G.dev_host_buffer_type(dev);
    return GS_OK;
}

int gs_plain_cpu_buft(void **buft) {
    /* struct ggml_backend_buffer_type: six interface pointers, device, context */
    static struct { void *iface[6]; void *device; void *context; } clone;
    *buft = NULL;
    if (!G.loaded) return fail(GS_E_INVALID, "gs_plain_cpu_buft: libraries not loaded");
    void *dev = G.dev_by_name("CPU");
    if (!dev) return fail(GS_E_INVALID, "ggml has no CPU device");
    if (!clone.device) memcpy(&clone, G.dev_buffer_type(dev), sizeof clone);
    *buft = &clone;
    return GS_OK;
}

int gs_cpu_repack_buft(void **buft) {
    *buft = NULL;
    if (!G.loaded) return fail(GS_E_INVALID, "gs_cpu_repack_buft: libraries not loaded");
    void *dev = G.dev_by_name("CPU");
    if (!dev) return fail(GS_E_INVALID, "ggml has no CPU device");
    void *reg = G.dev_backend_reg(dev);
    void **(*extra_bufts)(void *) = reg ? G.reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts") : NULL;
    for (void **b = extra_bufts ? extra_bufts(dev) : NULL; b && *b; b++)
        if (strcmp(G.buft_name(*b), "CPU_REPACK") == 0) { *buft = *b; break; }
    return GS_OK;
}

int gs_device_memory(const char *name, size_t *free_bytes, size_t *total_bytes) {
    if (!G.loaded) return fail(GS_E_INVALID, "gs_device_memory: libraries not loaded");
    void *dev = G.dev_by_name(name);
    if (!dev) return fail(GS_E_INVALID, "ggml has no device named %s", name);
    G.dev_memory(dev, free_bytes, total_bytes);
    return GS_OK;
}

int gs_tensor_buffer(const void *tensor, const char **buffer_name, size_t *buffer_size) {
    const struct gs_tensor *t = tensor;
    if (!G.loaded || !t || !t->buffer) return fail(GS_E_INVALID, "gs_tensor_buffer: tensor has no buffer");
    *buffer_name = G.buffer_name(t->buffer);
    *buffer_size = G.buffer_get_size(t->buffer);
    return GS_OK;
}

/* ---- pointer -> index map (open addressing) -------------------------------- */

typedef struct { const void **keys; int *vals; size_t cap; } ptrmap;

static size_t ptr_hash(const void *p, size_t cap) {
    uint64_t x = (uint64_t)(uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33;
    return (size_t)x & (cap - 1);
}

static int ptrmap_get(const ptrmap *m, const void *key) {
    if (!m->cap) return -1;
    for (size_t i = ptr_hash(key, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i]) return -1;
        if (m->keys[i] == key) return m->vals[i];
    }
}

static int ptrmap_put(ptrmap *m, const void *key, int val, size_t count) {
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

static void ptrmap_free(ptrmap *m) { free(m->keys); free(m->vals); memset(m, 0, sizeof *m); }

/* ---- engine state ---------------------------------------------------------- */

enum { SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_IN_USE };

typedef struct {
    struct gs_tensor *t;
    void   *src;          /* upload source: llama.cpp's host copy */
    void   *src_buffer;   /* the buffer t lived in before re-homing */
    void   *src_extra;    /* its backend-private extra pointer there */
    /* Generate-phase home of a CPU layer's weight when repacked for the CPU
     * kernels (NULL: the CPU reads the plain host copy at src). */
    void   *cpu_buffer, *cpu_data, *cpu_extra;
    size_t  nbytes, alloc, offset;
    int     layer;
    int     matmul_only;  /* discovery saw it only as src[0] of a matrix product */
} srec;

/* A KV cache tensor of the attached context and where llama.cpp put it. */
#define KV_MAX_VIEWS 8
typedef struct {
    struct gs_tensor *t;          /* cache_k_l<i> or cache_v_l<i>; NULL until seen */
    void   *dev_buffer, *dev_data, *dev_extra;
    struct gs_tensor *views[KV_MAX_VIEWS];   /* per-stream views allocated with it */
    void   *view_extra[KV_MAX_VIEWS];
    int     n_views;              /* -1: more than we track, so it never moves */
    size_t  nbytes, offset;       /* offset: in the layer's host KV buffer */
} kv_rec;

typedef struct {
    int    sidx[GS_N_PHASES]; /* position in the phase's execution order, -1 if not streamed then */
    int    cpu_generate;  /* computed by the CPU from host memory in the generate phase */
    int    gen_resident;  /* resident while generating, in the generate-resident region */
    int    gr_live;       /* ...and there now: its tensors point into the region */
    int    first, count;  /* its records in e->recs (contiguous after start) */
    int    slot;          /* slot adopted for the current evaluation, or -1 */
    size_t bytes;         /* laid-out size in a slot */
    void  *repack_buf;    /* CPU layers: their repacked weights (pageable host) */
    size_t repacked_bytes;
    kv_rec kv[2];         /* K, V of the attached context */
    void  *kv_host_buf;   /* CPU layers: their KV cache while generating */
    int    kv_on_host;
    void **dev_cell;      /* llama.cpp's device of this layer (see gs_engine_bind_layer_devices) */
    void  *dev_orig;      /* its value at binding: the device the layer was loaded for */
} layer_info;

typedef struct {
    int      layer;       /* layer held (loading, ready or in use), -1 if empty */
    int      state;
    char    *base;
    void    *event;       /* CUDA */
    uint64_t ticket;      /* host mode */
} slot_info;

typedef struct { int slot, layer; uint64_t ticket; } host_job;

struct gs_engine {
    gs_engine_config cfg;

    /* discovery */
    gs_weight *weights;
    char     (*weight_names)[64];
    unsigned char *weight_matmul_only;
    int        n_weights, cap_weights;
    ptrmap     weight_map;
    int        last_lout;
    gs_graph_check check;
    unsigned char *lout_seen;

    /* streaming */
    int        phase;     /* GS_PHASE_PROMPT or GS_PHASE_GENERATE */
    srec      *recs;
    int        n_recs, cap_recs;
    ptrmap     rec_map;
    layer_info *layers;
    int       *order[GS_N_PHASES];   /* streamed layers of each phase, in execution order */
    int        n_order[GS_N_PHASES];
    int        n_overflow;            /* layers with tensors in the ring (streamed in some phase) */
    int        n_slots;
    int        kv_attached, kv_scan;  /* a context's KV caches are (being) recorded */
    int        kv_cleared;            /* no cell in use since llama_memory_clear: moves copy nothing */
    int        reuse_min_batch;       /* >0: the attached context reuses graphs (see gs_engine_kv_attach) */
    int        check_shape;           /* ...and CPU layers exist: check each ubatch's phase (fixed while attached) */
    int        hold_kv;               /* generate phase: leave the CPU layers' caches where they are */
    /* generate-resident layers (see gs_engine_set_generate_resident) */
    int        gr_n;                  /* layers chosen */
    int        gr_own_mode;           /* region: own buffer (1) or the compute buffer's tail (0) */
    void      *gr_own;                /* own buffer */
    size_t     gr_reserve;            /* compute buffer bytes left to generate-phase graphs */
    char      *gr_base;               /* region while the layers are in it, else NULL */
    size_t     gr_bytes;
    int        gr_walk;               /* the next node asked starts a graph: look at all of it */
    void      *cbuf;                  /* the attached context's compute buffer for its GPU layers */
    char      *cbuf_base;
    size_t     cbuf_size, gen_extent; /* ...its size, and how much of it generate graphs used */
    void      *cpu_dev;               /* set while layer devices are bound */

    /* per-layer timing (calibration) */
    int        timing;
    double     t_last;
    double    *layer_seconds;
    uint64_t  *layer_count;
    /* timeline (probe) */
    int        tl_on, tl_in_decode, tl_open, tl_open_gpu, tl_graph_done;
    double     tl_begin, tl_mark;
    void      *tl_buffer;             /* last buffer classified, and its answer */
    int        tl_buffer_gpu;
    gs_timeline tl;
    slot_info *slots;
    void      *ring;
    size_t     slot_bytes;
    int        started, start_attempted;

    /* copy engine */
    void      *stream;
    pthread_t  thread;
    int        thread_started, stop;
    pthread_mutex_t mu;
    pthread_cond_t  cv_job, cv_done;
    host_job  *jobs;
    int        job_cap, job_head, job_len;
    uint64_t   issued, completed;

    gs_stats   stats;
    int        status;
    char       status_msg[512];
};

static void engine_fail(gs_engine *e, int code) {
    if (e->status) return;            /* keep the first failure */
    e->status = code;
    snprintf(e->status_msg, sizeof e->status_msg, "%s", g_err);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* "blk.12.ffn_up.weight" -> 12; "l_out-12" -> 12 (prefix "l_out-"); else -1. */
static int parse_index(const char *name, const char *prefix, char end) {
    size_t n = strlen(prefix);
    if (strncmp(name, prefix, n) != 0) return -1;
    char *stop;
    long v = strtol(name + n, &stop, 10);
    if (stop == name + n || *stop != end || v < 0 || v > 1 << 20) return -1;
    return (int)v;
}

int gs_engine_create(const gs_engine_config *cfg, gs_engine **out) {
    *out = NULL;
    if (!G.loaded) return fail(GS_E_INVALID, "gs_engine_create: call gs_libs_load first");
    if (!cfg || cfg->n_layer <= 0 || cfg->n_slots <= 0 || !cfg->ring_buft)
        return fail(GS_E_INVALID, "gs_engine_create: need n_layer > 0, n_slots > 0 and a ring buffer type");
    if (cfg->use_cuda && !C.loaded)
        return fail(GS_E_INVALID, "gs_engine_create: CUDA mode needs the CUDA runtime (gs_libs_load with cudart)");
    gs_engine *e = calloc(1, sizeof *e);
    if (!e) return fail(GS_E_NOMEM, "gs_engine_create: calloc");
    pthread_mutex_init(&e->mu, NULL);   /* first: gs_engine_destroy may run on any failure below */
    pthread_cond_init(&e->cv_job, NULL);
    pthread_cond_init(&e->cv_done, NULL);
    e->cfg = *cfg;
    e->layers = calloc(cfg->n_layer, sizeof *e->layers);
    e->lout_seen = calloc(cfg->n_layer, 1);
    if (!e->layers || !e->lout_seen) { gs_engine_destroy(e); return fail(GS_E_NOMEM, "gs_engine_create: calloc"); }
    for (int i = 0; i < cfg->n_layer; i++) {
        e->layers[i].sidx[0] = e->layers[i].sidx[1] = -1;
        e->layers[i].slot = -1;
    }
    e->layer_seconds = calloc(cfg->n_layer, sizeof *e->layer_seconds);
    e->layer_count = calloc(cfg->n_layer, sizeof *e->layer_count);
    if (!e->layer_seconds || !e->layer_count) { gs_engine_destroy(e); return fail(GS_E_NOMEM, "gs_engine_create: calloc"); }
    gs_engine_discover_reset(e);
    *out = e;
    return GS_OK;
}

/* ---- discovery ------------------------------------------------------------- */

void gs_engine_discover_reset(gs_engine *e) {
    e->last_lout = -1;
    memset(&e->check, 0, sizeof e->check);
    e->check.max_lout = -1;
    memset(e->lout_seen, 0, e->cfg.n_layer);
}

static int is_weight(const struct gs_tensor *t) {
    return t && t->buffer && G.buffer_get_usage(t->buffer) == GGML_USAGE_WEIGHTS;
}

static void violation(gs_engine *e, const char *fmt, ...) {
    if (e->check.violations++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->check.first_violation, sizeof e->check.first_violation, fmt, ap);
        va_end(ap);
    }
}

/* A weight that only ever feeds matrix products as their src[0] may be
 * repacked for the CPU kernels (which then read it in that layout only). */
static int is_matmul_src0(const struct gs_tensor *node, int k, const struct gs_tensor *src) {
    if (k != 0 || src->view_src) return 0;
    const char *op = G.op_name(node->op);
    return op && (strcmp(op, "MUL_MAT") == 0 || strcmp(op, "MUL_MAT_ID") == 0);
}

static void record_weight(gs_engine *e, struct gs_tensor *w, int viewed, int matmul_src0, const char *user_name) {
    int idx = ptrmap_get(&e->weight_map, w);
    if (idx < 0) {
        if (e->n_weights == e->cap_weights) {
            int ncap = e->cap_weights ? 2 * e->cap_weights : 256;
            gs_weight *nw = realloc(e->weights, ncap * sizeof *nw);
            if (nw) e->weights = nw;
            char (*nn)[64] = realloc(e->weight_names, ncap * sizeof *nn);
            if (nn) e->weight_names = nn;
            unsigned char *nm = realloc(e->weight_matmul_only, ncap);
            if (nm) e->weight_matmul_only = nm;
            if (!nw || !nn || !nm) { fail(GS_E_NOMEM, "discovery: realloc"); engine_fail(e, GS_E_NOMEM); return; }
            e->cap_weights = ncap;
        }
        idx = e->n_weights;
        if (ptrmap_put(&e->weight_map, w, idx, e->n_weights)) {
            fail(GS_E_NOMEM, "discovery: map"); engine_fail(e, GS_E_NOMEM); return;
        }
        e->n_weights++;
        memcpy(e->weight_names[idx], w->name, 64);
        e->weight_names[idx][63] = 0;
        gs_weight *r = &e->weights[idx];
        r->tensor = w;
        r->name = NULL;  /* set on read: weight_names may move when it grows */
        r->layer = parse_index(w->name, "blk.", '.');
        r->nbytes = G.nbytes(w);
        r->viewed = 0;
        e->weight_matmul_only[idx] = 1;
    }
    gs_weight *r = &e->weights[idx];
    r->viewed |= viewed;
    e->weight_matmul_only[idx] &= matmul_src0 && !viewed;
    if (r->layer >= 0 && r->layer != e->last_lout + 1)
        violation(e, "weight %s is used by node %s after l_out-%d", e->weight_names[idx], user_name, e->last_lout);
}

bool gs_discover_cb(void *tensor, bool ask, void *user) {
    gs_engine *e = user;
    struct gs_tensor *t = tensor;
    if (!ask || e->status) return false;
    if (t->view_src && is_weight(t->view_src)) record_weight(e, t->view_src, 1, 0, t->name);
    for (int k = 0; k < 10; k++) {
        struct gs_tensor *s = t->src[k];
        if (!s) continue;
        struct gs_tensor *base = s->view_src ? s->view_src : s;
        if (is_weight(base)) record_weight(e, base, base != s, is_matmul_src0(t, k, s), t->name);
    }
    int i = parse_index(t->name, "l_out-", '\0');
    if (i >= 0) {
        if (i >= e->cfg.n_layer) violation(e, "node l_out-%d but the model has %d layers", i, e->cfg.n_layer);
        else {
            if (i != e->last_lout + 1) violation(e, "l_out-%d follows l_out-%d", i, e->last_lout);
            if (!e->lout_seen[i]) { e->lout_seen[i] = 1; e->check.n_lout++; }
            if (i > e->check.max_lout) e->check.max_lout = i;
            e->last_lout = i;
        }
    }
    return false;
}

int gs_engine_weight_count(gs_engine *e) { return e->n_weights; }

int gs_engine_weight_get(gs_engine *e, int i, gs_weight *out) {
    if (i < 0 || i >= e->n_weights) return fail(GS_E_INVALID, "weight index %d out of range", i);
    *out = e->weights[i];
    out->name = e->weight_names[i];
    return GS_OK;
}

int gs_engine_graph_check(gs_engine *e, gs_graph_check *out) {
    *out = e->check;
    return GS_OK;
}

/* ---- streamed tensors and the ring ------------------------------------------ */

int gs_engine_add_tensor(gs_engine *e, int layer, void *tensor) {
    struct gs_tensor *t = tensor;
    if (e->started) return fail(GS_E_INVALID, "gs_engine_add_tensor: engine already started");
    if (layer < 0 || layer >= e->cfg.n_layer) return fail(GS_E_INVALID, "layer %d out of range", layer);
    if (!t || !t->buffer || !t->data || t->view_src)
        return fail(GS_E_INVALID, "tensor %s is not an allocated weight", t ? t->name : "(null)");
    if (ptrmap_get(&e->rec_map, t) >= 0) return fail(GS_E_INVALID, "tensor %s added twice", t->name);
    if (e->n_recs == e->cap_recs) {
        int ncap = e->cap_recs ? 2 * e->cap_recs : 256;
        srec *n = realloc(e->recs, ncap * sizeof *n);
        if (!n) return fail(GS_E_NOMEM, "gs_engine_add_tensor: realloc");
        e->recs = n;
        e->cap_recs = ncap;
    }
    srec *r = &e->recs[e->n_recs];
    memset(r, 0, sizeof *r);
    r->t = t;
    r->src = t->data;
    r->src_buffer = t->buffer;
    r->src_extra = t->extra;
    int w = ptrmap_get(&e->weight_map, t);
    r->matmul_only = w >= 0 && e->weight_matmul_only[w];
    r->nbytes = G.nbytes(t);
    r->alloc = G.buft_get_alloc_size(e->cfg.ring_buft, t);
    r->layer = layer;
    if (ptrmap_put(&e->rec_map, t, e->n_recs, e->n_recs)) return fail(GS_E_NOMEM, "gs_engine_add_tensor: map");
    e->n_recs++;
    return GS_OK;
}

static int cmp_rec(const void *a, const void *b) {
    const srec *x = a, *y = b;
    if (x->layer != y->layer) return x->layer - y->layer;
    return (x->t > y->t) - (x->t < y->t);
}

static size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

/* ---- copy engine ------------------------------------------------------------- */

/* Copy `layer`'s weights to dst (a slot, or the generate-resident region) in
 * its slot layout: on CUDA queued on the copy stream, in host mode now. */
static int copy_layer_to(gs_engine *e, int layer, char *dst) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const srec *r = &e->recs[k];
        /* Quantized rows are padded on CUDA; the padding must read as zero. */
        size_t pad = r->alloc - r->nbytes;
        if (!e->cfg.use_cuda) {
            memcpy(dst + r->offset, r->src, r->nbytes);
            if (pad) memset(dst + r->offset + r->nbytes, 0, pad);
            continue;
        }
        int err = C.MemcpyAsync(dst + r->offset, r->src, r->nbytes, CUDA_H2D, e->stream);
        if (err) return cuda_fail("cudaMemcpyAsync", err);
        if (pad && (err = C.MemsetAsync(dst + r->offset + r->nbytes, 0, pad, e->stream)))
            return cuda_fail("cudaMemsetAsync", err);
    }
    return GS_OK;
}

static void host_copy_layer(gs_engine *e, int slot, int layer) {
    copy_layer_to(e, layer, e->slots[slot].base);
    if (e->cfg.host_copy_delay_us > 0) usleep(e->cfg.host_copy_delay_us);
}

static void *host_copy_thread(void *arg) {
    gs_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop && e->job_len == 0) pthread_cond_wait(&e->cv_job, &e->mu);
        if (e->job_len == 0) break;          /* stop requested and queue drained */
        host_job job = e->jobs[e->job_head];
        pthread_mutex_unlock(&e->mu);
        host_copy_layer(e, job.slot, job.layer);
        pthread_mutex_lock(&e->mu);
        e->job_head = (e->job_head + 1) % e->job_cap;
        e->job_len--;
        e->completed = job.ticket;
        pthread_cond_broadcast(&e->cv_done);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static int copy_engine_start(gs_engine *e) {
    if (e->cfg.use_cuda) {
        int err = C.SetDevice(e->cfg.cuda_device);
        if (err) return cuda_fail("cudaSetDevice", err);
        /* Own non-blocking stream: never serialises with llama.cpp's streams. */
        err = C.StreamCreateWithFlags(&e->stream, CUDA_STREAM_NON_BLOCKING);
        if (err) { e->stream = NULL; return cuda_fail("cudaStreamCreateWithFlags", err); }
        for (int s = 0; s < e->n_slots; s++) {
            err = C.EventCreateWithFlags(&e->slots[s].event, CUDA_EVENT_DISABLE_TIMING);
            if (err) { e->slots[s].event = NULL; return cuda_fail("cudaEventCreateWithFlags", err); }
        }
        return GS_OK;
    }
    e->job_cap = 4 * e->n_slots + 8;
    e->jobs = calloc(e->job_cap, sizeof *e->jobs);
    if (!e->jobs) return fail(GS_E_NOMEM, "copy engine: calloc");
    if (pthread_create(&e->thread, NULL, host_copy_thread, e))
        return fail(GS_E_THREAD, "pthread_create: host copy thread");
    e->thread_started = 1;
    return GS_OK;
}

/* Queue the upload of `layer` into `slot`. Copies are FIFO (one stream or one
 * thread), so a later copy into the same slot is ordered after an earlier one. */
static int copy_issue(gs_engine *e, int slot, int layer) {
    const layer_info *ly = &e->layers[layer];
    slot_info *sl = &e->slots[slot];
    sl->layer = layer;
    sl->state = SLOT_LOADING;
    e->stats.uploads++;
    e->stats.bytes_uploaded += ly->bytes;
    if (e->cfg.use_cuda) {
        int rc = copy_layer_to(e, layer, sl->base);
        if (rc) { sl->state = SLOT_EMPTY; sl->layer = -1; return rc; }
        int err = C.EventRecord(sl->event, e->stream);
        if (err) { sl->state = SLOT_EMPTY; sl->layer = -1; return cuda_fail("cudaEventRecord", err); }
        return GS_OK;
    }
    pthread_mutex_lock(&e->mu);
    while (e->job_len == e->job_cap) pthread_cond_wait(&e->cv_done, &e->mu);
    host_job *j = &e->jobs[(e->job_head + e->job_len) % e->job_cap];
    j->slot = slot;
    j->layer = layer;
    j->ticket = ++e->issued;
    sl->ticket = j->ticket;
    e->job_len++;
    pthread_cond_signal(&e->cv_job);
    pthread_mutex_unlock(&e->mu);
    return GS_OK;
}

/* 1 if the slot's last copy has landed, 0 if in flight, <0 on error. */
static int copy_done(gs_engine *e, int slot) {
    slot_info *sl = &e->slots[slot];
    if (e->cfg.use_cuda) {
        int err = C.EventQuery(sl->event);
        if (err == CUDA_SUCCESS) return 1;
        if (err == CUDA_NOT_READY) return 0;
        return cuda_fail("cudaEventQuery", err);
    }
    pthread_mutex_lock(&e->mu);
    int done = e->completed >= sl->ticket;
    pthread_mutex_unlock(&e->mu);
    return done;
}

static int copy_wait(gs_engine *e, int slot) {
    slot_info *sl = &e->slots[slot];
    if (e->cfg.use_cuda) {
        int err = C.EventSynchronize(sl->event);
        return err ? cuda_fail("cudaEventSynchronize", err) : GS_OK;
    }
    pthread_mutex_lock(&e->mu);
    while (e->completed < sl->ticket) pthread_cond_wait(&e->cv_done, &e->mu);
    pthread_mutex_unlock(&e->mu);
    return GS_OK;
}

/* Wait until every upload issued so far has landed. */
static int copy_engine_drain(gs_engine *e) {
    if (e->cfg.use_cuda) {
        int err = e->stream ? C.StreamSynchronize(e->stream) : CUDA_SUCCESS;
        return err ? cuda_fail("cudaStreamSynchronize", err) : GS_OK;
    }
    pthread_mutex_lock(&e->mu);
    while (e->thread_started && e->completed < e->issued) pthread_cond_wait(&e->cv_done, &e->mu);
    pthread_mutex_unlock(&e->mu);
    return GS_OK;
}

static void copy_engine_stop(gs_engine *e) {
    if (e->cfg.use_cuda) {
        if (e->stream) C.StreamSynchronize(e->stream);
        for (int s = 0; e->slots && s < e->n_slots; s++)
            if (e->slots[s].event) { C.EventDestroy(e->slots[s].event); e->slots[s].event = NULL; }
        if (e->stream) { C.StreamDestroy(e->stream); e->stream = NULL; }
        return;
    }
    if (e->thread_started) {
        pthread_mutex_lock(&e->mu);
        e->stop = 1;
        pthread_cond_broadcast(&e->cv_job);
        pthread_mutex_unlock(&e->mu);
        pthread_join(e->thread, NULL);
        e->thread_started = 0;
    }
    free(e->jobs);
    e->jobs = NULL;
}

/* ---- start ------------------------------------------------------------------- */

static int sync_repacks(gs_engine *e);

/* The generate phase's streamed layers in execution order: the overflow
 * less the CPU layers and the generate-resident layers in their region. */
static void generate_order(gs_engine *e) {
    const int ph = GS_PHASE_GENERATE;
    e->n_order[ph] = 0;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        ly->sidx[ph] = -1;
        if (ly->count > 0 && !ly->cpu_generate && !ly->gr_live) {
            ly->sidx[ph] = e->n_order[ph];
            e->order[ph][e->n_order[ph]++] = i;
        }
    }
}

static void rehome_undo(gs_engine *e, int upto) {
    for (int k = 0; k < upto; k++) {
        e->recs[k].t->buffer = e->recs[k].src_buffer;
        e->recs[k].t->data = e->recs[k].src;
        e->recs[k].t->extra = e->recs[k].src_extra;
    }
}

int gs_engine_start(gs_engine *e) {
    if (e->started || e->start_attempted)
        return fail(GS_E_INVALID, "gs_engine_start: already started (or a failed start left it unusable)");
    e->start_attempted = 1;
    if (e->n_recs == 0) return fail(GS_E_INVALID, "gs_engine_start: no streamed tensors were added");

    /* Group records by layer (the map is rebuilt after sorting). */
    qsort(e->recs, e->n_recs, sizeof *e->recs, cmp_rec);
    ptrmap_free(&e->rec_map);
    size_t align = G.buft_get_alignment(e->cfg.ring_buft);
    if (align == 0) align = 1;
    size_t max_bytes = 0;
    for (int k = 0; k < e->n_recs; k++) {
        srec *r = &e->recs[k];
        layer_info *ly = &e->layers[r->layer];
        if (ly->count == 0) { ly->first = k; ly->bytes = 0; }
        ly->count++;
        r->offset = align_up(ly->bytes, align);
        ly->bytes = r->offset + r->alloc;
        if (ly->bytes > max_bytes) max_bytes = ly->bytes;
        if (ptrmap_put(&e->rec_map, r->t, k, k)) return fail(GS_E_NOMEM, "gs_engine_start: map");
    }
    for (int ph = 0; ph < GS_N_PHASES; ph++) {
        e->order[ph] = calloc(e->cfg.n_layer, sizeof **e->order);
        if (!e->order[ph]) return fail(GS_E_NOMEM, "gs_engine_start: calloc");
    }
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        if (ly->count == 0) continue;
        e->n_overflow++;
        ly->sidx[GS_PHASE_PROMPT] = e->n_order[GS_PHASE_PROMPT];
        e->order[GS_PHASE_PROMPT][e->n_order[GS_PHASE_PROMPT]++] = i;
    }
    generate_order(e);
    e->phase = GS_PHASE_PROMPT;
    e->n_slots = e->cfg.n_slots < e->n_overflow ? e->cfg.n_slots : e->n_overflow;
    e->slot_bytes = align_up(max_bytes, align);
    size_t ring_bytes = e->slot_bytes * (size_t)e->n_slots;
    e->slots = calloc(e->n_slots, sizeof *e->slots);
    if (!e->slots) return fail(GS_E_NOMEM, "gs_engine_start: calloc");

    e->ring = G.buft_alloc_buffer(e->cfg.ring_buft, ring_bytes);
    if (!e->ring)
        return fail(GS_E_GGML, "ggml_backend_buft_alloc_buffer(%s, %zu bytes) failed: not enough memory for %d slots",
                    G.buft_name(e->cfg.ring_buft), ring_bytes, e->n_slots);
    /* Without WEIGHTS usage the scheduler would not place ops by these tensors. */
    G.buffer_set_usage(e->ring, GGML_USAGE_WEIGHTS);
    G.buffer_clear(e->ring, 0);
    char *base = G.buffer_get_base(e->ring);
    for (int s = 0; s < e->n_slots; s++) {
        e->slots[s].base = base + (size_t)s * e->slot_bytes;
        e->slots[s].layer = -1;
        e->slots[s].state = SLOT_EMPTY;
    }
    for (int k = 0; k < e->n_recs; k++) {
        srec *r = &e->recs[k];
        r->t->buffer = NULL;
        r->t->data = NULL;
        int st = G.tensor_alloc(e->ring, r->t, e->slots[0].base + r->offset);
        if (st != 0) {
            rehome_undo(e, k + 1);
            return fail(GS_E_GGML, "ggml_backend_tensor_alloc(%s) failed with status %d", r->t->name, st);
        }
    }
    int rc = copy_engine_start(e);
    if (rc) return rc;
    if ((rc = sync_repacks(e))) return rc;
    e->started = 1;
    e->stats.slot_bytes = e->slot_bytes;
    e->stats.ring_bytes = ring_bytes;
    e->stats.n_streamed = e->n_overflow;
    e->stats.n_slots = e->n_slots;
    if (e->cfg.prefetch)
        for (int s = 0; s < e->n_slots; s++)
            if ((rc = copy_issue(e, s, e->order[e->phase][s]))) return rc;
    return GS_OK;
}

/* ---- the ring's state machine ------------------------------------------------ */

static int slot_holding(const gs_engine *e, int layer) {
    for (int s = 0; s < e->n_slots; s++)
        if (e->slots[s].layer == layer && e->slots[s].state != SLOT_EMPTY) return s;
    return -1;
}

/* Slot for a synchronous upload of `layer`: an empty one, else the one whose
 * layer is needed last from here. A slot still marked in use belongs to an
 * evaluation that never reached its release (e.g. an aborted decode): at a
 * hook call every launched op has finished, so it can be reclaimed. */
static int victim_slot(gs_engine *e, int layer) {
    int best = -1, best_dist = -1, S = e->n_order[e->phase], ph = e->phase;
    for (int s = 0; s < e->n_slots; s++) {
        const slot_info *sl = &e->slots[s];
        if (sl->state == SLOT_EMPTY) return s;
        /* in-use slots only as a last resort */
        int dist = sl->state == SLOT_IN_USE ? -1
                 : e->layers[sl->layer].sidx[ph] < 0 ? S   /* not streamed in this phase */
                 : (e->layers[sl->layer].sidx[ph] - e->layers[layer].sidx[ph] + S) % S;
        if (best < 0 || dist > best_dist) { best = s; best_dist = dist; }
    }
    if (e->slots[best].state == SLOT_IN_USE) e->layers[e->slots[best].layer].slot = -1;
    return best;
}

static void point_layer(gs_engine *e, int layer, int slot) {
    const layer_info *ly = &e->layers[layer];
    char *base = e->slots[slot].base;
    for (int k = ly->first; k < ly->first + ly->count; k++)
        e->recs[k].t->data = base + e->recs[k].offset;
}

static int adopt(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (ly->slot >= 0) return GS_OK;
    double t0 = now_s();
    int rc, s = slot_holding(e, layer);
    if (s < 0) {
        s = victim_slot(e, layer);
        if ((rc = copy_issue(e, s, layer)) || (rc = copy_wait(e, s))) return rc;
        e->stats.sync_fallbacks++;
        e->stats.wait_seconds += now_s() - t0;
    } else if (e->slots[s].state == SLOT_LOADING) {
        rc = copy_done(e, s);
        if (rc < 0) return rc;
        if (rc == 1) e->stats.adopted_ready++;
        else {
            if ((rc = copy_wait(e, s))) return rc;
            e->stats.adopted_waited++;
            e->stats.wait_seconds += now_s() - t0;
        }
    } else {
        e->stats.adopted_ready++;
    }
    e->slots[s].state = SLOT_IN_USE;
    ly->slot = s;
    point_layer(e, layer, s);
    if (ly->sidx[e->phase] == 0) e->stats.evaluations++;
    return GS_OK;
}

/* Layer finished on the device: its slot may be overwritten. Early trigger:
 * the slot immediately receives the streamed layer n_slots steps ahead in
 * execution order (wrapping round to the next ubatch or token). */
static int release(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    int s = ly->slot;
    if (s < 0) return GS_OK;
    ly->slot = -1;
    e->slots[s].state = SLOT_READY;
    if (!e->cfg.prefetch) return GS_OK;
    int S = e->n_order[e->phase];
    int next = e->order[e->phase][(ly->sidx[e->phase] + e->n_slots) % S];
    if (slot_holding(e, next) >= 0) return GS_OK;
    return copy_issue(e, s, next);
}

/* Before a node that reads a streamed weight runs, its layer must be adopted.
 * Normally the boundary at l_out-(L-1) did it; the first layer of a graph has
 * no such boundary and is adopted here (nothing launched is pending on it). */
static int adopt_sources(gs_engine *e, const struct gs_tensor *t) {
    for (int k = 0; k < 10; k++) {
        const struct gs_tensor *s = t->src[k];
        if (!s || s->buffer != e->ring) continue;
        int idx = ptrmap_get(&e->rec_map, s);
        if (idx < 0 || e->layers[e->recs[idx].layer].sidx[e->phase] < 0) continue;
        int rc = adopt(e, e->recs[idx].layer);
        if (rc) return rc;
    }
    return GS_OK;
}

/* 1 if `layer` sits complete in a slot (adoption would not wait). */
static int copy_landed(gs_engine *e, int layer) {
    int s = slot_holding(e, layer);
    if (s < 0 || e->slots[s].state == SLOT_IN_USE) return 0;
    return e->slots[s].state == SLOT_READY || copy_done(e, s) == 1;
}

static void kv_scan_node(gs_engine *e, const struct gs_tensor *t);
static int kv_view_stale(const struct gs_tensor *t);

static int set_phase(gs_engine *e, int phase);

/* Slots keep only the first layers `phase` will need. */
static void keep_first_slots(gs_engine *e, int phase) {
    int want = e->n_slots < e->n_order[phase] ? e->n_slots : e->n_order[phase];
    for (int s = 0; s < e->n_slots; s++) {
        slot_info *sl = &e->slots[s];
        if (sl->state == SLOT_IN_USE) { e->layers[sl->layer].slot = -1; sl->state = SLOT_READY; }
        int idx = sl->state == SLOT_EMPTY ? -1 : e->layers[sl->layer].sidx[phase];
        if (idx < 0 || idx >= want) { sl->state = SLOT_EMPTY; sl->layer = -1; }
    }
}

/* Empty slots receive the first layers the current phase will need. */
static int prefetch_first(gs_engine *e) {
    if (!e->cfg.prefetch) return GS_OK;
    int want = e->n_slots < e->n_order[e->phase] ? e->n_slots : e->n_order[e->phase];
    for (int k = 0, s = 0; k < want; k++) {
        int layer = e->order[e->phase][k];
        if (slot_holding(e, layer) >= 0) continue;
        while (s < e->n_slots && e->slots[s].state != SLOT_EMPTY) s++;
        if (s == e->n_slots) break;        /* cannot happen: at most `want` slots are kept */
        int rc = copy_issue(e, s, layer);
        if (rc) return rc;
    }
    return GS_OK;
}

/* ---- generate-resident layers ------------------------------------------------ */

/* Prompts will overwrite the region (or it goes with its context): its
 * layers stream again, pointed at slot 0 until adopted. */
static void gr_leave(gs_engine *e) {
    if (!e->gr_base) return;
    for (int i = 0; i < e->cfg.n_layer; i++)
        if (e->layers[i].gr_live) { e->layers[i].gr_live = 0; point_layer(e, i, 0); }
    e->gr_base = NULL;
    e->gr_bytes = 0;
    e->stats.gen_resident = 0;
    generate_order(e);
}

/* Switching to (or generating in) the generate phase: copy the
 * generate-resident layers into their region and point them there.
 * 1 if they moved in, 0 if they stream for now (the compute buffer not seen
 * yet, or no room), <0 on error (nothing pointed into the region). */
static int gr_enter(gs_engine *e) {
    if (!e->gr_n || e->gr_base) return 0;
    char *base;
    size_t bytes;
    if (e->gr_own_mode) {
        base = G.buffer_get_base(e->gr_own);
        bytes = G.buffer_get_size(e->gr_own);
    } else {
        if (!e->cbuf) return 0;
        /* Room for the generate graphs: what Python reserved for the largest,
         * and at least twice what they have used so far. */
        size_t start = align_up(e->gr_reserve > 2 * e->gen_extent ? e->gr_reserve : 2 * e->gen_extent, 4096);
        if (start >= e->cbuf_size) return 0;
        base = e->cbuf_base + start;
        bytes = e->cbuf_size - start;
    }
    size_t fit = bytes / e->slot_bytes, k = 0;
    if (fit == 0) return 0;
    if (e->cfg.use_cuda) {   /* the last prompt's graph and output reads are done with that memory */
        int err = C.DeviceSynchronize();
        if (err) return cuda_fail("cudaDeviceSynchronize", err);
    }
    /* Layers in order, one slot's size each; pointed there once all have landed. */
    for (int i = 0; i < e->cfg.n_layer && k < fit; i++) {
        if (!e->layers[i].gen_resident) continue;
        int rc = copy_layer_to(e, i, base + k++ * e->slot_bytes);
        if (rc) return rc;
    }
    int rc = copy_engine_drain(e);
    if (rc) return rc;
    k = 0;
    for (int i = 0; i < e->cfg.n_layer && k < fit; i++) {
        layer_info *ly = &e->layers[i];
        if (!ly->gen_resident) continue;
        char *dst = base + k++ * e->slot_bytes;
        ly->gr_live = 1;
        for (int j = ly->first; j < ly->first + ly->count; j++) {
            srec *r = &e->recs[j];
            r->t->buffer = e->ring;   /* a device buffer: the scheduler keeps the layer on the GPU */
            r->t->extra = r->src_extra;
            r->t->data = dst + r->offset;
        }
    }
    e->gr_base = base;
    e->gr_bytes = k * e->slot_bytes;
    e->stats.gen_resident = (int)k;
    e->stats.gen_resident_loads++;
    generate_order(e);
    return 1;
}

/* Where a compute-buffer tensor ends (offset), and whether it overlaps the region. */
static int cbuf_use(gs_engine *e, const struct gs_tensor *x) {
    if (x->buffer != e->cbuf || !x->data) return 0;
    char *d = x->data;
    size_t n = G.nbytes(x), end = (size_t)(d - e->cbuf_base) + n;
    if (end > e->gen_extent) e->gen_extent = e->stats.generate_extent = end;
    return e->gr_base && d < e->gr_base + e->gr_bytes && d + n > e->gr_base;
}

/* Every tensor of the graph that `t` belongs to: llama.cpp builds a graph in
 * one ggml context, whose objects lie one after another from its start.
 * Returns 1 if one of them is in the region. */
static int graph_in_region(gs_engine *e, const struct gs_tensor *t) {
    const struct gs_object *o = (const struct gs_object *)((const char *)t - sizeof *o);
    const char *mem = (const char *)t - o->offs;
    int hit = 0;
    for (o = (const struct gs_object *)mem; o; o = o->next)
        if (o->type == 0) hit |= cbuf_use(e, (const struct gs_tensor *)(mem + o->offs));
    return hit;
}

/* The attached context's compute buffer is where a GPU layer's output lives;
 * generate-phase graphs must stay clear of the region in its tail. llama.cpp
 * lays a graph out when it builds it, or keeps the layout of the last graph
 * with as many nodes (the prompt-sized one it reserves at first), so the
 * layout can change with the graph: each graph is looked at as a whole at its
 * first node, before anything of it runs, and if it reaches into the region
 * the layers stream instead (its inputs, written before, may have
 * overwritten them). Each node is checked again before it runs, with its
 * inputs: the scheduler's copies between backends are not in that context,
 * and one in the region fails the decode (never a wrong result). */
static int watch_compute_buffer(gs_engine *e, const struct gs_tensor *t, int layer) {
    if (layer >= 0 && !t->view_src && t->buffer && t->buffer != e->ring
        && !(e->phase == GS_PHASE_GENERATE && e->layers[layer].cpu_generate) && t->buffer != e->cbuf) {
        if (e->gr_base)
            return fail(GS_E_GRAPH, "the context's compute buffer changed (llama.cpp reallocated it) while "
                        "generate-resident layers were in the old one; load with generate_resident='none'");
        e->cbuf = t->buffer;
        e->cbuf_base = G.buffer_get_base(t->buffer);
        e->cbuf_size = G.buffer_get_size(t->buffer);
        e->gen_extent = 0;
        e->stats.compute_buffer_bytes = e->cbuf_size;
    }
    if (e->phase != GS_PHASE_GENERATE || !e->cbuf) return GS_OK;
    if (e->gr_walk) {
        e->gr_walk = 0;
        if (graph_in_region(e, t)) {
            gr_leave(e);
            e->stats.gen_resident_evictions++;
        }
    }
    for (int k = -1; k < 10; k++) {
        const struct gs_tensor *x = k < 0 ? t : t->src[k];
        if (x && cbuf_use(e, x))
            return fail(GS_E_GRAPH, "a generate-phase graph reaches into the compute buffer's tail, which holds "
                        "generate-resident layers (%s: %zu bytes at offset %zu of %zu; the layers start at %zu); "
                        "load with generate_resident='none'", x->name, G.nbytes(x),
                        (size_t)((char *)x->data - e->cbuf_base), e->cbuf_size, (size_t)(e->gr_base - e->cbuf_base));
    }
    return GS_OK;
}

int gs_engine_set_generate_resident(gs_engine *e, const int *layers, int n, size_t reserve_bytes, int own) {
    if (!e->started) return fail(GS_E_INVALID, "set_generate_resident: the engine has not started");
    if (n < 0) return fail(GS_E_INVALID, "set_generate_resident: n = %d", n);
    for (int k = 0; k < n; k++) {
        int i = layers[k];
        if (i < 0 || i >= e->cfg.n_layer || e->layers[i].count == 0)
            return fail(GS_E_INVALID, "generate-resident layer %d is not a streamed layer", i);
        if (e->layers[i].cpu_generate)
            return fail(GS_E_INVALID, "generate-resident layer %d is a CPU layer", i);
    }
    int rc = set_phase(e, GS_PHASE_PROMPT);
    if (rc) return rc;
    gr_leave(e);
    if (e->gr_own) { G.buffer_free(e->gr_own); e->gr_own = NULL; }
    for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].gen_resident = 0;
    e->gr_n = 0;
    if (n == 0) return GS_OK;
    if (own) {
        size_t bytes = e->slot_bytes * (size_t)n;
        e->gr_own = G.buft_alloc_buffer(e->cfg.ring_buft, bytes);
        if (!e->gr_own)
            return fail(GS_E_GGML, "ggml_backend_buft_alloc_buffer(%s, %zu bytes) failed: not enough memory for "
                        "%d generate-resident layers", G.buft_name(e->cfg.ring_buft), bytes, n);
    }
    for (int k = 0; k < n; k++) e->layers[layers[k]].gen_resident = 1;
    e->gr_n = n;
    e->gr_own_mode = own != 0;
    e->gr_reserve = reserve_bytes;
    return GS_OK;
}

/* ---- timeline (probe) ------------------------------------------------------ */

/* Whether a node computes on the GPU: its output lives in a device buffer. */
static int node_on_gpu(gs_engine *e, const struct gs_tensor *t) {
    void *b = t->view_src ? t->view_src->buffer : t->buffer;
    if (!b) return e->tl_open_gpu;
    if (b != e->tl_buffer) {
        const char *name = G.buffer_name(b);
        e->tl_buffer = b;
        e->tl_buffer_gpu = name && !strncmp(name, "CUDA", 4) && !strstr(name, "Host");
    }
    return e->tl_buffer_gpu;
}

static void timeline_close(gs_engine *e, double now) {
    if (!e->tl_open) return;
    *(e->tl_open_gpu ? &e->tl.gpu_s : &e->tl.cpu_s) += now - e->tl_mark;
    (*(e->tl_open_gpu ? &e->tl.gpu_segments : &e->tl.cpu_segments))++;
    e->tl_open = 0;
    e->tl_mark = now;
}

/* A segment's nodes are all asked before it is launched; the answer to the
 * last of them (or a node of the other backend) ends it. Returns whether the
 * node must end its segment: a graph's last node, so that its end is seen
 * (that sync happens anyway: the graph ends there) and the next ubatch's
 * graph building counts as such. */
static int timeline_node(gs_engine *e, const struct gs_tensor *t, bool ask) {
    double now = now_s();
    if (!ask) {
        timeline_close(e, now);
        e->tl_graph_done = !strcmp(t->name, "result_output");
        return 0;
    }
    int gpu = node_on_gpu(e, t);
    if (!e->tl_open || gpu != e->tl_open_gpu) {
        if (e->tl_open) timeline_close(e, now);
        else *(e->tl_graph_done ? &e->tl.pre_s : &e->tl.between_s) += now - e->tl_mark;
        e->tl_open = 1;
        e->tl_graph_done = 0;
        e->tl_open_gpu = gpu;
        e->tl_mark = now;
    }
    return !strcmp(t->name, "result_output");
}

int gs_engine_timeline(gs_engine *e, int on) {
    memset(&e->tl, 0, sizeof e->tl);
    e->tl_on = on;
    e->tl_in_decode = e->tl_open = 0;
    return GS_OK;
}

int gs_engine_timeline_mark(gs_engine *e, int begin) {
    if (!e->tl_on) return fail(GS_E_INVALID, "gs_engine_timeline_mark: the timeline is off");
    double now = now_s();
    if (begin) {
        e->tl_begin = e->tl_mark = now;
        e->tl_in_decode = 1;
        e->tl_open = 0;
        e->tl_graph_done = 1;   /* until the first node: building the first graph */
        return GS_OK;
    }
    if (!e->tl_in_decode) return fail(GS_E_INVALID, "gs_engine_timeline_mark: no decode begun");
    timeline_close(e, now);
    e->tl.wall_s += now - e->tl_begin;
    e->tl.decodes++;
    e->tl_in_decode = 0;
    return GS_OK;
}

int gs_engine_timeline_get(gs_engine *e, gs_timeline *out) {
    *out = e->tl;
    return GS_OK;
}

bool gs_engine_eval_cb(void *tensor, bool ask, void *user) {
    gs_engine *e = user;
    struct gs_tensor *t = tensor;
    if (e->status || !e->started) return !ask;
    int tl_end = e->tl_in_decode && timeline_node(e, t, ask);
    e->kv_cleared = 0;    /* this decode writes cells */
    if (ask && e->kv_scan) kv_scan_node(e, t);
    if (ask && e->kv_attached && kv_view_stale(t)) {
        fail(GS_E_GRAPH, "node %s reads KV cache %s where it was before moving between device and host: "
             "the context reused a graph across a move of the caches (decode through the driver, which holds them "
             "for such decodes, or create the context with LLAMA_GRAPH_REUSE_DISABLE=1)",
             t->name, t->view_src->name);
        engine_fail(e, GS_E_GRAPH);
        return false;
    }
    int i = parse_index(t->name, "l_out-", '\0');
    int n = e->cfg.n_layer, ph = e->phase;
    if (ask && e->gr_n && !e->gr_own_mode && e->kv_attached
        && watch_compute_buffer(e, t, i < n ? i : -1)) {
        engine_fail(e, GS_E_GRAPH);
        return false;
    }
    if (ask && i == 0 && e->check_shape
        && (t->ne[1] >= e->reuse_min_batch) != (ph == GS_PHASE_PROMPT)) {
        fail(GS_E_GRAPH, "a ubatch of %lld tokens ran in the %s phase on a context that reuses graphs: ubatches of "
             "%d or more tokens must run in the prompt phase, smaller ones in the generate phase (decode a "
             "prompt's short tail on its own), or a later decode could reuse this graph's placement",
             (long long)t->ne[1], ph == GS_PHASE_PROMPT ? "prompt" : "generate", e->reuse_min_batch);
        engine_fail(e, GS_E_GRAPH);
        return false;
    }
    if (ask) {
        if (i >= 0 && i < n && (e->timing || e->layers[i].sidx[ph] >= 0 || (i + 1 < n && e->layers[i + 1].sidx[ph] >= 0))) {
            /* Only the next layer's adoption needs this boundary. If its copy
             * has already landed, adopt now: nothing launched yet reads the
             * slot, and the sync (plus the relaunch gap) is saved. */
            if (!e->timing && e->layers[i].sidx[ph] < 0 && copy_landed(e, i + 1)) {
                int rc = adopt(e, i + 1);
                if (rc) engine_fail(e, rc);
                return false;
            }
            e->stats.boundaries++;
            return true;
        }
        int rc = adopt_sources(e, t);
        if (rc) engine_fail(e, rc);
        return tl_end;
    }
    /* The backend is synchronised: every node up to t has finished. */
    if (i >= 0 && i < n) {
        int rc = GS_OK;
        if (e->timing) {
            double t = now_s();
            if (i > 0) { e->layer_seconds[i] += t - e->t_last; e->layer_count[i]++; }
            e->t_last = t;
        }
        if (e->layers[i].sidx[ph] >= 0) rc = release(e, i);
        if (!rc && i + 1 < n && e->layers[i + 1].sidx[ph] >= 0) rc = adopt(e, i + 1);
        if (rc) engine_fail(e, rc);
    }
    return true;
}

static int set_phase(gs_engine *e, int phase);
static int sync_kv(gs_engine *e);

/* Which overflow layers the CPU computes while generating. Before start, or
 * between decodes (the engine then returns to the prompt phase); refused
 * while a context that reuses graphs is attached (its graphs keep the old
 * choice's placement). */
int gs_engine_set_cpu_layers(gs_engine *e, const int *layers, int n) {
    if (e->kv_attached && e->reuse_min_batch)
        return fail(GS_E_INVALID, "set_cpu_layers: the attached context reuses graphs, which keep the placement "
                    "they were built with; choose CPU layers before creating it, or create it without graph "
                    "reuse (graph_reuse=False, or LLAMA_GRAPH_REUSE_DISABLE=1)");
    for (int k = 0; k < n; k++) {
        if (layers[k] < 0 || layers[k] >= e->cfg.n_layer)
            return fail(GS_E_INVALID, "cpu layer %d out of range", layers[k]);
        if (e->layers[layers[k]].gen_resident)
            return fail(GS_E_INVALID, "layer %d is generate-resident; it cannot also be a CPU layer", layers[k]);
    }
    if (e->started) {
        int rc = set_phase(e, GS_PHASE_PROMPT);
        if (rc) return rc;
    }
    for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].cpu_generate = 0;
    for (int k = 0; k < n; k++) e->layers[layers[k]].cpu_generate = 1;
    if (!e->started) return GS_OK;
    generate_order(e);
    int rc = sync_kv(e);   /* frees host KV buffers of layers no longer on the CPU */
    return rc ? rc : sync_repacks(e);
}

/* Calibration of the link: upload `layer` into slot 0 synchronously, n times,
 * and report the fastest. Between decodes only. */
int gs_engine_measure_upload(gs_engine *e, int layer, int n, double *best_seconds) {
    if (!e->started || layer < 0 || layer >= e->cfg.n_layer || e->layers[layer].count == 0)
        return fail(GS_E_INVALID, "measure_upload: layer %d is not in the ring", layer);
    for (int s = 0; s < e->n_slots; s++) {
        if (e->slots[s].state == SLOT_IN_USE) e->layers[e->slots[s].layer].slot = -1;
        if (e->slots[s].state != SLOT_EMPTY) { int rc = copy_wait(e, s); if (rc) return rc; }
    }
    for (int s = 0; s < e->n_slots; s++)   /* one slot per layer: slot 0 will hold it */
        if (s != 0 && e->slots[s].layer == layer) { e->slots[s].state = SLOT_EMPTY; e->slots[s].layer = -1; }
    double best = 1e30;
    for (int k = 0; k < n; k++) {
        double t0 = now_s();
        int rc = copy_issue(e, 0, layer);
        if (!rc) rc = copy_wait(e, 0);
        if (rc) return rc;
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    *best_seconds = best;
    e->slots[0].state = SLOT_READY;
    return GS_OK;
}

/* A CPU layer's generate-phase home: its repacked copy where there is one,
 * else llama.cpp's host copy. */
static void point_home(gs_engine *e, int layer) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const srec *r = &e->recs[k];
        r->t->buffer = r->cpu_buffer ? r->cpu_buffer : r->src_buffer;
        r->t->data = r->cpu_buffer ? r->cpu_data : r->src;
        r->t->extra = r->cpu_buffer ? r->cpu_extra : r->src_extra;
    }
}

static void drop_repack(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->repack_buf) return;
    for (int k = ly->first; k < ly->first + ly->count; k++)
        e->recs[k].cpu_buffer = e->recs[k].cpu_data = e->recs[k].cpu_extra = NULL;
    G.buffer_free(ly->repack_buf);
    ly->repack_buf = NULL;
    e->stats.repacked_bytes -= ly->repacked_bytes;
    ly->repacked_bytes = 0;
}

/* Copy a CPU layer's matrix weights into a CPU_REPACK buffer, the layout
 * llama.cpp's CPU kernels run fastest on (what stock does with CPU layers).
 * The plain host copy stays: the prompt phase still uploads it. A weight the
 * repack buffer does not take (its init leaves no repack traits) keeps
 * reading the host copy. Runs on a scratch tensor so that the live one
 * keeps pointing where the current phase needs it. */
static int repack_layer(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    size_t align = G.buft_get_alignment(e->cfg.repack_buft), total = 0;
    if (align == 0) align = 1;
    for (int k = ly->first; k < ly->first + ly->count; k++)
        if (e->recs[k].matmul_only) total = align_up(total, align) + e->recs[k].nbytes;
    if (total == 0) return GS_OK;
    void *buf = G.buft_alloc_buffer(e->cfg.repack_buft, total);
    if (!buf) return fail(GS_E_NOMEM, "cannot allocate %zu bytes of host memory to repack layer %d for the CPU", total, layer);
    G.buffer_set_usage(buf, GGML_USAGE_WEIGHTS);
    char *base = G.buffer_get_base(buf);
    size_t off = 0, repacked = 0;
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        srec *r = &e->recs[k];
        if (!r->matmul_only) continue;
        off = align_up(off, align);
        struct gs_tensor scratch = *r->t;
        scratch.buffer = NULL;
        scratch.data = NULL;
        scratch.extra = NULL;
        int st = G.tensor_alloc(buf, &scratch, base + off);
        if (st != 0) {
            for (int j = ly->first; j < ly->first + ly->count; j++)
                e->recs[j].cpu_buffer = e->recs[j].cpu_data = e->recs[j].cpu_extra = NULL;
            G.buffer_free(buf);
            return fail(GS_E_GGML, "repack: ggml_backend_tensor_alloc(%s) failed with status %d", r->t->name, st);
        }
        if (scratch.extra) {
            G.tensor_set(&scratch, r->src, 0, r->nbytes);
            r->cpu_buffer = buf;
            r->cpu_data = base + off;
            r->cpu_extra = scratch.extra;
            repacked += r->nbytes;
        }
        off += r->nbytes;
    }
    if (repacked == 0) { G.buffer_free(buf); return GS_OK; }
    ly->repack_buf = buf;
    ly->repacked_bytes = G.buffer_get_size(buf);
    e->stats.repacked_bytes += ly->repacked_bytes;
    return GS_OK;
}

/* Repacked copies exactly for the current CPU layers. Tensors must not point
 * at a copy being dropped (callers are in the prompt phase). */
static int sync_repacks(gs_engine *e) {
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        int want = e->cfg.repack_buft && ly->cpu_generate && ly->count > 0;
        if (!want && ly->repack_buf) drop_repack(e, i);
        if (want && !ly->repack_buf) {
            int rc = repack_layer(e, i);
            if (rc) return rc;
        }
    }
    return GS_OK;
}

/* ---- KV caches of CPU layers ----------------------------------------------- */

/* "cache_k_l12", "cache_swa_v_l3" -> layer, *is_v; else -1. */
static int kv_layer_of(const struct gs_tensor *t, int *is_v) {
    if (!t || strncmp(t->name, "cache_", 6) != 0) return -1;
    const char *l = strrchr(t->name, 'l');
    if (!l || l - t->name < 8 || l[-1] != '_' || l[-3] != '_' || (l[-2] != 'k' && l[-2] != 'v')) return -1;
    *is_v = l[-2] == 'v';
    return parse_index(l, "l", '\0');
}

/* llama.cpp allocates per-stream views of each cache tensor right after the
 * layer's K and V (same ggml context); state save/load reads through them,
 * so they must follow the tensor. Walk the context's object chain from it. */
static void kv_find_views(kv_rec *r, int layer) {
    r->n_views = 0;
    const struct gs_object *obj = (const struct gs_object *)((const char *)r->t - sizeof(struct gs_object));
    for (int steps = 0; obj; obj = obj->next, steps++) {
        if (steps > 4 * KV_MAX_VIEWS + 4) { r->n_views = -1; return; }   /* more streams than we track */
        if (obj->type != 0 || obj->size < sizeof(struct gs_tensor)) break;
        struct gs_tensor *t = (struct gs_tensor *)((char *)obj + sizeof(struct gs_object));
        int is_v, il = kv_layer_of(t->view_src ? t->view_src : t, &is_v);
        if (il != layer) break;                /* past this layer's tensors */
        if (t->view_src != r->t) continue;     /* the tensor itself, its partner or the partner's views */
        if (r->n_views == KV_MAX_VIEWS) { r->n_views = -1; return; }
        r->views[r->n_views] = t;
        r->view_extra[r->n_views++] = t->extra;
    }
}

static void kv_record(gs_engine *e, struct gs_tensor *t) {
    int is_v, il = kv_layer_of(t, &is_v);
    if (il < 0 || il >= e->cfg.n_layer || !t->buffer || !t->data || t->view_src) return;
    kv_rec *r = &e->layers[il].kv[is_v];
    if (r->t) return;
    r->t = t;
    r->dev_buffer = t->buffer;
    r->dev_data = t->data;
    r->dev_extra = t->extra;
    r->nbytes = G.nbytes(t);
    kv_find_views(r, il);
}

/* Cache tensors reach the graph as the view_src of its views. */
static void kv_scan_node(gs_engine *e, const struct gs_tensor *t) {
    if (t->view_src) kv_record(e, t->view_src);
    for (int k = 0; k < 10; k++)
        if (t->src[k] && t->src[k]->view_src) kv_record(e, t->src[k]->view_src);
}

/* A graph node viewing a cache tensor from where it was when the graph was
 * allocated: only a reused graph can have one after a move. */
static int kv_view_stale(const struct gs_tensor *t) {
    int is_v;
    return t->view_src && t->data != (char *)t->view_src->data + t->view_offs && kv_layer_of(t->view_src, &is_v) >= 0;
}

static void kv_point(kv_rec *r, void *buffer, char *data, int home) {
    r->t->buffer = buffer;
    r->t->data = data;
    r->t->extra = home ? r->dev_extra : NULL;
    for (int k = 0; k < r->n_views; k++) {
        struct gs_tensor *v = r->views[k];
        v->buffer = buffer;
        v->data = data + v->view_offs;
        v->extra = home ? r->view_extra[k] : NULL;
    }
}

static int kv_to_host(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->kv_host_buf) {
        size_t align = G.buft_get_alignment(e->cfg.host_kv_buft), total = 0;
        if (align == 0) align = 1;
        for (int w = 0; w < 2; w++)
            if (ly->kv[w].t) { ly->kv[w].offset = align_up(total, align); total = ly->kv[w].offset + ly->kv[w].nbytes; }
        ly->kv_host_buf = G.buft_alloc_buffer(e->cfg.host_kv_buft, total);
        if (!ly->kv_host_buf)
            return fail(GS_E_NOMEM, "cannot allocate %zu bytes of host memory for layer %d's KV cache", total, layer);
        e->stats.host_kv_bytes += G.buffer_get_size(ly->kv_host_buf);
    }
    char *base = G.buffer_get_base(ly->kv_host_buf);
    for (int w = 0; w < 2; w++) {
        kv_rec *r = &ly->kv[w];
        if (!r->t) continue;
        if (!e->kv_cleared) {
            G.tensor_get(r->t, base + r->offset, 0, r->nbytes);
            e->stats.kv_moved_bytes += r->nbytes;
        }
        kv_point(r, ly->kv_host_buf, base + r->offset, 0);
    }
    ly->kv_on_host = 1;
    return GS_OK;
}

static void kv_to_device(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    char *base = G.buffer_get_base(ly->kv_host_buf);
    for (int w = 0; w < 2; w++) {
        kv_rec *r = &ly->kv[w];
        if (!r->t) continue;
        kv_point(r, r->dev_buffer, r->dev_data, 1);
        if (!e->kv_cleared) {
            G.tensor_set(r->t, base + r->offset, 0, r->nbytes);
            e->stats.kv_moved_bytes += r->nbytes;
        }
    }
    ly->kv_on_host = 0;
}

static void kv_free_host(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->kv_host_buf) return;
    e->stats.host_kv_bytes -= G.buffer_get_size(ly->kv_host_buf);
    G.buffer_free(ly->kv_host_buf);
    ly->kv_host_buf = NULL;
}

/* Every recorded cache where the phase wants it: a CPU layer's in host
 * memory while generating (unless hold_kv keeps it where it is for a decode
 * that may reuse the last graph), everything else in llama.cpp's buffers. Between
 * decodes only; the device is synchronised first (a decode returns before
 * its last kernels, which may still write the cache, have finished). */
static int sync_kv(gs_engine *e) {
    int synced = 0;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        int movable = ly->kv[0].t && ly->kv[0].n_views >= 0 && ly->kv[1].n_views >= 0;
        int want = e->kv_attached && e->cfg.host_kv_buft && e->started && e->phase == GS_PHASE_GENERATE
                   && ly->cpu_generate && movable;
        if (e->kv_attached && e->hold_kv && e->phase == GS_PHASE_GENERATE) want = ly->kv_on_host;
        if (want != ly->kv_on_host) {
            if (!synced && e->cfg.use_cuda) {
                int err = C.DeviceSynchronize();
                if (err != CUDA_SUCCESS) return cuda_fail("cudaDeviceSynchronize", err);
                synced = 1;
            }
            if (want) {
                int rc = kv_to_host(e, i);
                if (rc) return rc;
            } else {
                kv_to_device(e, i);
            }
        }
        if (!ly->kv_on_host && !(e->kv_attached && ly->cpu_generate)) kv_free_host(e, i);
    }
    return GS_OK;
}

static void kv_forget(gs_engine *e) {
    for (int i = 0; i < e->cfg.n_layer; i++) memset(e->layers[i].kv, 0, sizeof e->layers[i].kv);
}

int gs_engine_kv_attach(gs_engine *e, int reuse_min_batch) {
    if (e->kv_attached) return fail(GS_E_INVALID, "gs_engine_kv_attach: another context's KV cache is attached");
    if (reuse_min_batch < 0) return fail(GS_E_INVALID, "gs_engine_kv_attach: reuse_min_batch %d < 0", reuse_min_batch);
    kv_forget(e);
    e->cbuf = NULL;
    e->gen_extent = 0;
    e->kv_attached = e->kv_scan = 1;
    e->reuse_min_batch = reuse_min_batch;
    e->check_shape = 0;
    for (int i = 0; reuse_min_batch && i < e->cfg.n_layer; i++)
        if (e->layers[i].cpu_generate) e->check_shape = 1;   /* CPU layers cannot change while attached */
    e->hold_kv = 0;
    return GS_OK;
}

int gs_engine_kv_detach(gs_engine *e) {
    /* The context goes: no upload will be issued until the next one, and the
     * model (whose host memory the uploads read) may be freed next. */
    int rc = copy_engine_drain(e);
    if (!e->gr_own_mode) gr_leave(e);   /* the region goes with the context */
    e->cbuf = NULL;
    e->gen_extent = 0;
    if (!e->kv_attached) return rc;
    e->kv_attached = e->kv_scan = e->reuse_min_batch = e->check_shape = e->hold_kv = 0;
    int rc_kv = sync_kv(e);   /* every cache home, host buffers freed */
    kv_forget(e);
    return rc ? rc : rc_kv;
}

int gs_engine_kv_cleared(gs_engine *e) {
    e->kv_cleared = 1;
    return GS_OK;
}

/* Layers whose K and V the attached context has shown so far. */
static int kv_known(const gs_engine *e) {
    int n = 0;
    for (int i = 0; i < e->cfg.n_layer; i++) n += e->layers[i].kv[0].t != NULL;
    return n;
}

/* Between decodes only. Layers computed by the CPU while generating go back
 * to their host buffer (the scheduler then places their ops on the CPU for
 * small batches); in the prompt phase they stream like the others. The
 * scheduler's placement lives in the graph: see gs_engine_kv_attach for
 * contexts that reuse graphs. */
int gs_engine_set_phase(gs_engine *e, int phase, int hold_kv) {
    if (phase != GS_PHASE_PROMPT && phase != GS_PHASE_GENERATE)
        return fail(GS_E_INVALID, "unknown phase %d", phase);
    e->hold_kv = hold_kv != 0;
    e->gr_walk = 1;   /* a decode follows */
    if (!e->started) return GS_OK;
    /* Recording stops after the attached context's first full decode. */
    if (e->kv_scan && kv_known(e)) e->kv_scan = 0;
    int rc = phase == e->phase ? sync_kv(e) : set_phase(e, phase);
    if (!rc && phase == e->phase && phase == GS_PHASE_GENERATE && e->gr_n && !e->gr_base) {
        /* the compute buffer has been seen since the switch */
        rc = gr_enter(e);
        if (rc > 0) {
            keep_first_slots(e, phase);
            rc = prefetch_first(e);
        }
    }
    if (rc) engine_fail(e, rc);
    return rc;
}

/* A CPU layer counts as a CPU layer for llama.cpp's graph callback while
 * generating (its norms run where its matrices do); otherwise as loaded. */
static void apply_layer_devices(gs_engine *e) {
    if (!e->cpu_dev) return;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        *ly->dev_cell = e->phase == GS_PHASE_GENERATE && ly->cpu_generate ? e->cpu_dev : ly->dev_orig;
    }
}

int gs_engine_bind_layer_devices(gs_engine *e, void *const *cells, int n) {
    if (!cells) {             /* forget them, writing nothing: the model may be gone */
        e->cpu_dev = NULL;
        for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].dev_cell = NULL;
        return GS_OK;
    }
    if (n != e->cfg.n_layer) return fail(GS_E_INVALID, "bind_layer_devices: %d cells for %d layers", n, e->cfg.n_layer);
    if (e->phase != GS_PHASE_PROMPT) return fail(GS_E_INVALID, "bind_layer_devices: only in the prompt phase");
    void *cpu = G.dev_by_name("CPU");
    if (!cpu) return fail(GS_E_GGML, "bind_layer_devices: ggml has no CPU device");
    for (int i = 0; i < n; i++) {
        e->layers[i].dev_cell = (void **)cells[i];
        e->layers[i].dev_orig = *(void **)cells[i];
    }
    e->cpu_dev = cpu;
    return GS_OK;
}

static int set_phase(gs_engine *e, int phase) {
    if (phase == e->phase) return GS_OK;
    if (phase == GS_PHASE_PROMPT) gr_leave(e);
    else {
        int rc = gr_enter(e);
        if (rc < 0) return rc;
    }
    keep_first_slots(e, phase);
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        if (ly->count == 0 || ly->gr_live) continue;
        if (ly->sidx[phase] < 0) point_home(e, i);
        else if (ly->sidx[e->phase] < 0) {
            for (int k = ly->first; k < ly->first + ly->count; k++) {
                e->recs[k].t->buffer = e->ring;
                e->recs[k].t->extra = e->recs[k].src_extra;
            }
            point_layer(e, i, 0);
        }
    }
    e->phase = phase;
    apply_layer_devices(e);
    int rc = sync_kv(e);
    if (!rc) rc = prefetch_first(e);
    if (rc) engine_fail(e, rc);
    return rc;
}

int gs_engine_set_timing(gs_engine *e, int on) {
    e->timing = on;
    e->t_last = now_s();
    return GS_OK;
}

int gs_engine_layer_time(gs_engine *e, int layer, double *seconds, uint64_t *count) {
    if (layer < 0 || layer >= e->cfg.n_layer) return fail(GS_E_INVALID, "layer %d out of range", layer);
    *seconds = e->layer_seconds[layer];
    *count = e->layer_count[layer];
    return GS_OK;
}

int gs_engine_status(gs_engine *e, char *msg, size_t msg_len) {
    if (msg && msg_len) snprintf(msg, msg_len, "%s", e->status ? e->status_msg : "");
    return e->status;
}

int gs_engine_stats(gs_engine *e, gs_stats *out) {
    *out = e->stats;
    return GS_OK;
}

void gs_engine_reset_stats(gs_engine *e) {
    gs_stats keep = e->stats;
    memset(&e->stats, 0, sizeof e->stats);
    e->stats.slot_bytes = keep.slot_bytes;
    e->stats.ring_bytes = keep.ring_bytes;
    e->stats.n_streamed = keep.n_streamed;
    e->stats.repacked_bytes = keep.repacked_bytes;
    e->stats.host_kv_bytes = keep.host_kv_bytes;
    e->stats.gen_resident = keep.gen_resident;
    e->stats.compute_buffer_bytes = keep.compute_buffer_bytes;
    e->stats.generate_extent = keep.generate_extent;
    memset(e->layer_seconds, 0, e->cfg.n_layer * sizeof *e->layer_seconds);
    memset(e->layer_count, 0, e->cfg.n_layer * sizeof *e->layer_count);
    e->stats.n_slots = keep.n_slots;
}

int gs_engine_debug_swap_sources(gs_engine *e, int a, int b) {
    if (!e->started || a < 0 || b < 0 || a >= e->cfg.n_layer || b >= e->cfg.n_layer)
        return fail(GS_E_INVALID, "swap: engine not started or layer out of range");
    layer_info *la = &e->layers[a], *lb = &e->layers[b];
    if (la->count == 0 || lb->count == 0 || la->count != lb->count)
        return fail(GS_E_INVALID, "swap: layers %d and %d are not both streamed with the same tensors", a, b);
    for (int k = 0; k < la->count; k++) {
        srec *x = &e->recs[la->first + k], *y = &e->recs[lb->first + k];
        if (x->nbytes != y->nbytes || x->offset != y->offset)
            return fail(GS_E_INVALID, "swap: layers %d and %d differ in layout", a, b);
    }
    for (int k = 0; k < la->count; k++) {
        srec *x = &e->recs[la->first + k], *y = &e->recs[lb->first + k];
        void *tmp = x->src; x->src = y->src; y->src = tmp;
    }
    /* Drop whatever the slots hold so the swapped sources are used at once. */
    int rc = copy_engine_drain(e);
    for (int s = 0; s < e->n_slots; s++)
        if (e->slots[s].state != SLOT_IN_USE) { e->slots[s].state = SLOT_EMPTY; e->slots[s].layer = -1; }
    return rc;
}

void gs_engine_destroy(gs_engine *e) {
    if (!e) return;
    copy_engine_stop(e);
    if (e->ring) G.buffer_free(e->ring);
    if (e->gr_own) G.buffer_free(e->gr_own);
    /* The context is gone by contract: free host KV copies without touching its tensors. */
    for (int i = 0; e->layers && i < e->cfg.n_layer; i++) { drop_repack(e, i); kv_free_host(e, i); }
    ptrmap_free(&e->weight_map);
    ptrmap_free(&e->rec_map);
    free(e->weights);
    free(e->weight_names);
    free(e->weight_matmul_only);
    free(e->recs);
    free(e->layers);
    free(e->order[0]);
    free(e->order[1]);
    free(e->layer_seconds);
    free(e->layer_count);
    free(e->slots);
    free(e->lout_seen);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv_job);
    pthread_cond_destroy(&e->cv_done);
    free(e);
}
