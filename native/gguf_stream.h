/*
 * gguf-stream native helper: the ring of weight slots, its copy engine and the
 * llama.cpp scheduler hook (cb_eval) that streams layers through it.
 *
 * Nothing here links against ggml or CUDA at build time. gs_libs_load()
 * resolves the few ggml-base / ggml / cudart entry points from the libraries
 * llama-cpp-python has already loaded, so the helper always talks to the same
 * copies (and the same CUDA runtime) as llama.cpp itself.
 *
 * Objects are opaque handles, functions are gs_<object>_<verb>:
 *   gs_engine  the streaming of one model (what Python drives);
 *   gs_ring    the slots' state machine, which the engine runs and tests
 *              drive alone through a fake copy engine (gs_ring_ops);
 *   gs_copy    a copy engine: a CUDA stream, or a host thread.
 * Every function returns GS_OK (0) or a negative GS_E_* code; gs_last_error()
 * holds a message naming the failing call. Nothing aborts the process.
 * Exceptions: gs_strerror / gs_last_error (strings), the *_destroy functions
 * (nothing to report) and the two scheduler hooks (see their contract).
 *
 * This header is also the cffi declaration (gguf_stream/_build_native.py
 * drops its preprocessor lines except the integer #defines): plain C
 * declarations only, and #define only to integer literals.
 */
#ifndef GGUF_STREAM_H
#define GGUF_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GS_OK          0
#define GS_E_INVALID  -1  /* bad argument or wrong state */
#define GS_E_NOMEM    -2  /* host allocation failed */
#define GS_E_DLOPEN   -3  /* a library or symbol could not be resolved */
#define GS_E_GGML     -4  /* a ggml call failed (buffer or tensor allocation) */
#define GS_E_CUDA     -5  /* a CUDA runtime call failed */
#define GS_E_THREAD   -6  /* the host copy thread could not be started */
#define GS_E_GRAPH    -7  /* the graph used a streamed layer outside its segment */
#define GS_E_IO       -8  /* a disk-tier read failed, or the model file changed underneath */

const char *gs_strerror(int code);
/* Message of the last failure on this thread: "cudaMemcpyAsync: invalid argument". */
const char *gs_last_error(void);

/* ---- libraries and devices ------------------------------------------------ */

/* ggml_base/ggml: paths of the libraries llama-cpp-python loaded.
 * cudart: path of the CUDA runtime libggml-cuda uses, or NULL for host mode. */
int gs_libs_load(const char *ggml_base, const char *ggml, const char *cudart);

/* Device lookup by ggml name ("CUDA0", "CPU"): its buffer type, its host
 * (pinned) buffer type (NULL if it has none) and its memory figures. */
int gs_device_get_bufts(const char *name, void **buft, void **host_buft);
int gs_device_get_memory(const char *name, size_t *free_bytes, size_t *total_bytes);
/* Whether the named device computes llama.cpp's flash attention op for
 * this attention shape (head sizes of K and V, heads of Q and of K/V) and
 * these KV cache types (ggml type ids): what llama.cpp's -fa auto asks of
 * every layer's device when it creates a context. *supported is 0 for a
 * shape or type the op cannot be built with. */
int gs_device_supports_flash_attn(const char *name, int64_t head_dim_k, int64_t head_dim_v, int64_t n_head,
                                  int64_t n_head_kv, int type_k, int type_v, int *supported);
/* The plain CPU buffer type under another address. llama.cpp turns a
 * tensor override to the CPU buffer type (matched by address) into its
 * CPU_REPACK variant when repacking is on; host-mode upload sources must
 * stay in the plain layout the slots hold. */
int gs_cpu_get_plain_buft(void **buft);
/* One of the CPU backend's extra buffer types by name ("AMX", "CPU_REPACK"),
 * NULL where this build or this CPU has none. */
int gs_cpu_get_extra_buft(const char *name, void **buft);

/* Pinned host memory in ggml "CUDA_Host" buffers is allocated by llama.cpp;
 * this reports the name and size of the buffer a tensor lives in. */
int gs_tensor_get_buffer(const void *tensor, const char **buffer_name, size_t *buffer_size);

/* ---- counters -------------------------------------------------------------- */

#define GS_PHASE_PROMPT   0   /* large batches: every non-resident layer streams */
#define GS_PHASE_GENERATE 1   /* small batches: "cpu" layers are computed from host memory */
#define GS_N_PHASES       2

