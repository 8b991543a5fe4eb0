/* The engine's lifetime, its status and counters, and the test aid that
 * swaps two layers' sources. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"

void engine_fail(gs_engine *e, int code) {
    if (e->status) return;            /* keep the first failure */
    e->status = code;
    snprintf(e->status_msg, sizeof e->status_msg, "%s", gs_last_error());
}

int gs_engine_create(const gs_engine_config *cfg, gs_engine **out) {
    *out = NULL;
    if (!G.loaded) return fail(GS_E_INVALID, "gs_engine_create: call gs_libs_load first");
    if (!cfg || cfg->n_layer <= 0 || cfg->n_slots <= 0 || !cfg->ring_buft)
        return fail(GS_E_INVALID, "gs_engine_create: need n_layer > 0, n_slots > 0 and a ring buffer type");
    if (cfg->disk_readers < 0 || cfg->disk_readers > GS_DISK_READERS_MAX)
        return fail(GS_E_INVALID, "gs_engine_create: disk_readers %d is outside 0 .. %d", cfg->disk_readers,
                    GS_DISK_READERS_MAX);
    if (cfg->use_cuda && !C.loaded)
        return fail(GS_E_INVALID, "gs_engine_create: CUDA mode needs the CUDA runtime (gs_libs_load with cudart)");
    gs_engine *e = calloc(1, sizeof *e);
    if (!e) return fail(GS_E_NOMEM, "gs_engine_create: calloc");
    e->cfg = *cfg;
    e->layers = calloc(cfg->n_layer, sizeof *e->layers);
    e->disc.lout_seen = calloc(cfg->n_layer, 1);
    e->timing.seconds = calloc(cfg->n_layer, sizeof *e->timing.seconds);
    e->timing.count = calloc(cfg->n_layer, sizeof *e->timing.count);
    if (!e->layers || !e->disc.lout_seen || !e->timing.seconds || !e->timing.count) {
        gs_engine_destroy(e);
        return fail(GS_E_NOMEM, "gs_engine_create: calloc");
    }
    gs_engine_reset_discovery(e);
    *out = e;
    return GS_OK;
}

void gs_engine_destroy(gs_engine *e) {
    if (!e) return;
    gs_copy_destroy(e->copy);         /* first: uploads in flight read the sources */
    gs_file_close(e->file);
    gs_ring_destroy(e->ring);
    e->ring = NULL;                   /* split_free below must not count into it */
    if (e->ring_buf) G.buffer_free(e->ring_buf);
    gr_free(e);
    split_free(e);
    /* The context is gone by contract: free host KV copies without touching its tensors. */
    for (int i = 0; e->layers && i < e->cfg.n_layer; i++) { drop_repack(e, i); kv_free_host(e, i); }
    discovery_free(e);
    ptrmap_free(&e->rec_map);
    free(e->recs);
    free(e->up);
    free(e->layers);
    free(e->timing.seconds);
    free(e->timing.count);
    free(e);
}

int gs_engine_get_status(gs_engine *e, char *msg, size_t msg_len) {
    if (msg && msg_len) snprintf(msg, msg_len, "%s", e->status ? e->status_msg : "");
    return e->status;
}

int gs_engine_get_counters(gs_engine *e, gs_counters *out) {
    *out = e->ctr;
    uint64_t reads = 0, bytes = 0;
    double seconds = 0;
    if (e->file) gs_file_get_stats(e->file, &reads, &bytes, &seconds);
    out->disk_reads = reads - e->disk_base.reads;
    out->disk_bytes = bytes - e->disk_base.bytes;
    out->disk_read_seconds = seconds - e->disk_base.seconds;
    return GS_OK;
}

int gs_engine_get_sizes(gs_engine *e, gs_sizes *out) {
    *out = e->size;
    return GS_OK;
}

int gs_engine_reset_counters(gs_engine *e) {
    memset(&e->ctr, 0, sizeof e->ctr);
    if (e->file) gs_file_get_stats(e->file, &e->disk_base.reads, &e->disk_base.bytes, &e->disk_base.seconds);
    memset(e->timing.seconds, 0, e->cfg.n_layer * sizeof *e->timing.seconds);
    memset(e->timing.count, 0, e->cfg.n_layer * sizeof *e->timing.count);
    return GS_OK;
}

/* Layers a and b hold tensors of the same sizes at the same offsets. */
static int same_layout(const gs_engine *e, const layer_info *la, const layer_info *lb) {
    if (la->count == 0 || lb->count == 0 || la->count != lb->count)
        return fail(GS_E_INVALID, "swap: layers %d and %d are not both streamed with the same tensors",
                    (int)(la - e->layers), (int)(lb - e->layers));
    for (int k = 0; k < la->count; k++) {
        const gs_piece *x = &e->up[la->first + k], *y = &e->up[lb->first + k];
        if (x->nbytes != y->nbytes || x->offset != y->offset)
            return fail(GS_E_INVALID, "swap: layers %d and %d differ in layout",
                        (int)(la - e->layers), (int)(lb - e->layers));
    }
    return GS_OK;
}

int gs_engine_swap_sources(gs_engine *e, int a, int b) {
    if (!e->started || a < 0 || b < 0 || a >= e->cfg.n_layer || b >= e->cfg.n_layer)
        return fail(GS_E_INVALID, "swap: engine not started or layer out of range");
    layer_info *la = &e->layers[a], *lb = &e->layers[b];
    int rc = same_layout(e, la, lb);
    if (rc) return rc;
    for (int k = 0; k < la->count; k++) {
        gs_piece *x = &e->up[la->first + k], *y = &e->up[lb->first + k];
        gs_piece tmp = *x;
        x->src = y->src; x->file = y->file; x->file_offset = y->file_offset;
        y->src = tmp.src; y->file = tmp.file; y->file_offset = tmp.file_offset;
    }
    /* Drop whatever the slots hold so the swapped sources are used at once. */
    return gs_ring_discard(e->ring);
}
