/* Probes: the timeline of decodes, per-layer timing and upload timing
 * (calibration). */
#include <string.h>

#include "gs_engine.h"

/* ---- timeline ---------------------------------------------------------------- */

/* Whether a node computes on the GPU: its output lives in a device buffer. */
static int node_on_gpu(gs_engine *e, const struct gs_tensor *t) {
    void *b = t->view_src ? t->view_src->buffer : t->buffer;
    if (!b) return e->tl.open_gpu;
    if (b != e->tl.buffer) {
        const char *name = G.buffer_name(b);
        e->tl.buffer = b;
        e->tl.buffer_gpu = name && !strncmp(name, "CUDA", 4) && !strstr(name, "Host");
    }
    return e->tl.buffer_gpu;
}

static void timeline_close(gs_engine *e, double now) {
    if (!e->tl.open) return;
    *(e->tl.open_gpu ? &e->tl.sum.gpu_s : &e->tl.sum.cpu_s) += now - e->tl.mark;
    (*(e->tl.open_gpu ? &e->tl.sum.gpu_segments : &e->tl.sum.cpu_segments))++;
    e->tl.open = 0;
    e->tl.mark = now;
}

/* A segment's nodes are all asked before it is launched; the answer to the
 * last of them (or a node of the other backend) ends it. Returns whether the
 * node must end its segment: a graph's last node, so that its end is seen
 * (that sync happens anyway: the graph ends there) and the next ubatch's
 * graph building counts as such. */
int timeline_node(gs_engine *e, const struct gs_tensor *t, bool ask) {
    double now = now_s();
    if (!ask) {
        timeline_close(e, now);
        e->tl.graph_done = !strcmp(t->name, "result_output");
        return 0;
    }
    int gpu = node_on_gpu(e, t);
    if (!e->tl.open || gpu != e->tl.open_gpu) {
        if (e->tl.open) timeline_close(e, now);
        else *(e->tl.graph_done ? &e->tl.sum.pre_s : &e->tl.sum.between_s) += now - e->tl.mark;
        e->tl.open = 1;
        e->tl.graph_done = 0;
        e->tl.open_gpu = gpu;
        e->tl.mark = now;
    }
    return !strcmp(t->name, "result_output");
}

int gs_engine_set_timeline(gs_engine *e, int on) {
    memset(&e->tl.sum, 0, sizeof e->tl.sum);
    e->tl.on = on;
    e->tl.in_decode = e->tl.open = 0;
    return GS_OK;
}

int gs_engine_mark_timeline(gs_engine *e, int begin) {
    if (!e->tl.on) return fail(GS_E_INVALID, "gs_engine_mark_timeline: the timeline is off");
    double now = now_s();
    if (begin) {
        e->tl.begin = e->tl.mark = now;
        e->tl.in_decode = 1;
        e->tl.open = 0;
        e->tl.graph_done = 1;   /* until the first node: building the first graph */
        return GS_OK;
    }
    if (!e->tl.in_decode) return fail(GS_E_INVALID, "gs_engine_mark_timeline: no decode begun");
    timeline_close(e, now);
    e->tl.sum.wall_s += now - e->tl.begin;
    e->tl.sum.decodes++;
    e->tl.in_decode = 0;
    return GS_OK;
}

int gs_engine_get_timeline(gs_engine *e, gs_timeline *out) {
    *out = e->tl.sum;
    return GS_OK;
}

/* ---- per-layer timing ----------------------------------------------------------- */

int gs_engine_set_timing(gs_engine *e, int on) {
    e->timing.on = on;
    e->timing.t_last = now_s();
    return GS_OK;
}

/* At the boundary after `layer` (synchronised): the time since the last one is its. */
void timing_boundary(gs_engine *e, int layer) {
    if (!e->timing.on) return;
    double t = now_s();
    if (layer > 0) { e->timing.seconds[layer] += t - e->timing.t_last; e->timing.count[layer]++; }
    e->timing.t_last = t;
}

int gs_engine_get_layer_time(gs_engine *e, int layer, double *seconds, uint64_t *count) {
    if (layer < 0 || layer >= e->cfg.n_layer) return fail(GS_E_INVALID, "layer %d out of range", layer);
    *seconds = e->timing.seconds[layer];
    *count = e->timing.count[layer];
    return GS_OK;
}

/* ---- upload timing ---------------------------------------------------------------- */

/* Calibration of the link: upload `layer` into slot 0 synchronously, n times,
 * and report the fastest. Between decodes only. */
int gs_engine_measure_upload(gs_engine *e, int layer, int n, double *best_seconds) {
    if (!e->started || layer < 0 || layer >= e->cfg.n_layer || e->layers[layer].count == 0)
        return fail(GS_E_INVALID, "measure_upload: layer %d is not in the ring", layer);
    return gs_ring_time_upload(e->ring, layer, n, best_seconds);
}
