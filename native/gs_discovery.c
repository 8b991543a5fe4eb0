/* Discovery: the weights a throwaway context's graph reads, and whether each
 * layer's weights stay between its l_out boundaries (gs_engine_discover_cb). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"

int gs_engine_reset_discovery(gs_engine *e) {
    e->disc.last_lout = -1;
    memset(&e->disc.check, 0, sizeof e->disc.check);
    e->disc.check.max_lout = -1;
    memset(e->disc.lout_seen, 0, e->cfg.n_layer);
    return GS_OK;
}

static int is_weight(const struct gs_tensor *t) {
    return t && t->buffer && G.buffer_get_usage(t->buffer) == GGML_USAGE_WEIGHTS;
}

static void violation(gs_engine *e, const char *fmt, ...) {
    if (e->disc.check.violations++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->disc.check.first_violation, sizeof e->disc.check.first_violation, fmt, ap);
        va_end(ap);
    }
}

/* A weight that only ever feeds matrix products as their src[0] may be
 * repacked for the CPU kernels (which then read it in that layout only):
 * the products CPU_REPACK computes (its supports_op in ggml-cpu/repack.cpp),
 * a 2-D matrix's MUL_MAT or a 3-D stack's MUL_MAT_ID of F32 rows. Another
 * (deepseek2's per-head attn_k_b / attn_v_b: 3-D in a MUL_MAT) would leave
 * the scheduler no backend for its node (an abort). */
static int is_matmul_src0(const struct gs_tensor *node, int k, const struct gs_tensor *src) {
    if (k != 0 || src->view_src || !node->src[1] || node->src[1]->type != 0 /* GGML_TYPE_F32 */) return 0;
    const char *op = G.op_name(node->op);
    int stacked = src->ne[2] > 1, flat = src->ne[3] == 1;
    return op && flat && ((strcmp(op, "MUL_MAT") == 0 && !stacked) || (strcmp(op, "MUL_MAT_ID") == 0 && stacked));
}

static int grow(gs_engine *e) {
    int ncap = e->disc.cap ? 2 * e->disc.cap : 256;
    gs_weight *nw = realloc(e->disc.w, ncap * sizeof *nw);
    if (nw) e->disc.w = nw;
    char (*nn)[64] = realloc(e->disc.names, ncap * sizeof *nn);
    if (nn) e->disc.names = nn;
    unsigned char *nm = realloc(e->disc.matmul_only, ncap);
    if (nm) e->disc.matmul_only = nm;
    if (!nw || !nn || !nm) return fail(GS_E_NOMEM, "discovery: realloc");
    e->disc.cap = ncap;
    return GS_OK;
}

/* The index of weight w, recorded now if new; -1 on failure (recorded). */
static int weight_index(gs_engine *e, struct gs_tensor *w) {
    int idx = ptrmap_get(&e->disc.map, w);
    if (idx >= 0) return idx;
    int rc = e->disc.n == e->disc.cap ? grow(e) : GS_OK;
    idx = e->disc.n;
    if (!rc && ptrmap_put(&e->disc.map, w, idx, e->disc.n)) rc = fail(GS_E_NOMEM, "discovery: map");
    if (rc) { engine_fail(e, rc); return -1; }
    e->disc.n++;
    memcpy(e->disc.names[idx], w->name, 64);
    e->disc.names[idx][63] = 0;
    gs_weight *r = &e->disc.w[idx];
    r->tensor = w;
    r->name = NULL;  /* set on read: names may move when it grows */
    r->layer = parse_index(w->name, "blk.", '.');
    r->nbytes = G.nbytes(w);
    r->viewed = 0;
    e->disc.matmul_only[idx] = 1;
    return idx;
}

static void record_weight(gs_engine *e, struct gs_tensor *w, int viewed, int matmul_src0, const char *user_name) {
    int idx = weight_index(e, w);
    if (idx < 0) return;
    gs_weight *r = &e->disc.w[idx];
    r->viewed |= viewed;
    e->disc.matmul_only[idx] &= matmul_src0 && !viewed;
    if (r->layer >= 0 && r->layer != e->disc.last_lout + 1)
        violation(e, "weight %s is used by node %s after l_out-%d", e->disc.names[idx], user_name, e->disc.last_lout);
}

static void record_lout(gs_engine *e, int i) {
    if (i >= e->cfg.n_layer) { violation(e, "node l_out-%d but the model has %d layers", i, e->cfg.n_layer); return; }
    if (i != e->disc.last_lout + 1) violation(e, "l_out-%d follows l_out-%d", i, e->disc.last_lout);
    if (!e->disc.lout_seen[i]) { e->disc.lout_seen[i] = 1; e->disc.check.n_lout++; }
    if (i > e->disc.check.max_lout) e->disc.check.max_lout = i;
    e->disc.last_lout = i;
}

bool gs_engine_discover_cb(void *tensor, bool ask, void *user) {
    gs_engine *e = user;
    struct gs_tensor *t = tensor;
    if (!ask || e->status) return false;
    if (t->view_src && is_weight(t->view_src)) record_weight(e, t->view_src, 1, 0, t->name);
    for (int k = 0; k < GS_MAX_SRC; k++) {
        struct gs_tensor *s = t->src[k];
        if (!s) continue;
        struct gs_tensor *base = s->view_src ? s->view_src : s;
        if (is_weight(base)) record_weight(e, base, base != s, is_matmul_src0(t, k, s), t->name);
    }
    int i = parse_index(t->name, "l_out-", '\0');
    if (i >= 0) record_lout(e, i);
    return false;
}

int gs_engine_count_weights(gs_engine *e, int *n) {
    *n = e->disc.n;
    return GS_OK;
}

int gs_engine_get_weight(gs_engine *e, int i, gs_weight *out) {
    if (i < 0 || i >= e->disc.n) return fail(GS_E_INVALID, "weight index %d out of range", i);
    *out = e->disc.w[i];
    out->name = e->disc.names[i];
    return GS_OK;
}

int gs_engine_get_graph_check(gs_engine *e, gs_graph_check *out) {
    *out = e->disc.check;
    return GS_OK;
}

int weight_matmul_only(const gs_engine *e, const struct gs_tensor *t) {
    int w = ptrmap_get(&e->disc.map, t);
    return w >= 0 && e->disc.matmul_only[w];
}

void discovery_free(gs_engine *e) {
    ptrmap_free(&e->disc.map);
    free(e->disc.w);
    free(e->disc.names);
    free(e->disc.matmul_only);
    free(e->disc.lout_seen);
}
