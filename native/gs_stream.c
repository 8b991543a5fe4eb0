/* The hook's streaming: where a graph needs a boundary (a backend sync), and
 * what the ring does there and before nodes that read a streamed weight. */
#include "gs_engine.h"

static int streams_now(const gs_engine *e, int layer) {
    return layer < e->cfg.n_layer && layer_streams(e, e->phase, layer);
}

/* Before a node that reads a streamed weight runs, its layer must be adopted.
 * Normally the boundary at l_out-(L-1) did it; the first layer of a graph has
 * no such boundary and is adopted here (nothing launched is pending on it). */
static int adopt_sources(gs_engine *e, const struct gs_tensor *t) {
    for (int k = 0; k < GS_MAX_SRC; k++) {
        const struct gs_tensor *s = t->src[k];
        if (!s || s->buffer != e->ring_buf) continue;
        int idx = ptrmap_get(&e->rec_map, s);
        if (idx < 0 || !streams_now(e, e->recs[idx].layer)) continue;
        int rc = gs_ring_adopt(e->ring, e->phase, e->recs[idx].layer);
        if (rc) return rc;
    }
    return GS_OK;
}

/* Node t is asked (layer: i for l_out-<i>, else -1). STREAM_SYNC: a boundary
 * is needed after it; STREAM_ADOPTED: the next layer was adopted without one;
 * STREAM_PASS: nothing to sync for streaming (its sources were adopted). */
int stream_ask(gs_engine *e, const struct gs_tensor *t, int layer) {
    if (layer >= 0 && (e->timing.on || streams_now(e, layer) || streams_now(e, layer + 1))) {
        /* Only the next layer's adoption needs this boundary. If its copy
         * has already landed, adopt now: nothing launched yet reads the
         * slot, and the sync (plus the relaunch gap) is saved. */
        int landed = 0;
        if (!e->timing.on && !streams_now(e, layer)) gs_ring_landed(e->ring, layer + 1, &landed);
        if (landed) {
            int rc = gs_ring_adopt(e->ring, e->phase, layer + 1);
            if (rc) engine_fail(e, rc);
            return STREAM_ADOPTED;
        }
        e->ctr.boundaries++;
        return STREAM_SYNC;
    }
    int rc = adopt_sources(e, t);
    if (rc) engine_fail(e, rc);
    return STREAM_PASS;
}

/* The backend is synchronised after l_out-<layer>: every node up to it has
 * finished, so its slot is free and the next layer can be adopted. */
void stream_synced(gs_engine *e, int layer) {
    if (layer < 0) return;
    timing_boundary(e, layer);
    int rc = streams_now(e, layer) ? gs_ring_release(e->ring, e->phase, layer) : GS_OK;
    if (!rc && streams_now(e, layer + 1)) rc = gs_ring_adopt(e->ring, e->phase, layer + 1);
    if (rc) engine_fail(e, rc);
}
