/* The ring of weight slots: which layer each slot holds, when uploads are
 * issued, when an evaluation may read a layer. No memory, no ggml, no CUDA:
 * copies go through gs_ring_ops (the engine's copy engine, or a test's fake). */
#include <stdlib.h>
#include <string.h>

#include "gguf_stream.h"
#include "gs_util.h"

typedef struct { int layer, state; } slot_info;   /* layer: held (loading, ready or in use), -1 if empty */

struct gs_ring {
    int          n_layer, n_slots, prefetch;
    gs_ring_ops  ops;
    gs_counters *ctr;
    uint64_t    *bytes;                /* per layer: bytes one upload moves */
    int         *adopted;              /* per layer: slot adopted for the current evaluation, or -1 */
    int         *order[GS_N_PHASES];   /* streamed layers of each phase, in execution order */
    int          n_order[GS_N_PHASES];
    int         *pos[GS_N_PHASES];     /* per layer: its index in order[phase], -1 if not streamed then */
    slot_info   *slot;
};

static int bad_layer(const gs_ring *r, int layer) { return layer < 0 || layer >= r->n_layer; }
static int bad_phase(int phase) { return phase < 0 || phase >= GS_N_PHASES; }
static int min_int(int a, int b) { return a < b ? a : b; }

static void empty_slot(gs_ring *r, int s) {
    r->slot[s].state = GS_SLOT_EMPTY;
    r->slot[s].layer = -1;
}

static int holding(const gs_ring *r, int layer) {
    for (int s = 0; s < r->n_slots; s++)
        if (r->slot[s].layer == layer && r->slot[s].state != GS_SLOT_EMPTY) return s;
    return -1;
}

/* Queue the upload of `layer` into `slot`. Copies are FIFO (one stream or one
 * thread), so a later copy into the same slot is ordered after an earlier one. */
static int issue(gs_ring *r, int s, int layer) {
    r->slot[s].layer = layer;
    r->slot[s].state = GS_SLOT_LOADING;
    r->ctr->uploads++;
    r->ctr->bytes_uploaded += r->bytes[layer];
    int rc = r->ops.issue(r->ops.ctx, s, layer);
    if (rc) empty_slot(r, s);
    return rc;
}

/* Slot for a synchronous upload of `layer`: an empty one, else the one whose
 * layer is needed last from here. A slot still marked in use belongs to an
 * evaluation that never reached its release (e.g. an aborted decode): at a
 * hook call every launched op has finished, so it can be reclaimed. */
static int victim(gs_ring *r, int ph, int layer) {
    int best = -1, best_dist = -1, S = r->n_order[ph];
    for (int s = 0; s < r->n_slots; s++) {
        const slot_info *sl = &r->slot[s];
        if (sl->state == GS_SLOT_EMPTY) return s;
        /* in-use slots only as a last resort */
        int dist = sl->state == GS_SLOT_IN_USE ? -1
                 : r->pos[ph][sl->layer] < 0 ? S   /* not streamed in this phase */
                 : (r->pos[ph][sl->layer] - r->pos[ph][layer] + S) % S;
        if (best < 0 || dist > best_dist) { best = s; best_dist = dist; }
    }
    if (r->slot[best].state == GS_SLOT_IN_USE) r->adopted[r->slot[best].layer] = -1;
    return best;
}

/* The slot `layer` can be read from once this returns, and how long that took. */
static int await_layer(gs_ring *r, int ph, int layer, int *slot) {
    double t0 = now_s();
    int rc, s = holding(r, layer);
    if (s < 0) {
        s = victim(r, ph, layer);
        if ((rc = issue(r, s, layer)) || (rc = r->ops.wait(r->ops.ctx, s))) return rc;
        r->ctr->sync_fallbacks++;
        r->ctr->wait_seconds += now_s() - t0;
    } else if (r->slot[s].state == GS_SLOT_LOADING) {
        rc = r->ops.done(r->ops.ctx, s);
        if (rc < 0) return rc;
        if (rc == 1) r->ctr->adopted_ready++;
        else {
            if ((rc = r->ops.wait(r->ops.ctx, s))) return rc;
            r->ctr->adopted_waited++;
            r->ctr->wait_seconds += now_s() - t0;
        }
    } else {
        r->ctr->adopted_ready++;
    }
    *slot = s;
    return GS_OK;
}

