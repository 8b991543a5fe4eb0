/* The slice of ggml's and the CUDA runtime's ABI the helper relies on
 * (llama-cpp-python 0.3.36), and the entry points gs_libs_load resolves
 * (gs_libs.c). Internal. */
#ifndef GS_ABI_H
#define GS_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Mirror of struct ggml_tensor (ggml.h). The Python side checks names and
 * shapes read through it against the GGUF file before anything is re-homed. */
struct gs_tensor {
    int32_t type;
    void   *buffer;
    int64_t ne[4];
    size_t  nb[4];
    int32_t op;
    int32_t op_params[16];
    int32_t flags;
    struct gs_tensor *src[10];
    struct gs_tensor *view_src;
    size_t  view_offs;
    void   *data;
    char    name[64];
    void   *extra;
    char    padding[8];
};
_Static_assert(offsetof(struct gs_tensor, buffer) == 8, "ggml_tensor.buffer");
_Static_assert(offsetof(struct gs_tensor, src) == 152, "ggml_tensor.src");
_Static_assert(offsetof(struct gs_tensor, view_src) == 232, "ggml_tensor.view_src");
_Static_assert(offsetof(struct gs_tensor, data) == 248, "ggml_tensor.data");
_Static_assert(offsetof(struct gs_tensor, name) == 256, "ggml_tensor.name");
_Static_assert(sizeof(struct gs_tensor) == 336, "sizeof ggml_tensor");
#define GS_MAX_SRC 10

/* Mirror of struct ggml_object (ggml.c): the header right before every
 * tensor of a ggml context, chaining them in creation order. Used to find
 * the per-stream views llama.cpp allocates next to each KV cache tensor. */
struct gs_object {
    size_t offs;
    size_t size;
    struct gs_object *next;
    int32_t type;             /* GGML_OBJECT_TYPE_TENSOR = 0 */
    char    padding[4];
};
_Static_assert(sizeof(struct gs_object) == 32, "sizeof ggml_object");
#define GGML_OBJECT_TYPE_TENSOR 0

#define GGML_USAGE_WEIGHTS 1

/* struct ggml_init_params (ggml.h), passed by value to ggml_init. */
struct gs_init_params {
    size_t mem_size;
    void  *mem_buffer;
    bool   no_alloc;
};

/* ggml-base / ggml entry points (buffers, buffer types, devices, tensors). */
struct gs_ggml_syms {
    int    loaded;
    void  *(*dev_by_name)(const char *);
    void  *(*dev_buffer_type)(void *);
    void  *(*dev_host_buffer_type)(void *);
    void   (*dev_memory)(void *, size_t *, size_t *);
    void  *(*buft_alloc_buffer)(void *, size_t);
    size_t (*buft_get_alignment)(void *);
    size_t (*buft_get_alloc_size)(void *, const void *);
    const char *(*buft_name)(void *);
    const char *(*buffer_name)(void *);
    void   (*buffer_free)(void *);
    void  *(*buffer_get_base)(void *);
    size_t (*buffer_get_size)(void *);
    void   (*buffer_clear)(void *, uint8_t);
    void   (*buffer_set_usage)(void *, int);
    int    (*buffer_get_usage)(void *);
    int    (*tensor_alloc)(void *, void *, void *);
    void   (*tensor_set)(void *, const void *, size_t, size_t);
    void   (*tensor_get)(const void *, void *, size_t, size_t);
    size_t (*nbytes)(const void *);
    const char *(*op_name)(int);
    void  *(*dev_backend_reg)(void *);
    void  *(*reg_get_proc_address)(void *, const char *);
    void   (*sched_set_eval_callback)(void *, bool (*)(void *, bool, void *), void *);
    /* building one op on metadata only, to ask a device about it */
    void  *(*init)(struct gs_init_params);
    void   (*free)(void *);
    void  *(*new_tensor_3d)(void *, int, int64_t, int64_t, int64_t);
    void  *(*flash_attn_ext)(void *, void *, void *, void *, void *, float, float, float);
    bool   (*dev_supports_op)(void *, const void *);
};
extern struct gs_ggml_syms G;

/* CUDA runtime entry points; handles are opaque pointers, errors ints. */
#define CUDA_SUCCESS 0
#define CUDA_NOT_READY 600
#define CUDA_H2D 1
#define CUDA_D2H 2
#define CUDA_STREAM_NON_BLOCKING 1
#define CUDA_EVENT_DISABLE_TIMING 2
#define CUDA_HOST_ALLOC_PORTABLE 1
struct gs_cudart_syms {
    int loaded;
    int (*SetDevice)(int);
    int (*StreamCreateWithFlags)(void **, unsigned);
    int (*StreamDestroy)(void *);
    int (*StreamSynchronize)(void *);
    int (*EventCreateWithFlags)(void **, unsigned);
    int (*EventDestroy)(void *);
    int (*EventRecord)(void *, void *);
    int (*EventQuery)(void *);
    int (*EventSynchronize)(void *);
    int (*MemcpyAsync)(void *, const void *, size_t, int, void *);
    int (*MemsetAsync)(void *, int, size_t, void *);
    int (*Memcpy2DAsync)(void *, size_t, const void *, size_t, size_t, size_t, int, void *);
    int (*DeviceSynchronize)(void);
    int (*HostAlloc)(void **, size_t, unsigned);   /* the disk tier's pinned staging buffers */
    int (*FreeHost)(void *);
    const char *(*GetErrorString)(int);
};
extern struct gs_cudart_syms C;
/* gs_libs_load's CUDA half, alone (native/check/cuda_check.c runs without ggml). */
int load_cudart(const char *cudart);

#endif
