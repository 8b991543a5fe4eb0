/* A prompt's CPU experts (--prompt-cpu-experts) through llama.cpp's own
 * MUL_MAT_ID graph on the CPU, on a thread of its own. For a ubatch's many
 * rows llama.cpp's CPU backend has a tiled K-quant kernel that computes about
 * twice as fast as the row-by-row vec_dot the split pool uses (BENCHMARKS.md,
 * fifteenth session: 858-968 against 447-627 GFLOPS on the H200 box's 16
 * threads); the graph takes the pool's jobs as rows of one expert each
 * (n_expert_used 1), so each expert sees the rows stock's MUL_MAT_ID gives it.
 * The thread returns at once to the hook, as the pool does, so the GPU's
 * experts run meanwhile; the pool's finish waits for it. In the engine the
 * prompt split got 10% faster with it and stays slower than no split (its
 * main cost is elsewhere), so --prompt-cpu-experts stays off by default. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gs_abi.h"
#include "gs_split.h"
#include "gs_util.h"
#include "gguf_stream.h"

struct gs_cplan {                 /* struct ggml_cplan (ggml-cpu.h) */
    size_t work_size;
    uint8_t *work_data;
    int n_threads;
    void *threadpool;
    bool (*abort_callback)(void *);
    void *abort_callback_data;
    bool use_ref;
};

static struct {
    void *(*new_tensor_3d)(void *, int, int64_t, int64_t, int64_t);
    void *(*new_tensor_2d)(void *, int, int64_t, int64_t);
    void *(*mul_mat_id)(void *, void *, void *, void *);
    void *(*swiglu_split)(void *, void *, void *);
    void *(*new_graph)(void *);
    void  (*build_forward_expand)(void *, void *);
    size_t (*tensor_overhead)(void);
    size_t (*graph_overhead)(void);
    void *(*init)(struct gs_init_params);
    void  (*free)(void *);
    struct gs_cplan (*graph_plan)(const void *, int, void *);
    int   (*graph_compute)(void *, struct gs_cplan *);
    int ok;
} K;

int split_graph_load(void *cpu_lib, void *base_lib) {
    if (K.ok) return 1;
    if (!cpu_lib || !base_lib) return 0;
#define SYM(h, f, name) (*(void **)&K.f = dlsym(h, name))
    SYM(base_lib, new_tensor_3d, "ggml_new_tensor_3d");
    SYM(base_lib, new_tensor_2d, "ggml_new_tensor_2d");
    SYM(base_lib, mul_mat_id, "ggml_mul_mat_id");
    SYM(base_lib, swiglu_split, "ggml_swiglu_split");
    SYM(base_lib, new_graph, "ggml_new_graph");
    SYM(base_lib, build_forward_expand, "ggml_build_forward_expand");
    SYM(base_lib, tensor_overhead, "ggml_tensor_overhead");
    SYM(base_lib, graph_overhead, "ggml_graph_overhead");
    SYM(base_lib, init, "ggml_init");
    SYM(base_lib, free, "ggml_free");
    SYM(cpu_lib, graph_plan, "ggml_graph_plan");
    SYM(cpu_lib, graph_compute, "ggml_graph_compute");
#undef SYM
    K.ok = K.new_tensor_3d && K.new_tensor_2d && K.mul_mat_id && K.swiglu_split && K.new_graph
        && K.build_forward_expand && K.tensor_overhead && K.graph_overhead && K.init && K.free && K.graph_plan
        && K.graph_compute;
    return K.ok;
}

struct split_graph {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int posted, done, stop;
    int n_threads;
    int n_embd;
    void *ctx, *gf;               /* the posted layer's graph, built by the poster */
    struct gs_cplan plan;
    float *xg, *g, *u, *h, *y;    /* per job: its row of x, gate, up, activation (n_ff), output (n_embd) */
    int32_t *ids;                 /* per job: its expert */
    uint8_t *work;
    size_t cap_xg, cap_g, cap_u, cap_h, cap_y, cap_ids, cap_work;
};

static int grow(void *buf, size_t *cap, size_t want) {
    void **b = buf;
    if (want <= *cap) return GS_OK;
    void *n = realloc(*b, want);
    if (!n) return fail(GS_E_NOMEM, "split experts: realloc(%zu) for a prompt's CPU experts", want);
    *b = n;
    *cap = want;
    return GS_OK;
}

static void set_layout(struct gs_tensor *t, void *data, size_t nb1, size_t nb2) {
    t->data = data;
    if (nb1) { t->nb[1] = nb1; t->nb[2] = nb2; t->nb[3] = nb2 * (size_t)t->ne[2]; }
}

/* One layer's experts as llama.cpp's graph: gate and up over the jobs' rows,
 * SwiGLU, down; planned here, so that only the computing is left to the thread. */