int gs_ring_adopt(gs_ring *r, int ph, int layer) {
    if (bad_phase(ph) || bad_layer(r, layer) || r->pos[ph][layer] < 0)
        return fail(GS_E_INVALID, "gs_ring_adopt: layer %d does not stream in phase %d", layer, ph);
    if (r->adopted[layer] >= 0) return GS_OK;
    int s, rc = await_layer(r, ph, layer, &s);
    if (rc) return rc;
    r->slot[s].state = GS_SLOT_IN_USE;
    r->adopted[layer] = s;
    if (r->ops.point) r->ops.point(r->ops.ctx, layer, s);
    if (r->pos[ph][layer] == 0) r->ctr->evaluations++;
    return GS_OK;
}

int gs_ring_release(gs_ring *r, int ph, int layer) {
    if (bad_phase(ph) || bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_release: layer %d, phase %d", layer, ph);
    int s = r->adopted[layer];
    if (s < 0) return GS_OK;
    r->adopted[layer] = -1;
    r->slot[s].state = GS_SLOT_READY;
    if (!r->prefetch || r->pos[ph][layer] < 0) return GS_OK;
    int next = r->order[ph][(r->pos[ph][layer] + r->n_slots) % r->n_order[ph]];
    if (holding(r, next) >= 0) return GS_OK;
    return issue(r, s, next);
}

int gs_ring_landed(gs_ring *r, int layer, int *landed) {
    *landed = 0;
    if (bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_landed: layer %d out of range", layer);
    int s = holding(r, layer);
    if (s < 0 || r->slot[s].state == GS_SLOT_IN_USE) return GS_OK;
    *landed = r->slot[s].state == GS_SLOT_READY || r->ops.done(r->ops.ctx, s) == 1;
    return GS_OK;
}

int gs_ring_keep_first(gs_ring *r, int phase) {
    if (bad_phase(phase)) return fail(GS_E_INVALID, "gs_ring_keep_first: phase %d", phase);
    int want = min_int(r->n_slots, r->n_order[phase]);
    for (int s = 0; s < r->n_slots; s++) {
        slot_info *sl = &r->slot[s];
        if (sl->state == GS_SLOT_IN_USE) { r->adopted[sl->layer] = -1; sl->state = GS_SLOT_READY; }
        int idx = sl->state == GS_SLOT_EMPTY ? -1 : r->pos[phase][sl->layer];
        if (idx < 0 || idx >= want) empty_slot(r, s);
    }
    return GS_OK;
}

int gs_ring_prefetch_first(gs_ring *r, int phase) {
    if (bad_phase(phase)) return fail(GS_E_INVALID, "gs_ring_prefetch_first: phase %d", phase);
    if (!r->prefetch) return GS_OK;
    int want = min_int(r->n_slots, r->n_order[phase]);
    for (int k = 0, s = 0; k < want; k++) {
        int layer = r->order[phase][k];
        if (holding(r, layer) >= 0) continue;
        while (s < r->n_slots && r->slot[s].state != GS_SLOT_EMPTY) s++;
        if (s == r->n_slots) break;        /* cannot happen after keep_first: at most `want` slots are kept */
        int rc = issue(r, s, layer);
        if (rc) return rc;
    }
    return GS_OK;
}

int gs_ring_time_upload(gs_ring *r, int layer, int n, double *best_seconds) {
    if (bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_time_upload: layer %d out of range", layer);
    for (int s = 0; s < r->n_slots; s++) {
        if (r->slot[s].state == GS_SLOT_IN_USE) r->adopted[r->slot[s].layer] = -1;
        if (r->slot[s].state != GS_SLOT_EMPTY) { int rc = r->ops.wait(r->ops.ctx, s); if (rc) return rc; }
    }
    for (int s = 1; s < r->n_slots; s++)   /* one slot per layer: slot 0 will hold it */
        if (r->slot[s].layer == layer) empty_slot(r, s);
    double best = 1e30;
    for (int k = 0; k < n; k++) {
        double t0 = now_s();
        int rc = issue(r, 0, layer);
        if (!rc) rc = r->ops.wait(r->ops.ctx, 0);
        if (rc) return rc;
        double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    *best_seconds = best;
    r->slot[0].state = GS_SLOT_READY;
    return GS_OK;
}

int gs_ring_discard(gs_ring *r) {
    int rc = r->ops.drain(r->ops.ctx);
    for (int s = 0; s < r->n_slots; s++)
        if (r->slot[s].state != GS_SLOT_IN_USE) empty_slot(r, s);
    return rc;
}

/* ---- orders, queries, lifetime ------------------------------------------------ */

int gs_ring_set_order(gs_ring *r, int phase, const int *layers, int n) {
    if (bad_phase(phase) || n < 0 || n > r->n_layer) return fail(GS_E_INVALID, "gs_ring_set_order: phase %d, %d layers", phase, n);
    for (int k = 0; k < n; k++) {
        if (bad_layer(r, layers[k])) return fail(GS_E_INVALID, "gs_ring_set_order: layer %d out of range", layers[k]);
        for (int j = 0; j < k; j++)
            if (layers[j] == layers[k]) return fail(GS_E_INVALID, "gs_ring_set_order: layer %d twice", layers[k]);
    }
    for (int i = 0; i < r->n_layer; i++) r->pos[phase][i] = -1;
    for (int k = 0; k < n; k++) {
        r->order[phase][k] = layers[k];
        r->pos[phase][layers[k]] = k;
    }
    r->n_order[phase] = n;
    return GS_OK;
}

int gs_ring_get_position(const gs_ring *r, int phase, int layer, int *pos) {
    *pos = -1;
    if (bad_phase(phase) || bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_get_position: layer %d, phase %d", layer, phase);
    *pos = r->pos[phase][layer];
    return GS_OK;
}

int gs_ring_get_layer_at(const gs_ring *r, int phase, int pos, int *layer) {
    *layer = -1;
    if (bad_phase(phase) || pos < 0) return fail(GS_E_INVALID, "gs_ring_get_layer_at: phase %d, position %d", phase, pos);
    if (r->n_order[phase] > 0) *layer = r->order[phase][pos % r->n_order[phase]];
    return GS_OK;
}

int gs_ring_get_slot(const gs_ring *r, int slot, int *layer, int *state) {
    if (slot < 0 || slot >= r->n_slots) return fail(GS_E_INVALID, "gs_ring_get_slot: slot %d out of range", slot);
    *layer = r->slot[slot].state == GS_SLOT_EMPTY ? -1 : r->slot[slot].layer;
    *state = r->slot[slot].state;
    return GS_OK;
}

int gs_ring_get_adopted(const gs_ring *r, int layer, int *slot) {
    *slot = -1;
    if (bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_get_adopted: layer %d out of range", layer);
    *slot = r->adopted[layer];
    return GS_OK;
}

int gs_ring_set_layer_bytes(gs_ring *r, int layer, uint64_t bytes) {
    if (bad_layer(r, layer)) return fail(GS_E_INVALID, "gs_ring_set_layer_bytes: layer %d out of range", layer);
    r->bytes[layer] = bytes;
    return GS_OK;
}

void gs_ring_destroy(gs_ring *r) {
    if (!r) return;
    for (int ph = 0; ph < GS_N_PHASES; ph++) { free(r->order[ph]); free(r->pos[ph]); }
    free(r->bytes);
    free(r->adopted);
    free(r->slot);
    free(r);
}

int gs_ring_create(const gs_ring_config *cfg, gs_ring **out) {
    *out = NULL;
    if (!cfg || cfg->n_layer <= 0 || cfg->n_slots <= 0 || !cfg->counters || !cfg->ops.issue
        || !cfg->ops.done || !cfg->ops.wait || !cfg->ops.drain)
        return fail(GS_E_INVALID, "gs_ring_create: need n_layer > 0, n_slots > 0, counters and the copy ops");
    gs_ring *r = calloc(1, sizeof *r);
    if (!r) return fail(GS_E_NOMEM, "gs_ring_create: calloc");
    int n = cfg->n_layer, ok = 1;
    r->n_layer = n; r->n_slots = cfg->n_slots; r->prefetch = cfg->prefetch;
    r->ops = cfg->ops; r->ctr = cfg->counters;
    ok &= !!(r->bytes = calloc(n, sizeof *r->bytes));
    ok &= !!(r->adopted = malloc(n * sizeof *r->adopted));
    ok &= !!(r->slot = malloc(cfg->n_slots * sizeof *r->slot));
    for (int ph = 0; ph < GS_N_PHASES; ph++) {
        ok &= !!(r->order[ph] = calloc(n, sizeof *r->order[ph]));
        ok &= !!(r->pos[ph] = malloc(n * sizeof *r->pos[ph]));
    }
    if (!ok) { gs_ring_destroy(r); return fail(GS_E_NOMEM, "gs_ring_create: calloc"); }
    for (int i = 0; i < n; i++) {
        r->adopted[i] = r->pos[0][i] = r->pos[1][i] = -1;
        if (cfg->layer_bytes) r->bytes[i] = cfg->layer_bytes[i];
    }
    for (int s = 0; s < r->n_slots; s++) empty_slot(r, s);
    *out = r;
    return GS_OK;
}
