/* Mixture-of-experts layers split while generating (gs_engine_set_split_experts),
 * and in prompts (gs_engine_set_prompt_cpu_experts).
 *
 * A token reads only its routed experts: of a split layer's routed experts,
 * the first n_upload (per ubatch, over its rows) are copied from host memory
 * into a small device region and computed there by llama.cpp's own kernels,
 * while the CPU computes the others from the same host copy
 * (gs_split_cpu.c). The PCIe link and the CPU's memory bus then work on one
 * layer at the same time, where stock's --n-cpu-moe uses one of them per layer.
 *
 * The hook makes one boundary per split layer, after the node computing the
 * final routing weights (its name learned on the first decode): the ids are
 * read and rewritten in place (uploaded experts -> their index in the
 * region, the others -> a zero expert of their routing position, which adds
 * nothing), the CPU's threads compute the others while the uploads land,
 * and their weighted sum is added to the layer's residual (ffn_inp), whose
 * only consumer left is the add after the experts. Until that name is
 * known (the first decode), and always with into_sum, two: the ids after
 * ffn_moe_weights-L, the CPU's part into the expert sum after ffn_moe_out-L
 * (before a shared expert's add: llama.cpp's order). The region's tensors keep
 * the expert count in their shape; every id the kernels see is below
 * n_max + n_used, so they read only the region.
 *
 * Prompts (gs_engine_set_prompt_cpu_experts): the split layers stream through
 * the slots, less their last prompt_cpu experts, which read as zeros there
 * (the copy engine zero-fills a piece past its bytes); at the same two
 * boundaries the CPU computes the rows routed to those while the GPU computes
 * the rest, and its part joins the experts' sum. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"
#include "gs_split.h"

/* ---- device reads and writes: the split's own stream (CUDA), memcpy (host) ---- */

static int dio(gs_engine *e, void *dst, const void *src, size_t n, int kind) {
    if (!e->cfg.use_cuda) { memcpy(dst, src, n); return GS_OK; }
    int err = C.MemcpyAsync(dst, src, n, kind, e->split.stream);
    return err ? cuda_fail("cudaMemcpyAsync", err) : GS_OK;
}

/* n rows of `width` bytes, `spitch` apart in src, `dpitch` in dst: one call
 * (a prompt's 512 rows of ids were 512 copies, ~1-2 ms per split layer) */
static int dio_rows(gs_engine *e, void *dst, size_t dpitch, const void *src, size_t spitch, size_t width, size_t n,
                    int kind) {
    if (!e->cfg.use_cuda) {
        for (size_t r = 0; r < n; r++) memcpy((char *)dst + r * dpitch, (const char *)src + r * spitch, width);
        return GS_OK;
    }
    int err = C.Memcpy2DAsync(dst, dpitch, src, spitch, width, n, kind, e->split.stream);
    return err ? cuda_fail("cudaMemcpy2DAsync", err) : GS_OK;
}

static int dio_sync(gs_engine *e) {
    int err = e->cfg.use_cuda ? C.StreamSynchronize(e->split.stream) : CUDA_SUCCESS;
    return err ? cuda_fail("cudaStreamSynchronize", err) : GS_OK;
}

static void stage_free(gs_engine *e) {
    if (e->split.stage) e->cfg.use_cuda ? (void)C.FreeHost(e->split.stage) : free(e->split.stage);
    e->split.stage = NULL;
    e->split.cap_stage = 0;
}

/* Host memory the small reads and writes go through (pinned on CUDA: async). */
static int stage_grow(gs_engine *e, size_t want) {
    if (want <= e->split.cap_stage) return GS_OK;
    want = align_up(2 * want, 4096);
    void *p = NULL;
    if (e->cfg.use_cuda) {
        int err = C.HostAlloc(&p, want, 0);
        if (err) return cuda_fail("cudaHostAlloc", err);
    } else if (!(p = malloc(want))) return fail(GS_E_NOMEM, "split experts: malloc(%zu)", want);
    stage_free(e);
    e->split.stage = p;
    e->split.cap_stage = want;
    return GS_OK;
}