/* What happened since the last reset (gs_engine_reset_counters zeroes it). */
typedef struct {
    uint64_t evaluations;      /* graph evaluations that adopted at least one layer */
    uint64_t adopted_ready;    /* adoptions whose copy had already finished */
    uint64_t adopted_waited;   /* adoptions that waited for an in-flight copy */
    uint64_t sync_fallbacks;   /* adoptions with no copy issued: uploaded synchronously */
    uint64_t uploads;          /* layer copies issued */
    uint64_t bytes_uploaded;
    uint64_t boundaries;       /* segment boundaries requested (one backend sync each) */
    double   wait_seconds;     /* time spent waiting in adoptions (incl. fallbacks) */
    uint64_t kv_moved_bytes;   /* KV cache bytes copied between device and host at phase switches */
    uint64_t gen_resident_loads;     /* times the region was filled (once per switch to generating) */
    uint64_t gen_resident_evictions; /* graphs laid out over the region: its layers streamed instead */
    uint64_t hookless_decodes; /* generate-phase decodes run without the hook (gs_engine_route_hook) */
    uint64_t disk_reads;       /* disk tier: tensor reads from the model file (gs_file_read calls) */
    uint64_t disk_bytes;       /* ... and their bytes */
    double   disk_read_seconds; /* time those reads took (in the copy worker) */
    double   disk_wait_seconds; /* adoptions' waits for copies that read the file (the part not overlapped) */
    uint64_t disk_readaheads;  /* disk-tier layers the kernel was asked to read ahead (early trigger) */
    uint64_t layers_repacked;  /* CPU layers whose weights were repacked (a kept copy serving again: not) */
    uint64_t split_layers;     /* split-expert layers run (gs_engine_set_split_experts), per ubatch */
    uint64_t split_uploaded;   /* ... their experts uploaded to the device region */
    uint64_t split_cpu;        /* ... their (row, expert) pairs computed by the CPU */
    uint64_t split_prompt_layers; /* ... of them in prompt-phase ubatches (gs_engine_set_prompt_cpu_experts) */
    uint64_t split_early_releases; /* ... whose slot was freed at ffn_moe_out, before the CPU's part (experts-only slots) */
    double   split_upload_seconds;   /* the hook's time in those uploads (the CPU works meanwhile) */
    double   split_cpu_wait_seconds; /* its time finishing / waiting for the CPU's part */
} gs_counters;

/* What the engine holds now (a reset keeps it). */
typedef struct {
    uint64_t slot_bytes;       /* bytes of one slot */
    uint64_t ring_bytes;       /* bytes of all slots */
    int      n_streamed;
    int      n_slots;
    uint64_t repacked_bytes;   /* pageable host memory holding CPU layers' repacked weights */
    uint64_t host_kv_bytes;    /* host memory holding CPU layers' KV caches while generating */
    int      gen_resident;     /* generate-resident layers in their region now */
    uint64_t compute_buffer_bytes; /* the attached context's device compute buffer, 0 until seen */
    uint64_t generate_extent;  /* bytes of it the generate phase's graphs used so far */
    uint64_t disk_tier_bytes;  /* streamed bytes whose upload source is the model file (disk tier) */
    uint64_t released_host_bytes; /* pages of llama.cpp's copy of them returned to the OS */
    uint64_t staging_bytes;    /* the disk tier's staging buffers (pinned on CUDA), 0 without them */
    int      disk_direct;      /* 1: the disk tier reads with O_DIRECT (asked for and allowed) */
    int      disk_readers;     /* the staged engine's reader threads, 0 without it */
    uint64_t split_region_bytes; /* the split-expert layers' device region (gs_engine_set_split_experts) */
    int      split_n_upload;     /* experts uploaded per split layer and ubatch now; -1 while GS_SPLIT_AUTO times */
} gs_sizes;

/* ---- the model file (disk tier) ---------------------------------------------- */

/* The GGUF file that disk-tier tensors are read from. Opening checks that
 * it is the file the plan was made from (size and modification time, as
 * os.stat gives them); every read checks again (fstat) and that it got
 * every byte, so a file truncated or rewritten underneath fails the read
 * (GS_E_IO, naming the file) instead of feeding wrong weights. A file
 * replaced by rename keeps being read through the open descriptor (the old
 * inode: still the right bytes). Reads may run on any thread. */
