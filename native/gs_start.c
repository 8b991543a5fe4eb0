/* Streamed tensors: registration, the slots' layout, start (re-homing every
 * tensor into the ring) and the ring's bindings to the copy engine. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gs_engine.h"

int gs_engine_add_tensor(gs_engine *e, int layer, void *tensor) {
    struct gs_tensor *t = tensor;
    if (e->started) return fail(GS_E_INVALID, "gs_engine_add_tensor: engine already started");
    if (layer < 0 || layer >= e->cfg.n_layer) return fail(GS_E_INVALID, "layer %d out of range", layer);
    if (!t || !t->buffer || !t->data || t->view_src)
        return fail(GS_E_INVALID, "tensor %s is not an allocated weight", t ? t->name : "(null)");
    if (ptrmap_get(&e->rec_map, t) >= 0) return fail(GS_E_INVALID, "tensor %s added twice", t->name);
    if (e->n_recs == e->cap_recs) {
        int ncap = e->cap_recs ? 2 * e->cap_recs : 256;
        srec *n = realloc(e->recs, ncap * sizeof *n);
        if (!n) return fail(GS_E_NOMEM, "gs_engine_add_tensor: realloc");
        e->recs = n;
        e->cap_recs = ncap;
    }
    srec *r = &e->recs[e->n_recs];
    memset(r, 0, sizeof *r);
    r->t = t;
    r->src_buffer = t->buffer;
    r->src_extra = t->extra;
    r->cpu_forms = weight_cpu_forms(e, t);
    r->layer = layer;
    if (ptrmap_put(&e->rec_map, t, e->n_recs, e->n_recs)) return fail(GS_E_NOMEM, "gs_engine_add_tensor: map");
    e->n_recs++;
    return GS_OK;
}

int gs_engine_set_file(gs_engine *e, const char *path, uint64_t expect_size, int64_t expect_mtime_ns) {
    if (e->started || e->file) return fail(GS_E_INVALID, "gs_engine_set_file: engine started or file already set");
    return gs_file_open(path, expect_size, expect_mtime_ns, &e->file);
}

int gs_engine_add_file_tensor(gs_engine *e, int layer, void *tensor, uint64_t file_offset) {
    if (!e->file) return fail(GS_E_INVALID, "gs_engine_add_file_tensor: no model file (gs_engine_set_file)");
    int rc = gs_engine_add_tensor(e, layer, tensor);
    if (rc) return rc;
    srec *r = &e->recs[e->n_recs - 1];
    r->from_file = 1;
    r->file_offset = file_offset;
    e->layers[layer].disk_bytes += G.nbytes(r->t);
    return GS_OK;
}

static int cmp_rec(const void *a, const void *b) {
    const srec *x = a, *y = b;
    if (x->layer != y->layer) return x->layer - y->layer;
    return (x->t > y->t) - (x->t < y->t);
}

/* Records grouped by layer (the map is rebuilt after sorting), each with its
 * upload from llama.cpp's copy (t->data until re-homed) to its offset in a slot. */
static int layout(gs_engine *e, size_t align, size_t *max_bytes) {
    qsort(e->recs, e->n_recs, sizeof *e->recs, cmp_rec);
    ptrmap_free(&e->rec_map);
    e->up = calloc(e->n_recs, sizeof *e->up);
    if (!e->up) return fail(GS_E_NOMEM, "gs_engine_start: calloc");
    *max_bytes = 0;
    for (int k = 0; k < e->n_recs; k++) {
        srec *r = &e->recs[k];
        gs_piece *p = &e->up[k];
        layer_info *ly = &e->layers[r->layer];
        if (ly->count == 0) { ly->first = k; ly->bytes = 0; }
        ly->count++;
        p->src = r->t->data;
        p->file = r->from_file ? e->file : NULL;
        p->file_offset = r->file_offset;
        p->nbytes = G.nbytes(r->t);
        p->alloc = G.buft_get_alloc_size(e->cfg.ring_buft, r->t);
        p->offset = align_up(ly->bytes, align);
        ly->bytes = p->offset + p->alloc;
        if (ly->bytes > *max_bytes) *max_bytes = ly->bytes;
        if (ptrmap_put(&e->rec_map, r->t, k, k)) return fail(GS_E_NOMEM, "gs_engine_start: map");
    }
    return GS_OK;
}

/* ---- the ring's copy operations: layers and slots as the copy engine sees them ---- */

char *slot_base(const gs_engine *e, int slot) { return e->ring_base + (size_t)slot * e->size.slot_bytes; }

/* The disk tier's early trigger: a read takes longer than an upload, so the
 * kernel starts reading the disk-tier layer disk_lookahead streamed layers
 * beyond the one just issued; the copy worker's pread finds it in the page
 * cache. A hint only: its failure changes nothing but speed. */
