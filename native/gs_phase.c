/* Phases: which layers stream, which the CPU computes, and the switch
 * between prompt and generate placement (between decodes). */
#include "gs_engine.h"

/* The generate phase's streamed layers in execution order: the overflow
 * less the CPU layers and the generate-resident layers in their region. */
void generate_order(gs_engine *e) {
    int order[e->cfg.n_layer], n = 0;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        const layer_info *ly = &e->layers[i];
        if (ly->count > 0 && !ly->cpu_generate && !ly->gr_live && !is_split(e, i)) order[n++] = i;
    }
    (void)gs_ring_set_order(e->ring, GS_PHASE_GENERATE, order, n);   /* valid by construction */
}

/* A CPU layer counts as a CPU layer for llama.cpp's graph callback while
 * generating (its norms run where its matrices do); otherwise as loaded. */
static void apply_layer_devices(gs_engine *e) {
    if (!e->cpu_dev) return;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        *ly->dev_cell = e->phase == GS_PHASE_GENERATE && ly->cpu_generate ? e->cpu_dev : ly->dev_orig;
    }
}

int gs_engine_bind_layer_devices(gs_engine *e, void *const *cells, int n) {
    if (!cells) {             /* forget them, writing nothing: the model may be gone */
        e->cpu_dev = NULL;
        for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].dev_cell = NULL;
        return GS_OK;
    }
    if (n != e->cfg.n_layer) return fail(GS_E_INVALID, "bind_layer_devices: %d cells for %d layers", n, e->cfg.n_layer);
    if (e->phase != GS_PHASE_PROMPT) return fail(GS_E_INVALID, "bind_layer_devices: only in the prompt phase");
    void *cpu = G.dev_by_name("CPU");
    if (!cpu) return fail(GS_E_GGML, "bind_layer_devices: ggml has no CPU device");
    for (int i = 0; i < n; i++) {
        e->layers[i].dev_cell = (void **)cells[i];
        e->layers[i].dev_orig = *(void **)cells[i];
    }
    e->cpu_dev = cpu;
    return GS_OK;
}

/* Layers computed by the CPU while generating go back to their host home
 * (the scheduler then places their ops on the CPU for small batches); in
 * the prompt phase they stream like the others. */
int switch_phase(gs_engine *e, int phase) {
    if (phase == e->phase) return GS_OK;
    if (phase == GS_PHASE_PROMPT) gr_leave(e);
    else {
        int rc = gr_enter(e);
        if (rc < 0) return rc;
    }
    gs_ring_keep_first(e->ring, phase);
    for (int i = 0; i < e->cfg.n_layer; i++) {
        const layer_info *ly = &e->layers[i];
        if (ly->count == 0 || ly->gr_live) continue;
        if (layer_streams(e, phase, i)) {
            if (!layer_streams(e, e->phase, i)) rehome_layer(e, i, slot_base(e, 0));
        } else if (phase == GS_PHASE_GENERATE && is_split(e, i)) {
            split_point(e, i);
        } else {
            point_home(e, i);
        }
    }
    e->phase = phase;
    e->hook_ran = 0;
    apply_layer_devices(e);
    int rc = sync_kv(e);
    if (!rc) rc = gs_ring_prefetch_first(e->ring, e->phase);
    if (rc) engine_fail(e, rc);
    return rc;
}

/* Between decodes only. The scheduler's placement lives in the graph: see
 * gs_engine_attach_kv for contexts that reuse graphs. */
int gs_engine_set_phase(gs_engine *e, int phase, int hold_kv) {
    if (phase != GS_PHASE_PROMPT && phase != GS_PHASE_GENERATE)
        return fail(GS_E_INVALID, "unknown phase %d", phase);
    split_settle(e);
    e->kv.hold = hold_kv != 0;
    e->kv.graphs_dropped = 0;   /* a decode follows: it may leave a graph to reuse */
    e->gr.walk = 1;   /* a decode follows */
    if (!e->started) return GS_OK;
    kv_scan_done(e);
    const char *gr_base = e->gr.base;
    int rc = phase == e->phase ? sync_kv(e) : switch_phase(e, phase);
    if (!rc && phase == e->phase && phase == GS_PHASE_GENERATE && e->gr.n && !e->gr.base) {
        /* the compute buffer has been seen since the switch */
        rc = gr_enter(e);
        if (rc > 0) {
            gs_ring_keep_first(e->ring, phase);
            rc = gs_ring_prefetch_first(e->ring, phase);
        }
    }
    if (e->gr.base != gr_base) e->hook_ran = 0;   /* generate-resident layers moved in or out */
    if (rc) engine_fail(e, rc);
    return rc;
}

