/* The CUDA copy engine: uploads queued on a stream of its own, one event per
 * slot marking the end of the slot's last copy. Needs the CUDA runtime
 * (gs_libs_load with cudart). */
#include <stdlib.h>

#include "gs_abi.h"
#include "gs_copy.h"
#include "gs_util.h"

typedef struct {
    gs_copy base;
    void   *stream;
    void  **event;     /* per slot */
} cuda_copy;

static int cuda_put(gs_copy *c, void *dst, const gs_piece *p, int n) {
    cuda_copy *g = (cuda_copy *)c;
    for (int k = 0; k < n; k++)   /* before queueing anything: a slot is filled whole or not at all */
        if (p[k].file)
            return fail(GS_E_INVALID, "the CUDA copy engine cannot read disk-tier tensors yet (the disk tier "
                        "runs in host-slot mode only); give a host budget that holds every streamed layer");
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
    if (rc) return rc;
    int err = C.EventRecord(g->event[slot], g->stream);
    return err ? cuda_fail("cudaEventRecord", err) : GS_OK;
}

static int cuda_done(gs_copy *c, int slot) {
    int err = C.EventQuery(((cuda_copy *)c)->event[slot]);
    if (err == CUDA_SUCCESS) return 1;
    if (err == CUDA_NOT_READY) return 0;
    return cuda_fail("cudaEventQuery", err);
}

static int cuda_wait(gs_copy *c, int slot) {
    int err = C.EventSynchronize(((cuda_copy *)c)->event[slot]);
    return err ? cuda_fail("cudaEventSynchronize", err) : GS_OK;
}

static int cuda_drain(gs_copy *c) {
    cuda_copy *g = (cuda_copy *)c;
    int err = g->stream ? C.StreamSynchronize(g->stream) : CUDA_SUCCESS;
    return err ? cuda_fail("cudaStreamSynchronize", err) : GS_OK;
}

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
