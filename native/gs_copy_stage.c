/* The staged copy engine: the disk tier's path to a device. Every copy goes
 * through one uploader thread, in issue order, so slot copies stay FIFO. A
 * piece in host memory is queued on the lower stream as it is; a file piece
 * (disk tier) is cut into chunks, each read with pread into one of n_staging
 * staging buffers (pinned on CUDA) by a pool of n_readers reader threads,
 * then queued staging -> slot by the uploader with the buffer's event
 * recorded after it. After a slot's pieces the slot's event is recorded.
 *
 * Parallel reads: one pread at a time leaves an NVMe drive idle between
 * requests (it needs several in flight to reach its bandwidth), so reads run
 * ahead of the uploader, across the queued jobs: chunk c (numbered in the
 * order the uploader takes them) goes to buffer c % n_staging, and is handed
 * to the readers once chunk c - n_staging has been queued for upload. Its
 * reader first waits for that buffer's event (the upload that read it),
 * then preads. The uploader waits for chunk c to be read, in order.
 *
 * Completion is a ticket, as in the host engine: the uploader has *queued*
 * copy k once `queued` reaches k, so done/wait first wait for that, then for
 * the slot's event.
 *
 * A failed read or stream call makes the engine failed (its message kept,
 * since a thread's own message is not the caller's): every later call
 * reports it, readers read nothing more but still complete their chunks,
 * and the uploader queues nothing more but completes tickets, so no waiter
 * hangs. Destroy lets the uploader finish the queue, joins it and the
 * readers, drains the stream, then frees the staging buffers. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "gs_copy.h"
#include "gs_util.h"

typedef struct { int slot; void *dst; const gs_piece *pieces; int n; uint64_t ticket; } stage_job;

/* One staging buffer and the chunk it holds (or will). */
typedef struct {
    gs_file  *file;
    uint64_t  offset;
    size_t    len;
    uint64_t  seq;                  /* the chunk's number */
    int       ready, rc;            /* read (rc: its result) */
    size_t    at;                   /* where the bytes start (O_DIRECT reads an aligned span) */
} stage_buf;

typedef struct {
    gs_copy    base;
    gs_lower  *lower;
    size_t     chunk;               /* bytes of one staging buffer */
    int        n_staging, n_readers;
    void     **staging;
    stage_buf *buf;
    pthread_t  uploader, *readers;
    int        uploader_started, readers_started, stop, stop_readers;
    pthread_mutex_t mu;
    pthread_cond_t  cv_job;         /* the uploader: a job queued, a chunk read */
    pthread_cond_t  cv_read;        /* the readers: a chunk to read */
    pthread_cond_t  cv_queued;      /* callers: a copy queued on the stream */
    stage_job *jobs;                /* ring buffer of copies not yet queued on the stream */
    int        job_cap, job_head, job_len;
    uint64_t   issued, queued;
    uint64_t  *ticket;              /* per slot: its last copy */
    /* chunks: handed to the readers, taken by one, queued for upload */
    uint64_t   handed, taken, uploaded;
    /* the next chunk to hand out: job (by ticket), piece, bytes of it done */
    uint64_t   ahead_ticket;
    int        ahead_piece;
    size_t     ahead_done;
    int        err;                 /* first failure (GS_E_*), 0 if none */
    char       err_msg[512];
} staged_copy;

static int staging_event(const staged_copy *s, int b) { return s->base.n_slots + b; }

/* Under mu: the engine's failure, as this thread's error. */
static int failed(staged_copy *s) {
    return s->err ? fail(s->err, "%s", s->err_msg) : GS_OK;
}

/* Under mu: rc, with this thread's message, is the engine's failure (the first one stays). */
static void record_failure(staged_copy *s, int rc) {
    if (s->err) return;
    s->err = rc;
    snprintf(s->err_msg, sizeof s->err_msg, "%s", gs_last_error());
    pthread_cond_broadcast(&s->cv_job);
    pthread_cond_broadcast(&s->cv_queued);
}

/* Under mu: the queued job with ticket t (queued < t <= issued). */
static const stage_job *job_at(const staged_copy *s, uint64_t t) {
    return &s->jobs[(s->job_head + (int)(t - s->queued - 1)) % s->job_cap];
}

/* Under mu: the file piece the next chunk to hand out belongs to, NULL if
 * no queued job has one yet. */