/* Whether the coming decode can run without the hook (gs_engine_route_hook). */
static int hook_idle(const gs_engine *e) {
    if (e->phase != GS_PHASE_GENERATE || !e->kv.hold || !e->hook_ran || e->kv.scan || e->timing.on || e->tl.on)
        return 0;
    if (e->gr.n && !e->gr.base) return 0;   /* generate-resident layers wait to move in */
    if (e->split.n) return 0;               /* split layers work at their boundaries */
    int streamed = 0;
    for (int i = 0; i < e->cfg.n_layer; i++)
        streamed += e->layers[i].count > 0 && layer_streams(e, GS_PHASE_GENERATE, i);
    return streamed <= e->cfg.n_slots;      /* each in the slot it was adopted into */
}

int gs_engine_route_hook(gs_engine *e, void *sched, int *hooked) {
    *hooked = 1;
    if (!sched) return fail(GS_E_INVALID, "gs_engine_route_hook: no scheduler");
    if (e->started && !e->status && hook_idle(e)) {
        *hooked = 0;
        e->ctr.hookless_decodes++;
    }
    G.sched_set_eval_callback(sched, *hooked ? gs_engine_eval_cb : NULL, *hooked ? e : NULL);
    return GS_OK;
}

int gs_engine_graphs_dropped(gs_engine *e) {
    e->kv.graphs_dropped = 1;
    return GS_OK;
}

/* Which overflow layers the CPU computes while generating. Before start, or
 * between decodes (the engine then returns to the prompt phase); refused
 * while a context that reuses graphs is attached (its graphs keep the old
 * choice's placement), unless it has dropped them since its last decode. */
int gs_engine_set_cpu_layers(gs_engine *e, const int *layers, int n) {
    if (e->kv.attached && e->kv.reuse_min_batch && !e->kv.graphs_dropped)
        return fail(GS_E_INVALID, "set_cpu_layers: the attached context reuses graphs, which keep the placement "
                    "they were built with; choose CPU layers before creating it, or create it without graph "
                    "reuse (graph_reuse=False, or LLAMA_GRAPH_REUSE_DISABLE=1)");
    for (int k = 0; k < n; k++) {
        if (layers[k] < 0 || layers[k] >= e->cfg.n_layer)
            return fail(GS_E_INVALID, "cpu layer %d out of range", layers[k]);
        if (e->layers[layers[k]].gen_resident)
            return fail(GS_E_INVALID, "layer %d is generate-resident; it cannot also be a CPU layer", layers[k]);
        if (is_split(e, layers[k]))
            return fail(GS_E_INVALID, "layer %d has its experts split; it cannot also be a CPU layer", layers[k]);
        if (e->layers[layers[k]].disk_bytes)
            return fail(GS_E_INVALID, "layer %d is on the disk tier (read from the model file); the CPU cannot "
                        "compute it from host memory", layers[k]);
    }
    if (e->started) {
        int rc = switch_phase(e, GS_PHASE_PROMPT);
        if (rc) return rc;
    }
    for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].cpu_generate = 0;
    for (int k = 0; k < n; k++) e->layers[layers[k]].cpu_generate = 1;
    if (!e->started) return GS_OK;
    generate_order(e);
    int rc = sync_kv(e);   /* frees host KV buffers of layers no longer on the CPU */
    return rc ? rc : sync_repacks(e);
}

/* On a context that reuses graphs, a graph keeps the placement it was built
 * with: a ubatch's phase must follow from its size (checked at its first layer). */
int phase_node(gs_engine *e, const struct gs_tensor *t, int layer) {
    int ph = e->phase;
    if (layer != 0 || !e->kv.check_shape || (t->ne[1] >= e->kv.reuse_min_batch) == (ph == GS_PHASE_PROMPT))
        return GS_OK;
    return fail(GS_E_GRAPH, "a ubatch of %lld tokens ran in the %s phase on a context that reuses graphs: ubatches of "
                "%d or more tokens must run in the prompt phase, smaller ones in the generate phase (decode a "
                "prompt's short tail on its own), or a later decode could reuse this graph's placement",
                (long long)t->ne[1], ph == GS_PHASE_PROMPT ? "prompt" : "generate", e->kv.reuse_min_batch);
}