typedef struct gs_file gs_file;
int  gs_file_open(const char *path, uint64_t expect_size, int64_t expect_mtime_ns, gs_file **out);
void gs_file_close(gs_file *f);
/* n bytes at offset into dst (pread, retried on EINTR and partial reads).
 * Refused while O_DIRECT reads are on (dst need not be aligned). */
int  gs_file_read(gs_file *f, void *dst, size_t n, uint64_t offset);
/* Optional O_DIRECT reads (the page cache bypassed): on = 1 opens a second
 * descriptor with O_DIRECT; *active = 0 where the filesystem refuses it
 * (reads stay buffered, as they do if a later read is refused). */
#define GS_DIRECT_ALIGN 4096
int  gs_file_set_direct(gs_file *f, int on, int *active);
int  gs_file_is_direct(const gs_file *f);
/* n bytes at offset into buf, starting at buf + *at: with O_DIRECT the
 * GS_DIRECT_ALIGN-aligned span around them is read, so buf must be aligned
 * to it with room for n + 2 * GS_DIRECT_ALIGN bytes; buffered, *at = 0. */
int  gs_file_read_span(gs_file *f, void *buf, size_t n, uint64_t offset, size_t *at);
/* Ask the kernel to start reading n bytes at offset into its page cache
 * (posix_fadvise WILLNEED): the disk tier's early trigger. */
int  gs_file_advise(gs_file *f, uint64_t offset, size_t n);
/* What the reads so far did: calls, bytes, seconds (they only grow); the
 * seconds are wall time with at least one read in flight (parallel reads
 * count once: bytes / seconds is the file's read rate). */
int  gs_file_get_stats(const gs_file *f, uint64_t *reads, uint64_t *bytes, double *seconds);

/* Loading with a disk tier (see gs_diskload.c): disk-tier tensors are
 * overridden to this buffer type (plain CPU memory). While armed, its buffers
 * are remembered and gs_disk_load_progress_cb, set as the model params'
 * progress_callback, returns their pages to the OS before each tensor is
 * read, then calls next_cb (the callback it replaced; may be NULL). Disarm
 * right after the load (success or not): the buffers may be freed later. */
int  gs_disk_get_buft(void **buft);
int  gs_disk_load_arm(void *next_cb, void *next_user);
bool gs_disk_load_progress_cb(float progress, void *user);
/* *released_bytes: the largest page range handed back during the load. */
int  gs_disk_load_disarm(uint64_t *released_bytes);

/* ---- the copy engine --------------------------------------------------------- */

/* One tensor of a layer image: nbytes from src (or, with file set, from the
 * model file at file_offset: the disk tier) to dst + offset, then zeros up
 * to alloc (quantized rows are padded on CUDA; the padding must read as zero). */
typedef struct {
    const void *src;
    size_t      nbytes, alloc, offset;
    gs_file    *file;
    uint64_t    file_offset;
} gs_piece;

typedef struct gs_copy gs_copy;

/* Copies are FIFO (one stream or one thread), so a later copy into a slot is
 * ordered after an earlier one. Host: a worker thread that sleeps delay_us
 * after each issued copy (simulates a slow link). CUDA: its own non-blocking
 * stream on `device` and one event per slot. */
int  gs_copy_create_host(int n_slots, int delay_us, gs_copy **out);
int  gs_copy_create_cuda(int device, int n_slots, gs_copy **out);
/* The staged engine, the disk tier's (gs_copy_stage.c): one uploader thread
 * through which every copy goes in issue order; a file piece is read in
 * chunks of chunk_bytes into n_staging (>= 2) staging buffers by n_readers
 * (1 .. GS_DISK_READERS_MAX) reader threads, several chunks in flight, ahead
 * of the uploads; each chunk then copied to the slot in order, a staging
 * buffer reused only once its copy has passed. CUDA: pinned staging
 * (cudaHostAlloc), cudaMemcpyAsync on its own stream, an event per slot and
 * per staging buffer. Host: the same threads and staging over memcpy (so CI
 * runs them); delay_us as gs_copy_create_host. */
int  gs_copy_create_cuda_staged(int device, int n_slots, size_t chunk_bytes, int n_staging, int n_readers,
                                gs_copy **out);
int  gs_copy_create_host_staged(int n_slots, size_t chunk_bytes, int n_staging, int n_readers, int delay_us,
                                gs_copy **out);
