/* CPU layers' weights in the layouts llama.cpp's CPU kernels run fastest on
 * (AMX, CPU_REPACK: what stock's CPU layers get), and a CPU layer's
 * generate-phase home. */
#include "gs_engine.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* A CPU layer's generate-phase home: its repacked copy where there is one,
 * else llama.cpp's host copy. */
void point_home(gs_engine *e, int layer) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const srec *r = &e->recs[k];
        r->t->buffer = r->cpu_buffer ? r->cpu_buffer : r->src_buffer;
        r->t->data = r->cpu_buffer ? r->cpu_data : (void *)e->up[k].src;
        r->t->extra = r->cpu_buffer ? r->cpu_extra : r->src_extra;
    }
}

static void forget_homes(gs_engine *e, const layer_info *ly) {
    for (int k = ly->first; k < ly->first + ly->count; k++)
        e->recs[k].cpu_buffer = e->recs[k].cpu_data = e->recs[k].cpu_extra = NULL;
}

static int has_repack(const layer_info *ly) {
    for (int f = 0; f < N_CPU_FORMS; f++)
        if (ly->repack_bufs[f]) return 1;
    return 0;
}

void drop_repack(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!has_repack(ly)) return;
    forget_homes(e, ly);
    for (int f = 0; f < N_CPU_FORMS; f++) {
        if (ly->repack_bufs[f]) G.buffer_free(ly->repack_bufs[f]);
        ly->repack_bufs[f] = NULL;
    }
    e->size.repacked_bytes -= ly->repacked_bytes;
    ly->repacked_bytes = 0;
}

/* A scratch copy of k's tensor, `rows` rows of it (0: all) allocated at `at`
 * in buf: the live tensor keeps pointing where the current phase needs it.
 * Its extra: the repack traits the buffer chose for that shape (NULL: the
 * buffer does not repack it). */
static int scratch_at(gs_engine *e, int k, void *buf, char *at, int64_t rows, struct gs_tensor *scratch) {
    const srec *r = &e->recs[k];
    *scratch = *r->t;
    scratch->buffer = NULL;
    scratch->data = NULL;
    scratch->extra = NULL;
    if (rows) {
        scratch->ne[1] = rows;
        scratch->nb[2] = scratch->nb[1] * (size_t)rows;
        scratch->nb[3] = scratch->nb[2] * (size_t)scratch->ne[2];
    }
    int st = G.tensor_alloc(buf, scratch, at);
    return st ? fail(GS_E_GGML, "repack: ggml_backend_tensor_alloc(%s) failed with status %d", r->t->name, st) : GS_OK;
}

/* Rows per piece when a tensor is repacked in pieces by several threads
 * (0: whole). ggml repacks a tensor as a whole (set_tensor takes no offset),
 * one thread per tensor, at a few hundred MB/s: adding one 8B-shape layer
 * took 0.17 s, mostly its three largest tensors. Its layouts interleave
 * groups of 8 or 16 rows, row group after row group, so a piece of whole
 * row groups repacks to the same bytes at the same offset: pieces are
 * multiples of 64 rows, and only where the buffer picks the same repack
 * traits for the piece's shape as for the tensor's. */
#define REPACK_PIECE_BYTES ((size_t)4 << 20)

static int64_t piece_rows(gs_engine *e, int k, void *buf, char *at, const void *whole_traits) {
    const struct gs_tensor *t = e->recs[k].t;
    size_t piece = REPACK_PIECE_BYTES;
    const char *env = getenv("GGUF_STREAM_REPACK_PIECE_BYTES");  /* tests: pieces of small tensors */
    if (env && atoll(env) > 0) piece = (size_t)atoll(env);
    if (t->ne[2] != 1 || t->ne[3] != 1 || t->ne[1] % 64 || t->nb[1] == 0) return 0;
    int64_t rows = (int64_t)(piece / t->nb[1]) / 64 * 64;
    if (rows < 64) rows = 64;
    if (rows >= t->ne[1]) return 0;
    struct gs_tensor scratch;
    int64_t shapes[2] = {rows, t->ne[1] % rows};
    for (int s = 0; s < 2; s++) {
        if (!shapes[s]) continue;
        if (scratch_at(e, k, buf, at, shapes[s], &scratch) != GS_OK || scratch.extra != whole_traits) return 0;
    }
    return rows;
}

