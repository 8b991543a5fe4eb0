/* GPU check of the CUDA copy engine, alone and driving the ring, with no
 * ggml and no llama.cpp: what the CPU-only tests cannot run. On a machine
 * with a GPU and the CUDA runtime, from the repository root:
 *
 *   gcc -O2 -std=gnu11 -Wall -Inative -o /tmp/cuda_check native/check/cuda_check.c \
 *       native/gs_copy.c native/gs_copy_cuda.c native/gs_copy_host.c native/gs_copy_stage.c \
 *       native/gs_file.c native/gs_ring.c native/gs_util.c native/gs_libs.c -ldl -lpthread
 *   /tmp/cuda_check /usr/local/cuda/lib64/libcudart.so [DIR]
 *
 * The disk tier's checks write a scratch file of about 120 MiB in DIR
 * (default /tmp). Prints one line per check and exits 0 if all pass. */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_stream.h"
#include "gs_abi.h"
#include "gs_util.h"

static int failures;
static int (*Malloc)(void **, size_t);
static int (*Free)(void *);
static int (*Memcpy)(void *, const void *, size_t, int);
static int (*Memset)(void *, int, size_t);
#define D2H 2

#define CHECK(what, cond) do { int ok_ = (cond); failures += !ok_; \
    printf("%s %s\n", ok_ ? "ok  " : "FAIL", what); if (!ok_) printf("     %s\n", gs_last_error()); } while (0)

static void *dev_alloc(size_t n, int fill) {
    void *p = NULL;
    if (Malloc(&p, n) || Memset(p, fill, n)) { printf("FAIL cudaMalloc/cudaMemset\n"); exit(1); }
    return p;
}

static void readback(void *dst, const void *dev, size_t n) {
    if (Memcpy(dst, dev, n, D2H)) { printf("FAIL cudaMemcpy D2H\n"); exit(1); }
}

/* Pieces, padding zeroed, done / wait / drain / put / device sync. */
static void copy_engine_alone(void) {
    gs_copy *c;
    CHECK("create the CUDA copy engine", gs_copy_create_cuda(0, 3, &c) == GS_OK);
    if (!c) return;
    char a[6] = "abcdef", b[3] = "XYZ", got[64], want[64];
    gs_piece p[2] = { { a, 6, 8, 0 }, { b, 3, 16, 32 } };
    char *dst = dev_alloc(64, 0xAA);
    int done = -1;
    CHECK("issue", gs_copy_issue(c, 1, dst, p, 2) == GS_OK);
    CHECK("wait", gs_copy_wait(c, 1) == GS_OK);
    CHECK("done after wait", gs_copy_done(c, 1, &done) == GS_OK && done == 1);
    readback(got, dst, 64);
    memset(want, 0xAA, 64);
    memcpy(want, "abcdef\0\0", 8);
    memcpy(want + 32, "XYZ", 3);
    memset(want + 35, 0, 13);
    CHECK("bytes and zeroed padding", memcmp(got, want, 64) == 0);

    size_t big = 256u << 20;                  /* FIFO: a large copy, then a small one after it */
    char *src = malloc(big), *dbig = dev_alloc(big, 0);
    memset(src, 7, big);
    gs_piece pb = { src, big, big, 0 }, ps = { "z", 1, 1, 0 };
    CHECK("issue a large copy", gs_copy_issue(c, 0, dbig, &pb, 1) == GS_OK);
    CHECK("issue a small one after it", gs_copy_issue(c, 2, dbig, &ps, 1) == GS_OK);
    CHECK("wait for the small one", gs_copy_wait(c, 2) == GS_OK);
    CHECK("the large one landed first", gs_copy_done(c, 0, &done) == GS_OK && done == 1);
    readback(got, dbig, 2);
    CHECK("FIFO: the later copy wins", got[0] == 'z' && got[1] == 7);
    CHECK("put", gs_copy_put(c, dst, p, 1) == GS_OK);
    CHECK("drain", gs_copy_drain(c) == GS_OK);
    CHECK("sync the device", gs_copy_sync_device(c) == GS_OK);
    CHECK("a bad slot is refused", gs_copy_wait(c, 3) == GS_E_INVALID);
    gs_copy_destroy(c);
    Free(dbig); Free(dst); free(src);
}

/* The ring driving the CUDA copy engine, as the engine does: every adopted
 * slot holds its layer's bytes. */
#define N_LAYER 7
#define N_SLOTS 3
#define LAYER_BYTES (4u << 20)
typedef struct { gs_copy *c; char *slots; gs_piece piece[N_LAYER]; } bench;