static const gs_piece *next_file_piece(staged_copy *s) {
    /* A job already queued for upload had every chunk handed out: go on after it. */
    if (s->ahead_ticket <= s->queued) {
        s->ahead_ticket = s->queued + 1;
        s->ahead_piece = 0;
        s->ahead_done = 0;
    }
    while (s->ahead_ticket <= s->issued) {
        const stage_job *j = job_at(s, s->ahead_ticket);
        if (s->ahead_piece >= j->n) {
            s->ahead_ticket++;
            s->ahead_piece = 0;
        } else if (j->pieces[s->ahead_piece].file && s->ahead_done < j->pieces[s->ahead_piece].nbytes) {
            return &j->pieces[s->ahead_piece];
        } else {
            s->ahead_piece++;
        }
        s->ahead_done = 0;
    }
    return NULL;
}

/* Under mu: hand chunks to the readers, as far as the staging buffers allow. */
static void hand_out_reads(staged_copy *s) {
    const gs_piece *p;
    while (!s->err && s->handed < s->uploaded + (uint64_t)s->n_staging && (p = next_file_piece(s))) {
        size_t left = p->nbytes - s->ahead_done, len = left < s->chunk ? left : s->chunk;
        s->buf[s->handed % s->n_staging] = (stage_buf){ .file = p->file, .offset = p->file_offset + s->ahead_done,
                                                        .len = len, .seq = s->handed };
        s->handed++;
        s->ahead_done += len;
        pthread_cond_signal(&s->cv_read);
    }
}

/* A reader thread: chunks in the order they were handed out, each into its buffer. */
static void *reader(void *arg) {
    staged_copy *s = arg;
    int rc = s->lower->vt->thread_init(s->lower);
    pthread_mutex_lock(&s->mu);
    if (rc) record_failure(s, rc);
    for (;;) {
        while (!s->stop_readers && s->taken == s->handed) pthread_cond_wait(&s->cv_read, &s->mu);
        if (s->taken == s->handed) break;    /* stop requested, every chunk read */
        int b = (int)(s->taken++ % s->n_staging);
        stage_buf job = s->buf[b];
        size_t at = 0;
        rc = s->err;                         /* failed: read nothing more, complete the chunk */
        pthread_mutex_unlock(&s->mu);
        if (!rc) {
            gs_lower *l = s->lower;          /* the buffer's last upload must have read it */
            rc = l->vt->sync(l, staging_event(s, b));
            if (!rc) rc = gs_file_read_span(job.file, s->staging[b], job.len, job.offset, &at);
        }
        pthread_mutex_lock(&s->mu);
        if (rc) record_failure(s, rc);
        s->buf[b].rc = rc;
        s->buf[b].at = at;
        s->buf[b].ready = 1;
        pthread_cond_broadcast(&s->cv_job);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Uploader: n bytes of the file at offset, chunk by chunk as the readers have them, to dst. */
static int stage_file_piece(staged_copy *s, char *dst, gs_file *f, uint64_t offset, size_t n) {
    gs_lower *l = s->lower;
    for (size_t done = 0; done < n;) {
        size_t len = n - done < s->chunk ? n - done : s->chunk;
        pthread_mutex_lock(&s->mu);
        uint64_t c = s->uploaded;
        int b = (int)(c % s->n_staging);
        stage_buf *sb = &s->buf[b];
        hand_out_reads(s);
        /* read, or never to be: the engine failed before chunk c was handed out */
        while (!(sb->ready && sb->seq == c) && !(s->err && s->handed <= c)) {
            pthread_cond_wait(&s->cv_job, &s->mu);
            hand_out_reads(s);
        }
        int rc = sb->ready && sb->seq == c ? sb->rc : failed(s);
        if (!rc && (sb->file != f || sb->offset != offset + done || sb->len != len))
            rc = fail(GS_E_INVALID, "staged copy engine: chunk %llu read out of order (a bug)", (unsigned long long)c);
        sb->ready = 0;
        size_t at = sb->at;
        pthread_mutex_unlock(&s->mu);
        if (rc) return rc;
        if ((rc = l->vt->copy(l, dst + done, (char *)s->staging[b] + at, len))) return rc;
        if ((rc = l->vt->record(l, staging_event(s, b)))) return rc;
        pthread_mutex_lock(&s->mu);
        s->uploaded++;                       /* buffer b's next chunk may be read (after its event) */
        hand_out_reads(s);
        pthread_mutex_unlock(&s->mu);
        done += len;
    }
    return GS_OK;
}

/* Uploader: one issued (or put) copy, queued whole on the stream. */
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

static void *uploader(void *arg) {
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

/* Under mu: append a job; its ticket. Its chunks may be handed to the readers at once. */
static uint64_t enqueue(staged_copy *s, int slot, void *dst, const gs_piece *pieces, int n) {
    while (s->job_len == s->job_cap) pthread_cond_wait(&s->cv_queued, &s->mu);
    stage_job *j = &s->jobs[(s->job_head + s->job_len) % s->job_cap];
    *j = (stage_job){ slot, dst, pieces, n, ++s->issued };
    s->job_len++;
    hand_out_reads(s);
    pthread_cond_signal(&s->cv_job);
    return j->ticket;
}

/* Under mu: until the uploader has queued ticket t (or the engine failed). */
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
    int rc = s->uploader_started ? wait_queued(s, s->issued) : failed(s);
    pthread_mutex_unlock(&s->mu);
    return rc ? rc : lower_result(s, s->lower->vt->drain(s->lower));
}

static int staged_sync_device(gs_copy *c) {
    staged_copy *s = (staged_copy *)c;
    return lower_result(s, s->lower->vt->sync_device(s->lower));
}

static void staged_destroy(gs_copy *c) {
    staged_copy *s = (staged_copy *)c;
    if (s->uploader_started) {      /* the uploader finishes the queue (the readers with it) before it stops */
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv_job);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->uploader, NULL);
    }
    if (s->readers_started) {       /* then the readers: they finish the chunks handed out */
        pthread_mutex_lock(&s->mu);
        s->stop_readers = 1;
        pthread_cond_broadcast(&s->cv_read);
        pthread_mutex_unlock(&s->mu);
        for (int k = 0; k < s->readers_started; k++) pthread_join(s->readers[k], NULL);
    }
    gs_lower *l = s->lower;
    if (l) l->vt->drain(l);         /* copies in flight may still read the staging buffers */
    for (int b = 0; s->staging && b < s->n_staging; b++)
        if (s->staging[b]) l->vt->host_free(l, s->staging[b]);
    if (l) l->vt->destroy(l);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv_job);
    pthread_cond_destroy(&s->cv_read);
    pthread_cond_destroy(&s->cv_queued);
    free(s->staging);
    free(s->buf);
    free(s->readers);
    free(s->jobs);
    free(s->ticket);
    free(s);
}