/* ---- the hook's part --------------------------------------------------------- */

enum { MODE_TWO = 1, MODE_ONE = 2 };   /* per layer and decode: which boundaries it takes */

static int split_layer_of(const gs_engine *e, const struct gs_tensor *t, const char *prefix) {
    int i = parse_index(t->name, prefix, '\0');
    return i >= 0 && i < e->cfg.n_layer && is_split(e, i) && !e->layers[i].gr_live ? i : -1;
}

static int rec_layer(const gs_engine *e, const struct gs_tensor *w) {
    int idx = w ? ptrmap_get(&e->rec_map, w) : -1;
    return idx < 0 ? -1 : e->recs[idx].layer;
}

/* The node that computes the final routing weights, by name less its
 * layer: "ffn_moe_weights_norm-" for qwen3moe, the softmax's reshape
 * "ffn_moe_weights_softmax-" for gpt-oss (the first so named behind reshapes
 * and views). Once known, a layer takes one boundary there instead of two. */
static void learn_weights_node(gs_engine *e, const struct gs_tensor *w) {
    for (; w; w = w->src[0]) {
        const char *dash = strrchr(w->name, '-');
        if (dash && dash[1] && strspn(dash + 1, "0123456789") == strlen(dash + 1)
            && !strncmp(w->name, "ffn_moe_weights", 15) && dash - w->name < (long)sizeof e->split.weights_node - 1) {
            snprintf(e->split.weights_node, sizeof e->split.weights_node, "%.*s", (int)(dash - w->name + 1), w->name);
            return;
        }
        if (strcmp(G.op_name(w->op), "RESHAPE") && strcmp(G.op_name(w->op), "VIEW")) return;
    }
}

/* A split layer's experts' activation node must be the one the CPU
 * computes (GS_SPLIT_ACT_*): another fails the decode, never a wrong sum.
 * A model's graphs all build the same activation: once seen, no more asking
 * (every "ffn_" node of every generate decode comes here). */
static int activation_ok(gs_engine *e, const struct gs_tensor *t) {
    if (e->split.act_seen || strncmp(t->name, "ffn_moe_", 8)) return 1;
    static const char *names[] = { "ffn_moe_swiglu-", "ffn_moe_swiglu_oai-", "ffn_moe_swiglu_limited-",
                                   "ffn_moe_silu-", "ffn_moe_gelu-", "ffn_moe_geglu-", "ffn_moe_situ-",
                                   "ffn_moe_relu-", "ffn_moe_reglu-" };
    for (int k = 0; k < (int)(sizeof names / sizeof *names); k++) {
        int i = split_layer_of(e, t, names[k]);
        if (i < 0) continue;
        if (k == (e->split.oai ? 1 : 0)) return e->split.act_seen = 1;
        engine_fail(e, fail(GS_E_GRAPH, "split experts: layer %d's experts use %.*s, not the %s the CPU computes",
                            i, (int)strlen(names[k]) - 1, names[k], e->split.oai ? "swiglu_oai" : "swiglu"));
        return 0;
    }
    return 1;
}