static void read_ahead(gs_engine *e, int layer) {
    int pos, target;
    if (!e->file || e->cfg.disk_lookahead <= 0 || e->size.disk_direct   /* O_DIRECT: no page cache to fill */
        || gs_ring_get_position(e->ring, e->phase, layer, &pos) || pos < 0
        || gs_ring_get_layer_at(e->ring, e->phase, pos + e->cfg.disk_lookahead, &target) || target < 0
        || !e->layers[target].disk_bytes)
        return;
    const layer_info *ly = &e->layers[target];
    for (int k = ly->first; k < ly->first + ly->count; k++)
        if (e->up[k].file) gs_file_advise(e->file, e->up[k].file_offset, e->up[k].nbytes);
    e->ctr.disk_readaheads++;
}

static int op_issue(void *ctx, int slot, int layer) {
    gs_engine *e = ctx;
    const layer_info *ly = &e->layers[layer];
    const gs_piece *up = e->split.prompt_up ? e->split.prompt_up : e->up;   /* gs_split_set.c */
    int rc = gs_copy_issue(e->copy, slot, slot_base(e, slot), &up[ly->first], ly->count);
    if (!rc) read_ahead(e, layer);
    return rc;
}

static int op_done(void *ctx, int slot) {
    int done, rc = gs_copy_done(((gs_engine *)ctx)->copy, slot, &done);
    return rc ? rc : done;
}

/* A wait for a copy that reads the model file is the disk tier's part not
 * hidden behind compute (counted apart from the ring's wait_seconds). */
static int op_wait(void *ctx, int slot) {
    gs_engine *e = ctx;
    int layer = -1, state, disk = e->file && gs_ring_get_slot(e->ring, slot, &layer, &state) == GS_OK
                                  && layer >= 0 && e->layers[layer].disk_bytes > 0;
    double t0 = disk ? now_s() : 0;
    int rc = gs_copy_wait(e->copy, slot);
    if (disk) e->ctr.disk_wait_seconds += now_s() - t0;
    return rc;
}
static int op_drain(void *ctx) { return gs_copy_drain(((gs_engine *)ctx)->copy); }
static void op_point(void *ctx, int layer, int slot) { point_layer(ctx, layer, slot_base(ctx, slot)); }

/* The ring over the streamed layers, in layer order for prompts. */
static int make_ring(gs_engine *e, int *n_streamed, int *n_slots) {
    int n = e->cfg.n_layer, *order = calloc(n, sizeof *order);
    uint64_t *bytes = calloc(n, sizeof *bytes);
    int rc = order && bytes ? GS_OK : fail(GS_E_NOMEM, "gs_engine_start: calloc");
    *n_streamed = 0;
    for (int i = 0; !rc && i < n; i++) {
        bytes[i] = e->layers[i].bytes;
        if (e->layers[i].count > 0) order[(*n_streamed)++] = i;
    }
    *n_slots = e->cfg.n_slots < *n_streamed ? e->cfg.n_slots : *n_streamed;
    gs_ring_config rcfg = { n, *n_slots, e->cfg.prefetch, bytes, &e->ctr,
                            { e, op_issue, op_done, op_wait, op_drain, op_point } };
    if (!rc) rc = gs_ring_create(&rcfg, &e->ring);
    if (!rc) rc = gs_ring_set_order(e->ring, GS_PHASE_PROMPT, order, *n_streamed);
    free(order);
    free(bytes);
    return rc;
}

/* ---- start ------------------------------------------------------------------- */

static void rehome_undo(gs_engine *e, int upto) {
    for (int k = 0; k < upto; k++) {
        e->recs[k].t->buffer = e->recs[k].src_buffer;
        e->recs[k].t->data = (void *)e->up[k].src;
        e->recs[k].t->extra = e->recs[k].src_extra;
    }
}

/* The slots' buffer, every streamed tensor allocated in it at slot 0. */
static int alloc_slots(gs_engine *e, int n_slots) {
    size_t ring_bytes = e->size.slot_bytes * (size_t)n_slots;
    e->ring_buf = G.buft_alloc_buffer(e->cfg.ring_buft, ring_bytes);
    if (!e->ring_buf)
        return fail(GS_E_GGML, "ggml_backend_buft_alloc_buffer(%s, %zu bytes) failed: not enough memory for %d slots",
                    G.buft_name(e->cfg.ring_buft), ring_bytes, n_slots);
    /* Without WEIGHTS usage the scheduler would not place ops by these tensors. */
    G.buffer_set_usage(e->ring_buf, GGML_USAGE_WEIGHTS);
    G.buffer_clear(e->ring_buf, 0);
    e->ring_base = G.buffer_get_base(e->ring_buf);
    for (int k = 0; k < e->n_recs; k++) {
        srec *r = &e->recs[k];
        r->t->buffer = NULL;
        r->t->data = NULL;
        int st = G.tensor_alloc(e->ring_buf, r->t, slot_base(e, 0) + e->up[k].offset);
        if (st != 0) {
            rehome_undo(e, k + 1);
            return fail(GS_E_GGML, "ggml_backend_tensor_alloc(%s) failed with status %d", r->t->name, st);
        }
    }
    return GS_OK;
}

/* llama.cpp's copy of a disk-tier tensor (plain CPU memory, CPU_disk_tier,
 * on CUDA too) is never read again (uploads read the file; such layers are
 * not CPU layers), so its whole pages go back to the OS. Reading them would
 * now give zeros: a path that still used the copy could not pass the
 * exactness tests. */
