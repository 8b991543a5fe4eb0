/* The split's set-up: its layers, device region and CPU threads
 * (gs_engine_set_split_experts), and in prompts the uploads that leave the
 * CPU's experts out (gs_engine_set_prompt_cpu_experts). The hook's side is
 * gs_split.c's. */
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"
#include "gs_split.h"

/* Slot copies of the old extent leave (copies in flight land first; a slot
 * an aborted decode left in use too): none is adopted with the wrong one. */
static int forget_slots(gs_engine *e) {
    if (!e->ring) return GS_OK;
    gs_ring_keep_first(e->ring, GS_PHASE_PROMPT);   /* in-use slots back to ready */
    return gs_ring_discard(e->ring);
}

/* The ring's uploads of the split layers (e->split.prompt_up, beside the full
 * pieces that the generate-resident region's copies use) leave out their
 * expert tensors' last n_cpu experts (the expert index is their outermost
 * dimension); the copy engine zeroes a piece's bytes beyond nbytes up to its
 * slot size. Split layers never stream through the slots while generating. */
int prompt_uploads(gs_engine *e, int n_cpu) {
    int rc = forget_slots(e);
    free(e->split.prompt_up);
    e->split.prompt_up = NULL;
    e->split.prompt_cpu = 0;
    gs_piece *up = n_cpu && !rc ? malloc((size_t)e->n_recs * sizeof *up) : NULL;
    if (n_cpu && !rc && !up) rc = fail(GS_E_NOMEM, "set_prompt_cpu_experts: malloc");
    if (up) memcpy(up, e->up, (size_t)e->n_recs * sizeof *up);
    for (int i = 0; i < e->cfg.n_layer; i++) {
        if (!is_split(e, i)) continue;
        uint64_t left_out = 0;
        for (int m = 0; m < SPLIT_TENSORS && up; m++) {
            int k = e->split.rec[i][m];
            if (k < 0) continue;
            size_t stride = expert_stride(e, i, m);
            up[k].nbytes -= (size_t)n_cpu * stride;
            left_out += (uint64_t)n_cpu * stride;
        }
        if (e->ring) (void)gs_ring_set_layer_bytes(e->ring, i, e->layers[i].bytes - left_out);   /* in range */
    }
    e->split.prompt_up = up;
    e->split.prompt_cpu = up ? n_cpu : 0;
    return rc;
}

int gs_engine_set_prompt_cpu_experts(gs_engine *e, int n_cpu) {
    if (!e->split.n) return fail(GS_E_INVALID, "set_prompt_cpu_experts: no split layers (set_split_experts first)");
    if (e->kv.attached && e->kv.reuse_min_batch && !e->kv.graphs_dropped)
        return fail(GS_E_INVALID, "set_prompt_cpu_experts: the attached context reuses graphs built with the old placement");
    for (int i = 0; i < e->cfg.n_layer; i++) {
        int n_expert = is_split(e, i) ? layer_n_expert(e, i) : 0;
        if (is_split(e, i) && (n_cpu < 0 || n_cpu >= n_expert))
            return fail(GS_E_INVALID, "set_prompt_cpu_experts: %d of layer %d's %d experts (0 .. %d)", n_cpu, i,
                        n_expert, n_expert - 1);
    }
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    return rc ? rc : prompt_uploads(e, n_cpu);
}

/* The layer's gate, up and down expert tensors among its records, and their
 * biases where it has them (gpt-oss). */
