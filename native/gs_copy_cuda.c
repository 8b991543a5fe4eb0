/* The CUDA copy engine: uploads queued on a stream of its own, one event per
 * slot marking the end of the slot's last copy. Needs the CUDA runtime
 * (gs_libs_load with cudart). With a disk tier the staged engine
 * (gs_copy_stage.c) runs over the CUDA stream at the end of this file. */
#include <stdlib.h>

#include "gs_abi.h"
#include "gs_copy.h"
#include "gs_util.h"

typedef struct {
    gs_copy base;
    void   *stream;
    void  **event;     /* per slot */
} cuda_copy;

/* Event and stream calls as both engines here use them: 0 or GS_E_*;
 * event_done 1 / 0 (passed / not yet) or GS_E_*. */
static int event_record(void *event, void *stream) {
    int err = C.EventRecord(event, stream);
    return err ? cuda_fail("cudaEventRecord", err) : GS_OK;
}

static int event_done(void *event) {
    int err = C.EventQuery(event);
    if (err == CUDA_SUCCESS) return 1;
    if (err == CUDA_NOT_READY) return 0;
    return cuda_fail("cudaEventQuery", err);
}

static int event_wait(void *event) {
    int err = C.EventSynchronize(event);
    return err ? cuda_fail("cudaEventSynchronize", err) : GS_OK;
}

static int stream_drain(void *stream) {
    int err = stream ? C.StreamSynchronize(stream) : CUDA_SUCCESS;
    return err ? cuda_fail("cudaStreamSynchronize", err) : GS_OK;
}

static int cuda_put(gs_copy *c, void *dst, const gs_piece *p, int n) {
    cuda_copy *g = (cuda_copy *)c;
    for (int k = 0; k < n; k++)   /* before queueing anything: a slot is filled whole or not at all */
        if (p[k].file)
            return fail(GS_E_INVALID, "the plain CUDA copy engine reads no disk-tier tensors: the disk tier "
                        "needs the staged one (gs_copy_create_cuda_staged)");
    for (int k = 0; k < n; k++) {
        char *to = (char *)dst + p[k].offset;
        size_t pad = p[k].alloc - p[k].nbytes;
        int err = C.MemcpyAsync(to, p[k].src, p[k].nbytes, CUDA_H2D, g->stream);
        if (err) return cuda_fail("cudaMemcpyAsync", err);
        if (pad && (err = C.MemsetAsync(to + p[k].nbytes, 0, pad, g->stream)))
            return cuda_fail("cudaMemsetAsync", err);
    }
    return GS_OK;
}

static int cuda_issue(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n) {
    cuda_copy *g = (cuda_copy *)c;
    int rc = cuda_put(c, dst, pieces, n);
    return rc ? rc : event_record(g->event[slot], g->stream);
}

static int cuda_done(gs_copy *c, int slot) { return event_done(((cuda_copy *)c)->event[slot]); }
static int cuda_wait(gs_copy *c, int slot) { return event_wait(((cuda_copy *)c)->event[slot]); }
static int cuda_drain(gs_copy *c) { return stream_drain(((cuda_copy *)c)->stream); }

static int cuda_sync_device(gs_copy *c) {
    (void)c;
    int err = C.DeviceSynchronize();
    return err != CUDA_SUCCESS ? cuda_fail("cudaDeviceSynchronize", err) : GS_OK;
}

static void cuda_destroy(gs_copy *c) {
    cuda_copy *g = (cuda_copy *)c;
    if (g->stream) C.StreamSynchronize(g->stream);
    for (int s = 0; g->event && s < c->n_slots; s++)
        if (g->event[s]) C.EventDestroy(g->event[s]);
    if (g->stream) C.StreamDestroy(g->stream);
    free(g->event);
    free(g);
}

static const gs_copy_vt cuda_vt = {
    cuda_issue, cuda_put, cuda_done, cuda_wait, cuda_drain, cuda_sync_device, cuda_destroy,
};

static int cuda_open(cuda_copy *g, int device) {
    int err = C.SetDevice(device);
    if (err) return cuda_fail("cudaSetDevice", err);
    /* Own non-blocking stream: never serialises with llama.cpp's streams. */
    err = C.StreamCreateWithFlags(&g->stream, CUDA_STREAM_NON_BLOCKING);
    if (err) { g->stream = NULL; return cuda_fail("cudaStreamCreateWithFlags", err); }
    for (int s = 0; s < g->base.n_slots; s++) {
        err = C.EventCreateWithFlags(&g->event[s], CUDA_EVENT_DISABLE_TIMING);
        if (err) { g->event[s] = NULL; return cuda_fail("cudaEventCreateWithFlags", err); }
    }
    return GS_OK;
}

int gs_copy_create_cuda(int device, int n_slots, gs_copy **out) {
    *out = NULL;
    if (!C.loaded) return fail(GS_E_INVALID, "gs_copy_create_cuda: the CUDA runtime is not loaded");
    if (n_slots <= 0) return fail(GS_E_INVALID, "gs_copy_create_cuda: n_slots %d <= 0", n_slots);
    cuda_copy *g = calloc(1, sizeof *g);
    if (!g || !(g->event = calloc(n_slots, sizeof *g->event))) {
        free(g);
        return fail(GS_E_NOMEM, "copy engine: calloc");
    }
    g->base = (gs_copy){ &cuda_vt, n_slots };
    int rc = cuda_open(g, device);
    if (rc) { cuda_destroy(&g->base); return rc; }
    *out = &g->base;
    return GS_OK;
}

