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

/* The row multiple AMX's kernels need in a weight of this ggml type (0: they
 * do not take it): ggml-cpu/amx/amx.cpp's supports_op. */
static int amx_alignment(int type) {
    switch (type) {
    case 2: case 3: case 8: return 32;                 /* Q4_0, Q4_1, Q8_0: TILE_K */
    case 12: case 13: case 14: case 23: return 256;    /* Q4_K, Q5_K, Q6_K, IQ4_XS: QK_K */
    case 1: return 16;                                 /* F16 */
    default: return 0;
    }
}

/* The repacked layouts (CPU_FORM_* bits) this use of weight src, as node's
 * src[k], allows. A weight repacked for the CPU is read in that layout only,
 * so only matrix products of F32 rows that the layout's kernels compute may
 * read it: CPU_REPACK's a 2-D matrix's MUL_MAT or a 3-D stack's MUL_MAT_ID
 * (its supports_op in ggml-cpu/repack.cpp); AMX's a 2-D matrix's MUL_MAT of
 * contiguous rows with 32-multiple outputs. Any other (deepseek2's per-head
 * attn_k_b / attn_v_b: 3-D in a MUL_MAT) would leave the scheduler no backend
 * for its node (an abort). */
static unsigned cpu_forms_of_use(const struct gs_tensor *node, int k, const struct gs_tensor *src) {
    const struct gs_tensor *rows = node->src[1];
    if (k != 0 || src->view_src || !rows || rows->type != 0 /* GGML_TYPE_F32 */ || src->ne[3] != 1) return 0;
    const char *op = G.op_name(node->op);
    int stacked = src->ne[2] > 1;
    if (op && strcmp(op, "MUL_MAT_ID") == 0) return stacked ? 1u << CPU_FORM_REPACK : 0;
    if (!op || strcmp(op, "MUL_MAT") != 0 || stacked) return 0;
    int align = amx_alignment(src->type);
    int amx = align && src->ne[0] % align == 0 && node->ne[0] % 32 == 0 && f32_dense(rows);
    return 1u << CPU_FORM_REPACK | (amx ? 1u << CPU_FORM_AMX : 0);
}

static int grow(gs_engine *e) {
    int ncap = e->disc.cap ? 2 * e->disc.cap : 256;
    gs_weight *nw = realloc(e->disc.w, ncap * sizeof *nw);
    if (nw) e->disc.w = nw;
    char (*nn)[64] = realloc(e->disc.names, ncap * sizeof *nn);
    if (nn) e->disc.names = nn;
    if (!nw || !nn) return fail(GS_E_NOMEM, "discovery: realloc");
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
    r->cpu_layouts = CPU_FORMS_ALL;
    return idx;
}

static void record_weight(gs_engine *e, struct gs_tensor *w, int viewed, unsigned forms, const char *user_name) {
    int idx = weight_index(e, w);
    if (idx < 0) return;
    gs_weight *r = &e->disc.w[idx];
    r->viewed |= viewed;
    r->cpu_layouts &= viewed ? 0 : forms;
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
        if (is_weight(base)) record_weight(e, base, base != s, cpu_forms_of_use(t, k, s), t->name);
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

unsigned weight_cpu_forms(const gs_engine *e, const struct gs_tensor *t) {
    int w = ptrmap_get(&e->disc.map, t);
    return w >= 0 ? e->disc.w[w].cpu_layouts : 0;
}

void discovery_free(gs_engine *e) {
    ptrmap_free(&e->disc.map);
    free(e->disc.w);
    free(e->disc.names);
    free(e->disc.lout_seen);
}