/* The names the split looks for ("ffn_..." of a split layer). */
static int split_name(gs_engine *e, const struct gs_tensor *t) {
    int i;
    if (!activation_ok(e, t)) return 1;
    if ((i = split_layer_of(e, t, "ffn_inp-")) >= 0) { e->split.inp[i] = (struct gs_tensor *)t; return 0; }
    if ((i = split_layer_of(e, t, "ffn_moe_logits-")) >= 0) { e->split.x[i] = t->src[1]; return 0; }
    if ((i = split_layer_of(e, t, "ffn_moe_topk-")) >= 0) {     /* a new decode's routing for layer i */
        e->split.ids[i] = (struct gs_tensor *)t;
        e->split.routed[i] = 0;
        /* prompts take two: the GPU computes the other experts meanwhile */
        e->split.mode[i] = e->split.weights_node[0] && e->split.inp[i] && !e->split.into_sum
                           && e->phase == GS_PHASE_GENERATE ? MODE_ONE : MODE_TWO;
        return 0;
    }
    if ((i = split_layer_of(e, t, e->split.weights_node[0] ? e->split.weights_node : "ffn_moe_weights-")) >= 0
        && e->split.mode[i] == MODE_ONE) {
        e->split.w[i] = (struct gs_tensor *)t;
        return 1;
    }
    if ((i = split_layer_of(e, t, "ffn_moe_weights-")) >= 0 && e->split.mode[i] == MODE_TWO) return 1;
    if ((i = split_layer_of(e, t, "ffn_moe_weighted-")) >= 0 && e->split.mode[i] == MODE_TWO) {
        e->split.w[i] = t->src[1];   /* read once this node is done: later nodes may reuse its memory */
        learn_weights_node(e, t->src[1]);
        return 1;
    }
    return (i = split_layer_of(e, t, "ffn_moe_out-")) >= 0 && e->split.mode[i] == MODE_TWO;
}

/* Every node of a generate decode is asked: the names first (all "ffn_"),
 * then whether it reads a split layer's experts (they live in the region's
 * buffer while generating), which must come after the layer's routing. */
static int split_now(const gs_engine *e) {   /* generating, or prompts with CPU experts */
    return e->split.n && (e->phase == GS_PHASE_GENERATE || e->split.prompt_cpu);
}

int split_ask(gs_engine *e, const struct gs_tensor *t) {
    if (!split_now(e)) return 0;
    if (!strncmp(t->name, "ffn_", 4) && split_name(e, t)) return 1;
    for (int k = 0; k < 3; k++) {
        const struct gs_tensor *s = t->src[k];
        int l = s && s->buffer == e->split.buf ? rec_layer(e, s) : -1;
        if (l >= 0 && !e->split.routed[l]) {
            engine_fail(e, fail(GS_E_GRAPH, "split experts: %s reads layer %d's experts before its routing was seen "
                                "(ffn_moe_topk/ffn_moe_weights-%d): this graph's expert block is not the one the "
                                "split knows", t->name, l, l));
            return 1;
        }
    }
    return 0;
}

/* Staging layout of a ubatch: ids, x, routing weights, the residual (or expert sum). */
typedef struct { size_t ids, x, w, y, end; } stage_at;

static stage_at stage_layout(size_t n_ids, size_t n_rows, size_t n_embd) {
    stage_at a;
    a.ids = 0;
    a.x = align_up(n_ids * sizeof(int32_t), 64);
    a.w = align_up(a.x + n_rows * n_embd * sizeof(float), 64);
    a.y = align_up(a.w + n_ids * sizeof(float), 64);
    a.end = a.y + n_rows * n_embd * sizeof(float);
    return a;
}

static int layer_n_embd(const gs_engine *e, int layer) { return (int)e->recs[e->split.rec[layer][W_GATE]].t->ne[0]; }

/* The CPU's experts, weighted, onto y (rows of n_embd); then y goes back to `to`. */
static int add_cpu_part(gs_engine *e, int layer, const float *w, float *y, struct gs_tensor *to, int n_used) {
    int n_embd = layer_n_embd(e, layer);
    double t0 = now_s();
    split_pool_finish(e->split.pool);
    e->ctr.split_cpu_wait_seconds += now_s() - t0;
    /* a row's jobs (contiguous, in routing order) summed first, as llama.cpp
     * sums a row's weighted experts, then onto the residual: with every
     * routed expert on the CPU the layer's output is then stock's bit for bit */
    float acc[n_embd];
    for (int j = 0; j < e->split.n_jobs;) {
        int row = e->split.jobs[j].row;
        memset(acc, 0, sizeof acc);
        for (; j < e->split.n_jobs && e->split.jobs[j].row == row; j++) {
            float wk = w[(size_t)row * n_used + e->split.jobs[j].pos];
            const float *yj = split_pool_out(e->split.pool, j);
            for (int c = 0; c < n_embd; c++) acc[c] += wk * yj[c];
        }
        float *o = y + (size_t)row * n_embd;
        for (int c = 0; c < n_embd; c++) o[c] += acc[c];
    }
    return dio(e, to->data, y, (size_t)e->split.rows[layer] * n_embd * sizeof(float), CUDA_H2D);
}

