"""cffi build script for the native helper (``gguf_stream._native``).

Registered through ``cffi_modules`` in setup.py, so ``pip install`` compiles it
with the system C compiler. It needs no CUDA toolkit and no ggml headers: the
helper resolves ggml and the CUDA runtime from the already-loaded libraries at
run time. ``python -m gguf_stream._build_native`` builds it in place (used on
machines where the package is run from a checkout without pip).
"""
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"

# The declarations Python may call; kept in step with native/gguf_stream.h.
CDEF = """
#define GS_OK ...
#define GS_E_INVALID ...
#define GS_E_NOMEM ...
#define GS_E_DLOPEN ...
#define GS_E_GGML ...
#define GS_E_CUDA ...
#define GS_E_THREAD ...
#define GS_E_GRAPH ...

const char *gs_strerror(int code);
const char *gs_last_error(void);
int gs_libs_load(const char *ggml_base, const char *ggml, const char *cudart);
int gs_device_bufts(const char *name, void **buft, void **host_buft);
int gs_device_memory(const char *name, size_t *free_bytes, size_t *total_bytes);
int gs_cpu_repack_buft(void **buft);
int gs_plain_cpu_buft(void **buft);
int gs_tensor_buffer(const void *tensor, const char **buffer_name, size_t *buffer_size);

typedef struct gs_engine gs_engine;
typedef struct {
    int    n_layer;
    int    n_slots;
    void  *ring_buft;
    int    use_cuda;
    int    cuda_device;
    int    prefetch;
    int    host_copy_delay_us;
    void  *repack_buft;
    void  *host_kv_buft;
} gs_engine_config;
typedef struct {
    uint64_t evaluations, adopted_ready, adopted_waited, sync_fallbacks;
    uint64_t uploads, bytes_uploaded, boundaries;
    double   wait_seconds;
    uint64_t slot_bytes, ring_bytes;
    int      n_streamed, n_slots;
    uint64_t repacked_bytes;
    uint64_t host_kv_bytes;
    uint64_t kv_moved_bytes;
    int      gen_resident;
    uint64_t gen_resident_loads;
    uint64_t gen_resident_evictions;
    uint64_t compute_buffer_bytes;
    uint64_t generate_extent;
} gs_stats;
typedef struct {
    uint64_t decodes;
    uint64_t cpu_segments, gpu_segments;
    double   wall_s;
    double   pre_s;
    double   cpu_s, gpu_s;
    double   between_s;
} gs_timeline;
typedef struct {
    void       *tensor;
    const char *name;
    int         layer;
    size_t      nbytes;
    int         viewed;
} gs_weight;
typedef struct {
    int  n_lout;
    int  max_lout;
    int  violations;
    char first_violation[160];
} gs_graph_check;

int  gs_engine_create(const gs_engine_config *cfg, gs_engine **out);
void gs_engine_destroy(gs_engine *e);
bool gs_discover_cb(void *tensor, bool ask, void *user);
void gs_engine_discover_reset(gs_engine *e);
int  gs_engine_weight_count(gs_engine *e);
int  gs_engine_weight_get(gs_engine *e, int i, gs_weight *out);
int  gs_engine_graph_check(gs_engine *e, gs_graph_check *out);
int  gs_engine_add_tensor(gs_engine *e, int layer, void *tensor);
int  gs_engine_start(gs_engine *e);
bool gs_engine_eval_cb(void *tensor, bool ask, void *user);
#define GS_PHASE_PROMPT ...
#define GS_PHASE_GENERATE ...
int  gs_engine_set_cpu_layers(gs_engine *e, const int *layers, int n);
int  gs_engine_set_generate_resident(gs_engine *e, const int *layers, int n, size_t reserve_bytes, int own);
int  gs_engine_set_phase(gs_engine *e, int phase, int hold_kv);
int  gs_engine_kv_attach(gs_engine *e, int reuse_min_batch);
int  gs_engine_kv_detach(gs_engine *e);
int  gs_engine_kv_cleared(gs_engine *e);
int  gs_engine_bind_layer_devices(gs_engine *e, void *const *cells, int n);
int  gs_engine_measure_upload(gs_engine *e, int layer, int n, double *best_seconds);
int  gs_engine_set_timing(gs_engine *e, int on);
int  gs_engine_layer_time(gs_engine *e, int layer, double *seconds, uint64_t *count);
int  gs_engine_timeline(gs_engine *e, int on);
int  gs_engine_timeline_mark(gs_engine *e, int begin);
int  gs_engine_timeline_get(gs_engine *e, gs_timeline *out);
int  gs_engine_status(gs_engine *e, char *msg, size_t msg_len);
int  gs_engine_stats(gs_engine *e, gs_stats *out);
void gs_engine_reset_stats(gs_engine *e);
int  gs_engine_debug_swap_sources(gs_engine *e, int layer_a, int layer_b);
"""


def make_builder(absolute: bool = False) -> cffi.FFI:
    """setuptools wants paths relative to setup.py; an in-place build
    (which compiles inside its temporary directory) needs absolute ones."""
    base = NATIVE if absolute else NATIVE.relative_to(ROOT)
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "gguf_stream._native",
        '#include "gguf_stream.h"',
        sources=[str(base / "gguf_stream.c")],
        include_dirs=[str(base)],
        libraries=["dl", "pthread"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # A stale build with another suffix (e.g. _native.abi3.so from an
    # editable install) would win the import; keep only this one.
    for old in (ROOT / "gguf_stream").glob("_native*.so"):
        old.unlink()
    make_builder(absolute=True).compile(tmpdir=str(ROOT / "build" / "cffi"),
                                        target=str(ROOT / "gguf_stream" / "_native.*"))