/* Waits for the copies in flight, then frees. */
void gs_copy_destroy(gs_copy *c);
/* Queue the copy of pieces[0..n) to dst; it ends the slot's fence. pieces
 * and their sources must stay valid until it has landed. Pieces with a file
 * (disk tier) are read by the host engine's worker straight into dst, or by
 * the staged engine's reader through its staging buffers; the plain CUDA
 * engine refuses them (GS_E_INVALID). A failed read makes the engine
 * failed: every later call reports it. */
int  gs_copy_issue(gs_copy *c, int slot, void *dst, const gs_piece *pieces, int n);
/* Copy pieces to dst outside any slot: queued on the stream (CUDA, see
 * drain) or done before returning (host). */
int  gs_copy_put(gs_copy *c, void *dst, const gs_piece *pieces, int n);
/* *done = 1 if the slot's last issued copy has landed (or none was issued). */
int  gs_copy_done(gs_copy *c, int slot, int *done);
int  gs_copy_wait(gs_copy *c, int slot);
/* Until every copy issued or put so far has landed. */
int  gs_copy_drain(gs_copy *c);
/* Until the device is idle, llama.cpp's work included (CUDA; host: nothing). */
int  gs_copy_sync_device(gs_copy *c);

/* ---- the ring ------------------------------------------------------------------ */

#define GS_SLOT_EMPTY   0
#define GS_SLOT_LOADING 1   /* a copy into it was issued */
#define GS_SLOT_READY   2   /* its copy has been seen landed, or it was released */
#define GS_SLOT_IN_USE  3   /* adopted by the current evaluation */

typedef struct gs_ring gs_ring;

/* What the ring asks of its owner, with ctx. The ring keeps no memory: a
 * slot is an index, the owner knows where it lies and what a layer is.
 *   issue(slot, layer)  queue the upload of layer into slot (FIFO); 0 or <0.
 *   done(slot)          1 if the slot's last copy has landed, 0 if in flight, <0 error.
 *   wait(slot)          block until it has landed; 0 or <0.
 *   drain()             block until every copy issued has landed; 0 or <0.
 *   point(layer, slot)  may be NULL: layer was adopted into slot, its
 *                       tensors must read it from now on. */
typedef struct {
    void *ctx;
    int  (*issue)(void *ctx, int slot, int layer);
    int  (*done)(void *ctx, int slot);
    int  (*wait)(void *ctx, int slot);
    int  (*drain)(void *ctx);
    void (*point)(void *ctx, int layer, int slot);
} gs_ring_ops;

typedef struct {
    int             n_layer;      /* layers are numbered 0 .. n_layer - 1 */
    int             n_slots;      /* >= 1 */
    int             prefetch;     /* 0: never upload ahead (adoptions upload synchronously) */
    const uint64_t *layer_bytes;  /* n_layer entries: bytes one upload moves (copied); NULL: 0 */
    gs_counters    *counters;     /* where the ring counts (adoptions, uploads, waits) */
    gs_ring_ops     ops;
} gs_ring_config;

/* Every phase starts with an empty order: set_order before adopting. */
int  gs_ring_create(const gs_ring_config *cfg, gs_ring **out);
void gs_ring_destroy(gs_ring *r);
/* The layers streamed in `phase`, in execution order (distinct). */
int  gs_ring_set_order(gs_ring *r, int phase, const int *layers, int n);
/* *pos = layer's place in phase's order, -1 if it does not stream then. */
int  gs_ring_get_position(const gs_ring *r, int phase, int layer, int *pos);
/* *layer = the layer at pos in phase's order, pos wrapping round to the next evaluation; -1 if none. */
int  gs_ring_get_layer_at(const gs_ring *r, int phase, int pos, int *layer);
/* Before the layer's weights are read: its slot, reusing a landed copy,
 * waiting for one in flight, or uploading into a victim slot now. Counts
 * the adoption; an evaluation starts at the phase's first layer. A layer
 * already adopted in this evaluation is left as it is. */
int  gs_ring_adopt(gs_ring *r, int phase, int layer);
/* The layer has finished: its slot may be overwritten. Early trigger: it
 * receives the layer n_slots steps ahead in phase's order right away
 * (wrapping round to the next evaluation), unless a slot holds that one. */
int  gs_ring_release(gs_ring *r, int phase, int layer);
/* *landed = 1 if layer sits complete in a slot not in use (adoption would not wait). */
int  gs_ring_landed(gs_ring *r, int layer, int *landed);
/* Phase switch: slots keep only the first layers `phase` will need (a slot
 * left in use by an aborted evaluation is reclaimed) ... */