/* Bytes of one expert in a layer's split tensor m: a matrix's nb[2], a bias's nb[1]. */
size_t expert_stride(const gs_engine *e, int layer, int m) {
    const struct gs_tensor *t = e->recs[e->split.rec[layer][m]].t;
    return m < B_GATE ? t->nb[2] : t->nb[1];
}

/* The layer's expert matrices where the CPU reads them: the uploads' source. */
static expert_mats layer_mats(const gs_engine *e, int layer) {
    expert_mats m;
    for (int k = 0; k < 3; k++) {
        int r = e->split.rec[layer][k], rb = e->split.rec[layer][B_GATE + k];
        const struct gs_tensor *t = e->recs[r].t;
        m.src[k] = e->up[r].src;
        m.nb1[k] = t->nb[1];
        m.nb2[k] = t->nb[2];
        m.type[k] = t->type;
        m.bias[k] = rb < 0 ? NULL : (const float *)e->up[rb].src;
        m.bias_nb1[k] = rb < 0 ? 0 : e->recs[rb].t->nb[1];
    }
    m.oai = e->split.oai;
    m.n_embd = layer_n_embd(e, layer);
    m.n_ff = (int)e->recs[e->split.rec[layer][W_GATE]].t->ne[1];
    return m;
}

/* GS_SPLIT_AUTO: this one-row layer run's n_upload, the candidates in turn,
 * the turn shifted at each decode (with as many split layers as candidates,
 * or a multiple, a layer would otherwise always time the same one). */