/* ---- the CUDA stream under the staged engine (gs_copy_stage.c) ----------------
 * What the disk tier needs of CUDA, kept to the calls the plain engine makes
 * plus pinned staging memory: its own non-blocking stream, events (slots,
 * then staging buffers), cudaHostAlloc'd staging (portable: pinned for every
 * context). The uploader and reader threads bind themselves to the device
 * first: the CUDA runtime's current device is per thread. */
typedef struct {
    gs_lower base;
    int      device;
    void    *stream;
    void   **event;
} cuda_lower;

static int cl_thread_init(gs_lower *l) {
    int err = C.SetDevice(((cuda_lower *)l)->device);
    return err ? cuda_fail("cudaSetDevice (disk tier thread)", err) : GS_OK;
}

static int cl_host_alloc(gs_lower *l, size_t n, void **out) {
    int err = C.HostAlloc(out, n, CUDA_HOST_ALLOC_PORTABLE);
    if (!err) return GS_OK;
    *out = NULL;
    (void)l;
    return fail(GS_E_CUDA, "cudaHostAlloc of a %zu-byte pinned staging buffer for the disk tier: %s (cudaError %d)",
                n, C.GetErrorString(err), err);
}

static void cl_host_free(gs_lower *l, void *p) { (void)l; C.FreeHost(p); }

static int cl_copy(gs_lower *l, void *dst, const void *src, size_t n) {
    int err = C.MemcpyAsync(dst, src, n, CUDA_H2D, ((cuda_lower *)l)->stream);
    return err ? cuda_fail("cudaMemcpyAsync", err) : GS_OK;
}

static int cl_zero(gs_lower *l, void *dst, size_t n) {
    int err = C.MemsetAsync(dst, 0, n, ((cuda_lower *)l)->stream);
    return err ? cuda_fail("cudaMemsetAsync", err) : GS_OK;
}

static int cl_record(gs_lower *l, int event) {
    cuda_lower *g = (cuda_lower *)l;
    return event_record(g->event[event], g->stream);
}

static int cl_query(gs_lower *l, int event) { return event_done(((cuda_lower *)l)->event[event]); }
static int cl_sync(gs_lower *l, int event) { return event_wait(((cuda_lower *)l)->event[event]); }
static int cl_drain(gs_lower *l) { return stream_drain(((cuda_lower *)l)->stream); }

static int cl_sync_device(gs_lower *l) { (void)l; return cuda_sync_device(NULL); }

static void cl_destroy(gs_lower *l) {
    cuda_lower *g = (cuda_lower *)l;
    if (g->stream) C.StreamSynchronize(g->stream);
    for (int k = 0; g->event && k < l->n_events; k++)
        if (g->event[k]) C.EventDestroy(g->event[k]);
    if (g->stream) C.StreamDestroy(g->stream);
    free(g->event);
    free(g);
}

static const gs_lower_vt cuda_lower_vt = {
    cl_thread_init, cl_host_alloc, cl_host_free, cl_copy, cl_zero, cl_record, cl_query, cl_sync,
    cl_drain, cl_sync_device, cl_destroy,
};

int lower_create_cuda(int device, int n_events, gs_lower **out) {
    *out = NULL;
    cuda_lower *g = calloc(1, sizeof *g);
    if (!g || !(g->event = calloc(n_events, sizeof *g->event))) {
        free(g);
        return fail(GS_E_NOMEM, "copy engine: calloc");
    }
    g->base = (gs_lower){ &cuda_lower_vt, n_events };
    g->device = device;
    int err = C.SetDevice(device);
    if (err) { cl_destroy(&g->base); return cuda_fail("cudaSetDevice", err); }
    err = C.StreamCreateWithFlags(&g->stream, CUDA_STREAM_NON_BLOCKING);
    if (err) { g->stream = NULL; cl_destroy(&g->base); return cuda_fail("cudaStreamCreateWithFlags", err); }
    for (int k = 0; k < n_events; k++) {
        err = C.EventCreateWithFlags(&g->event[k], CUDA_EVENT_DISABLE_TIMING);
        if (err) { g->event[k] = NULL; cl_destroy(&g->base); return cuda_fail("cudaEventCreateWithFlags", err); }
    }
    *out = &g->base;
    return GS_OK;
}

int gs_copy_create_cuda_staged(int device, int n_slots, size_t chunk_bytes, int n_staging, int n_readers,
                               gs_copy **out) {
    *out = NULL;
    if (!C.loaded) return fail(GS_E_INVALID, "gs_copy_create_cuda_staged: the CUDA runtime is not loaded");
    if (n_slots <= 0 || n_staging < 2)
        return fail(GS_E_INVALID, "gs_copy_create_cuda_staged: n_slots %d <= 0 or n_staging %d < 2", n_slots, n_staging);
    gs_lower *l;
    int rc = lower_create_cuda(device, n_slots + n_staging, &l);
    return rc ? rc : copy_create_staged(l, n_slots, chunk_bytes, n_staging, n_readers, out);
}
