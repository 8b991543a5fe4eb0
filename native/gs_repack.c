/* CPU layers' weights in the layout llama.cpp's CPU kernels run fastest on
 * (CPU_REPACK), and a CPU layer's generate-phase home. */
#include "gs_engine.h"

/* A CPU layer's generate-phase home: its repacked copy where there is one,
 * else llama.cpp's host copy. */
void point_home(gs_engine *e, int layer) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const srec *r = &e->recs[k];
        r->t->buffer = r->cpu_buffer ? r->cpu_buffer : r->src_buffer;
        r->t->data = r->cpu_buffer ? r->cpu_data : (void *)e->up[k].src;
        r->t->extra = r->cpu_buffer ? r->cpu_extra : r->src_extra;
    }
}

static void forget_homes(gs_engine *e, const layer_info *ly) {
    for (int k = ly->first; k < ly->first + ly->count; k++)
        e->recs[k].cpu_buffer = e->recs[k].cpu_data = e->recs[k].cpu_extra = NULL;
}

void drop_repack(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    if (!ly->repack_buf) return;
    forget_homes(e, ly);
    G.buffer_free(ly->repack_buf);
    ly->repack_buf = NULL;
    e->size.repacked_bytes -= ly->repacked_bytes;
    ly->repacked_bytes = 0;
}

/* Record k's weights repacked at `at` in buf, if the buffer takes them
 * (its init leaves repack traits in extra); their size, else 0. Runs on a
 * scratch tensor so that the live one keeps pointing where the current
 * phase needs it. */
static int repack_tensor(gs_engine *e, int k, void *buf, char *at, size_t *repacked) {
    srec *r = &e->recs[k];
    struct gs_tensor scratch = *r->t;
    scratch.buffer = NULL;
    scratch.data = NULL;
    scratch.extra = NULL;
    int st = G.tensor_alloc(buf, &scratch, at);
    if (st != 0) return fail(GS_E_GGML, "repack: ggml_backend_tensor_alloc(%s) failed with status %d", r->t->name, st);
    if (scratch.extra) {
        G.tensor_set(&scratch, e->up[k].src, 0, e->up[k].nbytes);
        r->cpu_buffer = buf;
        r->cpu_data = at;
        r->cpu_extra = scratch.extra;
        *repacked += e->up[k].nbytes;
    }
    return GS_OK;
}

/* Copy a CPU layer's matrix weights into a CPU_REPACK buffer, the layout
 * llama.cpp's CPU kernels run fastest on (what stock does with CPU layers).
 * The plain host copy stays: the prompt phase still uploads it. A weight the
 * repack buffer does not take keeps reading the host copy. */
static int repack_layer(gs_engine *e, int layer) {
    layer_info *ly = &e->layers[layer];
    size_t align = G.buft_get_alignment(e->cfg.repack_buft), total = 0;
    if (align == 0) align = 1;
    for (int k = ly->first; k < ly->first + ly->count; k++)
        if (e->recs[k].matmul_only) total = align_up(total, align) + e->up[k].nbytes;
    if (total == 0) return GS_OK;
    void *buf = G.buft_alloc_buffer(e->cfg.repack_buft, total);
    if (!buf) return fail(GS_E_NOMEM, "cannot allocate %zu bytes of host memory to repack layer %d for the CPU", total, layer);
    G.buffer_set_usage(buf, GGML_USAGE_WEIGHTS);
    char *base = G.buffer_get_base(buf);
    size_t off = 0, repacked = 0;
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        if (!e->recs[k].matmul_only) continue;
        off = align_up(off, align);
        int rc = repack_tensor(e, k, buf, base + off, &repacked);
        if (rc) { forget_homes(e, ly); G.buffer_free(buf); return rc; }
        off += e->up[k].nbytes;
    }
    if (repacked == 0) { G.buffer_free(buf); return GS_OK; }
    ly->repack_buf = buf;
    ly->repacked_bytes = G.buffer_get_size(buf);
    e->size.repacked_bytes += ly->repacked_bytes;
    return GS_OK;
}

/* Repacked copies exactly for the current CPU layers. Tensors must not point
 * at a copy being dropped (callers are in the prompt phase). */
int sync_repacks(gs_engine *e) {
    for (int i = 0; i < e->cfg.n_layer; i++) {
        layer_info *ly = &e->layers[i];
        int want = e->cfg.repack_buft && ly->cpu_generate && ly->count > 0;
        if (!want && ly->repack_buf) drop_repack(e, i);
        if (want && !ly->repack_buf) {
            int rc = repack_layer(e, i);
            if (rc) return rc;
        }
    }
    return GS_OK;
}