static void tune_pick(gs_engine *e) {
    int n_cand = e->split.tune.hi - e->split.tune.lo + 1, k = (e->split.tune.runs + e->split.tune.decodes) % n_cand;
    while (e->split.tune.cnt[k] >= GS_SPLIT_TUNE_RUNS) k = (k + 1) % n_cand;   /* one not yet full: runs < total */
    e->split.tune.cur = k;
    e->split.n_upload = e->split.tune.lo + k;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* One timed layer run of the candidate tune_pick chose; once each has its
 * runs, the one with the least median keeps (a preempted run is an outlier). */
static void tune_record(gs_engine *e, double seconds) {
    int lo = e->split.tune.lo, n_cand = e->split.tune.hi - lo + 1, k = e->split.tune.cur;
    e->split.tune.sec[k][e->split.tune.cnt[k]++] = (float)seconds;
    if (++e->split.tune.runs < n_cand * GS_SPLIT_TUNE_RUNS) return;
    int best = 0;
    float best_s = 0;
    for (k = 0; k < n_cand; k++) {
        qsort(e->split.tune.sec[k], GS_SPLIT_TUNE_RUNS, sizeof(float), cmp_float);
        float med = e->split.tune.sec[k][GS_SPLIT_TUNE_RUNS / 2];
        if (k == 0 || med < best_s) { best = k; best_s = med; }
    }
    e->split.n_upload = e->size.split_n_upload = lo + best;
    e->split.tune.hi = lo - 1;
}

/* The boundary where a layer's routing is known: read it, choose, rewrite
 * the ids, start the CPU, upload. MODE_ONE (the final weights and the
 * residual at hand): finish the CPU's part into the residual here too. */
static int route(gs_engine *e, int layer) {
    struct gs_tensor *ids = e->split.ids[layer], *x = e->split.x[layer], *w = e->split.w[layer], *inp = e->split.inp[layer];
    int one = e->split.mode[layer] == MODE_ONE;
    if (!ids || !x || ids->type != 26 /* GGML_TYPE_I32 */ || x->type != 0 /* F32 */
        || (one && (!w || !inp || w->type != 0 || inp->type != 0 || !f32_dense(w) || !f32_dense(inp))) || !f32_dense(x))
        return fail(GS_E_GRAPH, "split experts: layer %d's routing tensors were not seen (or not I32 ids / contiguous F32 "
                    "input, weights and residual)", layer);
    int n_used = (int)ids->ne[0], n_rows = (int)ids->ne[1], n_expert = layer_n_expert(e, layer);
    int n_embd = (int)x->ne[0];
    if (n_used > e->split.n_used)
        return fail(GS_E_GRAPH, "split experts: layer %d routes %d experts per token, the region has zero experts for %d",
                    layer, n_used, e->split.n_used);
    if (x->ne[1] * x->ne[2] != n_rows || n_embd != e->recs[e->split.rec[layer][W_GATE]].t->ne[0]
        || (one && (inp->ne[0] != n_embd || inp->ne[1] * inp->ne[2] != n_rows || (size_t)w->ne[0] * w->ne[1] * w->ne[2]
                    != (size_t)n_used * n_rows)))
        return fail(GS_E_GRAPH, "split experts: layer %d's expert input, weights or residual have unexpected shapes", layer);
    size_t n_ids = (size_t)n_used * n_rows;
    double t_start = now_s();
    int prompt = e->phase == GS_PHASE_PROMPT;
    /* a two-boundary run is timed only where every run takes two (into_sum): the
     * first decode's, before the weights node is learned, would be the odd one */
    int timed = !prompt && n_rows == 1 && tuning(e) && (one || e->split.into_sum);
    if (timed) tune_pick(e);
    e->split.tune.layer = timed && !one ? layer : -1;   /* a two-boundary run ends at its second */
    e->split.tune.t0 = t_start;
    stage_at at = stage_layout(n_ids, n_rows, n_embd);
    int rc = stage_grow(e, at.end);
    cpu_job *jobs = rc ? NULL : split_pool_jobs(e->split.pool, n_ids);
    if (!jobs) return rc ? rc : GS_E_NOMEM;
    char *st = e->split.stage;
    int32_t *id = (int32_t *)(st + at.ids);
    size_t id_row = n_used * sizeof(int32_t);
    rc = dio_rows(e, id, id_row, ids->data, ids->nb[1], id_row, n_rows, CUDA_D2H);
    if (!rc) rc = dio(e, st + at.x, x->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc && one) rc = dio(e, st + at.w, w->data, n_ids * sizeof(float), CUDA_D2H);
    if (!rc && one) rc = dio(e, st + at.y, inp->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc) rc = dio_sync(e);
    if (rc) return rc;
    /* generating: uploaded, the first n_upload distinct experts in routing order
     * (row 0's best first), the rest to the CPU; prompts: the last prompt_cpu
     * (zeros in the slot) to the CPU, the ids stay */
    int slot_of[n_expert], n_up = 0, first_cpu = prompt ? n_expert - e->split.prompt_cpu : n_expert;
    for (int k = 0; k < n_expert; k++) slot_of[k] = -1;
    int n_jobs = 0;
    for (size_t k = 0; k < n_ids; k++) {
        int ex = id[k];
        if (ex < 0 || ex >= n_expert) return fail(GS_E_GRAPH, "split experts: layer %d routed to expert %d of %d", layer, ex, n_expert);
        if (prompt) {
            if (ex >= first_cpu) jobs[n_jobs++] = (cpu_job){ (int)(k / n_used), (int)(k % n_used), ex };
            continue;
        }
        if (slot_of[ex] < 0 && n_up < e->split.n_upload) { slot_of[ex] = n_up; e->split.up_ids[n_up++] = ex; }
        if (slot_of[ex] < 0) jobs[n_jobs++] = (cpu_job){ (int)(k / n_used), (int)(k % n_used), ex };
        /* a left-out expert reads a zero expert of its own position: llama.cpp's
         * batched kernels group a ubatch's rows by expert, at most one per row */
        id[k] = slot_of[ex] >= 0 ? slot_of[ex] : e->split.n_max + (int)(k % n_used);
    }
    e->split.rows[layer] = n_rows;
    e->split.jobs = jobs;
    e->split.n_jobs = n_jobs;
    expert_mats mats = layer_mats(e, layer);
    rc = split_pool_post(e->split.pool, &mats, (const float *)(st + at.x), n_rows, n_jobs);   /* the CPU first */
    for (int m = 0; m < SPLIT_TENSORS && !rc; m++) {
        int k = e->split.rec[layer][m];
        if (k < 0) continue;
        size_t nb = expert_stride(e, layer, m);
        for (int j = 0; j < n_up && !rc; j++)
            rc = dio(e, e->split.base + e->split.off[layer][m] + j * nb,
                     (const char *)e->up[k].src + (size_t)e->split.up_ids[j] * nb, nb, CUDA_H2D);
    }
    if (!rc && !prompt) rc = dio_rows(e, ids->data, ids->nb[1], id, id_row, id_row, n_rows, CUDA_H2D);
    if (!rc && one) rc = add_cpu_part(e, layer, (const float *)(st + at.w), (float *)(st + at.y), inp, n_used);
    double t0 = now_s();
    if (!rc) rc = dio_sync(e);
    e->ctr.split_upload_seconds += now_s() - t0;
    e->ctr.split_uploaded += n_up;
    e->ctr.split_cpu += n_jobs;
    e->ctr.split_layers++;
    e->ctr.split_prompt_layers += prompt;
    e->split.routed[layer] = 1;
    if (prompt && !n_jobs) e->split.mode[layer] = 0;   /* nothing routed to the CPU: no second boundary */
    if (timed && one && !rc) tune_record(e, now_s() - t_start);
    return rc;
}

/* MODE_TWO, after ffn_moe_weighted-L: the final routing weights, while the
 * nodes after it have not yet reused their memory (before, the read at
 * ffn_moe_out-L found other data there in some graphs: qwen2moe's of 20 rows). */
static int read_weights(gs_engine *e, int layer) {
    struct gs_tensor *w = e->split.w[layer];
    int n_rows = e->split.rows[layer], n_used = (int)e->split.ids[layer]->ne[0];
    if (!w || w->type != 0 || !f32_dense(w) || (size_t)w->ne[0] * w->ne[1] * w->ne[2] != (size_t)n_used * n_rows)
        return fail(GS_E_GRAPH, "split experts: layer %d's routing weights were not as expected", layer);
    stage_at at = stage_layout((size_t)n_used * n_rows, n_rows, layer_n_embd(e, layer));
    int rc = dio(e, e->split.stage + at.w, w->data, (size_t)n_used * n_rows * sizeof(float), CUDA_D2H);
    return rc ? rc : dio_sync(e);
}

/* A prompt's split layer whose slot holds its experts alone: once
 * ffn_moe_out has run nothing later reads the slot, so it is released here,
 * before the wait for the CPU's part, and the next upload into it starts now
 * (at l_out-L it would start only after the CPU's part, the link idle
 * meanwhile). Split layers stream their experts alone today (whole layers
 * are never split); a slot that also held a shared expert or the dense part
 * would be read after the experts, so such a layer keeps it until l_out. */
static int release_experts_slot(gs_engine *e, int layer) {
    if (e->phase != GS_PHASE_PROMPT || !layer_streams(e, e->phase, layer)) return GS_OK;
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        int m = 0;
        while (m < SPLIT_TENSORS && e->split.rec[layer][m] != k) m++;
        if (m == SPLIT_TENSORS) return GS_OK;
    }
    e->ctr.split_early_releases++;
    return gs_ring_release(e->ring, e->phase, layer);
}

