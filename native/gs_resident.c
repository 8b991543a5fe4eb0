/* Generate-resident layers (see gs_engine_set_generate_resident): copied into
 * a region at each switch to the generate phase, streamed again when prompts
 * (or a generate graph) need that memory. */
#include "gs_engine.h"

/* Prompts will overwrite the region (or it goes with its context): its
 * layers stream again, pointed at slot 0 until adopted. */
void gr_leave(gs_engine *e) {
    if (!e->gr.base) return;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        if (!e->layers[i].gr_live) continue;
        e->layers[i].gr_live = 0;
        /* a split layer while generating; else streamed (switch_phase re-homes it for prompts) */
        if (is_split(e, i) && e->phase == GS_PHASE_GENERATE) split_point(e, i);
        else point_layer(e, i, slot_base(e, 0));
    }
    e->gr.base = NULL;
    e->gr.bytes = 0;
    e->size.gen_resident = 0;
    generate_order(e);
}

/* Where the region would lie now; 0 if nowhere yet (the compute buffer not
 * seen, or no room past what generate graphs need). */
static int region(gs_engine *e, char **base, size_t *bytes) {
    if (e->gr.own_mode) {
        *base = G.buffer_get_base(e->gr.own);
        *bytes = G.buffer_get_size(e->gr.own);
        return 1;
    }
    if (!e->gr.cbuf) return 0;
    /* Room for the generate graphs: what Python reserved for the largest,
     * and at least twice what they have used so far. */
    size_t start = align_up(e->gr.reserve > 2 * e->gr.extent ? e->gr.reserve : 2 * e->gr.extent, 4096);
    if (start >= e->size.compute_buffer_bytes) return 0;
    *base = e->gr.cbuf_base + start;
    *bytes = e->size.compute_buffer_bytes - start;
    return 1;
}

/* Switching to (or generating in) the generate phase: copy the
 * generate-resident layers into their region and point them there.
 * 1 if they moved in, 0 if they stream for now (the compute buffer not seen
 * yet, or no room), <0 on error (nothing pointed into the region). */
int gr_enter(gs_engine *e) {
    if (!e->gr.n || e->gr.base) return 0;
    char *base;
    size_t bytes, fit, k = 0, slot = e->size.slot_bytes;
    if (!region(e, &base, &bytes) || (fit = bytes / slot) == 0) return 0;
    /* the last prompt's graph and output reads are done with that memory */
    int rc = gs_copy_sync_device(e->copy);
    if (rc) return rc;
    /* Layers in order, one slot's size each; pointed there once all have landed. */
    for (int i = 0; i < e->cfg.n_layer && k < fit; i++)
        if (e->layers[i].gen_resident && (rc = copy_layer_to(e, i, base + k++ * slot))) return rc;
    if ((rc = gs_copy_drain(e->copy))) return rc;
    k = 0;
    for (int i = 0; i < e->cfg.n_layer && k < fit; i++) {
        if (!e->layers[i].gen_resident) continue;
        e->layers[i].gr_live = 1;
        /* a device buffer: the scheduler keeps the layer on the GPU */
        rehome_layer(e, i, base + k++ * slot);
    }
    e->gr.base = base;
    e->gr.bytes = k * slot;
    e->size.gen_resident = (int)k;
    e->ctr.gen_resident_loads++;
    generate_order(e);
    return 1;
}

/* Where a compute-buffer tensor ends (offset), and whether it overlaps the region. */
static int cbuf_use(gs_engine *e, const struct gs_tensor *x) {
    if (x->buffer != e->gr.cbuf || !x->data) return 0;
    char *d = x->data;
    size_t n = G.nbytes(x), end = (size_t)(d - e->gr.cbuf_base) + n;
    if (end > e->gr.extent) e->gr.extent = e->size.generate_extent = end;
    return e->gr.base && d < e->gr.base + e->gr.bytes && d + n > e->gr.base;
}

/* Every tensor of the graph that `t` belongs to: llama.cpp builds a graph in
 * one ggml context, whose objects lie one after another from its start.
 * Returns 1 if one of them is in the region. */
static int graph_in_region(gs_engine *e, const struct gs_tensor *t) {
    const struct gs_object *o = (const struct gs_object *)((const char *)t - sizeof *o);
    const char *mem = (const char *)t - o->offs;
    int hit = 0;
    for (o = (const struct gs_object *)mem; o; o = o->next)
        if (o->type == GGML_OBJECT_TYPE_TENSOR) hit |= cbuf_use(e, (const struct gs_tensor *)(mem + o->offs));
    return hit;
}

/* A GPU layer's l_out lives in the attached context's compute buffer: the
 * first one seen (or a new one: llama.cpp reallocated it) is the buffer. */
