/* The host copy engine: one worker thread copies issued layers in FIFO order
 * (host-slot mode, where the "device" is host memory). Completion is a
 * ticket: copy k has landed once `completed` reaches k. Disk-tier pieces are
 * read from the model file straight into the slot; a failed read makes the
 * engine failed (its message is kept, the worker's thread-local one is not
 * the caller's), and every later call reports it. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gs_copy.h"
#include "gs_util.h"

typedef struct { void *dst; const gs_piece *pieces; int n; uint64_t ticket; } host_job;

typedef struct {
    gs_copy    base;
    int        delay_us;
    pthread_t  thread;
    int        thread_started, stop;
    pthread_mutex_t mu;
    pthread_cond_t  cv_job, cv_done;
    host_job  *jobs;                 /* ring buffer of queued copies */
    int        job_cap, job_head, job_len;
    uint64_t   issued, completed;
    uint64_t  *ticket;               /* per slot: its last copy */
    int        err;                  /* first failed copy (GS_E_*), 0 if none */
    char       err_msg[512];
} host_copy;

static int copy_pieces(void *dst, const gs_piece *p, int n) {
    for (int k = 0; k < n; k++) {
        char *to = (char *)dst + p[k].offset;
        if (p[k].file) {
            int rc = gs_file_read(p[k].file, to, p[k].nbytes, p[k].file_offset);
            if (rc) return rc;
        } else {
            memcpy(to, p[k].src, p[k].nbytes);
        }
        if (p[k].alloc > p[k].nbytes) memset(to + p[k].nbytes, 0, p[k].alloc - p[k].nbytes);
    }
    return GS_OK;
}

/* Under mu: the engine's failure, as this thread's error. */
static int failed(host_copy *h) {
    return h->err ? fail(h->err, "%s", h->err_msg) : GS_OK;
}

static void record_failure(host_copy *h, int rc) {
    if (h->err) return;
    h->err = rc;
    snprintf(h->err_msg, sizeof h->err_msg, "%s", gs_last_error());
}

static int host_put(gs_copy *c, void *dst, const gs_piece *p, int n) {
    host_copy *h = (host_copy *)c;
    pthread_mutex_lock(&h->mu);
    int rc = failed(h);
    pthread_mutex_unlock(&h->mu);
    if (rc) return rc;
    if ((rc = copy_pieces(dst, p, n))) {
        pthread_mutex_lock(&h->mu);
        record_failure(h, rc);
        pthread_mutex_unlock(&h->mu);
    }
    return rc;
}

static void *worker(void *arg) {
    host_copy *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->stop && h->job_len == 0) pthread_cond_wait(&h->cv_job, &h->mu);
        if (h->job_len == 0) break;          /* stop requested and queue drained */
        host_job job = h->jobs[h->job_head];
        pthread_mutex_unlock(&h->mu);
        int rc = copy_pieces(job.dst, job.pieces, job.n);
        if (h->delay_us > 0) usleep(h->delay_us);
        pthread_mutex_lock(&h->mu);
        if (rc) record_failure(h, rc);
        h->job_head = (h->job_head + 1) % h->job_cap;
        h->job_len--;
        h->completed = job.ticket;
        pthread_cond_broadcast(&h->cv_done);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

static int host_issue(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n) {
    host_copy *h = (host_copy *)c;
    pthread_mutex_lock(&h->mu);
    int rc = failed(h);
    if (rc) { pthread_mutex_unlock(&h->mu); return rc; }
    while (h->job_len == h->job_cap) pthread_cond_wait(&h->cv_done, &h->mu);
    host_job *j = &h->jobs[(h->job_head + h->job_len) % h->job_cap];
    *j = (host_job){ dst, pieces, n, ++h->issued };
    h->ticket[slot] = j->ticket;
    h->job_len++;
    pthread_cond_signal(&h->cv_job);
    pthread_mutex_unlock(&h->mu);
    return GS_OK;
}

static int host_done(gs_copy *c, int slot) {
    host_copy *h = (host_copy *)c;
    pthread_mutex_lock(&h->mu);
    int done = h->completed >= h->ticket[slot];
    int rc = failed(h);
    pthread_mutex_unlock(&h->mu);
    return rc ? rc : done;
}

static int host_wait(gs_copy *c, int slot) {
    host_copy *h = (host_copy *)c;
    pthread_mutex_lock(&h->mu);
    while (h->completed < h->ticket[slot]) pthread_cond_wait(&h->cv_done, &h->mu);
    int rc = failed(h);
    pthread_mutex_unlock(&h->mu);
    return rc;
}

static int host_drain(gs_copy *c) {
    host_copy *h = (host_copy *)c;
    pthread_mutex_lock(&h->mu);
    while (h->thread_started && h->completed < h->issued) pthread_cond_wait(&h->cv_done, &h->mu);
    int rc = failed(h);
    pthread_mutex_unlock(&h->mu);
    return rc;
}

static int host_sync_device(gs_copy *c) { (void)c; return GS_OK; }

