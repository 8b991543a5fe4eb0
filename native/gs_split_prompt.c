/* Prompts with part of the split layers' experts on the CPU
 * (gs_engine_set_prompt_cpu_experts): the uploads that leave them out. The
 * hook's side is gs_split.c's, at the boundaries the generate phase takes. */
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
        int n_expert = is_split(e, i) ? (int)e->recs[e->split.rec[i][W_GATE]].t->ne[2] : 0;
        if (is_split(e, i) && (n_cpu < 0 || n_cpu >= n_expert))
            return fail(GS_E_INVALID, "set_prompt_cpu_experts: %d of layer %d's %d experts (0 .. %d)", n_cpu, i,
                        n_expert, n_expert - 1);
    }
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    return rc ? rc : prompt_uploads(e, n_cpu);
}