static int see_compute_buffer(gs_engine *e, const struct gs_tensor *t, int layer) {
    if (layer < 0 || t->view_src || !t->buffer || t->buffer == e->ring_buf
        || (e->phase == GS_PHASE_GENERATE && e->layers[layer].cpu_generate) || t->buffer == e->gr.cbuf)
        return GS_OK;
    if (e->gr.base)
        return fail(GS_E_GRAPH, "the context's compute buffer changed (llama.cpp reallocated it) while "
                    "generate-resident layers were in the old one; load with generate_resident='none'");
    e->gr.cbuf = t->buffer;
    e->gr.cbuf_base = G.buffer_get_base(t->buffer);
    e->size.compute_buffer_bytes = G.buffer_get_size(t->buffer);
    e->gr.extent = 0;
    return GS_OK;
}

/* The attached context's compute buffer is where a GPU layer's output lives;
 * generate-phase graphs must stay clear of the region in its tail. llama.cpp
 * lays a graph out when it builds it, or keeps the layout of the last graph
 * with as many nodes (the prompt-sized one it reserves at first), so the
 * layout can change with the graph: each graph is looked at as a whole at its
 * first node, before anything of it runs, and if it reaches into the region
 * the layers stream instead (its inputs, written before, may have
 * overwritten them). Each node is checked again before it runs, with its
 * inputs: the scheduler's copies between backends are not in that context,
 * and one in the region fails the decode (never a wrong result). */
int resident_node(gs_engine *e, const struct gs_tensor *t, int layer) {
    if (!e->gr.n || e->gr.own_mode || !e->kv.attached) return GS_OK;
    int rc = see_compute_buffer(e, t, layer);
    if (rc || e->phase != GS_PHASE_GENERATE || !e->gr.cbuf) return rc;
    if (e->gr.walk) {
        e->gr.walk = 0;
        if (graph_in_region(e, t)) {
            gr_leave(e);
            e->ctr.gen_resident_evictions++;
        }
    }
    for (int k = -1; k < GS_MAX_SRC; k++) {
        const struct gs_tensor *x = k < 0 ? t : t->src[k];
        if (x && cbuf_use(e, x))
            return fail(GS_E_GRAPH, "a generate-phase graph reaches into the compute buffer's tail, which holds "
                        "generate-resident layers (%s: %zu bytes at offset %zu of %zu; the layers start at %zu); "
                        "load with generate_resident='none'", x->name, G.nbytes(x),
                        (size_t)((char *)x->data - e->gr.cbuf_base), (size_t)e->size.compute_buffer_bytes,
                        (size_t)(e->gr.base - e->gr.cbuf_base));
    }
    return GS_OK;
}

int gs_engine_set_generate_resident(gs_engine *e, const int *layers, int n, size_t reserve_bytes, int own) {
    if (!e->started) return fail(GS_E_INVALID, "set_generate_resident: the engine has not started");
    if (n < 0) return fail(GS_E_INVALID, "set_generate_resident: n = %d", n);
    for (int k = 0; k < n; k++) {
        int i = layers[k];
        if (i < 0 || i >= e->cfg.n_layer || e->layers[i].count == 0)
            return fail(GS_E_INVALID, "generate-resident layer %d is not a streamed layer", i);
        if (e->layers[i].cpu_generate)
            return fail(GS_E_INVALID, "generate-resident layer %d is a CPU layer", i);
    }
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    if (rc) return rc;
    gr_leave(e);
    gr_free(e);
    for (int i = 0; i < e->cfg.n_layer; i++) e->layers[i].gen_resident = 0;
    e->gr.n = 0;
    if (n == 0) return GS_OK;
    if (own) {
        size_t bytes = e->size.slot_bytes * (size_t)n;
        e->gr.own = G.buft_alloc_buffer(e->cfg.ring_buft, bytes);
        if (!e->gr.own)
            return fail(GS_E_GGML, "ggml_backend_buft_alloc_buffer(%s, %zu bytes) failed: not enough memory for "
                        "%d generate-resident layers", G.buft_name(e->cfg.ring_buft), bytes, n);
    }
    for (int k = 0; k < n; k++) e->layers[layers[k]].gen_resident = 1;
    e->gr.n = n;
    e->gr.own_mode = own != 0;
    e->gr.reserve = reserve_bytes;
    return GS_OK;
}

/* A context is attached or goes: its compute buffer is yet to be seen. */
void gr_forget_context(gs_engine *e) {
    e->gr.cbuf = NULL;
    e->gr.extent = 0;
}

void gr_free(gs_engine *e) {
    if (e->gr.own) { G.buffer_free(e->gr.own); e->gr.own = NULL; }
}
