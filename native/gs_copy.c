/* The copy engine's public entry points: argument checks, then dispatch to
 * the implementation (host thread or CUDA stream). */
#include "gs_copy.h"
#include "gs_util.h"

static int bad_slot(const gs_copy *c, int slot) {
    return !c || slot < 0 || slot >= c->n_slots;
}

void gs_copy_destroy(gs_copy *c) {
    if (c) c->vt->destroy(c);
}

int gs_copy_issue(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n) {
    if (bad_slot(c, slot) || n < 0) return fail(GS_E_INVALID, "gs_copy_issue: slot %d or count %d out of range", slot, n);
    return c->vt->issue(c, slot, dst, pieces, n);
}

int gs_copy_put(gs_copy *c, void *dst, const gs_piece *pieces, int n) {
    if (!c || n < 0) return fail(GS_E_INVALID, "gs_copy_put: no copy engine or count %d < 0", n);
    return c->vt->put(c, dst, pieces, n);
}

int gs_copy_done(gs_copy *c, int slot, int *done) {
    *done = 0;
    if (bad_slot(c, slot)) return fail(GS_E_INVALID, "gs_copy_done: slot %d out of range", slot);
    int rc = c->vt->done(c, slot);
    if (rc < 0) return rc;
    *done = rc;
    return GS_OK;
}

int gs_copy_wait(gs_copy *c, int slot) {
    if (bad_slot(c, slot)) return fail(GS_E_INVALID, "gs_copy_wait: slot %d out of range", slot);
    return c->vt->wait(c, slot);
}

int gs_copy_drain(gs_copy *c) {
    return c ? c->vt->drain(c) : GS_OK;
}

int gs_copy_sync_device(gs_copy *c) {
    return c ? c->vt->sync_device(c) : GS_OK;
}
