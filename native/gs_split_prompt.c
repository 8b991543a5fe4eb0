/* Prompts with part of the split layers' experts on the CPU
 * (gs_engine_set_prompt_cpu_experts): the uploads that leave them out. The
 * hook's side is gs_split.c's, at the boundaries the generate phase takes. */
#include "gs_engine.h"
#include "gs_split.h"

/* ---- prompts: the last experts on the CPU -------------------------------------- */

/* The split layers' expert tensors upload all but their last n_cpu experts
 * (the expert index is their outermost dimension); the copy engine zeroes a
 * piece's bytes beyond nbytes up to its slot size. */
void prompt_uploads(gs_engine *e, int n_cpu) {
    for (int i = 0; i < e->cfg.n_layer; i++) {
        if (!is_split(e, i)) continue;
        uint64_t left_out = 0;
        for (int m = 0; m < SPLIT_TENSORS; m++) {
            int k = e->split.rec[i][m];
            if (k < 0) continue;
            const struct gs_tensor *t = e->recs[k].t;
            size_t n_expert = (size_t)(m < B_GATE ? t->ne[2] : t->ne[1]), stride = expert_stride(e, i, m);
            e->up[k].nbytes = (n_expert - (size_t)n_cpu) * stride;
            left_out += (uint64_t)n_cpu * stride;
        }
        if (e->ring) (void)gs_ring_set_layer_bytes(e->ring, i, e->layers[i].bytes - left_out);   /* in range */
    }
    e->split.prompt_cpu = n_cpu;
}

int gs_engine_set_prompt_cpu_experts(gs_engine *e, int n_cpu) {
    if (!e->split.n) return fail(GS_E_INVALID, "set_prompt_cpu_experts: no split layers (set_split_experts first)");
    if (e->kv.attached && e->kv.reuse_min_batch && !e->kv.graphs_dropped)
        return fail(GS_E_INVALID, "set_prompt_cpu_experts: the attached context reuses graphs built with the old placement");
    for (int i = 0; i < e->cfg.n_layer; i++) {
        int n_expert = is_split(e, i) ? (int)e->recs[e->split.rec[i][W_GATE]].t->ne[2] : 0;
        if (is_split(e, i) && (n_cpu < 0 || n_cpu >= n_expert))
            return fail(GS_E_INVALID, "set_prompt_cpu_experts: %d of layer %d's %d experts (0 .. %d)", n_cpu, i,
                        n_expert, n_expert - 1);
    }
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    if (!rc) rc = gs_ring_discard(e->ring);   /* slot copies of the old extent */
    if (rc) return rc;
    prompt_uploads(e, n_cpu);
    return GS_OK;
}