/* MODE_TWO's last boundary, after ffn_moe_out-L: the CPU's part into the expert sum. */
static int add_to_sum(gs_engine *e, int layer, struct gs_tensor *out) {
    struct gs_tensor *w = e->split.w[layer];
    int n_rows = e->split.rows[layer], n_embd = layer_n_embd(e, layer), n_used = (int)e->split.ids[layer]->ne[0];
    if (!w || w->type != 0 || out->type != 0 || out->ne[0] != n_embd)
        return fail(GS_E_GRAPH, "split experts: layer %d's routing weights or expert sum were not as expected", layer);
    stage_at at = stage_layout((size_t)n_used * n_rows, n_rows, n_embd);   /* the weights: read at weighted */
    char *st = e->split.stage;
    int rc = release_experts_slot(e, layer);
    if (!rc) rc = dio(e, st + at.y, out->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc) rc = dio_sync(e);
    if (!rc) rc = add_cpu_part(e, layer, (const float *)(st + at.w), (float *)(st + at.y), out, n_used);
    if (!rc) rc = dio_sync(e);
    if (!rc && e->split.tune.layer == layer) tune_record(e, now_s() - e->split.tune.t0);
    e->split.tune.layer = -1;
    e->split.mode[layer] = 0;
    return rc;
}