static int find_experts(gs_engine *e, int layer, int rec[SPLIT_TENSORS]) {
    static const char *names[SPLIT_TENSORS] = { ".ffn_gate_exps.weight", ".ffn_up_exps.weight", ".ffn_down_exps.weight",
                                                ".ffn_gate_exps.bias", ".ffn_up_exps.bias", ".ffn_down_exps.bias" };
    const layer_info *ly = &e->layers[layer];
    for (int m = 0; m < SPLIT_TENSORS; m++) rec[m] = -1;
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const char *name = e->recs[k].t->name;
        int m = 0;
        while (m < SPLIT_TENSORS && !(strstr(name, names[m]) && !strcmp(strstr(name, names[m]), names[m]))) m++;
        if (m < SPLIT_TENSORS) rec[m] = k;
        else if (strstr(name, "_exps"))   /* scales indexed by the routed ids would read rewritten ones */
            return fail(GS_E_INVALID, "split experts: layer %d has %s; only gate/up/down expert weights and biases "
                        "can be split", layer, name);
    }
    for (int m = 0; m < 3; m++) {
        if (rec[m] < 0)
            return fail(GS_E_INVALID, "split experts: layer %d has no streamed %s tensor (separate gate, up and down "
                        "expert tensors are needed)", layer, names[m] + 1);
        const struct gs_tensor *t = e->recs[rec[m]].t;
        if (!cpu_kernels_have(t->type) || t->ne[3] != 1)
            return fail(GS_E_INVALID, "split experts: the CPU has no dot product for %s's type %d", t->name, t->type);
    }
    const struct gs_tensor *g = e->recs[rec[0]].t, *u = e->recs[rec[1]].t, *d = e->recs[rec[2]].t;
    if (g->ne[0] != u->ne[0] || g->ne[1] != u->ne[1] || d->ne[0] != g->ne[1] || d->ne[1] != g->ne[0]
        || g->ne[2] != u->ne[2] || g->ne[2] != d->ne[2])
        return fail(GS_E_INVALID, "split experts: layer %d's expert tensors do not have gate/up [n_embd, n_ff, n] and "
                    "down [n_ff, n_embd, n] shapes", layer);
    for (int m = B_GATE; m < SPLIT_TENSORS; m++) {   /* a bias: F32 [rows of its matrix, n] */
        const struct gs_tensor *b = rec[m] < 0 ? NULL : e->recs[rec[m]].t, *w = e->recs[rec[m - B_GATE]].t;
        if (b && (b->type != 0 || b->ne[0] != w->ne[1] || b->ne[1] != w->ne[2] || b->ne[2] != 1 || b->ne[3] != 1))
            return fail(GS_E_INVALID, "split experts: %s is not an F32 bias per expert [%lld, %lld]", b->name,
                        (long long)w->ne[1], (long long)w->ne[2]);
    }
    if (e->split.n_max + e->split.n_used > g->ne[2])
        return fail(GS_E_INVALID, "split experts: %d uploaded experts and %d zero ones (one per expert used) need %d "
                    "experts per layer (it has %lld)", e->split.n_max, e->split.n_used,
                    e->split.n_max + e->split.n_used, (long long)g->ne[2]);
    return GS_OK;
}

/* GS_SPLIT_AUTO's candidates: a quarter to three quarters of the experts
 * used (PCIe and the CPU's memory at comparable rates share them about
 * evenly), as the region and the expert count allow. */
static void tune_range(gs_engine *e, int layer) {
    int n_expert = 0, u = e->split.n_used;
    const layer_info *ly = layer >= 0 && layer < e->cfg.n_layer ? &e->layers[layer] : NULL;
    for (int k = ly ? ly->first : 0; ly && k < ly->first + ly->count; k++)
        if (strstr(e->recs[k].t->name, "_exps.weight")) n_expert = (int)e->recs[k].t->ne[2];
    int lo = u / 4 > 1 ? u / 4 : 1, hi = (3 * u + 3) / 4;
    if (hi > n_expert - u) hi = n_expert - u;
    if (hi > GS_SPLIT_MAX_UPLOAD) hi = GS_SPLIT_MAX_UPLOAD;
    if (hi - lo + 1 > GS_SPLIT_TUNE_CANDIDATES) hi = lo + GS_SPLIT_TUNE_CANDIDATES - 1;
    if (lo > hi) lo = hi;                 /* few experts beyond those used: fewer candidates */
    if (lo < 1) lo = hi = 1;              /* none: find_experts refuses the layer */
    e->split.tune.lo = lo;
    e->split.tune.hi = hi > lo ? hi : lo - 1;
    e->split.tune.runs = 0;
    e->split.n_max = hi > lo ? hi : lo;
    e->split.n_upload = lo;
}

static int alloc_arrays(gs_engine *e) {
    int n = e->cfg.n_layer;
    e->split.on = calloc(n, 1);
    e->split.rec = calloc(n, sizeof *e->split.rec);
    e->split.off = calloc(n, sizeof *e->split.off);
    e->split.x = calloc(n, sizeof *e->split.x);
    e->split.ids = calloc(n, sizeof *e->split.ids);
    e->split.w = calloc(n, sizeof *e->split.w);
    e->split.inp = calloc(n, sizeof *e->split.inp);
    e->split.mode = calloc(n, 1);
    e->split.routed = calloc(n, 1);
    e->split.rows = calloc(n, sizeof *e->split.rows);
    if (!e->split.on || !e->split.rec || !e->split.off || !e->split.x || !e->split.ids || !e->split.w
        || !e->split.inp || !e->split.mode || !e->split.routed || !e->split.rows)
        return fail(GS_E_NOMEM, "split experts: calloc");
    return GS_OK;
}

