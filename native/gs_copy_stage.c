/* The staged copy engine: the disk tier's path to a device. Every copy goes
 * through one reader thread, in issue order, so slot copies stay FIFO. A
 * piece in host memory is queued on the lower stream as it is; a file piece
 * (disk tier) is read with pread, chunk by chunk, into one of n_staging
 * staging buffers (pinned on CUDA), each chunk then queued staging -> slot
 * with the buffer's event recorded after it: a staging buffer is written
 * again only once its event has passed (its last copy has read it). After a
 * slot's pieces the slot's event is recorded. Completion is a ticket, as in
 * the host engine: the reader has *queued* copy k once `queued` reaches k,
 * so done/wait first wait for that, then for the slot's event.
 *
 * A failed read or stream call makes the engine failed (its message kept,
 * since the reader's thread-local one is not the caller's): every later
 * call reports it, and the reader queues nothing more but still completes
 * tickets, so no waiter hangs. Destroy lets the reader finish the queue,
 * joins it, drains the stream, then frees the staging buffers. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "gs_copy.h"
#include "gs_util.h"

typedef struct { int slot; void *dst; const gs_piece *pieces; int n; uint64_t ticket; } stage_job;

typedef struct {
    gs_copy    base;
    gs_lower  *lower;
    size_t     chunk;               /* bytes of one staging buffer */
    int        n_staging, next;     /* next: the staging buffer the reader fills next */
    void     **staging;
    pthread_t  thread;
    int        thread_started, stop;
    pthread_mutex_t mu;
    pthread_cond_t  cv_job, cv_queued;
    stage_job *jobs;                /* ring buffer of copies not yet queued on the stream */
    int        job_cap, job_head, job_len;
    uint64_t   issued, queued;
    uint64_t  *ticket;              /* per slot: its last copy */
    int        err;                 /* first failure (GS_E_*), 0 if none */
    char       err_msg[512];
} staged_copy;

static int staging_event(const staged_copy *s, int b) { return s->base.n_slots + b; }

/* Under mu: the engine's failure, as this thread's error. */
static int failed(staged_copy *s) {
    return s->err ? fail(s->err, "%s", s->err_msg) : GS_OK;
}

/* Under mu. */
static void record_failure(staged_copy *s, int rc) {
    if (s->err) return;
    s->err = rc;
    snprintf(s->err_msg, sizeof s->err_msg, "%s", gs_last_error());
}

/* Reader thread: n bytes of the file at offset, through the staging buffers, to dst. */
static int stage_file_piece(staged_copy *s, char *dst, gs_file *f, uint64_t offset, size_t n) {
    gs_lower *l = s->lower;
    for (size_t done = 0; done < n;) {
        size_t len = n - done < s->chunk ? n - done : s->chunk;
        int b = s->next, rc;
        s->next = (s->next + 1) % s->n_staging;
        /* The buffer's last copy must have read it before it is overwritten. */
        if ((rc = l->vt->sync(l, staging_event(s, b)))) return rc;
        size_t at;   /* O_DIRECT reads an aligned span: the bytes start at staging + at */
        if ((rc = gs_file_read_span(f, s->staging[b], len, offset + done, &at))) return rc;
        if ((rc = l->vt->copy(l, dst + done, (char *)s->staging[b] + at, len))) return rc;
        if ((rc = l->vt->record(l, staging_event(s, b)))) return rc;
        done += len;
    }
    return GS_OK;
}

/* Reader thread: one issued (or put) copy, queued whole on the stream. */
static int stage_job_run(staged_copy *s, const stage_job *j) {
    gs_lower *l = s->lower;
    for (int k = 0; k < j->n; k++) {
        const gs_piece *p = &j->pieces[k];
        char *to = (char *)j->dst + p->offset;
        int rc = p->file ? stage_file_piece(s, to, p->file, p->file_offset, p->nbytes)
                         : p->nbytes ? l->vt->copy(l, to, p->src, p->nbytes) : GS_OK;
        if (!rc && p->alloc > p->nbytes) rc = l->vt->zero(l, to + p->nbytes, p->alloc - p->nbytes);
        if (rc) return rc;
    }
    return j->slot >= 0 ? l->vt->record(l, j->slot) : GS_OK;
}