static void release_host_copies(gs_engine *e) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (int k = 0; k < e->n_recs; k++) {
        if (!e->recs[k].from_file) continue;
        uintptr_t a = (uintptr_t)e->up[k].src, first = align_up(a, page), last = (a + e->up[k].nbytes) / page * page;
        if (last > first && madvise((void *)first, last - first, MADV_DONTNEED) == 0)
            e->size.released_host_bytes += last - first;
    }
}

/* The disk tier's staging chunk: the configured size, but no larger than
 * its largest tensor (page-rounded): small models stage little. */
static size_t staging_chunk(const gs_engine *e) {
    size_t want = e->cfg.staging_bytes ? e->cfg.staging_bytes : GS_STAGING_DEFAULT, biggest = 0;
    for (int k = 0; k < e->n_recs; k++)
        if (e->up[k].file && e->up[k].nbytes > biggest) biggest = e->up[k].nbytes;
    biggest = align_up(biggest, 4096);
    return want < biggest ? want : biggest;
}

/* A disk tier goes through the staged engine on CUDA (parallel preads into
 * pinned staging, then the upload) and, when asked, in host mode (its test
 * bed); O_DIRECT reads need it too (aligned staging). */
static int create_copy_engine(gs_engine *e, int n_slots) {
    if (e->size.disk_tier_bytes && (e->cfg.use_cuda || e->cfg.host_staging || e->cfg.disk_direct)) {
        size_t chunk = staging_chunk(e);
        int readers = e->cfg.disk_readers ? e->cfg.disk_readers : GS_DISK_READERS, buffers = readers + GS_STAGING_SPARE;
        int direct = 0, rc0 = e->cfg.disk_direct ? gs_file_set_direct(e->file, 1, &direct) : GS_OK;
        if (rc0) return rc0;
        e->size.disk_direct = direct;
        int rc = e->cfg.use_cuda
            ? gs_copy_create_cuda_staged(e->cfg.cuda_device, n_slots, chunk, buffers, readers, &e->copy)
            : gs_copy_create_host_staged(n_slots, chunk, buffers, readers, e->cfg.host_copy_delay_us, &e->copy);
        if (!rc) {
            e->size.staging_bytes = chunk * buffers;
            e->size.disk_readers = readers;
        }
        return rc;
    }
    return e->cfg.use_cuda ? gs_copy_create_cuda(e->cfg.cuda_device, n_slots, &e->copy)
                           : gs_copy_create_host(n_slots, e->cfg.host_copy_delay_us, &e->copy);
}

int gs_engine_start(gs_engine *e) {
    if (e->started || e->start_attempted)
        return fail(GS_E_INVALID, "gs_engine_start: already started (or a failed start left it unusable)");
    e->start_attempted = 1;
    if (e->n_recs == 0) return fail(GS_E_INVALID, "gs_engine_start: no streamed tensors were added");
    for (int i = 0; i < e->cfg.n_layer; i++) {
        if (!e->layers[i].disk_bytes) continue;
        if (e->layers[i].cpu_generate)
            return fail(GS_E_INVALID, "layer %d is on the disk tier; it cannot be a CPU layer", i);
        e->size.disk_tier_bytes += e->layers[i].disk_bytes;
    }
    size_t align = G.buft_get_alignment(e->cfg.ring_buft), max_bytes = 0;
    if (align == 0) align = 1;
    int n_streamed, n_slots, rc = layout(e, align, &max_bytes);
    if (!rc) rc = make_ring(e, &n_streamed, &n_slots);
    if (rc) return rc;
    generate_order(e);
    e->phase = GS_PHASE_PROMPT;
    e->size.slot_bytes = align_up(max_bytes, align);
    if ((rc = alloc_slots(e, n_slots))) return rc;
    if ((rc = create_copy_engine(e, n_slots)) || (rc = sync_repacks(e))) return rc;
    release_host_copies(e);
    e->started = 1;
    e->size.ring_bytes = e->size.slot_bytes * (size_t)n_slots;
    e->size.n_streamed = n_streamed;
    e->size.n_slots = n_slots;
    return gs_ring_prefetch_first(e->ring, GS_PHASE_PROMPT);
}

/* ---- where a layer's tensors read from ------------------------------------------ */

void point_layer(gs_engine *e, int layer, char *base) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++)
        e->recs[k].t->data = base + e->up[k].offset;
}

void rehome_layer(gs_engine *e, int layer, char *base) {
    const layer_info *ly = &e->layers[layer];
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        e->recs[k].t->buffer = e->ring_buf;
        e->recs[k].t->extra = e->recs[k].src_extra;
    }
    point_layer(e, layer, base);
}

int layer_streams(const gs_engine *e, int phase, int layer) {
    int pos;
    return e->ring && gs_ring_get_position(e->ring, phase, layer, &pos) == GS_OK && pos >= 0;
}

int copy_layer_to(gs_engine *e, int layer, char *dst) {
    const layer_info *ly = &e->layers[layer];
    return gs_copy_put(e->copy, dst, &e->up[ly->first], ly->count);
}
