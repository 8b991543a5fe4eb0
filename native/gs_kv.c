/* KV caches of the CPU layers (see gs_engine_attach_kv): recorded during the
 * attached context's first decode, moved into host memory while generating
 * and back for prompts, together with their per-stream views. */
#include <string.h>

#include "gs_engine.h"

/* "cache_k_l12", "cache_swa_v_l3" -> layer, *is_v; else -1. */
static int kv_layer_of(const struct gs_tensor *t, int *is_v) {
    if (!t || strncmp(t->name, "cache_", 6) != 0) return -1;
    const char *l = strrchr(t->name, 'l');
    if (!l || l - t->name < 8 || l[-1] != '_' || l[-3] != '_' || (l[-2] != 'k' && l[-2] != 'v')) return -1;
    *is_v = l[-2] == 'v';
    return parse_index(l, "l", '\0');
}

/* llama.cpp allocates per-stream views of each cache tensor right after the
 * layer's K and V (same ggml context); state save/load reads through them,
 * so they must follow the tensor. Walk the context's object chain from it. */
static void kv_find_views(kv_rec *r, int layer) {
    r->n_views = 0;
    const struct gs_object *obj = (const struct gs_object *)((const char *)r->t - sizeof(struct gs_object));
    for (int steps = 0; obj; obj = obj->next, steps++) {
        if (steps > 4 * KV_MAX_VIEWS + 4) { r->n_views = -1; return; }   /* more streams than we track */
        if (obj->type != GGML_OBJECT_TYPE_TENSOR || obj->size < sizeof(struct gs_tensor)) break;
        struct gs_tensor *t = (struct gs_tensor *)((char *)obj + sizeof(struct gs_object));
        int is_v, il = kv_layer_of(t->view_src ? t->view_src : t, &is_v);
        if (il != layer) break;                /* past this layer's tensors */
        if (t->view_src != r->t) continue;     /* the tensor itself, its partner or the partner's views */
        if (r->n_views == KV_MAX_VIEWS) { r->n_views = -1; return; }
        r->views[r->n_views] = t;
        r->view_extra[r->n_views++] = t->extra;
    }
}

static void kv_record(gs_engine *e, struct gs_tensor *t) {
    int is_v, il = kv_layer_of(t, &is_v);
    if (il < 0 || il >= e->cfg.n_layer || !t->buffer || !t->data || t->view_src) return;
    kv_rec *r = &e->layers[il].kv[is_v];
    if (r->t) return;
    r->t = t;
    r->dev_buffer = t->buffer;
    r->dev_data = t->data;
    r->dev_extra = t->extra;
    r->nbytes = G.nbytes(t);
    kv_find_views(r, il);
}

/* A graph node viewing a cache tensor from where it was when the graph was
 * allocated: only a reused graph can have one after a move. */
static int kv_view_stale(const struct gs_tensor *t) {
    int is_v;
    return t->view_src && t->data != (char *)t->view_src->data + t->view_offs && kv_layer_of(t->view_src, &is_v) >= 0;
}

/* Per node: this decode writes cells; before a node runs, cache tensors
 * reach the graph as the view_src of its views (recorded while scanning). */
int kv_node(gs_engine *e, const struct gs_tensor *t, bool ask) {
    e->kv.cleared = 0;
    if (!ask) return GS_OK;
    if (e->kv.scan) {
        if (t->view_src) kv_record(e, t->view_src);
        for (int k = 0; k < GS_MAX_SRC; k++)
            if (t->src[k] && t->src[k]->view_src) kv_record(e, t->src[k]->view_src);
    }
    if (e->kv.attached && kv_view_stale(t))
        return fail(GS_E_GRAPH, "node %s reads KV cache %s where it was before moving between device and host: "
                    "the context reused a graph across a move of the caches (decode through the driver, which holds "
                    "them for such decodes, or create the context with LLAMA_GRAPH_REUSE_DISABLE=1)",
                    t->name, t->view_src->name);
    return GS_OK;
}

/* ---- moves ------------------------------------------------------------------ */

static void kv_point(kv_rec *r, void *buffer, char *data, int home) {
    r->t->buffer = buffer;
    r->t->data = data;
    r->t->extra = home ? r->dev_extra : NULL;
    for (int k = 0; k < r->n_views; k++) {
        struct gs_tensor *v = r->views[k];
        v->buffer = buffer;
        v->data = data + v->view_offs;
        v->extra = home ? r->view_extra[k] : NULL;
    }
}

static int kv_alloc_host(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    size_t align = G.buft_get_alignment(e->cfg.host_kv_buft), total = 0;
    if (align == 0) align = 1;
    for (int w = 0; w < 2; w++)
        if (ly->kv[w].t) { ly->kv[w].offset = align_up(total, align); total = ly->kv[w].offset + ly->kv[w].nbytes; }
    ly->kv_host_buf = G.buft_alloc_buffer(e->cfg.host_kv_buft, total);
    if (!ly->kv_host_buf)
        return fail(GS_E_NOMEM, "cannot allocate %zu bytes of host memory for layer %d's KV cache", total, layer);
    /* zeroed as llama.cpp zeroes its caches: a cleared cache moves without
     * copying, and attention reads cells it masks out (garbage may be NaN) */
    G.buffer_clear(ly->kv_host_buf, 0);
    e->size.host_kv_bytes += G.buffer_get_size(ly->kv_host_buf);
    return GS_OK;
}