int  gs_ring_keep_first(gs_ring *r, int phase);
/* ... and empty slots receive the rest of them (nothing without prefetch). */
int  gs_ring_prefetch_first(gs_ring *r, int phase);
/* Calibration, between evaluations: every copy landed, then the best of n
 * synchronous uploads of layer into slot 0 (which keeps it, ready). */
int  gs_ring_time_upload(gs_ring *r, int layer, int n, double *best_seconds);
/* Every copy landed, then the slots not in use forget what they hold. */
int  gs_ring_discard(gs_ring *r);
/* Slot s: the layer it holds (-1 if empty) and its GS_SLOT_* state. */
int  gs_ring_get_slot(const gs_ring *r, int slot, int *layer, int *state);
/* The slot layer was adopted into for the current evaluation, -1 if none. */
int  gs_ring_get_adopted(const gs_ring *r, int layer, int *slot);
/* What one upload of layer moves from now on (the counters' bytes_uploaded). */
int  gs_ring_set_layer_bytes(gs_ring *r, int layer, uint64_t bytes);

/* ---- the engine ------------------------------------------------------------------ */

typedef struct gs_engine gs_engine;

typedef struct {
    int    n_layer;            /* layers of the model */
    int    n_slots;            /* ring size, >= 1 */
    void  *ring_buft;          /* ggml buffer type the slots are allocated in */
    int    use_cuda;           /* 1: CUDA copy stream + events; 0: host copy thread */
    int    cuda_device;        /* CUDA device of the ring (use_cuda only) */
    int    prefetch;           /* 0: never prefetch (every adoption uploads synchronously) */
    int    host_copy_delay_us; /* host mode only: sleep per layer copy (simulates a slow link) */
    void  *amx_buft;           /* CPU layers' weights that llama.cpp's AMX kernels compute (2-D products
                                  of the types they take) are repacked in this buffer type, as stock's
                                  are: llama.cpp tries it before CPU_REPACK; NULL: none */
    void  *repack_buft;        /* the rest of their matrix weights that CPU_REPACK takes go in this one
                                  (gs_cpu_get_extra_buft); NULL: they read the plain host copy */
    void  *host_kv_buft;       /* CPU layers' KV caches move into this (host) buffer type while
                                  generating (see gs_engine_attach_kv); NULL: they stay put */
    int    disk_lookahead;     /* disk tier's early trigger: with each upload issued, the disk-tier
                                  layer this many streamed layers further on is read ahead by the
                                  kernel (its reads need more lead time than uploads); 0: off */
    size_t staging_bytes;      /* disk tier: the staged engine's chunk (one staging buffer; capped at
                                  the largest disk-tier tensor); 0: GS_STAGING_DEFAULT */
    int    host_staging;       /* host mode with a disk tier: the staged engine over memcpy instead
                                  of the host engine's direct reads (CUDA always stages) */
    int    disk_direct;        /* disk tier: O_DIRECT reads where the filesystem allows (staged engine,
                                  also in host mode; the kernel's read-ahead hints are then off) */
    int    disk_readers;       /* disk tier: the staged engine's reader threads (reads in flight at
                                  once); 0: GS_DISK_READERS */
} gs_engine_config;

#define GS_STAGING_DEFAULT 67108864   /* 64 MiB per staging buffer */
#define GS_DISK_READERS 4             /* an NVMe drive needs several reads in flight */
#define GS_DISK_READERS_MAX 64
#define GS_STAGING_SPARE 2            /* staging buffers = readers + this: chunks read, waiting or uploading */

/* Where decodes' wall time goes (probe; see gs_engine_set_timeline). A segment
 * is what the scheduler launches between two host syncs; its time runs from
 * its first node being asked to the sync after it (or to the next segment's
 * first node, so it includes the hand-over copy into the next graph split). */
typedef struct {
    uint64_t decodes;
    uint64_t cpu_segments, gpu_segments;
    double   wall_s;      /* between gs_engine_mark_timeline(1) and (0) */
    double   pre_s;       /* mark(1) to the first node asked: graph build, allocation, inputs */
    double   cpu_s, gpu_s;
    double   between_s;   /* sync to the next node asked: the hook's own work (adoption incl.
                             copy waits, releases, copy issues) and split input copies */
} gs_timeline;

