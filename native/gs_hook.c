/* The scheduler hook (gs_engine_eval_cb): each feature looks at every node,
 * in this order; streaming decides the answer. */
#include "gs_engine.h"

/* i for a node l_out-<i> of one of the model's layers, else -1. */
static int boundary_layer(const gs_engine *e, const struct gs_tensor *t) {
    int i = parse_index(t->name, "l_out-", '\0');
    return i < e->cfg.n_layer ? i : -1;
}

bool gs_engine_eval_cb(void *tensor, bool ask, void *user) {
    gs_engine *e = user;
    const struct gs_tensor *t = tensor;
    if (e->status || !e->started) return !ask;
    if (e->phase == GS_PHASE_GENERATE) e->hook_ran = 1;
    int tl_end = e->tl.in_decode && timeline_node(e, t, ask);
    int rc = kv_node(e, t, ask);
    int layer = boundary_layer(e, t);
    if (!ask) {
        /* The backend is synchronised: every node up to t has finished. Always
         * true: false would silently drop the rest of the split. */
        stream_synced(e, layer);
        split_synced(e, (struct gs_tensor *)t);
        return true;
    }
    int split = split_ask(e, t);
    if (!rc) rc = resident_node(e, t, layer);
    if (!rc) rc = phase_node(e, t, layer);
    if (rc) {
        engine_fail(e, rc);
        return false;
    }
    switch (stream_ask(e, t, layer)) {
    case STREAM_SYNC:    return true;
    case STREAM_ADOPTED: return split;
    default:             return tl_end || split;
    }
}
