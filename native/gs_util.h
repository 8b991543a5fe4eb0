/* Small helpers every unit shares (gs_util.c): the error message, the clock,
 * name parsing and a pointer -> index map. Internal. */
#ifndef GS_UTIL_H
#define GS_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Sets gs_last_error()'s message and returns code. */
int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* fail(GS_E_CUDA, ...) with the runtime's own description of err. */
int cuda_fail(const char *call, int err);

/* Monotonic seconds. */
double now_s(void);

static inline size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

/* "blk.12.ffn_up.weight" -> 12; "l_out-12" -> 12 (prefix "l_out-"); else -1. */
int parse_index(const char *name, const char *prefix, char end);

/* Pointer -> index map (open addressing, load <= 1/2). */
typedef struct { const void **keys; int *vals; size_t cap; } ptrmap;
int  ptrmap_get(const ptrmap *m, const void *key);          /* -1 if absent */
int  ptrmap_put(ptrmap *m, const void *key, int val, size_t count);  /* count: entries now */
void ptrmap_free(ptrmap *m);

#endif
