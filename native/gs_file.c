/* The model file of the disk tier: disk-tier tensors are read from the GGUF
 * itself (pread at the tensor's data offset), never from host memory. Every
 * read re-checks the file's identity (fstat: size and modification time as
 * at open, which were those the plan was made from) and gets every byte or
 * fails: a file truncated or rewritten underneath is GS_E_IO, never wrong
 * weights. Reads may run on any thread, several at once (the staged
 * engine's readers). */
#define _GNU_SOURCE   /* O_DIRECT */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf_stream.h"
#include "gs_util.h"

struct gs_file {
    int      fd;
    int      dfd;                   /* O_DIRECT descriptor (gs_file_set_direct), -1 if none */
    int      direct_refused;        /* set (atomically) once a read was refused: buffered from then on;
                                       dfd stays open until close, another reader may be using it */
    uint64_t size;
    int64_t  mtime_ns;
    char     path[512];
    /* Under mu: readers may be several threads. `busy` is wall time with at
     * least one read in flight, so parallel reads count once and
     * bytes / busy is the file's read rate, not one reader's. */
    pthread_mutex_t mu;
    uint64_t reads, bytes;
    int      in_flight;
    double   busy, busy_since;
};

static int64_t mtime_ns(const struct stat *st) {
    return (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

/* The file as opened is the file now (size and mtime unchanged). */
static int same_file(gs_file *f) {
    struct stat st;
    if (fstat(f->fd, &st))
        return fail(GS_E_IO, "disk tier: fstat(%s): %s", f->path, strerror(errno));
    if ((uint64_t)st.st_size != f->size || mtime_ns(&st) != f->mtime_ns)
        return fail(GS_E_IO, "disk tier: %s changed while the model was loaded (size %llu -> %llu bytes, "
                    "modification time %s); reload the model", f->path, (unsigned long long)f->size,
                    (unsigned long long)st.st_size, mtime_ns(&st) == f->mtime_ns ? "unchanged" : "changed");
    return GS_OK;
}

int gs_file_open(const char *path, uint64_t expect_size, int64_t expect_mtime_ns, gs_file **out) {
    *out = NULL;
    if (!path || !*path) return fail(GS_E_INVALID, "gs_file_open: no path");
    gs_file *f = calloc(1, sizeof *f);
    if (!f) return fail(GS_E_NOMEM, "gs_file_open: calloc");
    snprintf(f->path, sizeof f->path, "%s", path);
    f->dfd = -1;
    pthread_mutex_init(&f->mu, NULL);
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        int err = errno;
        pthread_mutex_destroy(&f->mu);
        free(f);
        return fail(GS_E_IO, "disk tier: open(%s): %s", path, strerror(err));
    }
    f->size = expect_size;
    f->mtime_ns = expect_mtime_ns;
    int rc = same_file(f);
    if (rc) { gs_file_close(f); return rc; }
    /* Reads walk the file in order, layer after layer: let the kernel read ahead. */
    posix_fadvise(f->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    *out = f;
    return GS_OK;
}

void gs_file_close(gs_file *f) {
    if (!f) return;
    if (f->fd >= 0) close(f->fd);
    if (f->dfd >= 0) close(f->dfd);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

static int direct_on(const gs_file *f) {
    return f->dfd >= 0 && !__atomic_load_n(&f->direct_refused, __ATOMIC_ACQUIRE);
}

static void read_begin(gs_file *f) {
    pthread_mutex_lock(&f->mu);
    if (f->in_flight++ == 0) f->busy_since = now_s();
    pthread_mutex_unlock(&f->mu);
}

/* A read ended: counted if it got its n bytes. */
static void read_end(gs_file *f, int ok, size_t n) {
    pthread_mutex_lock(&f->mu);
    if (--f->in_flight == 0) f->busy += now_s() - f->busy_since;
    if (ok) { f->reads++; f->bytes += n; }
    pthread_mutex_unlock(&f->mu);
}

/* Reads [from, to) of the file through fd into dst; the bytes up to `need`
 * must come (EOF after them is fine: an O_DIRECT span rounded past the end).
 * 1 if fd refused the read (EINVAL: O_DIRECT not allowed there), else 0 or <0. */
static int read_range(gs_file *f, int fd, char *dst, uint64_t from, uint64_t to, uint64_t need) {
    for (uint64_t got = 0; got < to - from;) {
        ssize_t k = pread(fd, dst + got, to - from - got, (off_t)(from + got));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && errno == EINVAL && fd == f->dfd && got == 0) return 1;
        if (k < 0)
            return fail(GS_E_IO, "disk tier: read of %llu bytes at offset %llu from %s: %s",
                        (unsigned long long)(to - from), (unsigned long long)from, f->path, strerror(errno));
        if (k == 0) {
            if (from + got >= need) return GS_OK;
            /* end of file before the tensor's end: truncated since the check */
            return fail(GS_E_IO, "disk tier: %s ended after %llu bytes, inside a tensor (truncated while the "
                        "model was loaded?); reload the model", f->path, (unsigned long long)(from + got));
        }
        got += (size_t)k;
    }
    return GS_OK;
}

static int read_checked(gs_file *f, void *dst, size_t n, uint64_t offset, size_t *at) {
    int rc = same_file(f);
    if (rc) return rc;
    if (offset > f->size || n > f->size - offset)
        return fail(GS_E_IO, "disk tier: read of %zu bytes at offset %llu is past the end of %s (%llu bytes)",
                    n, (unsigned long long)offset, f->path, (unsigned long long)f->size);
    *at = 0;
    rc = 1;
    if (direct_on(f) && n) {   /* the aligned span around the bytes, straight from the device */
        uint64_t from = offset / GS_DIRECT_ALIGN * GS_DIRECT_ALIGN;
        uint64_t to = align_up(offset + n, GS_DIRECT_ALIGN);
        rc = read_range(f, f->dfd, dst, from, to, offset + n);
        if (rc == 1)          /* refused after all: buffered reads from now on */
            __atomic_store_n(&f->direct_refused, 1, __ATOMIC_RELEASE);
        else if (rc == GS_OK)
            *at = (size_t)(offset - from);
    }
    if (rc == 1) rc = read_range(f, f->fd, dst, offset, offset + n, offset + n);
    /* A rewrite during the read shows in the mtime afterwards. */
    return rc ? rc : same_file(f);
}

static int read_counted(gs_file *f, void *dst, size_t n, uint64_t offset, size_t *at) {
    if (!f || (!dst && n)) return fail(GS_E_INVALID, "gs_file_read: no file or destination");
    read_begin(f);
    int rc = read_checked(f, dst, n, offset, at);
    read_end(f, rc == GS_OK, n);
    return rc;
}

int gs_file_read(gs_file *f, void *dst, size_t n, uint64_t offset) {
    if (f && direct_on(f))
        return fail(GS_E_INVALID, "gs_file_read: %s reads with O_DIRECT: use gs_file_read_span", f->path);
    size_t at;
    return read_counted(f, dst, n, offset, &at);
}

int gs_file_read_span(gs_file *f, void *buf, size_t n, uint64_t offset, size_t *at) {
    return read_counted(f, buf, n, offset, at);
}

int gs_file_set_direct(gs_file *f, int on, int *active) {
    *active = 0;
    if (!f) return fail(GS_E_INVALID, "gs_file_set_direct: no file");
    if (f->dfd >= 0) close(f->dfd);   /* before any reader runs: no read can be using it */
    f->dfd = -1;
    f->direct_refused = 0;
    if (!on) return GS_OK;
    int fd = open(f->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd < 0) return GS_OK;            /* the filesystem refuses O_DIRECT: buffered reads */
    struct stat a, b;                    /* the same file as the one opened (not one renamed over it) */
    if (fstat(fd, &a) || fstat(f->fd, &b) || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
        close(fd);
        return fail(GS_E_IO, "disk tier: %s is no longer the file that was opened; reload the model", f->path);
    }
    f->dfd = fd;
    *active = 1;
    return GS_OK;
}

int gs_file_is_direct(const gs_file *f) { return f && direct_on(f); }

int gs_file_advise(gs_file *f, uint64_t offset, size_t n) {
    if (!f) return fail(GS_E_INVALID, "gs_file_advise: no file");
    int err = posix_fadvise(f->fd, (off_t)offset, (off_t)n, POSIX_FADV_WILLNEED);
    return err ? fail(GS_E_IO, "disk tier: posix_fadvise(%s): %s", f->path, strerror(err)) : GS_OK;
}

int gs_file_get_stats(const gs_file *f, uint64_t *reads, uint64_t *bytes, double *seconds) {
    if (!f) return fail(GS_E_INVALID, "gs_file_get_stats: no file");
    gs_file *m = (gs_file *)f;   /* the lock only: the stats are read, not changed */
    pthread_mutex_lock(&m->mu);
    *reads = f->reads;
    *bytes = f->bytes;
    *seconds = f->busy + (f->in_flight ? now_s() - f->busy_since : 0);
    pthread_mutex_unlock(&m->mu);
    return GS_OK;
}
