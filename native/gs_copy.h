/* The copy engine's interface (see gs_copy_* in gguf_stream.h): one struct
 * of function pointers, implemented by the host thread (gs_copy_host.c) and
 * the CUDA stream (gs_copy_cuda.c). The public gs_copy_* functions check
 * their arguments and dispatch here. Internal. */
#ifndef GS_COPY_H
#define GS_COPY_H

#include "gguf_stream.h"

typedef struct {
    int  (*issue)(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n);
    int  (*put)(gs_copy *c, void *dst, const gs_piece *pieces, int n);
    int  (*done)(gs_copy *c, int slot);     /* 1 landed, 0 in flight, <0 error */
    int  (*wait)(gs_copy *c, int slot);
    int  (*drain)(gs_copy *c);
    int  (*sync_device)(gs_copy *c);
    void (*destroy)(gs_copy *c);
} gs_copy_vt;

/* The first member of every implementation's state. */
struct gs_copy {
    const gs_copy_vt *vt;
    int n_slots;
};

/* A stream the staged copy engine (gs_copy_stage.c) queues onto: the CUDA
 * one (gs_copy_cuda.c: cudaMemcpyAsync, events) or the host one
 * (gs_copy_host.c: memcpy done at once, events as completed flags), so the
 * same reader and staging code runs in CI. Events are numbered 0 ..
 * n_events-1; one never recorded counts as passed. Every call but
 * host_alloc/host_free/destroy may run on the uploader thread; thread_init
 * and sync also on the reader threads (sync of a staging buffer's event,
 * never at the same time as its record). */
typedef struct gs_lower gs_lower;
typedef struct {
    int   (*thread_init)(gs_lower *l);                            /* first, on the reader thread */
    int   (*host_alloc)(gs_lower *l, size_t n, void **out);       /* staging memory (pinned on CUDA) */
    void  (*host_free)(gs_lower *l, void *p);
    int   (*copy)(gs_lower *l, void *dst, const void *src, size_t n);   /* host -> slot, in stream order */
    int   (*zero)(gs_lower *l, void *dst, size_t n);
    int   (*record)(gs_lower *l, int event);       /* the event passes once what was queued so far has */
    int   (*query)(gs_lower *l, int event);        /* 1 passed, 0 not yet, <0 error */
    int   (*sync)(gs_lower *l, int event);         /* until it has passed */
    int   (*drain)(gs_lower *l);                   /* until everything queued has landed */
    int   (*sync_device)(gs_lower *l);
    void  (*destroy)(gs_lower *l);                 /* after drain */
} gs_lower_vt;

struct gs_lower {
    const gs_lower_vt *vt;
    int n_events;
};

int lower_create_cuda(int device, int n_events, gs_lower **out);
/* delay_us: sleep when recording events below delay_events (the slots'), as the host engine's slow link. */
int lower_create_host(int n_events, int delay_us, int delay_events, gs_lower **out);
/* Takes lower (destroyed with the engine, or here on failure). */
int copy_create_staged(gs_lower *lower, int n_slots, size_t chunk_bytes, int n_staging, int n_readers,
                       gs_copy **out);

#endif