/* Repack rows [row0, row0 + rows) of k (rows 0: all of it) into its place at
 * `at` (the tensor's start) in buf. Pieces are CPU_REPACK's only, whose
 * rows keep their plain size. */
static int repack_piece(gs_engine *e, int k, void *buf, char *at, int64_t row0, int64_t rows) {
    struct gs_tensor scratch;
    size_t off = e->recs[k].t->nb[1] * (size_t)row0;
    int rc = scratch_at(e, k, buf, at + off, rows, &scratch);
    if (rc) return rc;
    size_t n = rows ? e->recs[k].t->nb[1] * (size_t)rows : e->up[k].nbytes;
    G.tensor_set(&scratch, (const char *)e->up[k].src + off, 0, n);
    return GS_OK;
}

/* Copy CPU layers' matrix weights into the CPU backend's extra buffer types,
 * the layouts llama.cpp's CPU kernels run fastest on, each weight in the
 * first (llama.cpp's order: AMX, then CPU_REPACK) whose kernels compute
 * every use of it: what stock does with its CPU layers. The plain host copy
 * stays: the prompt phase still uploads it. A weight neither takes keeps
 * reading the host copy.
 *
 * Repacking is a CPU-bound shuffle of every byte (one thread managed well
 * under 1 GB/s): gigabytes of CPU layers took seconds of every load, so
 * CPU_REPACK's tensors are repacked by up to REPACK_MAX_THREADS threads. Each
 * writes its own tensor's bytes and its own srec; ggml's repack (init_tensor,
 * then set_tensor) keeps no shared state. AMX's conversion runs on
 * llama.cpp's own threads (OpenMP) already: its tensors go one at a time. */
#define REPACK_MAX_THREADS 32

typedef struct {
    int     k;
    void   *buf;
    char   *at;       /* the tensor's start in buf */
    int64_t row0, rows;  /* the piece (rows 0: the whole tensor) */
    int     rc;
} repack_job;

typedef struct {
    gs_engine  *e;
    repack_job *jobs;
    int         n;
    int         next;     /* the next job to take (atomic) */
    int         failed;   /* the first error's code (atomic), 0: none */
    char        err[512]; /* its message (fail() writes a thread-local one) */
    pthread_mutex_t mu;
} repack_work;

static void *repack_worker(void *arg) {
    repack_work *w = arg;
    for (;;) {
        int j = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (j >= w->n || __atomic_load_n(&w->failed, __ATOMIC_RELAXED)) break;
        repack_job *jb = &w->jobs[j];
        jb->rc = repack_piece(w->e, jb->k, jb->buf, jb->at, jb->row0, jb->rows);
        if (jb->rc) {
            pthread_mutex_lock(&w->mu);
            if (!w->failed) {
                snprintf(w->err, sizeof w->err, "%s", gs_last_error());
                __atomic_store_n(&w->failed, jb->rc, __ATOMIC_RELAXED);
            }
            pthread_mutex_unlock(&w->mu);
        }
    }
    return NULL;
}

static int repack_threads(int n_jobs) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > REPACK_MAX_THREADS) n = REPACK_MAX_THREADS;
    return (int)(n < n_jobs ? n : n_jobs);
}