static int op_issue(void *ctx, int s, int l) {
    bench *b = ctx;
    return gs_copy_issue(b->c, s, b->slots + (size_t)s * LAYER_BYTES, &b->piece[l], 1);
}
static int op_done(void *ctx, int s) { int d, rc = gs_copy_done(((bench *)ctx)->c, s, &d); return rc ? rc : d; }
static int op_wait(void *ctx, int s) { return gs_copy_wait(((bench *)ctx)->c, s); }
static int op_drain(void *ctx) { return gs_copy_drain(((bench *)ctx)->c); }

static void ring_on_cuda(void) {
    bench b;
    static char src[N_LAYER][LAYER_BYTES];
    for (int l = 0; l < N_LAYER; l++) {
        memset(src[l], 'A' + l, LAYER_BYTES);
        b.piece[l] = (gs_piece){ src[l], LAYER_BYTES, LAYER_BYTES, 0 };
    }
    CHECK("create the copy engine for the ring", gs_copy_create_cuda(0, N_SLOTS, &b.c) == GS_OK);
    if (!b.c) return;
    b.slots = dev_alloc((size_t)N_SLOTS * LAYER_BYTES, 0);
    gs_counters ctr = { 0 };
    gs_ring_config cfg = { N_LAYER, N_SLOTS, 1, NULL, &ctr, { &b, op_issue, op_done, op_wait, op_drain, NULL } };
    gs_ring *r;
    int order[N_LAYER] = { 0, 1, 2, 3, 4, 5, 6 }, right = 1, rc = GS_OK;
    CHECK("create the ring", gs_ring_create(&cfg, &r) == GS_OK && gs_ring_set_order(r, 0, order, N_LAYER) == GS_OK);
    rc |= gs_ring_prefetch_first(r, 0);
    char got[2];
    for (int ev = 0; ev < 4; ev++) {
        for (int l = 0; l < N_LAYER; l++) {
            int slot;
            rc |= gs_ring_adopt(r, 0, l);
            rc |= gs_ring_get_adopted(r, l, &slot);
            readback(got, b.slots + (size_t)slot * LAYER_BYTES + LAYER_BYTES - 2, 2);
            right &= got[0] == 'A' + l && got[1] == 'A' + l;
            rc |= gs_ring_release(r, 0, l);
        }
    }
    CHECK("4 evaluations of 7 layers through 3 slots", rc == GS_OK);
    CHECK("every adopted slot held its layer", right);
    printf("     adopted ready %llu, waited %llu, sync %llu, uploads %llu, wait %.1f ms\n",
           (unsigned long long)ctr.adopted_ready, (unsigned long long)ctr.adopted_waited,
           (unsigned long long)ctr.sync_fallbacks, (unsigned long long)ctr.uploads, ctr.wait_seconds * 1e3);
    CHECK("counters", ctr.evaluations == 4 && ctr.uploads == N_SLOTS + 4 * N_LAYER && ctr.sync_fallbacks == 0
          && ctr.adopted_ready + ctr.adopted_waited == 4 * N_LAYER);
    double best;
    CHECK("time an upload", gs_ring_time_upload(r, 3, 3, &best) == GS_OK && best > 0);
    printf("     %u MiB from pageable memory in %.2f ms\n", LAYER_BYTES >> 20, best * 1e3);
    gs_ring_destroy(r);
    gs_copy_destroy(b.c);
    Free(b.slots);
}

/* ---- the disk tier: the staged engine (reader, pinned staging, events) ---- */
#define D_LAYERS 5
#define D_SLOTS 2
#define D_PIECE ((24u << 20) + 1000)   /* a file piece: not a multiple of the chunk */
#define D_ALLOC (D_PIECE + 3096)       /* ... padded: the rest must read as zeros */
#define D_MEM 4096                     /* then a piece from host memory */
#define D_SLOT (D_ALLOC + D_MEM)
#define D_CHUNK (4u << 20)             /* 7 chunks a piece: each staging buffer reused within it */

static uint32_t word_at(uint64_t off) { return (uint32_t)(off / 4) * 2654435761u ^ 0x5bd1e995u; }

typedef struct { gs_copy *c; char *slots; gs_piece piece[D_LAYERS][2]; } dbench;

static int d_issue(void *ctx, int s, int l) {
    dbench *b = ctx;
    return gs_copy_issue(b->c, s, b->slots + (size_t)s * D_SLOT, b->piece[l], 2);
}
static int d_done(void *ctx, int s) { int d, rc = gs_copy_done(((dbench *)ctx)->c, s, &d); return rc ? rc : d; }
static int d_wait(void *ctx, int s) { return gs_copy_wait(((dbench *)ctx)->c, s); }
static int d_drain(void *ctx) { return gs_copy_drain(((dbench *)ctx)->c); }

