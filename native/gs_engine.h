/* The engine's state, shared by its units, and what each unit offers the
 * others. Internal. A unit owns the fields of its sub-struct; the others
 * read them. */
#ifndef GS_ENGINE_H
#define GS_ENGINE_H

#include "gguf_stream.h"
#include "gs_abi.h"
#include "gs_util.h"

/* The layouts a CPU layer's matrix weight may be repacked in, in the order
 * llama.cpp tries their buffer types (ggml-cpu's extra buffer types). */
enum { CPU_FORM_AMX, CPU_FORM_REPACK, N_CPU_FORMS };  /* bit f of a mask: GS_CPU_AMX, GS_CPU_REPACK */
#define CPU_FORMS_ALL ((1u << N_CPU_FORMS) - 1)
_Static_assert(GS_CPU_AMX == 1u << CPU_FORM_AMX && GS_CPU_REPACK == 1u << CPU_FORM_REPACK,
               "gs_weight.cpu_layouts' public bits are the CPU_FORM_* bits");

/* A streamed tensor: where llama.cpp put it, and its CPU-layer home. Its
 * upload (source, size, place in a slot) is e->up[k], same index. */
typedef struct {
    struct gs_tensor *t;
    void   *src_buffer;   /* the buffer t lived in before re-homing */
    void   *src_extra;    /* its backend-private extra pointer there */
    /* Generate-phase home of a CPU layer's weight when repacked for the CPU
     * kernels (NULL: the CPU reads the plain host copy at up[k].src). */
    void   *cpu_buffer, *cpu_data, *cpu_extra;
    int     layer;
    unsigned cpu_forms;   /* CPU_FORM_* bits: the repacked layouts every use discovery saw allows */
    int     from_file;    /* disk tier: uploads read the model file at file_offset */
    uint64_t file_offset;
} srec;

/* A KV cache tensor of the attached context and where llama.cpp put it. */
#define KV_MAX_VIEWS 8
typedef struct {
    struct gs_tensor *t;          /* cache_k_l<i> or cache_v_l<i>; NULL until seen */
    void   *dev_buffer, *dev_data, *dev_extra;
    struct gs_tensor *views[KV_MAX_VIEWS];   /* per-stream views allocated with it */
    void   *view_extra[KV_MAX_VIEWS];
    int     n_views;              /* -1: more than we track, so it never moves */
    size_t  nbytes, offset;       /* offset: in the layer's host KV buffer */
} kv_rec;

typedef struct {
    int    first, count;  /* its records in e->recs (contiguous after start); count 0: not streamed */
    size_t bytes;         /* laid-out size in a slot */
    size_t disk_bytes;    /* of its tensors', read from the model file (disk tier) */
    int    cpu_generate;  /* computed by the CPU from host memory in the generate phase */
    int    gen_resident;  /* resident while generating, in the generate-resident region */
    int    gr_live;       /* ...and there now: its tensors point into the region */
    void  *repack_bufs[N_CPU_FORMS];  /* CPU layers: their repacked weights by layout (pageable host) */
    size_t repacked_bytes;
    kv_rec kv[2];         /* K, V of the attached context */
    void  *kv_host_buf;   /* CPU layers: their KV cache while generating */
    int    kv_on_host;
    void **dev_cell;      /* llama.cpp's device of this layer (see gs_engine_bind_layer_devices) */
    void  *dev_orig;      /* its value at binding: the device the layer was loaded for */
} layer_info;

struct gs_engine {
    gs_engine_config cfg;
    int         started, start_attempted;
    int         phase;                /* GS_PHASE_PROMPT or GS_PHASE_GENERATE */
    int         status;               /* the first failure a hook recorded */
    char        status_msg[512];
    gs_counters ctr;                  /* zeroed by gs_engine_reset_counters */
    gs_sizes    size;                 /* kept by it */

    struct {                          /* gs_discovery.c */
        gs_weight *w;
        char     (*names)[64];
        int        n, cap;
        ptrmap     map;
        int        last_lout;
        gs_graph_check check;
        unsigned char *lout_seen;
    } disc;