typedef struct {
    void       *tensor;
    const char *name;
    int         layer;         /* -1 for shared tensors */
    size_t      nbytes;
    int         viewed;        /* 1 if some graph node is a view of it */
    unsigned    cpu_layouts;   /* the CPU's repacked layouts every use of it allows: GS_CPU_AMX,
                                  GS_CPU_REPACK bits (a CPU layer's copy takes the first this
                                  build has, as llama.cpp's loader does) */
} gs_weight;

#define GS_CPU_AMX    1
#define GS_CPU_REPACK 2

typedef struct {
    int  n_lout;               /* distinct l_out-<i> nodes seen */
    int  max_lout;             /* highest i seen, -1 if none */
    int  violations;           /* weights of layer L used outside (l_out-(L-1), l_out-L] */
    char first_violation[160];
} gs_graph_check;

int  gs_engine_create(const gs_engine_config *cfg, gs_engine **out);
/* Frees the copy engine and the slots. Call after the context and the model
 * are freed: streamed tensors point into the slots until then. */
void gs_engine_destroy(gs_engine *e);

/* Discovery hook: set as cb_eval (user data = engine) on a throwaway context
 * and decode one small batch (< 32 tokens, so no op-offload copy stands in
 * for a weight). It records every weight tensor and checks that layer i's
 * weights are only used between l_out-(i-1) and l_out-i. Always answers false. */
bool gs_engine_discover_cb(void *tensor, bool ask, void *user);
int  gs_engine_reset_discovery(gs_engine *e);
int  gs_engine_count_weights(gs_engine *e, int *n);
int  gs_engine_get_weight(gs_engine *e, int i, gs_weight *out);
int  gs_engine_get_graph_check(gs_engine *e, gs_graph_check *out);

/* Marks a discovered weight of a streamed layer; its current data (llama.cpp's
 * host copy, pinned on CUDA) becomes the upload source. */
int  gs_engine_add_tensor(gs_engine *e, int layer, void *tensor);
/* Disk tier: the model file (see gs_file_open), before adding file tensors. */
int  gs_engine_set_file(gs_engine *e, const char *path, uint64_t expect_size, int64_t expect_mtime_ns);
/* Like add_tensor, but the upload source is the model file at file_offset
 * (where the GGUF puts the tensor's data). At start the pages of
 * llama.cpp's copy are returned to the OS (they are never read again), and
 * the copy engine is the staged one with CUDA (or host_staging). Such a
 * layer cannot be a CPU layer (the CPU would read host memory that is not
 * there). */
int  gs_engine_add_file_tensor(gs_engine *e, int layer, void *tensor, uint64_t file_offset);
/* Allocates the ring, re-homes every added tensor into it and prefetches the
 * first n_slots streamed layers. Must run before the real context exists. */
int  gs_engine_start(gs_engine *e);

/* The scheduler hook, set as cb_eval with user data = engine.
 * ask=true:  answers true only at l_out-<i> where layer i is streamed (release
 *            its slot, start the next upload) or layer i+1 is (adopt it after
 *            the preceding work has finished), and, while a timeline records,
 *            at a graph's last node (result_output, whose segment end
 *            llama.cpp synchronises anyway); each true is a backend sync.
 * ask=false: acts at that boundary and always answers true (false would
 *            silently drop the rest of the split).
 * Errors cannot be returned through the scheduler: they are recorded and read
 * with gs_engine_get_status() after llama_decode. */
bool gs_engine_eval_cb(void *tensor, bool ask, void *user);

/* Layers the CPU computes in the generate phase (added like streamed ones:
 * they stream in the prompt phase). Before start, or between decodes: the
 * engine then returns to the prompt phase. Refused while a context that
 * reuses graphs is attached (see gs_engine_attach_kv), unless its graphs
 * were dropped since its last decode (gs_engine_graphs_dropped). */
int  gs_engine_set_cpu_layers(gs_engine *e, const int *layers, int n);
/* The caller has made the attached context drop every graph it could reuse
 * (llama_graph_reserve resets them), so the coming decode builds its graph
 * anew: set_cpu_layers may change CPU layers under a context that reuses
 * graphs until that decode (the next set_phase). */
int  gs_engine_graphs_dropped(gs_engine *e);
/* keep = 1: a layer that stops being a CPU layer keeps its repacked copy,
 * which serves again (not repacked anew) if it becomes one again: the split
 * search tries several sets of CPU layers. keep = 0 frees the copies of
 * layers that are not CPU layers now, and from then on at each change. */