/* Run every job, on this thread and up to threads - 1 others. */
static int run_repack_jobs(gs_engine *e, repack_job *jobs, int n, int threads) {
    repack_work w = {.e = e, .jobs = jobs, .n = n};
    pthread_mutex_init(&w.mu, NULL);
    pthread_t th[REPACK_MAX_THREADS];
    int started = 0;
    for (int i = 0; i < threads - 1 && i < REPACK_MAX_THREADS; i++) {
        if (pthread_create(&th[started], NULL, repack_worker, &w) != 0) break;  /* fewer threads: still done */
        started++;
    }
    repack_worker(&w);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    pthread_mutex_destroy(&w.mu);
    return w.failed ? fail(w.failed, "%s", w.err) : GS_OK;
}

static void *form_buft(const gs_engine *e, int form) {
    return form == CPU_FORM_AMX ? e->cfg.amx_buft : e->cfg.repack_buft;
}

/* The layout a CPU layer's weight is repacked in: the first this build has
 * whose kernels compute every use of it; -1: none (it reads the host copy). */
static int form_of(const gs_engine *e, const srec *r) {
    for (int f = 0; f < N_CPU_FORMS; f++)
        if (form_buft(e, f) && (r->cpu_forms >> f & 1)) return f;
    return -1;
}

static size_t form_alignment(const gs_engine *e, int form) {
    size_t align = G.buft_get_alignment(form_buft(e, form));
    return align ? align : 1;
}

typedef struct {
    repack_job *jobs;
    int n, cap;
} job_list;

static int push_job(job_list *l, repack_job jb) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 64;
        repack_job *more = realloc(l->jobs, (size_t)cap * sizeof *more);
        if (!more) return fail(GS_E_NOMEM, "repack: out of host memory");
        l->jobs = more;
        l->cap = cap;
    }
    l->jobs[l->n++] = jb;
    return GS_OK;
}

/* Where record k goes in its layer's buffer of layout f, the records before
 * it (of that layout) taking *end bytes; *end then covers k too. */
static size_t place_in_form(const gs_engine *e, int f, int k, size_t *end) {
    size_t at = align_up(*end, form_alignment(e, f));
    *end = at + G.buft_get_alloc_size(form_buft(e, f), e->recs[k].t);
    return at;
}

/* Layer i's buffer of layout f, sized for the tensors it takes (NULL in
 * *buf: none). */
static int alloc_form_buffer(gs_engine *e, int i, int f, void **buf) {
    const layer_info *ly = &e->layers[i];
    size_t total = 0;
    *buf = NULL;
    for (int k = ly->first; k < ly->first + ly->count; k++)
        if (form_of(e, &e->recs[k]) == f) place_in_form(e, f, k, &total);
    if (total == 0) return GS_OK;
    void *buft = form_buft(e, f);
    *buf = G.buft_alloc_buffer(buft, total);
    if (!*buf) return fail(GS_E_NOMEM, "cannot allocate %zu bytes of host memory to repack layer %d for the CPU", total, i);
    G.buffer_set_usage(*buf, GGML_USAGE_WEIGHTS);
    return GS_OK;
}

/* The jobs repacking layer i's tensors of layout f into buf: each tensor the
 * buffer repacks, CPU_REPACK's in pieces where that gives the same bytes
 * (piece_rows); its generate-phase home is recorded here. */
static int plan_form_jobs(gs_engine *e, int i, int f, void *buf, job_list *jobs) {
    const layer_info *ly = &e->layers[i];
    char *base = G.buffer_get_base(buf);
    size_t end = 0;
    int rc = GS_OK;
    for (int k = ly->first; k < ly->first + ly->count && rc == GS_OK; k++) {
        if (form_of(e, &e->recs[k]) != f) continue;
        char *at = base + place_in_form(e, f, k, &end);
        struct gs_tensor whole;
        if ((rc = scratch_at(e, k, buf, at, 0, &whole)) != GS_OK || !whole.extra) continue;
        int64_t rows = f == CPU_FORM_REPACK ? piece_rows(e, k, buf, at, whole.extra) : 0, n_rows = e->recs[k].t->ne[1];
        for (int64_t r0 = 0; rc == GS_OK; r0 += rows) {
            int64_t n = rows && n_rows - r0 < rows ? n_rows - r0 : rows;
            rc = push_job(jobs, (repack_job){.k = k, .buf = buf, .at = at, .row0 = r0, .rows = n});
            if (!rows || r0 + rows >= n_rows) break;
        }
        e->recs[k].cpu_buffer = buf;
        e->recs[k].cpu_data = at;
        e->recs[k].cpu_extra = whole.extra;
    }
    return rc;
}

