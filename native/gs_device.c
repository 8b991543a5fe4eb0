/* Device and buffer queries, by ggml name. */
#include <string.h>

#include "gguf_stream.h"
#include "gs_abi.h"
#include "gs_util.h"

/* The named device, or an error naming the caller. */
static int device(const char *caller, const char *name, void **dev) {
    if (!G.loaded) return fail(GS_E_INVALID, "%s: libraries not loaded", caller);
    *dev = G.dev_by_name(name);
    if (!*dev) return fail(GS_E_INVALID, "ggml has no device named %s", name);
    return GS_OK;
}

int gs_device_get_bufts(const char *name, void **buft, void **host_buft) {
    void *dev;
    int rc = device("gs_device_get_bufts", name, &dev);
    if (rc) return rc;
    if (buft) *buft = G.dev_buffer_type(dev);
    if (host_buft) *host_buft = G.dev_host_buffer_type(dev);
    return GS_OK;
}

int gs_device_get_memory(const char *name, size_t *free_bytes, size_t *total_bytes) {
    void *dev;
    int rc = device("gs_device_get_memory", name, &dev);
    if (rc) return rc;
    G.dev_memory(dev, free_bytes, total_bytes);
    return GS_OK;
}

/* ggml type ids a KV cache may have (llama.cpp's -ctk/-ctv) and their block
 * sizes: a row of a block type must hold whole blocks, or ggml aborts. */
static int kv_type_block(int type) {
    switch (type) {
    case 0: case 1: case 30: return 1;                  /* f32, f16, bf16 */
    case 2: case 3: case 6: case 7: case 8: case 20:    /* q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl */
        return 32;
    default: return 0;
    }
}

int gs_device_supports_flash_attn(const char *name, int64_t head_dim_k, int64_t head_dim_v, int64_t n_head,
                                  int64_t n_head_kv, int type_k, int type_v, int *supported) {
    enum { N_KV = 256, TYPE_F32 = 0, TYPE_F16 = 1 };   /* a padded cache's cells, as llama.cpp's graphs have */
    void *dev;
    *supported = 0;
    int rc = device("gs_device_supports_flash_attn", name, &dev);
    if (rc) return rc;
    int bk = kv_type_block(type_k), bv = kv_type_block(type_v);
    /* the shapes ggml_flash_attn_ext asserts on (it would abort the process) */
    if (!bk || !bv || head_dim_k <= 0 || head_dim_v <= 0 || n_head_kv <= 0 || n_head <= 0 ||
        n_head % n_head_kv || head_dim_k % bk || head_dim_v % bv)
        return GS_OK;
    void *ctx = G.init((struct gs_init_params){.mem_size = 64 * 1024, .mem_buffer = NULL, .no_alloc = true});
    if (!ctx) return fail(GS_E_NOMEM, "gs_device_supports_flash_attn: ggml_init failed");
    void *q = G.new_tensor_3d(ctx, TYPE_F32, head_dim_k, 1, n_head);
    void *k = G.new_tensor_3d(ctx, type_k, head_dim_k, N_KV, n_head_kv);
    void *v = G.new_tensor_3d(ctx, type_v, head_dim_v, N_KV, n_head_kv);
    void *mask = G.new_tensor_3d(ctx, TYPE_F16, N_KV, 1, 1);
    void *op = q && k && v && mask ? G.flash_attn_ext(ctx, q, k, v, mask, 1.0f, 0.0f, 0.0f) : NULL;
    if (op) *supported = G.dev_supports_op(dev, op);
    G.free(ctx);
    return op ? GS_OK : fail(GS_E_NOMEM, "gs_device_supports_flash_attn: could not build the op");
}

int gs_cpu_get_plain_buft(void **buft) {
    /* struct ggml_backend_buffer_type: six interface pointers, device, context */
    static struct { void *iface[6]; void *device; void *context; } clone;
    void *dev;
    *buft = NULL;
    int rc = device("gs_cpu_get_plain_buft", "CPU", &dev);
    if (rc) return rc;
    if (!clone.device) memcpy(&clone, G.dev_buffer_type(dev), sizeof clone);
    *buft = &clone;
    return GS_OK;
}

int gs_cpu_get_extra_buft(const char *name, void **buft) {
    void *dev;
    *buft = NULL;
    int rc = device("gs_cpu_get_extra_buft", "CPU", &dev);
    if (rc) return rc;
    void *reg = G.dev_backend_reg(dev);
    void **(*extra_bufts)(void *) = reg ? G.reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts") : NULL;
    for (void **b = extra_bufts ? extra_bufts(dev) : NULL; b && *b; b++)
        if (strcmp(G.buft_name(*b), name) == 0) { *buft = *b; break; }
    return GS_OK;
}

int gs_tensor_get_buffer(const void *tensor, const char **buffer_name, size_t *buffer_size) {
    const struct gs_tensor *t = tensor;
    if (!G.loaded || !t || !t->buffer) return fail(GS_E_INVALID, "gs_tensor_get_buffer: tensor has no buffer");
    *buffer_name = G.buffer_name(t->buffer);
    *buffer_size = G.buffer_get_size(t->buffer);
    return GS_OK;
}
