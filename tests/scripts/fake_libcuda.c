/* A stand-in for libcuda.so.1: the CUDA driver API calls scripts/cuda_alloc.py makes.
 *
 * The GPUs are the UUIDs in $FAKE_GPUS (comma-separated, as the fake pynvml lists them).
 * CUDA_VISIBLE_DEVICES is honoured as the driver does: entries are indices or UUIDs (a unique
 * prefix will do), the list stops at the first entry that names no GPU, and nothing visible
 * makes cuInit fail with CUDA_ERROR_NO_DEVICE. $FAKE_CUDA_IGNORE_VISIBLE=1 breaks that on
 * purpose (everything lands on GPU 0), so the check's failure path can be tested.
 *
 * Memory is not really allocated: each context (FAKE_CTX_BYTES) and allocation is appended to
 * $FAKE_CUDA_LEDGER as "pid uuid bytes" (negative when freed), which the fake pynvml reads as
 * the GPU's compute processes. Every call is appended to $FAKE_CUDA_LOG.
 *
 * Built by the tests: cc -shared -fPIC [-DFAKE_NO_V2] -o libcuda.so fake_libcuda.c
 * (-DFAKE_NO_V2 exports only the plain symbols, as an old driver would).
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_GPUS 16
#define FAKE_CTX_BYTES (300ULL * 1024 * 1024)

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;

static char all_gpus[MAX_GPUS][64];
static int n_all;
static int visible[MAX_GPUS]; /* indices into all_gpus */
static int n_visible;
static int initialised;
static int current = -1; /* the device of the current context */
static size_t allocated;

static void logf_(const char *fmt, ...) {
    const char *path = getenv("FAKE_CUDA_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static void ledger(int dev, long long bytes) {
    const char *path = getenv("FAKE_CUDA_LEDGER");
    if (!path || dev < 0) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "%d %s %lld\n", (int)getpid(), all_gpus[visible[dev]], bytes);
    fclose(f);
}

static void split(const char *text, char out[][64], int *n) {
    *n = 0;
    if (!text) return;
    const char *p = text;
    while (*p && *n < MAX_GPUS) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len > 63) len = 63;
        memcpy(out[*n], p, len);
        out[*n][len] = 0;
        (*n)++;
        if (!end) break;
        p = end + 1;
    }
}

static int find(const char *entry) {
    char *end;
    long index = strtol(entry, &end, 10);
    if (*entry && *end == 0) return (index >= 0 && index < n_all) ? (int)index : -1;
    int found = -1;
    for (int i = 0; i < n_all; i++) {
        if (strncmp(all_gpus[i], entry, strlen(entry)) == 0) {
            if (found >= 0) return -1; /* ambiguous prefix */
            found = i;
        }
    }
    return found;
}

CUresult cuInit(unsigned int flags) {
    logf_("cuInit %u", flags);
    split(getenv("FAKE_GPUS"), all_gpus, &n_all);
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    const char *ignore = getenv("FAKE_CUDA_IGNORE_VISIBLE");
    n_visible = 0;
    if (!cvd || (ignore && strcmp(ignore, "1") == 0)) {
        for (int i = 0; i < n_all; i++) visible[n_visible++] = i;
    } else {
        char entries[MAX_GPUS][64];
        int n;
        split(cvd, entries, &n);
        for (int i = 0; i < n; i++) {
            int g = find(entries[i]);
            if (g < 0) break;
            visible[n_visible++] = g;
        }
    }
    if (n_visible == 0) return 100; /* CUDA_ERROR_NO_DEVICE */
    initialised = 1;
    return 0;
}

CUresult cuDriverGetVersion(int *version) {
    *version = 12040;
    return 0;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case 0: *name = "CUDA_SUCCESS"; return 0;
    case 3: *name = "CUDA_ERROR_NOT_INITIALIZED"; return 0;
    case 100: *name = "CUDA_ERROR_NO_DEVICE"; return 0;
    case 101: *name = "CUDA_ERROR_INVALID_DEVICE"; return 0;
    case 201: *name = "CUDA_ERROR_INVALID_CONTEXT"; return 0;
    default: return 1;
    }
}