/* Repacked copies for the current CPU layers (and, with keep_repacks, the
 * ones already made for former CPU layers). Tensors must not point at a copy
 * being dropped (only a CPU layer in the generate phase points at its copy:
 * point_home). On an error no layer of this call keeps a repacked copy (or a
 * pointer into one). */
int sync_repacks(gs_engine *e) {
    int n_layer = e->cfg.n_layer, rc = GS_OK;
    void *(*bufs)[N_CPU_FORMS] = calloc((size_t)n_layer, sizeof *bufs);  /* this call's new buffers */
    if (!bufs) return fail(GS_E_NOMEM, "repack: out of host memory");
    int repacking = form_buft(e, CPU_FORM_AMX) || form_buft(e, CPU_FORM_REPACK);
    for (int i = 0; i < n_layer && rc == GS_OK; i++) {
        layer_info *ly = &e->layers[i];
        int want = repacking && ly->cpu_generate && ly->count > 0;
        if (!want && has_repack(ly) && !e->keep_repacks) drop_repack(e, i);
        if (!want || has_repack(ly)) continue;
        for (int f = 0; f < N_CPU_FORMS && rc == GS_OK; f++)
            if (form_buft(e, f)) rc = alloc_form_buffer(e, i, f, &bufs[i][f]);
    }
    job_list jobs[N_CPU_FORMS] = {{0}};
    for (int i = 0; i < n_layer && rc == GS_OK; i++)
        for (int f = 0; f < N_CPU_FORMS && rc == GS_OK; f++)
            if (bufs[i][f]) rc = plan_form_jobs(e, i, f, bufs[i][f], &jobs[f]);
    for (int f = 0; f < N_CPU_FORMS && rc == GS_OK; f++)
        if (jobs[f].n)
            rc = run_repack_jobs(e, jobs[f].jobs, jobs[f].n, f == CPU_FORM_AMX ? 1 : repack_threads(jobs[f].n));
    for (int i = 0; i < n_layer; i++) {
        layer_info *ly = &e->layers[i];
        int kept = 0, made = 0;
        for (int f = 0; f < N_CPU_FORMS; f++) made |= bufs[i][f] != NULL;
        if (!made) continue;
        if (rc != GS_OK) forget_homes(e, ly);  /* a layer given buffers here had no copy before */
        for (int f = 0; f < N_CPU_FORMS; f++) {
            if (!bufs[i][f]) continue;
            int used = 0;
            for (int k = ly->first; k < ly->first + ly->count; k++) used |= e->recs[k].cpu_buffer == bufs[i][f];
            if (rc != GS_OK || !used) {
                G.buffer_free(bufs[i][f]);
                continue;
            }
            ly->repack_bufs[f] = bufs[i][f];
            ly->repacked_bytes += G.buffer_get_size(bufs[i][f]);
            e->size.repacked_bytes += G.buffer_get_size(bufs[i][f]);
            kept = 1;
        }
        e->ctr.layers_repacked += kept;
    }
    for (int f = 0; f < N_CPU_FORMS; f++) free(jobs[f].jobs);
    free(bufs);
    return rc;
}

int gs_engine_keep_repacks(gs_engine *e, int keep) {
    e->keep_repacks = keep != 0;
    return keep || !e->started ? GS_OK : sync_repacks(e);
}