static void *reader(void *arg) {
    staged_copy *s = arg;
    int rc = s->lower->vt->thread_init(s->lower);
    pthread_mutex_lock(&s->mu);
    if (rc) record_failure(s, rc);
    for (;;) {
        while (!s->stop && s->job_len == 0) pthread_cond_wait(&s->cv_job, &s->mu);
        if (s->job_len == 0) break;          /* stop requested and queue drained */
        stage_job job = s->jobs[s->job_head];
        int skip = s->err != 0;              /* failed: queue nothing more, complete the tickets */
        pthread_mutex_unlock(&s->mu);
        rc = skip ? GS_OK : stage_job_run(s, &job);
        pthread_mutex_lock(&s->mu);
        if (rc) record_failure(s, rc);
        s->job_head = (s->job_head + 1) % s->job_cap;
        s->job_len--;
        s->queued = job.ticket;
        pthread_cond_broadcast(&s->cv_queued);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Under mu: append a job; its ticket. */
static uint64_t enqueue(staged_copy *s, int slot, void *dst, const gs_piece *pieces, int n) {
    while (s->job_len == s->job_cap) pthread_cond_wait(&s->cv_queued, &s->mu);
    stage_job *j = &s->jobs[(s->job_head + s->job_len) % s->job_cap];
    *j = (stage_job){ slot, dst, pieces, n, ++s->issued };
    s->job_len++;
    pthread_cond_signal(&s->cv_job);
    return j->ticket;
}

/* Under mu: until the reader has queued ticket t (or the engine failed). */
static int wait_queued(staged_copy *s, uint64_t t) {
    while (s->queued < t && !s->err) pthread_cond_wait(&s->cv_queued, &s->mu);
    return failed(s);
}

static int staged_issue(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n) {
    staged_copy *s = (staged_copy *)c;
    pthread_mutex_lock(&s->mu);
    int rc = failed(s);
    if (!rc) s->ticket[slot] = enqueue(s, slot, dst, pieces, n);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Outside the slots: queued on the stream when this returns (see drain). */
static int staged_put(gs_copy *c, void *dst, const gs_piece *pieces, int n) {
    staged_copy *s = (staged_copy *)c;
    pthread_mutex_lock(&s->mu);
    int rc = failed(s);
    if (!rc) rc = wait_queued(s, enqueue(s, -1, dst, pieces, n));
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Under mu released: an error of the stream is the engine's failure too. */
static int lower_result(staged_copy *s, int rc) {
    if (rc < 0) {
        pthread_mutex_lock(&s->mu);
        record_failure(s, rc);
        pthread_mutex_unlock(&s->mu);
    }
    return rc;
}

static int staged_done(gs_copy *c, int slot) {
    staged_copy *s = (staged_copy *)c;
    pthread_mutex_lock(&s->mu);
    int rc = failed(s), queued = s->queued >= s->ticket[slot];
    pthread_mutex_unlock(&s->mu);
    if (rc || !queued) return rc;
    return lower_result(s, s->lower->vt->query(s->lower, slot));
}

static int staged_wait(gs_copy *c, int slot) {
    staged_copy *s = (staged_copy *)c;
    pthread_mutex_lock(&s->mu);
    int rc = wait_queued(s, s->ticket[slot]);
    pthread_mutex_unlock(&s->mu);
    return rc ? rc : lower_result(s, s->lower->vt->sync(s->lower, slot));
}

static int staged_drain(gs_copy *c) {
    staged_copy *s = (staged_copy *)c;
    pthread_mutex_lock(&s->mu);
    int rc = s->thread_started ? wait_queued(s, s->issued) : failed(s);
    pthread_mutex_unlock(&s->mu);
    return rc ? rc : lower_result(s, s->lower->vt->drain(s->lower));
}

static int staged_sync_device(gs_copy *c) {
    staged_copy *s = (staged_copy *)c;
    return lower_result(s, s->lower->vt->sync_device(s->lower));
}

static void staged_destroy(gs_copy *c) {
    staged_copy *s = (staged_copy *)c;
    if (s->thread_started) {        /* the reader finishes the queue before it stops */
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv_job);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    gs_lower *l = s->lower;
    if (l) l->vt->drain(l);         /* copies in flight may still read the staging buffers */
    for (int b = 0; s->staging && b < s->n_staging; b++)
        if (s->staging[b]) l->vt->host_free(l, s->staging[b]);
    if (l) l->vt->destroy(l);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv_job);
    pthread_cond_destroy(&s->cv_queued);
    free(s->staging);
    free(s->jobs);
    free(s->ticket);
    free(s);
}

static const gs_copy_vt staged_vt = {
    staged_issue, staged_put, staged_done, staged_wait, staged_drain, staged_sync_device, staged_destroy,
};

int copy_create_staged(gs_lower *lower, int n_slots, size_t chunk_bytes, int n_staging, gs_copy **out) {
    *out = NULL;
    if (n_slots <= 0 || chunk_bytes == 0 || n_staging < 2 || lower->n_events < n_slots + n_staging) {
        lower->vt->destroy(lower);
        return fail(GS_E_INVALID, "staged copy engine: need n_slots > 0, chunk_bytes > 0, n_staging >= 2 "
                    "(got %d, %zu, %d)", n_slots, chunk_bytes, n_staging);
    }
    staged_copy *s = calloc(1, sizeof *s);
    if (!s) { lower->vt->destroy(lower); return fail(GS_E_NOMEM, "staged copy engine: calloc"); }
    s->base = (gs_copy){ &staged_vt, n_slots };
    s->lower = lower;
    s->chunk = chunk_bytes;
    s->n_staging = n_staging;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv_job, NULL);
    pthread_cond_init(&s->cv_queued, NULL);
    s->job_cap = 4 * n_slots + 8;
    s->jobs = calloc(s->job_cap, sizeof *s->jobs);
    s->ticket = calloc(n_slots, sizeof *s->ticket);
    s->staging = calloc(n_staging, sizeof *s->staging);
    if (!s->jobs || !s->ticket || !s->staging) { staged_destroy(&s->base); return fail(GS_E_NOMEM, "staged copy engine: calloc"); }
    for (int b = 0; b < n_staging; b++) {
        /* room for an O_DIRECT span around a chunk (gs_file_read_span) */
        int rc = lower->vt->host_alloc(lower, chunk_bytes + 2 * GS_DIRECT_ALIGN, &s->staging[b]);
        if (rc) { s->staging[b] = NULL; staged_destroy(&s->base); return rc; }
    }
    if (pthread_create(&s->thread, NULL, reader, s)) {
        staged_destroy(&s->base);
        return fail(GS_E_THREAD, "pthread_create: the disk tier's reader thread");
    }
    s->thread_started = 1;
    *out = &s->base;
    return GS_OK;
}