    /* streamed tensors, their layers and the slots (gs_start.c) */
    srec      *recs;
    gs_piece  *up;                    /* per record: its upload into a slot */
    int        n_recs, cap_recs;
    ptrmap     rec_map;
    layer_info *layers;
    void      *ring_buf;              /* the slots' ggml buffer */
    char      *ring_base;
    gs_ring   *ring;
    gs_copy   *copy;
    gs_file   *file;                  /* the model file of the disk tier (gs_engine_set_file), or NULL */
    struct { uint64_t reads, bytes; double seconds; } disk_base;  /* its stats at the last counter reset */
    void      *cpu_dev;               /* set while layer devices are bound (gs_phase.c) */
    int        hook_ran;              /* the hook ran in the generate phase since placement changed (gs_phase.c) */
    int        keep_repacks;          /* layers leaving the CPU keep their repacked copies (gs_repack.c) */

    struct {                          /* KV caches of the attached context (gs_kv.c) */
        int attached, scan;           /* a context's KV caches are (being) recorded */
        int cleared;                  /* no cell in use since llama_memory_clear: moves copy nothing */
        int reuse_min_batch;          /* >0: the attached context reuses graphs (see gs_engine_attach_kv) */
        int check_shape;              /* ...and CPU layers exist: check each ubatch's phase (fixed while attached) */
        int graphs_dropped;           /* the attached context holds no graph until its next decode (gs_engine_graphs_dropped) */
        int hold;                     /* generate phase: leave the CPU layers' caches where they are */
    } kv;

    struct {                          /* generate-resident layers (gs_resident.c) */
        int     n;                    /* layers chosen */
        int     own_mode;             /* region: own buffer (1) or the compute buffer's tail (0) */
        void   *own;                  /* own buffer */
        size_t  reserve;              /* compute buffer bytes left to generate-phase graphs */
        char   *base;                 /* region while the layers are in it, else NULL */
        size_t  bytes;
        int     walk;                 /* the next node asked starts a graph: look at all of it */
        void   *cbuf;                 /* the attached context's compute buffer for its GPU layers */
        char   *cbuf_base;            /* (its size: size.compute_buffer_bytes) */
        size_t  extent;               /* how much of it generate graphs used */
    } gr;

    struct {                          /* experts split while generating (gs_split.c) */
        int     n, n_upload, n_used;  /* layers split; experts of a ubatch uploaded per layer now; routed per token */
        int     prompt_cpu;           /* prompt phase: the last experts of each split layer the CPU computes */
        gs_piece *prompt_up;          /* ... and the ring's uploads without them (NULL: e->up) */
        int     n_max;                /* room in the region for uploaded experts (the zero ones follow) */
        struct {                      /* GS_SPLIT_AUTO: n_upload timed over one-row decodes, lo..hi in turn */
            int    lo, hi, runs;      /* candidates; runs timed so far (hi < lo: chosen) */
            int    decodes, cur;      /* decodes seen (shifts the turn); the candidate of the run being timed */
            int    layer;             /* the layer being timed until its second boundary (two-boundary mode), or -1 */
            double t0;                /* ... and when its run started */
            int    cnt[GS_SPLIT_TUNE_CANDIDATES];
            float  sec[GS_SPLIT_TUNE_CANDIDATES][GS_SPLIT_TUNE_RUNS];
        } tune;
        unsigned char *on;            /* per layer */
        int     oai;                  /* the experts' activation: GS_SPLIT_ACT_* */
        int     into_sum;             /* the CPU's part into the experts' sum: two boundaries (gs_engine_set_split_experts) */
        int     act_seen;             /* ... and a split layer's graph showed it */
        int   (*rec)[6];              /* per layer: records of its gate, up, down expert tensors and their
                                       * biases (-1: none), gs_split.h's order (SPLIT_TENSORS) */
        size_t (*off)[6];             /* ... and their place in the region */
        void   *buf;                  /* the device region */
        char   *base;
        size_t  bytes;
        int     up_ids[GS_SPLIT_MAX_UPLOAD];   /* the experts in the region now */
        void   *stream;               /* CUDA: its own copy stream (never behind the ring's uploads) */
        char   *stage;                /* host memory for the small reads and writes (pinned on CUDA) */
        size_t  cap_stage;
        char    weights_node[64];     /* the final routing weights' node name less its layer, once seen */
        /* per layer, from the graph being run: the experts' input, the routed ids,
         * the final routing weights, the residual; its boundaries this decode
         * (MODE_*), routing rewritten, the ubatch's rows */
        struct gs_tensor **x, **ids, **w, **inp;
        unsigned char *mode, *routed;
        int    *rows;
        struct split_pool *pool;      /* the CPU's threads (gs_split_cpu.c) */
        const struct cpu_job *jobs;   /* the layer's (row, expert) pairs they compute */
        int     n_jobs;
    } split;