static const gs_copy_vt staged_vt = {
    staged_issue, staged_put, staged_done, staged_wait, staged_drain, staged_sync_device, staged_destroy,
};

int copy_create_staged(gs_lower *lower, int n_slots, size_t chunk_bytes, int n_staging, int n_readers,
                       gs_copy **out) {
    *out = NULL;
    if (n_slots <= 0 || chunk_bytes == 0 || n_staging < 2 || n_readers < 1 || n_readers > GS_DISK_READERS_MAX
        || lower->n_events < n_slots + n_staging) {
        lower->vt->destroy(lower);
        return fail(GS_E_INVALID, "staged copy engine: need n_slots > 0, chunk_bytes > 0, n_staging >= 2, "
                    "1 <= n_readers <= %d (got %d, %zu, %d, %d)", GS_DISK_READERS_MAX, n_slots, chunk_bytes,
                    n_staging, n_readers);
    }
    staged_copy *s = calloc(1, sizeof *s);
    if (!s) { lower->vt->destroy(lower); return fail(GS_E_NOMEM, "staged copy engine: calloc"); }
    s->base = (gs_copy){ &staged_vt, n_slots };
    s->lower = lower;
    s->chunk = chunk_bytes;
    s->n_staging = n_staging;
    s->n_readers = n_readers;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv_job, NULL);
    pthread_cond_init(&s->cv_read, NULL);
    pthread_cond_init(&s->cv_queued, NULL);
    s->job_cap = 4 * n_slots + 8;
    s->jobs = calloc(s->job_cap, sizeof *s->jobs);
    s->ticket = calloc(n_slots, sizeof *s->ticket);
    s->staging = calloc(n_staging, sizeof *s->staging);
    s->buf = calloc(n_staging, sizeof *s->buf);
    s->readers = calloc(n_readers, sizeof *s->readers);
    if (!s->jobs || !s->ticket || !s->staging || !s->buf || !s->readers) {
        staged_destroy(&s->base);
        return fail(GS_E_NOMEM, "staged copy engine: calloc");
    }
    for (int b = 0; b < n_staging; b++) {
        /* room for an O_DIRECT span around a chunk (gs_file_read_span) */
        int rc = lower->vt->host_alloc(lower, chunk_bytes + 2 * GS_DIRECT_ALIGN, &s->staging[b]);
        if (rc) { s->staging[b] = NULL; staged_destroy(&s->base); return rc; }
    }
    for (; s->readers_started < n_readers; s->readers_started++)
        if (pthread_create(&s->readers[s->readers_started], NULL, reader, s)) {
            staged_destroy(&s->base);
            return fail(GS_E_THREAD, "pthread_create: the disk tier's reader threads");
        }
    if (pthread_create(&s->uploader, NULL, uploader, s)) {
        staged_destroy(&s->base);
        return fail(GS_E_THREAD, "pthread_create: the disk tier's uploader thread");
    }
    s->uploader_started = 1;
    *out = &s->base;
    return GS_OK;
}