int  gs_engine_keep_repacks(gs_engine *e, int keep);
/* Generate-resident layers: streamed for prompts, resident while generating
 * in device memory that prompts use. own = 1: the engine's own buffer (for
 * the short-lived calibration contexts, before the real context exists);
 * own = 0: the tail of the attached context's compute buffer, which
 * llama.cpp sizes for a prompt-sized ubatch and a generate-phase graph
 * leaves idle, at least reserve_bytes from its start. The layers are copied
 * in at each switch to the generate phase (prompts overwrite them) once that
 * buffer has been seen, above twice what generate graphs have used of it;
 * until then, and beyond what fits, they stream. A generate graph laid out
 * over them makes them stream again (seen at its first node); a scheduler
 * copy there fails the decode (never a wrong result). Between decodes; layers
 * must be streamed and not CPU layers; n = 0 clears. */
/* Mixture-of-experts layers split while generating: of each token's routed
 * experts in those layers (n_used per token), the first n_upload of a ubatch
 * are uploaded into a small device region (n_upload + n_used experts of each
 * expert tensor: the others read zero ones there) and computed by
 * llama.cpp's kernels there, while n_threads CPU threads (the hook's own
 * included) compute the others from the host copy; the hook adds the CPU's
 * part to the layer's expert sum. The layers must be streamed (they still
 * stream for prompts), with separate gate/up/down expert tensors, and be
 * neither CPU, generate-resident nor disk-tier layers. n = 0 turns it off.
 * Between decodes, as set_cpu_layers. */
#define GS_SPLIT_MAX_UPLOAD 64
/* n_upload GS_SPLIT_AUTO: the hook times its split layers' work on the first
 * one-row decodes with each n_upload from about a quarter to three quarters
 * of n_used in turn, GS_SPLIT_TUNE_RUNS layer runs each, and keeps the
 * fastest (median): PCIe and the CPU's memory rates differ by machine. */
#define GS_SPLIT_AUTO -1
/* activation: the experts' GLU as llama.cpp's graph computes it: SwiGLU
 * (qwen3moe, qwen2moe, glm4moe) or gpt-oss's clamped one (swiglu_oai, alpha
 * 1.702, limit 7); a split layer whose graph shows another fails the decode.
 * Expert biases (ffn_*_exps.bias) are uploaded and added as llama.cpp's
 * ggml_add_id does. */
#define GS_SPLIT_ACT_SWIGLU 0
#define GS_SPLIT_ACT_OAI 1
#define GS_SPLIT_TUNE_CANDIDATES 8
#define GS_SPLIT_TUNE_RUNS 24
/* into_sum: the CPU's part joins the routed experts' sum (a second boundary
 * per split layer, after ffn_moe_out) instead of the residual: llama.cpp's
 * order where a shared expert is added between the two; one more sync per
 * layer (for host mode, whose runs are tests: on a GPU it would cost time). */
int  gs_engine_set_split_experts(gs_engine *e, const int *layers, int n, int n_upload, int n_used, int n_threads,
                                 int activation, int into_sum);
/* In prompt-phase ubatches (they stream every layer through the slots), the
 * split layers' last n_cpu experts are computed by the CPU (the split's
 * threads, from the host copy) and not uploaded: their part of each slot
 * copy is zeros, whose outputs add nothing, so PCIe moves (n_expert - n_cpu)
 * / n_expert of those layers' expert bytes (and the rows' activations to the
 * host, the CPU's sum back) while the CPU computes the rest at the routing
 * boundary; its part joins the experts' sum at a second one. 0: off;
 * set_split_experts turns it off. Between decodes. */
int  gs_engine_set_prompt_cpu_experts(gs_engine *e, int n_cpu);
int  gs_engine_set_generate_resident(gs_engine *e, const int *layers, int n, size_t reserve_bytes, int own);
/* Switch placement between decodes; the engine starts in the prompt phase.
 * hold_kv (generate phase): leave the CPU layers' KV caches where they are
 * for the coming decode, which may reuse a graph built before they could
 * move (see gs_engine_attach_kv). */
int  gs_engine_set_phase(gs_engine *e, int phase, int hold_kv);
/* After gs_engine_set_phase, before the decode: set the hook of the context's
 * scheduler (sched: its ggml_backend_sched_t) for the coming decode. It is off
 * (*hooked = 0) only where it would do nothing: the generate phase, a decode
 * that may reuse the last graph (hold_kv), which ran with the hook since the
 * placement last changed, and nothing to move per token (at most n_slots
 * layers stream while generating, each staying in its slot; no probe on).
 * Such a decode then runs as stock's does: no call per node, one graph
 * compute per split, CUDA graphs matched by id instead of node by node. A
 * rebuilt graph takes the hook back from the context's parameters, so this
 * can only leave it out of a reused graph; otherwise it is set. */
