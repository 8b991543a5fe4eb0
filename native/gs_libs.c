/* Library loading: the ggml and CUDA runtime entry points, resolved from the
 * copies llama-cpp-python has already loaded. */
#define _GNU_SOURCE
#include <dlfcn.h>

#include "gguf_stream.h"
#include "gs_abi.h"
#include "gs_util.h"

struct gs_ggml_syms G;
struct gs_cudart_syms C;

static void *open_loaded(const char *path) {
    /* Prefer the copy already in the process; fall back to loading it. */
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    return h ? h : dlopen(path, RTLD_NOW);
}

static int resolve(void *h1, void *h2, const char *name, void **slot) {
    void *p = h1 ? dlsym(h1, name) : NULL;
    if (!p && h2) p = dlsym(h2, name);
    if (!p) return fail(GS_E_DLOPEN, "symbol %s not found in the loaded ggml/cudart libraries", name);
    *slot = p;
    return GS_OK;
}

#define RESOLVE(h1, h2, field, sym) \
    do { int rc_ = resolve(h1, h2, sym, (void **)&field); if (rc_) return rc_; } while (0)

static int load_ggml(const char *ggml_base, const char *ggml) {
    void *hb = open_loaded(ggml_base);
    if (!hb) return fail(GS_E_DLOPEN, "dlopen(%s): %s", ggml_base, dlerror());
    void *hg = open_loaded(ggml);
    if (!hg) return fail(GS_E_DLOPEN, "dlopen(%s): %s", ggml, dlerror());
    RESOLVE(hg, hb, G.dev_by_name, "ggml_backend_dev_by_name");
    RESOLVE(hb, hg, G.dev_buffer_type, "ggml_backend_dev_buffer_type");
    RESOLVE(hb, hg, G.dev_host_buffer_type, "ggml_backend_dev_host_buffer_type");
    RESOLVE(hb, hg, G.dev_memory, "ggml_backend_dev_memory");
    RESOLVE(hb, hg, G.buft_alloc_buffer, "ggml_backend_buft_alloc_buffer");
    RESOLVE(hb, hg, G.buft_get_alignment, "ggml_backend_buft_get_alignment");
    RESOLVE(hb, hg, G.buft_get_alloc_size, "ggml_backend_buft_get_alloc_size");
    RESOLVE(hb, hg, G.buft_name, "ggml_backend_buft_name");
    RESOLVE(hb, hg, G.buffer_name, "ggml_backend_buffer_name");
    RESOLVE(hb, hg, G.buffer_free, "ggml_backend_buffer_free");
    RESOLVE(hb, hg, G.buffer_get_base, "ggml_backend_buffer_get_base");
    RESOLVE(hb, hg, G.buffer_get_size, "ggml_backend_buffer_get_size");
    RESOLVE(hb, hg, G.buffer_clear, "ggml_backend_buffer_clear");
    RESOLVE(hb, hg, G.buffer_set_usage, "ggml_backend_buffer_set_usage");
    RESOLVE(hb, hg, G.buffer_get_usage, "ggml_backend_buffer_get_usage");
    RESOLVE(hb, hg, G.tensor_alloc, "ggml_backend_tensor_alloc");
    RESOLVE(hb, hg, G.tensor_set, "ggml_backend_tensor_set");
    RESOLVE(hb, hg, G.tensor_get, "ggml_backend_tensor_get");
    RESOLVE(hb, hg, G.nbytes, "ggml_nbytes");
    RESOLVE(hb, hg, G.op_name, "ggml_op_name");
    RESOLVE(hb, hg, G.dev_backend_reg, "ggml_backend_dev_backend_reg");
    RESOLVE(hb, hg, G.reg_get_proc_address, "ggml_backend_reg_get_proc_address");
    RESOLVE(hb, hg, G.sched_set_eval_callback, "ggml_backend_sched_set_eval_callback");
    RESOLVE(hb, hg, G.init, "ggml_init");
    RESOLVE(hb, hg, G.free, "ggml_free");
    RESOLVE(hb, hg, G.new_tensor_3d, "ggml_new_tensor_3d");
    RESOLVE(hb, hg, G.flash_attn_ext, "ggml_flash_attn_ext");
    RESOLVE(hb, hg, G.dev_supports_op, "ggml_backend_dev_supports_op");
    G.loaded = 1;
    return GS_OK;
}

int load_cudart(const char *cudart) {
    void *hc = open_loaded(cudart);
    if (!hc) return fail(GS_E_DLOPEN, "dlopen(%s): %s", cudart, dlerror());
    RESOLVE(hc, NULL, C.SetDevice, "cudaSetDevice");
    RESOLVE(hc, NULL, C.StreamCreateWithFlags, "cudaStreamCreateWithFlags");
    RESOLVE(hc, NULL, C.StreamDestroy, "cudaStreamDestroy");
    RESOLVE(hc, NULL, C.StreamSynchronize, "cudaStreamSynchronize");
    RESOLVE(hc, NULL, C.EventCreateWithFlags, "cudaEventCreateWithFlags");
    RESOLVE(hc, NULL, C.EventDestroy, "cudaEventDestroy");
    RESOLVE(hc, NULL, C.EventRecord, "cudaEventRecord");
    RESOLVE(hc, NULL, C.EventQuery, "cudaEventQuery");
    RESOLVE(hc, NULL, C.EventSynchronize, "cudaEventSynchronize");
    RESOLVE(hc, NULL, C.MemcpyAsync, "cudaMemcpyAsync");
    RESOLVE(hc, NULL, C.MemsetAsync, "cudaMemsetAsync");
    RESOLVE(hc, NULL, C.Memcpy2DAsync, "cudaMemcpy2DAsync");
    RESOLVE(hc, NULL, C.DeviceSynchronize, "cudaDeviceSynchronize");
    RESOLVE(hc, NULL, C.HostAlloc, "cudaHostAlloc");
    RESOLVE(hc, NULL, C.FreeHost, "cudaFreeHost");
    RESOLVE(hc, NULL, C.GetErrorString, "cudaGetErrorString");
    C.loaded = 1;
    return GS_OK;
}

int gs_libs_load(const char *ggml_base, const char *ggml, const char *cudart) {
    if (!ggml_base || !ggml) return fail(GS_E_INVALID, "gs_libs_load: ggml library paths are required");
    int rc = G.loaded ? GS_OK : load_ggml(ggml_base, ggml);
    if (!rc && cudart && !C.loaded) rc = load_cudart(cudart);
    return rc;
}