static int build(struct split_graph *s, const expert_mats *m, int n_jobs, int n_expert) {
    size_t mem = 16 * K.tensor_overhead() + K.graph_overhead();
    void *ctx = K.init((struct gs_init_params){ mem, NULL, true });
    if (!ctx) return fail(GS_E_NOMEM, "split experts: ggml_init for a prompt's CPU experts");
    struct gs_tensor *w[3];
    for (int k = 0; k < 3; k++) {
        int down = k == W_DOWN;
        w[k] = K.new_tensor_3d(ctx, m->type[k], down ? m->n_ff : m->n_embd, down ? m->n_embd : m->n_ff, n_expert);
        set_layout(w[k], (void *)m->src[k], m->nb1[k], m->nb2[k]);
    }
    struct gs_tensor *x = K.new_tensor_3d(ctx, 0 /* F32 */, m->n_embd, 1, n_jobs);
    struct gs_tensor *ids = K.new_tensor_2d(ctx, 26 /* I32 */, 1, n_jobs);
    set_layout(x, s->xg, 0, 0);
    set_layout(ids, s->ids, 0, 0);
    struct gs_tensor *g = K.mul_mat_id(ctx, w[W_GATE], x, ids), *u = K.mul_mat_id(ctx, w[W_UP], x, ids);
    struct gs_tensor *h = K.swiglu_split(ctx, g, u);
    struct gs_tensor *y = K.mul_mat_id(ctx, w[W_DOWN], h, ids);
    set_layout(g, s->g, 0, 0);
    set_layout(u, s->u, 0, 0);
    set_layout(h, s->h, 0, 0);
    set_layout(y, s->y, 0, 0);
    void *gf = K.new_graph(ctx);
    K.build_forward_expand(gf, y);
    struct gs_cplan plan = K.graph_plan(gf, s->n_threads, NULL);
    int rc = grow(&s->work, &s->cap_work, plan.work_size ? plan.work_size : 1);
    if (rc) { K.free(ctx); return rc; }
    plan.work_data = s->work;
    s->ctx = ctx;
    s->gf = gf;
    s->plan = plan;
    return GS_OK;
}

static void *thread_main(void *arg) {
    struct split_graph *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->posted && !s->stop) pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop) break;
        pthread_mutex_unlock(&s->mu);
        K.graph_compute(s->gf, &s->plan);   /* fails only through an abort callback; there is none */
        K.free(s->ctx);
        pthread_mutex_lock(&s->mu);
        s->ctx = s->gf = NULL;
        s->posted = 0;
        s->done = 1;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

int split_graph_create(int n_threads, split_graph **out) {
    struct split_graph *s = calloc(1, sizeof *s);
    if (!s) return fail(GS_E_NOMEM, "split experts: calloc");
    s->n_threads = n_threads > 0 ? n_threads : 1;
    s->done = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (pthread_create(&s->th, NULL, thread_main, s)) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
        return fail(GS_E_NOMEM, "split experts: pthread_create failed");
    }
    *out = s;
    return GS_OK;
}

void split_graph_free(split_graph *s) {
    if (!s) return;
    split_graph_finish(s);
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s->xg); free(s->g); free(s->u); free(s->h); free(s->y); free(s->ids); free(s->work);
    free(s);
}

int split_graph_usable(const expert_mats *m) {
    return K.ok && !m->oai && !m->bias[0] && !m->bias[1] && !m->bias[2];
}

int split_graph_post(split_graph *s, const expert_mats *m, const float *x, const cpu_job *jobs, int n_jobs) {
    split_graph_finish(s);
    size_t n = n_jobs > 0 ? (size_t)n_jobs : 1, row = m->n_embd * sizeof(float), ff = m->n_ff * sizeof(float);
    int rc = grow(&s->xg, &s->cap_xg, n * row);
    if (!rc) rc = grow(&s->g, &s->cap_g, n * ff);
    if (!rc) rc = grow(&s->u, &s->cap_u, n * ff);
    if (!rc) rc = grow(&s->h, &s->cap_h, n * ff);
    if (!rc) rc = grow(&s->y, &s->cap_y, n * row);
    if (!rc) rc = grow(&s->ids, &s->cap_ids, n * sizeof(int32_t));
    if (rc) return rc;
    int n_expert = 0;
    for (int j = 0; j < n_jobs; j++) {
        memcpy(s->xg + (size_t)j * m->n_embd, x + (size_t)jobs[j].row * m->n_embd, row);
        s->ids[j] = jobs[j].expert;
        if (jobs[j].expert >= n_expert) n_expert = jobs[j].expert + 1;
    }
    s->n_embd = m->n_embd;
    if (!n_jobs) return GS_OK;
    if ((rc = build(s, m, n_jobs, n_expert))) return rc;
    pthread_mutex_lock(&s->mu);
    s->done = 0;
    s->posted = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return GS_OK;
}

void split_graph_finish(split_graph *s) {
    pthread_mutex_lock(&s->mu);
    while (!s->done) pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
}

const float *split_graph_out(const split_graph *s, int job) { return s->y + (size_t)job * s->n_embd; }
