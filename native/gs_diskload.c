/* The disk tier at load time. llama.cpp (load mode none) reads every weight
 * into host memory, so a disk tier alone would still need the whole model in
 * RAM while loading. Its tensors are overridden to this buffer type instead:
 * the plain CPU one, whose buffers are remembered while a load is armed; the
 * load's progress callback, which llama.cpp calls before reading each tensor,
 * hands every whole page of them back to the OS. Their bytes are never read
 * (uploads read the file; the discovery decode only needs the graph), so the
 * load holds about one tensor of them at a time. One load at a time. */
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gguf_stream.h"
#include "gs_abi.h"
#include "gs_util.h"

#define MAX_DISK_BUFFERS 64

typedef void *(*alloc_fn)(void *buft, size_t size);
typedef bool (*progress_fn)(float progress, void *user);

static struct { void *iface[6]; void *device; void *context; } disk_buft;   /* struct ggml_backend_buffer_type */
static alloc_fn cpu_alloc;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
    int         armed, n;
    struct { char *base; size_t size; } buf[MAX_DISK_BUFFERS];
    progress_fn next;            /* the callback this one stands in front of */
    void       *next_user;
    uint64_t    released;        /* bytes of page ranges handed back (pages never touched included) */
} load;

/* Its own name: llama.cpp keeps one weight context per buffer type *name*,
 * so under "CPU" its tensors would join the CPU buffer's. */
static const char *disk_name(void *buft) { (void)buft; return "CPU_disk_tier"; }

static void *disk_alloc(void *buft, size_t size) {
    void *b = cpu_alloc(buft, size);
    pthread_mutex_lock(&mu);
    if (b && load.armed && load.n < MAX_DISK_BUFFERS) {
        load.buf[load.n].base = G.buffer_get_base(b);
        load.buf[load.n].size = G.buffer_get_size(b);
        load.n++;
    }
    pthread_mutex_unlock(&mu);
    return b;
}

int gs_disk_get_buft(void **buft) {
    *buft = NULL;
    if (!G.loaded) return fail(GS_E_INVALID, "gs_disk_get_buft: libraries not loaded");
    void *dev = G.dev_by_name("CPU");
    if (!dev) return fail(GS_E_INVALID, "ggml has no device named CPU");
    pthread_mutex_lock(&mu);
    if (!cpu_alloc) {   /* (the CPU buffer type's device is NULL: not a "done" flag) */
        memcpy(&disk_buft, G.dev_buffer_type(dev), sizeof disk_buft);
        cpu_alloc = (alloc_fn)disk_buft.iface[1];
        disk_buft.iface[0] = (void *)disk_name;
        disk_buft.iface[1] = (void *)disk_alloc;
    }
    pthread_mutex_unlock(&mu);
    *buft = &disk_buft;
    return GS_OK;
}

int gs_disk_load_arm(void *next_cb, void *next_user) {
    pthread_mutex_lock(&mu);
    load.armed = 1;
    load.n = 0;
    load.released = 0;
    load.next = (progress_fn)next_cb;
    load.next_user = next_user;
    pthread_mutex_unlock(&mu);
    return GS_OK;
}

int gs_disk_load_disarm(uint64_t *released_bytes) {
    pthread_mutex_lock(&mu);
    if (released_bytes) *released_bytes = load.released;
    load.armed = 0;
    load.n = 0;                  /* the buffers may be freed from now on: forget them */
    load.next = NULL;
    pthread_mutex_unlock(&mu);
    return GS_OK;
}

bool gs_disk_load_progress_cb(float progress, void *user) {
    (void)user;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    pthread_mutex_lock(&mu);
    uint64_t released = 0;
    for (int i = 0; load.armed && i < load.n; i++) {
        /* Every tensor read so far is complete: all of them can go. Whole pages
         * only: a partial one may belong to the allocator. */
        uintptr_t a = (uintptr_t)load.buf[i].base, first = align_up(a, page);
        uintptr_t last = (a + load.buf[i].size) / page * page;
        if (last > first && madvise((void *)first, last - first, MADV_DONTNEED) == 0) released += last - first;
    }
    if (released > load.released) load.released = released;
    progress_fn next = load.next;
    void *next_user = load.next_user;
    pthread_mutex_unlock(&mu);
    return next ? next(progress, next_user) : true;
}