/* Between decodes: the CPU's last job done, and nothing kept from the last
 * graph (a graph's tensors are seen again at each decode; the context may be
 * gone). */
void split_settle(gs_engine *e) {
    if (!e->split.n) return;
    e->split.tune.decodes++;
    split_pool_finish(e->split.pool);
    size_t n = e->cfg.n_layer;
    memset(e->split.x, 0, n * sizeof *e->split.x);
    memset(e->split.ids, 0, n * sizeof *e->split.ids);
    memset(e->split.w, 0, n * sizeof *e->split.w);
    memset(e->split.inp, 0, n * sizeof *e->split.inp);
    memset(e->split.mode, 0, n);
    memset(e->split.routed, 0, n);
    e->split.tune.layer = -1;
}

void split_synced(gs_engine *e, struct gs_tensor *t) {
    if (!split_now(e) || e->status) return;
    int i, rc = GS_OK;
    const char *first = e->split.weights_node[0] ? e->split.weights_node : "ffn_moe_weights-";
    if ((i = split_layer_of(e, t, first)) >= 0 && e->split.mode[i] == MODE_ONE && !e->split.routed[i])
        rc = route(e, i);
    else if ((i = split_layer_of(e, t, "ffn_moe_weights-")) >= 0 && e->split.mode[i] == MODE_TWO && !e->split.routed[i])
        rc = route(e, i);
    else if ((i = split_layer_of(e, t, "ffn_moe_weighted-")) >= 0 && e->split.mode[i] == MODE_TWO && e->split.routed[i])
        rc = read_weights(e, i);
    else if ((i = split_layer_of(e, t, "ffn_moe_out-")) >= 0 && e->split.mode[i] == MODE_TWO && e->split.routed[i])
        rc = add_to_sum(e, i, t);
    if (rc) engine_fail(e, rc);
}

/* ---- placement ---------------------------------------------------------------- */

/* Split layers' expert tensors read from the region while generating. */
void split_point(gs_engine *e, int layer) {
    for (int m = 0; m < SPLIT_TENSORS; m++) {
        if (e->split.rec[layer][m] < 0) continue;
        const srec *r = &e->recs[e->split.rec[layer][m]];
        r->t->buffer = e->split.buf;
        r->t->extra = r->src_extra;
        r->t->data = e->split.base + e->split.off[layer][m];
    }
}

void split_free(gs_engine *e) {
    if (e->split.prompt_cpu) (void)prompt_uploads(e, 0);   /* its slot copies go (drained) */
    split_pool_free(e->split.pool);
    e->split.pool = NULL;
    if (e->split.buf) G.buffer_free(e->split.buf);
    e->split.buf = NULL;
    e->split.base = NULL;
    stage_free(e);
    if (e->split.stream) C.StreamDestroy(e->split.stream);
    free(e->split.on); free(e->split.rec); free(e->split.off); free(e->split.x); free(e->split.ids);
    free(e->split.w); free(e->split.inp); free(e->split.mode); free(e->split.routed); free(e->split.rows);
    memset(&e->split, 0, sizeof e->split);
    e->size.split_region_bytes = 0;
    e->size.split_n_upload = 0;
}