int gs_engine_set_split_experts(gs_engine *e, const int *layers, int n, int n_upload, int n_used, int n_threads,
                                int activation, int into_sum) {
    if (!e->started) return fail(GS_E_INVALID, "set_split_experts: the engine has not started");
    if (e->kv.attached && e->kv.reuse_min_batch && !e->kv.graphs_dropped)
        return fail(GS_E_INVALID, "set_split_experts: the attached context reuses graphs built with the old placement");
    if (n < 0 || (n > 0 && (n_upload < GS_SPLIT_AUTO || n_upload > GS_SPLIT_MAX_UPLOAD || n_used < 1
                            || n_threads < 1 || (activation != GS_SPLIT_ACT_SWIGLU && activation != GS_SPLIT_ACT_OAI))))
        return fail(GS_E_INVALID, "set_split_experts: %d layers, %d uploaded experts (0 .. %d, or %d: timed), %d used, "
                    "%d threads, activation %d", n, n_upload, GS_SPLIT_MAX_UPLOAD, GS_SPLIT_AUTO, n_used, n_threads,
                    activation);
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    if (rc) return rc;
    split_free(e);
    generate_order(e);
    if (n == 0) return GS_OK;
    if ((rc = cpu_kernels_load()) || (rc = alloc_arrays(e))) { split_free(e); return rc; }
    e->split.n_used = n_used;
    e->split.oai = activation == GS_SPLIT_ACT_OAI;
    e->split.into_sum = into_sum != 0;
    e->split.n_upload = e->split.n_max = n_upload;
    e->split.tune.lo = 1;                 /* tune.hi < lo: nothing to time */
    e->split.tune.layer = -1;
    if (n_upload == GS_SPLIT_AUTO) tune_range(e, layers[0]);
    size_t align = G.buft_get_alignment(e->cfg.ring_buft), region = 0;
    if (!align) align = 1;
    /* Layers share the region, one at a time, but a tensor of one kind (gate,
     * ..., down bias) lies at one offset per expert stride: a layer whose down
     * experts are larger (Q6_K beside Q4_K, as Q4_K_M files mix) would
     * otherwise upload over another layer's zero experts, which are never
     * cleared again. */
    struct { int m; size_t stride, off; } seg[64];
    int n_seg = 0;
    for (int k = 0; k < n && !rc; k++) {
        int i = layers[k];
        if (i < 0 || i >= e->cfg.n_layer || e->layers[i].count == 0)
            rc = fail(GS_E_INVALID, "split experts: layer %d is not a streamed layer", i);
        else if (e->layers[i].cpu_generate || e->layers[i].disk_bytes)
            rc = fail(GS_E_INVALID, "split experts: layer %d is a CPU or disk-tier layer", i);
        else if (!(rc = find_experts(e, i, e->split.rec[i]))) {
            for (int m = 0; m < SPLIT_TENSORS && !rc; m++) {
                if (e->split.rec[i][m] < 0) continue;
                size_t stride = expert_stride(e, i, m);
                int g = 0;
                while (g < n_seg && !(seg[g].m == m && seg[g].stride == stride)) g++;
                if (g == n_seg && n_seg == (int)(sizeof seg / sizeof *seg))
                    rc = fail(GS_E_INVALID, "split experts: more than %d expert tensor layouts", n_seg);
                else if (g == n_seg) {
                    seg[n_seg++] = (typeof(*seg)){ m, stride, region };
                    region = align_up(region + (size_t)(e->split.n_max + n_used) * stride + 512, align);
                }
                if (!rc) e->split.off[i][m] = seg[g].off;
            }
            e->split.on[i] = 1;
        }
    }
    if (!rc) {
        e->split.buf = G.buft_alloc_buffer(e->cfg.ring_buft, region);
        if (!e->split.buf) rc = fail(GS_E_GGML, "split experts: no room for the %zu-byte device region", region);
    }
    if (!rc) {
        G.buffer_set_usage(e->split.buf, GGML_USAGE_WEIGHTS);
        G.buffer_clear(e->split.buf, 0);      /* the zero experts (and the padding after them) stay zero */
        e->split.base = G.buffer_get_base(e->split.buf);
        e->split.bytes = region;
        rc = split_pool_create(n_threads - 1, &e->split.pool);
    }
    if (!rc && e->cfg.use_cuda) {
        int err = C.StreamCreateWithFlags(&e->split.stream, CUDA_STREAM_NON_BLOCKING);
        if (err) { e->split.stream = NULL; rc = cuda_fail("cudaStreamCreateWithFlags", err); }
    }
    if (rc) { split_free(e); return rc; }
    e->split.n = n;
    e->size.split_region_bytes = region;
    e->size.split_n_upload = tuning(e) ? -1 : e->split.n_upload;
    generate_order(e);
    return GS_OK;
}

