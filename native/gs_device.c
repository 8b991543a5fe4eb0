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

int gs_cpu_get_repack_buft(void **buft) {
    void *dev;
    *buft = NULL;
    int rc = device("gs_cpu_get_repack_buft", "CPU", &dev);
    if (rc) return rc;
    void *reg = G.dev_backend_reg(dev);
    void **(*extra_bufts)(void *) = reg ? G.reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts") : NULL;
    for (void **b = extra_bufts ? extra_bufts(dev) : NULL; b && *b; b++)
        if (strcmp(G.buft_name(*b), "CPU_REPACK") == 0) { *buft = *b; break; }
    return GS_OK;
}

int gs_tensor_get_buffer(const void *tensor, const char **buffer_name, size_t *buffer_size) {
    const struct gs_tensor *t = tensor;
    if (!G.loaded || !t || !t->buffer) return fail(GS_E_INVALID, "gs_tensor_get_buffer: tensor has no buffer");
    *buffer_name = G.buffer_name(t->buffer);
    *buffer_size = G.buffer_get_size(t->buffer);
    return GS_OK;
}