static char *write_scratch(const char *path, size_t n) {
    uint32_t *w = malloc(n);
    for (size_t k = 0; k < n / 4; k++) w[k] = word_at(4 * k);
    FILE *fp = fopen(path, "wb");
    /* written back (fsync): dirty pages would survive the cache drops below */
    int ok = fp && fwrite(w, 1, n, fp) == n && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    if (fp) fclose(fp);
    if (!ok) { printf("FAIL writing %s\n", path); exit(1); }
    return (char *)w;
}

static void disk_tier_staged(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/gs_cuda_check_disk.bin", dir);
    size_t fsize = (size_t)D_LAYERS * D_PIECE;
    char *bytes = write_scratch(path, fsize);
    struct stat st;
    stat(path, &st);
    gs_file *f = NULL;
    CHECK("open the scratch file", gs_file_open(path, st.st_size, (int64_t)st.st_mtim.tv_sec * 1000000000LL
                                                + st.st_mtim.tv_nsec, &f) == GS_OK);
    if (!f) return;
    static char mem[D_LAYERS][D_MEM];
    dbench b;
    for (int l = 0; l < D_LAYERS; l++) {
        memset(mem[l], 'a' + l, D_MEM);
        b.piece[l][0] = (gs_piece){ NULL, D_PIECE, D_ALLOC, 0, f, (uint64_t)l * D_PIECE };
        b.piece[l][1] = (gs_piece){ mem[l], D_MEM, D_MEM, D_ALLOC, NULL, 0 };
    }
    gs_copy *plain;
    if (gs_copy_create_cuda(0, 1, &plain) == GS_OK) {
        char *d = dev_alloc(D_SLOT, 0);
        CHECK("the plain CUDA engine refuses file pieces", gs_copy_issue(plain, 0, d, b.piece[0], 2) == GS_E_INVALID);
        gs_copy_destroy(plain);
        Free(d);
    }
    /* two staging buffers for three readers: reads wait for buffers, not only for uploads */
    CHECK("create the staged CUDA engine", gs_copy_create_cuda_staged(0, D_SLOTS, D_CHUNK, 2, 3, &b.c) == GS_OK);
    if (!b.c) { gs_file_close(f); return; }
    b.slots = dev_alloc((size_t)D_SLOTS * D_SLOT, 0xAA);
    gs_counters ctr = { 0 };
    gs_ring_config cfg = { D_LAYERS, D_SLOTS, 1, NULL, &ctr, { &b, d_issue, d_done, d_wait, d_drain, NULL } };
    gs_ring *r;
    int order[D_LAYERS] = { 0, 1, 2, 3, 4 }, right = 1, rc = GS_OK;
    CHECK("create the ring", gs_ring_create(&cfg, &r) == GS_OK && gs_ring_set_order(r, 0, order, D_LAYERS) == GS_OK);
    rc |= gs_ring_prefetch_first(r, 0);
    char *got = malloc(D_SLOT), *want = malloc(D_SLOT);
    for (int ev = 0; ev < 3; ev++) {
        for (int l = 0; l < D_LAYERS; l++) {
            int slot;
            rc |= gs_ring_adopt(r, 0, l);
            rc |= gs_ring_get_adopted(r, l, &slot);
            readback(got, b.slots + (size_t)slot * D_SLOT, D_SLOT);
            memcpy(want, bytes + (size_t)l * D_PIECE, D_PIECE);
            memset(want + D_PIECE, 0, D_ALLOC - D_PIECE);
            memcpy(want + D_ALLOC, mem[l], D_MEM);
            right &= memcmp(got, want, D_SLOT) == 0;
            rc |= gs_ring_release(r, 0, l);
        }
    }
    CHECK("3 evaluations of 5 disk-tier layers through 2 slots", rc == GS_OK);
    CHECK("every adopted slot held its layer's file bytes, zeroed padding and memory piece", right);
    printf("     adopted ready %llu, waited %llu, sync %llu, uploads %llu, wait %.1f ms\n",
           (unsigned long long)ctr.adopted_ready, (unsigned long long)ctr.adopted_waited,
           (unsigned long long)ctr.sync_fallbacks, (unsigned long long)ctr.uploads, ctr.wait_seconds * 1e3);
    double t0 = now_s();               /* the staged rate with the file in the page cache */
    for (int k = 0; k < 4 * D_LAYERS; k++) rc |= d_issue(&b, k % D_SLOTS, k % D_LAYERS);
    rc |= gs_copy_drain(b.c);
    double dt = now_s() - t0;
    CHECK("20 staged layer copies and a drain", rc == GS_OK);
    printf("     page cache -> pinned staging -> GPU: %.2f GB/s (%u MiB chunks)\n",
           4.0 * D_LAYERS * D_PIECE / dt / 1e9, D_CHUNK >> 20);
    gs_ring_destroy(r);
    gs_copy_destroy(b.c);
    /* the file's pages dropped first: the device's rate through the engine, one reader and
     * GS_DISK_READERS in parallel, O_DIRECT (where allowed) and buffered; each layer read once */
    int readers[2] = { 1, GS_DISK_READERS };
    for (int i = 0; i < 2; i++) {
        b.c = NULL;
        if (gs_copy_create_cuda_staged(0, D_SLOTS, D_CHUNK, readers[i] + GS_STAGING_SPARE, readers[i], &b.c)) {
            CHECK("a staged engine with more readers", 0);
            break;
        }
        for (int direct = 1; direct >= 0; direct--) {
            int active = 0, fd = open(path, O_RDONLY);
            gs_file_set_direct(f, direct, &active);
            if (direct && !active) { printf("     O_DIRECT refused on %s\n", dir); close(fd); continue; }
            posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
            close(fd);
            t0 = now_s();
            for (int l = 0; l < D_LAYERS; l++) rc |= d_issue(&b, l % D_SLOTS, l);
            rc |= gs_copy_drain(b.c);
            dt = now_s() - t0;
            right = 1;
            for (int l = D_LAYERS - D_SLOTS; l < D_LAYERS; l++) {   /* the last copies, one a slot */
                readback(got, b.slots + (size_t)(l % D_SLOTS) * D_SLOT, D_SLOT);
                right &= memcmp(got, bytes + (size_t)l * D_PIECE, D_PIECE) == 0
                         && memcmp(got + D_ALLOC, mem[l], D_MEM) == 0;
            }
            char what[160];
            snprintf(what, sizeof what, "%s reads by %d reader(s), cache dropped: the right bytes",
                     direct ? "O_DIRECT" : "buffered", readers[i]);
            CHECK(what, rc == GS_OK && right);
            printf("     disk -> %s -> pinned staging -> GPU, %d reader(s): %.2f GB/s\n",
                   direct ? "O_DIRECT" : "page cache", readers[i], (double)D_LAYERS * D_PIECE / dt / 1e9);
        }
        if (i == 0) gs_copy_destroy(b.c);
    }
    if (!b.c) { gs_file_close(f); Free(b.slots); free(got); free(want); free(bytes); unlink(path); return; }
    /* a file changed underneath: the read fails, the engine stays failed, nothing hangs */
    CHECK("truncate the file", truncate(path, fsize / 2) == 0);
    int done = -1;
    CHECK("issue after the truncation (queued)", gs_copy_issue(b.c, 0, b.slots, b.piece[D_LAYERS - 1], 2) == GS_OK);
    CHECK("its wait fails with GS_E_IO", gs_copy_wait(b.c, 0) == GS_E_IO);
    CHECK("naming the change", strstr(gs_last_error(), "changed while the model was loaded") != NULL);
    CHECK("and the engine stays failed", gs_copy_done(b.c, 1, &done) == GS_E_IO && gs_copy_drain(b.c) == GS_E_IO);
    gs_copy_destroy(b.c);
    gs_file_close(f);
    /* destroyed with copies in flight: the readers finish, staging is freed after the stream drains */
    free(write_scratch(path, fsize));
    stat(path, &st);
    f = NULL;
    gs_file_open(path, st.st_size, (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec, &f);
    CHECK("a second staged engine", f && gs_copy_create_cuda_staged(0, D_SLOTS, D_CHUNK, 3, GS_DISK_READERS, &b.c) == GS_OK);
    if (b.c) {
        for (int l = 0; l < D_LAYERS; l++) rc |= d_issue(&b, l % D_SLOTS, l);
        gs_copy_destroy(b.c);
        CHECK("destroyed with 5 copies in flight", rc == GS_OK);
    }
    gs_file_close(f);
    Free(b.slots);
    free(got); free(want); free(bytes);
    unlink(path);
}

int main(int argc, char **argv) {
    const char *cudart = argc > 1 ? argv[1] : "libcudart.so";
    if (load_cudart(cudart) != GS_OK) { printf("FAIL %s\n", gs_last_error()); return 1; }
    void *h = dlopen(cudart, RTLD_NOW | RTLD_NOLOAD);
    Malloc = dlsym(h, "cudaMalloc");
    Free = dlsym(h, "cudaFree");
    Memcpy = dlsym(h, "cudaMemcpy");
    Memset = dlsym(h, "cudaMemset");
    copy_engine_alone();
    ring_on_cuda();
    disk_tier_staged(argc > 2 ? argv[2] : "/tmp");
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures != 0;
}