    struct {                          /* per-layer timing, for calibration (gs_probe.c) */
        int       on;
        double    t_last;
        double   *seconds;
        uint64_t *count;
    } timing;

    struct {                          /* the timeline probe (gs_probe.c) */
        int     on, in_decode, open, open_gpu, graph_done;
        double  begin, mark;
        void   *buffer;               /* last buffer classified, and its answer */
        int     buffer_gpu;
        gs_timeline sum;
    } tl;
};

/* F32 rows laid end to end (every stride; stricter than ggml_is_contiguous,
 * which skips those of dimensions of size 1). */
static inline int f32_dense(const struct gs_tensor *t) {
    return t->nb[0] == 4 && t->nb[1] == 4 * (size_t)t->ne[0] && t->nb[2] == t->nb[1] * (size_t)t->ne[1]
           && t->nb[3] == t->nb[2] * (size_t)t->ne[2];
}

/* gs_engine.c: keep the first failure (and gs_last_error's message) for gs_engine_get_status. */
void engine_fail(gs_engine *e, int code);

/* gs_start.c: where a layer's tensors read from. */
char *slot_base(const gs_engine *e, int slot);
void  point_layer(gs_engine *e, int layer, char *base);     /* data only */
void  rehome_layer(gs_engine *e, int layer, char *base);    /* into the ring's buffer at base */
int   layer_streams(const gs_engine *e, int phase, int layer);  /* in phase's order */
int   copy_layer_to(gs_engine *e, int layer, char *dst);    /* outside the slots; see gs_copy_put */

/* gs_phase.c */
void generate_order(gs_engine *e);
int  switch_phase(gs_engine *e, int phase);
int  phase_node(gs_engine *e, const struct gs_tensor *t, int layer);

/* gs_stream.c: the hook's streaming, before a node runs (ask) and at a boundary. */
enum { STREAM_PASS, STREAM_SYNC, STREAM_ADOPTED };
int  stream_ask(gs_engine *e, const struct gs_tensor *t, int layer);
void stream_synced(gs_engine *e, int layer);

/* gs_resident.c */
int  gr_enter(gs_engine *e);
void gr_leave(gs_engine *e);
int  resident_node(gs_engine *e, const struct gs_tensor *t, int layer);
void gr_forget_context(gs_engine *e);
void gr_free(gs_engine *e);

/* gs_split.c; a layer whose experts are split while generating */
static inline int is_split(const gs_engine *e, int layer) { return e->split.on && e->split.on[layer]; }
/* GS_SPLIT_AUTO still timing its candidates (tune.hi < lo: chosen, or nothing to time) */
static inline int tuning(const gs_engine *e) { return e->split.tune.hi >= e->split.tune.lo; }
/* a split layer's experts per expert tensor */
static inline int layer_n_expert(const gs_engine *e, int layer) {
    return (int)e->recs[e->split.rec[layer][0]].t->ne[2];
}
int  split_ask(gs_engine *e, const struct gs_tensor *t);
void split_synced(gs_engine *e, struct gs_tensor *t);
void split_point(gs_engine *e, int layer);
void split_settle(gs_engine *e);
void split_free(gs_engine *e);
size_t expert_stride(const gs_engine *e, int layer, int m);   /* bytes of one expert of split tensor m */
/* gs_split_set.c: the ring's uploads of the split layers leave out their last n_cpu experts (0: none);
 * drains the slots first */
int  prompt_uploads(gs_engine *e, int n_cpu);

/* gs_repack.c */
void point_home(gs_engine *e, int layer);
int  sync_repacks(gs_engine *e);
void drop_repack(gs_engine *e, int layer);

/* gs_kv.c */
int  kv_node(gs_engine *e, const struct gs_tensor *t, bool ask);
int  sync_kv(gs_engine *e);
void kv_free_host(gs_engine *e, int layer);
void kv_scan_done(gs_engine *e);

/* gs_probe.c */
int  timeline_node(gs_engine *e, const struct gs_tensor *t, bool ask);
void timing_boundary(gs_engine *e, int layer);

/* gs_discovery.c */
unsigned weight_cpu_forms(const gs_engine *e, const struct gs_tensor *t);
void discovery_free(gs_engine *e);

#endif