int  gs_engine_route_hook(gs_engine *e, void *sched, int *hooked);
/* KV caches of the CPU layers. Attention runs where a layer's KV cache
 * lives: left on the device, every CPU layer would hand its activations to
 * the GPU and back three times per token. With host_kv_buft set, the cache
 * tensors (cache_k_l<i> / cache_v_l<i>) of one context are recorded during
 * its first decode after gs_engine_attach_kv; in the generate phase those of
 * the CPU layers then live in host memory (copied across at each phase
 * switch, together with the per-stream views llama.cpp's state save/load
 * reads), so the CPU computes the whole layer like stock does.
 * Attach right after creating the context; detach (moves everything back
 * and waits for the uploads in flight, which read the model's host memory)
 * before freeing it. One context at a time: a second attach fails.
 * reuse_min_batch > 0: the context may reuse its last graph for a decode of
 * the same shape (llama.cpp's default), and a graph keeps the scheduler's
 * placement and the KV views it was built with. The driver then keeps the
 * placement a function of the shape: a ubatch of n tokens runs in the
 * prompt phase iff n >= reuse_min_batch (checked at every decode while CPU
 * layers exist), CPU layers do not change while attached, and the caches'
 * moves to host memory wait (hold_kv) while the coming decode has the last
 * graph's shape. 0: the context rebuilds every graph (created with
 * LLAMA_GRAPH_REUSE_DISABLE=1). */
int  gs_engine_attach_kv(gs_engine *e, int reuse_min_batch);
int  gs_engine_detach_kv(gs_engine *e);
/* After llama_memory_clear: every cell is free, so moves until the next
 * decode only re-point the caches (their bytes no longer matter). */
int  gs_engine_mark_kv_cleared(gs_engine *e);

/* llama.cpp pins each layer's "norm" ops (and "l_last") to the layer's
 * device for batches under 32 tokens. Our layers are all loaded as GPU layers
 * (their KV caches serve prompts on the GPU), so a CPU layer's norms would
 * run on the GPU: four backend switches per CPU layer instead of two.
 * cells[i] is the address of layer i's device pointer in the model
 * (model->pimpl->dev_layer[i].dev, found and checked by the caller); in the
 * generate phase the engine points a CPU layer's cell at the CPU device, in
 * the prompt phase back at the value it had when bound. Bind in the prompt
 * phase. cells = NULL forgets them without writing (the model may be freed):
 * cells are written only by set_phase / set_cpu_layers, which must not run
 * after the model is freed. */
int  gs_engine_bind_layer_devices(gs_engine *e, void *const *cells, int n);

/* Link calibration: best of n synchronous uploads of `layer`, between decodes. */
int  gs_engine_measure_upload(gs_engine *e, int layer, int n, double *best_seconds);
/* Calibration: a boundary at every l_out-<i>, accumulating the wall time
 * from l_out-(i-1) to l_out-i per layer (reset with gs_engine_reset_counters). */
int  gs_engine_set_timing(gs_engine *e, int on);
int  gs_engine_get_layer_time(gs_engine *e, int layer, double *seconds, uint64_t *count);
/* Probe: break decodes' wall time into graph building, CPU and GPU segments
 * and the hook's work between them, adding no boundaries (unlike timing).
 * on resets the sums; bracket each decode with mark(1) / mark(0). */
int  gs_engine_set_timeline(gs_engine *e, int on);
int  gs_engine_mark_timeline(gs_engine *e, int begin);
int  gs_engine_get_timeline(gs_engine *e, gs_timeline *out);

/* The first failure recorded by a hook (GS_OK if none) and its message. */
int  gs_engine_get_status(gs_engine *e, char *msg, size_t msg_len);
int  gs_engine_get_counters(gs_engine *e, gs_counters *out);
int  gs_engine_get_sizes(gs_engine *e, gs_sizes *out);
/* Zeroes the counters and the per-layer timing; sizes stay. */
int  gs_engine_reset_counters(gs_engine *e);

/* Test aid: exchange the upload sources of two streamed layers of identical
 * layout, so each is fed the other's weights. Used to prove that the
 * exactness tests can fail. */
int  gs_engine_swap_sources(gs_engine *e, int layer_a, int layer_b);

#endif
