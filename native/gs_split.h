/* The CPU's part of split expert layers (gs_split_cpu.c), as gs_split.c
 * uses it. Internal. */
#ifndef GS_SPLIT_H
#define GS_SPLIT_H

#include <stddef.h>

enum { W_GATE, W_UP, W_DOWN, B_GATE, B_UP, B_DOWN, SPLIT_TENSORS };   /* B_*: expert biases (gpt-oss) */

typedef struct cpu_job { int row, pos, expert; } cpu_job;   /* one expert of one ubatch row, at routing position pos */

typedef struct {              /* a layer's expert matrices in host memory */
    const char *src[3];       /* expert 0 of gate, up, down */
    size_t nb1[3], nb2[3];    /* row and expert strides */
    int type[3];
    const float *bias[3];     /* expert 0's bias of gate, up, down (F32), or NULL */
    size_t bias_nb1[3];       /* ... the expert stride */
    int n_embd, n_ff;
    int oai;                  /* the activation: 0 SwiGLU, 1 gpt-oss's clamped SwiGLU (GS_SPLIT_ACT_OAI) */
} expert_mats;

typedef struct split_pool split_pool;

/* llama.cpp's CPU kernels (once per process); whether a weight type has them. */
int  cpu_kernels_load(void);
int  cpu_kernels_have(int type);

int  split_pool_create(int n_workers, split_pool **out);
void split_pool_free(split_pool *p);
/* Room for n jobs, once the last layer's work is done; NULL when out of memory. */
cpu_job *split_pool_jobs(split_pool *p, size_t n);
/* Start the first n_jobs jobs on x (n_rows rows of n_embd floats). */
int  split_pool_post(split_pool *p, const expert_mats *m, const float *x, int n_rows, int n_jobs);
/* The calling thread helps, then waits until the posted work is done. */
void split_pool_finish(split_pool *p);
/* A finished job's expert output: n_embd floats, not yet weighted. */
const float *split_pool_out(const split_pool *p, int job);

/* A prompt's CPU experts through llama.cpp's MUL_MAT_ID graph on a thread of
 * its own (gs_split_graph.c; the pool hands them over, see split_pool_post). */
typedef struct split_graph split_graph;
int  split_graph_load(void *cpu_lib, void *base_lib);   /* 1 if llama.cpp's graph entry points were found */
int  split_graph_usable(const expert_mats *m);         /* loaded, and no biases or gpt-oss activation */
int  split_graph_create(int n_threads, split_graph **out);
void split_graph_free(split_graph *s);
int  split_graph_post(split_graph *s, const expert_mats *m, const float *x, const cpu_job *jobs, int n_jobs);
void split_graph_finish(split_graph *s);
const float *split_graph_out(const split_graph *s, int job);

#endif