static int kv_to_host(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->kv_host_buf) {
        int rc = kv_alloc_host(e, layer);
        if (rc) return rc;
    }
    char *base = G.buffer_get_base(ly->kv_host_buf);
    for (int w = 0; w < 2; w++) {
        kv_rec *r = &ly->kv[w];
        if (!r->t) continue;
        if (!e->kv.cleared) {
            G.tensor_get(r->t, base + r->offset, 0, r->nbytes);
            e->ctr.kv_moved_bytes += r->nbytes;
        }
        kv_point(r, ly->kv_host_buf, base + r->offset, 0);
    }
    ly->kv_on_host = 1;
    return GS_OK;
}

static void kv_to_device(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    char *base = G.buffer_get_base(ly->kv_host_buf);
    for (int w = 0; w < 2; w++) {
        kv_rec *r = &ly->kv[w];
        if (!r->t) continue;
        kv_point(r, r->dev_buffer, r->dev_data, 1);
        if (!e->kv.cleared) {
            G.tensor_set(r->t, base + r->offset, 0, r->nbytes);
            e->ctr.kv_moved_bytes += r->nbytes;
        }
    }
    ly->kv_on_host = 0;
}

void kv_free_host(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->kv_host_buf) return;
    e->size.host_kv_bytes -= G.buffer_get_size(ly->kv_host_buf);
    G.buffer_free(ly->kv_host_buf);
    ly->kv_host_buf = NULL;
}

/* Whether layer i's caches belong in host memory now. */
static int kv_wanted_on_host(const gs_engine *e, const layer_info *ly) {
    if (e->kv.attached && e->kv.hold && e->phase == GS_PHASE_GENERATE) return ly->kv_on_host;
    int movable = ly->kv[0].t && ly->kv[0].n_views >= 0 && ly->kv[1].n_views >= 0;
    return e->kv.attached && e->cfg.host_kv_buft && e->started && e->phase == GS_PHASE_GENERATE
           && ly->cpu_generate && movable;
}

/* Every recorded cache where the phase wants it: a CPU layer's in host
 * memory while generating (unless hold keeps it where it is for a decode
 * that may reuse the last graph), everything else in llama.cpp's buffers. Between
 * decodes only; the device is synchronised first (a decode returns before
 * its last kernels, which may still write the cache, have finished). */
int sync_kv(gs_engine *e) {
    int synced = 0;
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        int want = kv_wanted_on_host(e, ly);
        if (want != ly->kv_on_host) {
            if (!synced) {
                int rc = gs_copy_sync_device(e->copy);
                if (rc) return rc;
                synced = 1;
            }
            if (want) {
                int rc = kv_to_host(e, i);
                if (rc) return rc;
            } else {
                kv_to_device(e, i);
            }
        }
        if (!ly->kv_on_host && !(e->kv.attached && ly->cpu_generate)) kv_free_host(e, i);
    }
    return GS_OK;
}

/* ---- the attached context ------------------------------------------------------- */

static void kv_forget(gs_engine *e) {
    for (int i = 0; i < e->cfg.n_layer; i++) memset(e->layers[i].kv, 0, sizeof e->layers[i].kv);
}

/* Recording stops after the attached context's first full decode: once
 * some layer's caches have been seen. */
void kv_scan_done(gs_engine *e) {
    if (!e->kv.scan) return;
    for (int i = 0; i < e->cfg.n_layer; i++)
        if (e->layers[i].kv[0].t) { e->kv.scan = 0; return; }
}

int gs_engine_attach_kv(gs_engine *e, int reuse_min_batch) {
    if (e->kv.attached) return fail(GS_E_INVALID, "gs_engine_attach_kv: another context's KV cache is attached");
    if (reuse_min_batch < 0) return fail(GS_E_INVALID, "gs_engine_attach_kv: reuse_min_batch %d < 0", reuse_min_batch);
    kv_forget(e);
    gr_forget_context(e);
    e->kv.attached = e->kv.scan = 1;
    e->kv.graphs_dropped = 0;
    e->kv.reuse_min_batch = reuse_min_batch;
    e->kv.check_shape = 0;
    for (int i = 0; reuse_min_batch && i < e->cfg.n_layer; i++)
        if (e->layers[i].cpu_generate) e->kv.check_shape = 1;   /* CPU layers cannot change while attached */
    e->kv.hold = 0;
    return GS_OK;
}

int gs_engine_detach_kv(gs_engine *e) {
    /* The context goes: no upload will be issued until the next one, and the
     * model (whose host memory the uploads read) may be freed next. */
    split_settle(e);
    int rc = gs_copy_drain(e->copy);
    if (rc == GS_E_IO) rc = GS_OK;      /* a failed disk read: nothing is in flight, and decodes report it */
    if (!e->gr.own_mode) gr_leave(e);   /* the region goes with the context */
    gr_forget_context(e);
    if (!e->kv.attached) return rc;
    e->kv.attached = e->kv.scan = e->kv.reuse_min_batch = e->kv.check_shape = e->kv.hold = e->kv.graphs_dropped = 0;
    int rc_kv = sync_kv(e);   /* every cache home, host buffers freed */
    kv_forget(e);
    return rc ? rc : rc_kv;
}

int gs_engine_mark_kv_cleared(gs_engine *e) {
    e->kv.cleared = 1;
    return GS_OK;
}