CUresult cuDeviceGetCount(int *count) {
    logf_("cuDeviceGetCount");
    if (!initialised) return 3;
    *count = n_visible;
    return 0;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    logf_("cuDeviceGet %d", ordinal);
    if (!initialised) return 3;
    if (ordinal < 0 || ordinal >= n_visible) return 101;
    *device = ordinal;
    return 0;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (!initialised) return 3;
    if (dev < 0 || dev >= n_visible) return 101;
    snprintf(name, (size_t)len, "Fake GPU %d", visible[dev]);
    return 0;
}

static CUresult get_uuid(unsigned char *out, CUdevice dev) {
    if (!initialised) return 3;
    if (dev < 0 || dev >= n_visible) return 101;
    const char *u = all_gpus[visible[dev]];
    if (strncmp(u, "GPU-", 4) == 0) u += 4;
    int k = 0;
    for (const char *p = u; *p && k < 16; p++) {
        if (*p == '-') continue;
        if (!p[1]) break;
        unsigned int byte;
        if (sscanf(p, "%2x", &byte) != 1) return 1;
        out[k++] = (unsigned char)byte;
        p++;
    }
    return k == 16 ? 0 : 1;
}

static CUresult ctx_create(const char *symbol, CUcontext *ctx, unsigned int flags, CUdevice dev) {
    logf_("%s flags=%u dev=%d", symbol, flags, dev);
    if (!initialised) return 3;
    if (dev < 0 || dev >= n_visible) return 101;
    current = dev;
    *ctx = (CUcontext)(uintptr_t)(0x1000 + dev);
    ledger(dev, (long long)FAKE_CTX_BYTES);
    return 0;
}

static CUresult ctx_destroy(const char *symbol, CUcontext ctx) {
    logf_("%s", symbol);
    if (current < 0 || ctx != (CUcontext)(uintptr_t)(0x1000 + current)) return 201;
    ledger(current, -(long long)FAKE_CTX_BYTES);
    current = -1;
    return 0;
}

static CUresult mem_alloc(const char *symbol, CUdeviceptr *ptr, size_t bytes) {
    logf_("%s %zu", symbol, bytes);
    if (current < 0) return 201;
    *ptr = 0x7f0000000000ULL;
    allocated = bytes;
    ledger(current, (long long)bytes);
    return 0;
}

static CUresult mem_free(const char *symbol, CUdeviceptr ptr) {
    logf_("%s", symbol);
    if (current < 0 || ptr != 0x7f0000000000ULL) return 1;
    ledger(current, -(long long)allocated);
    allocated = 0;
    return 0;
}

static CUresult memset_d8(const char *symbol, CUdeviceptr ptr, unsigned char value, size_t n) {
    logf_("%s %u %zu", symbol, (unsigned)value, n);
    if (current < 0) return 201;
    return (ptr == 0x7f0000000000ULL && n <= allocated) ? 0 : 1;
}

CUresult cuCtxSynchronize(void) {
    logf_("cuCtxSynchronize");
    return current < 0 ? 201 : 0;
}

#ifdef FAKE_NO_V2
CUresult cuDeviceGetUuid(unsigned char *out, CUdevice dev) { return get_uuid(out, dev); }
CUresult cuCtxCreate(CUcontext *c, unsigned int f, CUdevice d) {
    return ctx_create("cuCtxCreate", c, f, d);
}
CUresult cuCtxDestroy(CUcontext c) { return ctx_destroy("cuCtxDestroy", c); }
CUresult cuMemAlloc(CUdeviceptr *p, size_t n) { return mem_alloc("cuMemAlloc", p, n); }
CUresult cuMemFree(CUdeviceptr p) { return mem_free("cuMemFree", p); }
CUresult cuMemsetD8(CUdeviceptr p, unsigned char v, size_t n) {
    return memset_d8("cuMemsetD8", p, v, n);
}
#else
CUresult cuDeviceGetUuid_v2(unsigned char *out, CUdevice dev) { return get_uuid(out, dev); }
CUresult cuCtxCreate_v2(CUcontext *c, unsigned int f, CUdevice d) {
    return ctx_create("cuCtxCreate_v2", c, f, d);
}
CUresult cuCtxDestroy_v2(CUcontext c) { return ctx_destroy("cuCtxDestroy_v2", c); }
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return mem_alloc("cuMemAlloc_v2", p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { return mem_free("cuMemFree_v2", p); }
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    return memset_d8("cuMemsetD8_v2", p, v, n);
}
#endif
