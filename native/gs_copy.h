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

#endif