static void host_destroy(gs_copy *c) {
    host_copy *h = (host_copy *)c;
    if (h->thread_started) {       /* the worker drains the queue before it stops */
        pthread_mutex_lock(&h->mu);
        h->stop = 1;
        pthread_cond_broadcast(&h->cv_job);
        pthread_mutex_unlock(&h->mu);
        pthread_join(h->thread, NULL);
    }
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv_job);
    pthread_cond_destroy(&h->cv_done);
    free(h->jobs);
    free(h->ticket);
    free(h);
}

static const gs_copy_vt host_vt = {
    host_issue, host_put, host_done, host_wait, host_drain, host_sync_device, host_destroy,
};

int gs_copy_create_host(int n_slots, int delay_us, gs_copy **out) {
    *out = NULL;
    if (n_slots <= 0) return fail(GS_E_INVALID, "gs_copy_create_host: n_slots %d <= 0", n_slots);
    host_copy *h = calloc(1, sizeof *h);
    if (!h) return fail(GS_E_NOMEM, "copy engine: calloc");
    h->base = (gs_copy){ &host_vt, n_slots };
    h->delay_us = delay_us;
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv_job, NULL);
    pthread_cond_init(&h->cv_done, NULL);
    h->job_cap = 4 * n_slots + 8;
    h->jobs = calloc(h->job_cap, sizeof *h->jobs);
    h->ticket = calloc(n_slots, sizeof *h->ticket);
    if (!h->jobs || !h->ticket) { host_destroy(&h->base); return fail(GS_E_NOMEM, "copy engine: calloc"); }
    if (pthread_create(&h->thread, NULL, worker, h)) {
        host_destroy(&h->base);
        return fail(GS_E_THREAD, "pthread_create: host copy thread");
    }
    h->thread_started = 1;
    *out = &h->base;
    return GS_OK;
}

/* ---- the host stream under the staged engine (gs_copy_stage.c) ----------------
 * Host-slot mode's stand-in for the CUDA stream, so that CI runs the disk
 * tier's reader and staging code: a copy is a memcpy done before the call
 * returns, so every event has passed as soon as it is recorded: its
 * "completed flag" is always set, and only its number is checked. */
typedef struct {
    gs_lower base;
    int      delay_us, delay_events;
} host_lower;

static int hl_thread_init(gs_lower *l) { (void)l; return GS_OK; }

static int hl_host_alloc(gs_lower *l, size_t n, void **out) {
    (void)l;
    if (posix_memalign(out, GS_DIRECT_ALIGN, n)) *out = NULL;   /* aligned, as O_DIRECT reads need */
    return *out ? GS_OK : fail(GS_E_NOMEM, "disk tier: allocation of a %zu-byte staging buffer", n);
}

static void hl_host_free(gs_lower *l, void *p) { (void)l; free(p); }

static int hl_copy(gs_lower *l, void *dst, const void *src, size_t n) { (void)l; memcpy(dst, src, n); return GS_OK; }
static int hl_zero(gs_lower *l, void *dst, size_t n) { (void)l; memset(dst, 0, n); return GS_OK; }

static int hl_record(gs_lower *l, int event) {
    const host_lower *h = (const host_lower *)l;
    if (event < 0 || event >= l->n_events) return fail(GS_E_INVALID, "host stream: event %d out of range", event);
    if (h->delay_us > 0 && event < h->delay_events) usleep(h->delay_us);   /* a slot's copy: the slow link */
    return GS_OK;
}

static int hl_query(gs_lower *l, int event) {
    return event < 0 || event >= l->n_events ? fail(GS_E_INVALID, "host stream: event %d out of range", event) : 1;
}

static int hl_sync(gs_lower *l, int event) { int rc = hl_query(l, event); return rc < 0 ? rc : GS_OK; }
static int hl_nothing(gs_lower *l) { (void)l; return GS_OK; }

static void hl_destroy(gs_lower *l) { free(l); }

static const gs_lower_vt host_lower_vt = {
    hl_thread_init, hl_host_alloc, hl_host_free, hl_copy, hl_zero, hl_record, hl_query, hl_sync,
    hl_nothing, hl_nothing, hl_destroy,
};

int lower_create_host(int n_events, int delay_us, int delay_events, gs_lower **out) {
    *out = NULL;
    host_lower *h = calloc(1, sizeof *h);
    if (!h) return fail(GS_E_NOMEM, "host stream: calloc");
    h->base = (gs_lower){ &host_lower_vt, n_events };
    h->delay_us = delay_us;
    h->delay_events = delay_events;
    *out = &h->base;
    return GS_OK;
}

int gs_copy_create_host_staged(int n_slots, size_t chunk_bytes, int n_staging, int n_readers, int delay_us,
                               gs_copy **out) {
    *out = NULL;
    if (n_slots <= 0 || n_staging < 2)
        return fail(GS_E_INVALID, "gs_copy_create_host_staged: n_slots %d <= 0 or n_staging %d < 2", n_slots, n_staging);
    gs_lower *l;
    int rc = lower_create_host(n_slots + n_staging, delay_us, n_slots, &l);
    return rc ? rc : copy_create_staged(l, n_slots, chunk_bytes, n_staging, n_readers, out);
}
