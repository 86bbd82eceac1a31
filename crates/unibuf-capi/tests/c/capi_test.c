/*
 * capi_test.c: the C ABI of unibuf exercised from C11, on the CPU backend.
 *
 * Every area of the API, good paths and bad inputs. Good paths are checked against references
 * computed here, on fresh random data (the seed is printed; set UNIBUF_TEST_SEED to replay),
 * with odd sizes and outputs poisoned before they are written. Bad inputs must return their
 * status and a non-empty message, and never crash. Exits non-zero on any failure.
 *
 * Built and run by crates/unibuf-capi/ci.sh (also under valgrind).
 */
#include "unibuf.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int checks = 0;
static int failures = 0;

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        checks++;                                                                          \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, "\n");                                                         \
        }                                                                                  \
    } while (0)

/* A call that must succeed. */
#define OK(call)                                                                           \
    do {                                                                                   \
        ub_status s_ = (call);                                                             \
        checks++;                                                                          \
        if (s_ != UB_STATUS_OK) {                                                          \
            failures++;                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,      \
                    ub_status_name(s_), ub_last_error_message());                          \
        }                                                                                  \
    } while (0)

/* A call that must fail with `want`, a non-empty message containing `part` (NULL: any), and the
 * last-error status set to the same value. */
#define FAILS(call, want, part) expect_failure((call), (want), (part), #call, __LINE__)

static void expect_failure(ub_status got, ub_status want, const char *part, const char *what,
                           int line) {
    const char *m = ub_last_error_message();
    checks++;
    if (got != want || m == NULL || m[0] == '\0' || ub_last_error_status() != got ||
        (part != NULL && strstr(m, part) == NULL)) {
        failures++;
        fprintf(stderr, "FAIL %s:%d: %s -> %s (want %s%s%s): \"%s\"\n", __FILE__, line, what,
                ub_status_name(got), ub_status_name(want), part ? ", message with " : "",
                part ? part : "", m ? m : "(null)");
    }
}

/* ---- random data ---------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t next_u64(void) {
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static float next_f32(void) { /* uniform in [-2, 2) */
    return (float)((double)(next_u64() >> 40) / 16777216.0 * 4.0 - 2.0);
}

static void fill_random(void *p, size_t n) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)(next_u64() >> 56);
}

static void fill_f32(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = next_f32();
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        fprintf(stderr, "out of host memory\n");
        exit(2);
    }
    return p;
}

/* Poison: what an output holds before it is written (NaN as floats). */
static void poison(void *p, size_t n) { memset(p, 0xFF, n); }

static int close_to(float a, float b, float tol) {
    return fabsf(a - b) <= tol * (1.0f + fabsf(b));
}

static int all_close(const float *got, const float *want, size_t n, float tol, const char *what) {
    for (size_t i = 0; i < n; i++) {
        if (!close_to(got[i], want[i], tol)) {
            fprintf(stderr, "  %s[%zu]: got %.7g, want %.7g\n", what, i, (double)got[i],
                    (double)want[i]);
            return 0;
        }
    }
    return 1;
}

/* ---- helpers over the API --------------------------------------------------------------- */

static ub_buffer *alloc_buf(ub_device *dev, ub_dtype dt, const size_t *shape, size_t rank,
                            ub_storage_mode mode, const char *label) {
    ub_buffer *b = NULL;
    OK(ub_device_alloc(dev, dt, shape, rank, mode, label, &b));
    return b;
}

static ub_buffer *upload_f32(ub_device *dev, ub_queue *q, const float *v, const size_t *shape,
                             size_t rank, const char *label) {
    size_t n = 1;
    for (size_t i = 0; i < rank; i++) n *= shape[i];
    ub_buffer *b = alloc_buf(dev, UB_DTYPE_F32, shape, rank, UB_STORAGE_AUTO, label);
    OK(ub_queue_upload(q, b, v, n * sizeof(float)));
    return b;
}

static float *download_f32(ub_queue *q, ub_buffer *b, size_t n) {
    float *out = xmalloc(n * sizeof(float));
    poison(out, n * sizeof(float));
    OK(ub_queue_download(q, b, out, n * sizeof(float)));
    return out;
}

/* The release callback of wrapped memory: counts calls and frees the memory. */
static int released = 0;
static void release_free(void *user_data) {
    released++;
    free(user_data);
}
static void release_count(void *user_data) {
    (void)user_data;
    released++;
}

/* ---- the areas -------------------------------------------------------------------------- */

static void test_versions_and_statuses(void) {
    uint32_t v = ub_abi_version();
    CHECK(v >> 16 == UB_ABI_VERSION_MAJOR, "abi major %u", v >> 16);
    CHECK(strcmp(ub_status_name(UB_STATUS_OUT_OF_RANGE), "UB_STATUS_OUT_OF_RANGE") == 0, "name");
    CHECK(strcmp(ub_status_name(999), "UB_STATUS_<invalid>") == 0, "invalid name");
    CHECK(ub_dtype_size(UB_DTYPE_BF16) == 2 && ub_dtype_size(UB_DTYPE_U64) == 8, "sizes");
    CHECK(ub_dtype_size(77) == 0, "size of no dtype");
}

static void test_device(ub_device *dev) {
    ub_device_info info;
    memset(&info, 0xAB, sizeof info);
    OK(ub_device_get_info(dev, &info));
    CHECK(strcmp(info.backend, "cpu") == 0, "backend %s", info.backend);
    CHECK(info.unified_memory, "the CPU has unified memory");
    CHECK(info.page_size >= 4096 && (info.page_size & (info.page_size - 1)) == 0, "page %zu",
          info.page_size);
    CHECK(info.total_memory > 0 && info.max_buffer_len > 0, "memory sizes");

    size_t len = 0;
    OK(ub_device_name(dev, NULL, 0, &len));
    CHECK(len > 0, "name length %zu", len);
    char *name = xmalloc(len + 1);
    FAILS(ub_device_name(dev, name, len, &len), UB_STATUS_BUFFER_TOO_SMALL, "NUL");
    OK(ub_device_name(dev, name, len + 1, &len));
    CHECK(strlen(name) == len, "name %s", name);
    free(name);
    FAILS(ub_device_name(dev, NULL, 0, NULL), UB_STATUS_NULL_POINTER, "len_out");
    FAILS(ub_device_get_info(dev, NULL), UB_STATUS_NULL_POINTER, "info_out");

    ub_device *none = (ub_device *)0x1;
    FAILS(ub_device_open("no-such-backend", &none), UB_STATUS_BACKEND_UNAVAILABLE,
          "no-such-backend");
    CHECK(none == NULL, "the out-pointer is NULL on failure");
    FAILS(ub_device_open("cpu", NULL), UB_STATUS_NULL_POINTER, "dev_out");
    FAILS(ub_device_open_with(NULL, &none), UB_STATUS_NULL_POINTER, "options");

    /* A device with a memory cap: an allocation past it fails, retryably or not. */
    ub_device_options o;
    memset(&o, 0, sizeof o);
    o.backend = "cpu";
    o.memory_limit = 1 << 20;
    ub_device *small = NULL;
    OK(ub_device_open_with(&o, &small));
    size_t big[1] = {4 << 20};
    ub_buffer *b = NULL;
    ub_status s = ub_device_alloc(small, UB_DTYPE_U8, big, 1, UB_STORAGE_SHARED, "big", &b);
    CHECK(s == UB_STATUS_NEVER_FITS || s == UB_STATUS_BUDGET_EXCEEDED, "%s: %s",
          ub_status_name(s), ub_last_error_message());
    CHECK(b == NULL, "no buffer");
    OK(ub_device_drain(small));
    OK(ub_device_check_fault(small));
    OK(ub_device_release(small));
}

static void test_handles(ub_device *dev, ub_queue *q) {
    OK(ub_buffer_release(NULL));
    OK(ub_queue_release(NULL));
    OK(ub_device_release(NULL));
    OK(ub_mapping_release(NULL));
    OK(ub_download_release(NULL));
    OK(ub_weights_release(NULL));
    OK(ub_loaded_weights_release(NULL));
    OK(ub_host_signal_release(NULL));

    size_t shape[1] = {5};
    ub_buffer *b = alloc_buf(dev, UB_DTYPE_F32, shape, 1, UB_STORAGE_SHARED, "twice");
    OK(ub_buffer_release(b));
    FAILS(ub_buffer_release(b), UB_STATUS_INVALID_HANDLE, "already released");
    ub_buffer_info info;
    FAILS(ub_buffer_get_info(b, &info), UB_STATUS_INVALID_HANDLE, "generation");
    float x[5] = {0};
    FAILS(ub_queue_upload(q, b, x, sizeof x), UB_STATUS_INVALID_HANDLE, "dst");
    FAILS(ub_buffer_get_info(NULL, &info), UB_STATUS_NULL_POINTER, "buf");
    FAILS(ub_buffer_get_info((ub_buffer *)(void *)q, &info), UB_STATUS_INVALID_HANDLE,
          "is a ub_queue handle, not a ub_buffer handle");
    FAILS(ub_buffer_get_info((ub_buffer *)(uintptr_t)0x12345, &info), UB_STATUS_INVALID_HANDLE,
          NULL);
    FAILS(ub_queue_release((ub_queue *)(void *)dev), UB_STATUS_INVALID_HANDLE, "ub_device");
    FAILS(ub_device_drain(NULL), UB_STATUS_NULL_POINTER, "dev");
}

static const ub_storage_mode MODES[3] = {UB_STORAGE_SHARED, UB_STORAGE_PRIVATE,
                                         UB_STORAGE_AUTO};

static void test_alloc_and_views(ub_device *dev, ub_queue *q) {
    size_t shape[3] = {7, 3, 5};
    for (int m = 0; m < 3; m++) {
        ub_buffer *b = alloc_buf(dev, UB_DTYPE_F32, shape, 3, MODES[m], "alloc");
        ub_buffer_info info;
        OK(ub_buffer_get_info(b, &info));
        CHECK(info.dtype == UB_DTYPE_F32 && info.rank == 3 && info.len == 105 &&
                  info.byte_len == 420 && info.byte_offset == 0,
              "info of mode %u", MODES[m]);
        CHECK(info.mode == (MODES[m] == UB_STORAGE_AUTO ? UB_STORAGE_SHARED : MODES[m]),
              "mode %u resolved to %u", MODES[m], info.mode);
        CHECK(info.host_accessible == (info.mode != UB_STORAGE_PRIVATE), "host access");
        size_t dims[4] = {0}, rank = 0;
        OK(ub_buffer_shape(b, NULL, 0, &rank));
        CHECK(rank == 3, "rank %zu", rank);
        FAILS(ub_buffer_shape(b, dims, 2, &rank), UB_STATUS_BUFFER_TOO_SMALL, "3 dimensions");
        OK(ub_buffer_shape(b, dims, 4, &rank));
        CHECK(dims[0] == 7 && dims[1] == 3 && dims[2] == 5, "dims");
        char label[16];
        size_t len = 0;
        OK(ub_buffer_label(b, label, sizeof label, &len));
        CHECK(strcmp(label, "alloc") == 0 && len == 5, "label %s", label);

        /* Views: rows, slice, bytes, reshape, cast; each shares memory and reads back. */
        float v[105];
        fill_f32(v, 105);
        OK(ub_queue_upload(q, b, v, sizeof v));
        ub_buffer *rows = NULL, *sl = NULL, *bytes = NULL, *re = NULL, *cast = NULL;
        OK(ub_buffer_rows(b, 2, 5, &rows));
        OK(ub_buffer_slice(b, 17, 40, &sl));
        OK(ub_buffer_byte_view(b, 12, 20, &bytes));
        size_t flat[2] = {15, 7};
        OK(ub_buffer_reshape(b, flat, 2, &re));
        OK(ub_buffer_cast(b, UB_DTYPE_U16, &cast));
        bool shared = false;
        OK(ub_buffer_shares_memory(b, rows, &shared));
        CHECK(shared, "a view shares its memory");
        float got[45];
        poison(got, sizeof got);
        OK(ub_queue_download(q, rows, got, 45 * sizeof(float)));
        CHECK(memcmp(got, v + 30, 45 * sizeof(float)) == 0, "rows 2..5");
        poison(got, sizeof got);
        OK(ub_queue_download(q, sl, got, 23 * sizeof(float)));
        CHECK(memcmp(got, v + 17, 23 * sizeof(float)) == 0, "slice 17..40");
        unsigned char gb[20];
        poison(gb, sizeof gb);
        OK(ub_queue_download(q, bytes, gb, sizeof gb));
        CHECK(memcmp(gb, (unsigned char *)v + 12, 20) == 0, "bytes 12..32");
        OK(ub_buffer_get_info(cast, &info));
        CHECK(info.dtype == UB_DTYPE_U16 && info.len == 210, "cast len %zu", info.len);
        OK(ub_buffer_get_info(rows, &info));
        CHECK(info.byte_offset == 120, "rows offset %zu", info.byte_offset);

        ub_buffer *bad = (ub_buffer *)0x1;
        FAILS(ub_buffer_rows(b, 5, 8, &bad), UB_STATUS_OUT_OF_RANGE, "5..8");
        CHECK(bad == NULL, "NULL on failure");
        FAILS(ub_buffer_rows(b, 4, 2, &bad), UB_STATUS_OUT_OF_RANGE, NULL);
        FAILS(ub_buffer_slice(b, 100, 106, &bad), UB_STATUS_OUT_OF_RANGE, "length 105");
        FAILS(ub_buffer_byte_view(b, 401, 20, &bad), UB_STATUS_OUT_OF_RANGE, "401..421");
        FAILS(ub_buffer_byte_view(b, SIZE_MAX, 2, &bad), UB_STATUS_OUT_OF_RANGE, NULL);
        size_t wrong[2] = {4, 26};
        FAILS(ub_buffer_reshape(b, wrong, 2, &bad), UB_STATUS_SHAPE_MISMATCH, "105 elements");
        FAILS(ub_buffer_cast(b, UB_DTYPE_F64, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);
        FAILS(ub_buffer_cast(b, 42, &bad), UB_STATUS_INVALID_ARGUMENT, "42 is not a ub_dtype");
        FAILS(ub_buffer_rows(b, 0, 1, NULL), UB_STATUS_NULL_POINTER, "view_out");

        ub_buffer *views[5] = {rows, sl, bytes, re, cast};
        for (int i = 0; i < 5; i++) OK(ub_buffer_release(views[i]));
        OK(ub_buffer_release(b));
    }

    ub_buffer *bad = NULL;
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, shape, 3, UB_STORAGE_EXTERNAL, NULL, &bad),
          UB_STATUS_INVALID_ARGUMENT, "wrapped, not allocated");
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, shape, 3, 9, NULL, &bad),
          UB_STATUS_INVALID_ARGUMENT, "9 is not a ub_storage_mode");
    FAILS(ub_device_alloc(dev, 12, shape, 3, UB_STORAGE_SHARED, NULL, &bad),
          UB_STATUS_INVALID_ARGUMENT, "12 is not a ub_dtype");
    size_t huge[2] = {SIZE_MAX / 2, 3};
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, huge, 2, UB_STORAGE_SHARED, NULL, &bad),
          UB_STATUS_INVALID_ARGUMENT, "overflows");
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, NULL, 2, UB_STORAGE_SHARED, NULL, &bad),
          UB_STATUS_NULL_POINTER, "shape");
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, shape, 65, UB_STORAGE_SHARED, NULL, &bad),
          UB_STATUS_INVALID_ARGUMENT, "65 dimensions");
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, (const size_t *)((uintptr_t)shape + 1), 2,
                          UB_STORAGE_SHARED, NULL, &bad),
          UB_STATUS_MISALIGNED, "shape");
    FAILS(ub_device_alloc(dev, UB_DTYPE_F32, shape, 3, UB_STORAGE_SHARED, "\xff\xfe", &bad),
          UB_STATUS_INVALID_ARGUMENT, "not UTF-8");
    CHECK(bad == NULL, "no buffer on failure");
}

/* Upload, download, copy and fill across the storage modes, sync and async. */
static void test_transfers(ub_device *dev, ub_queue *q) {
    const size_t n = 1237; /* odd: not a multiple of any chunk or vector width */
    size_t shape[1] = {n};
    unsigned char *data = xmalloc(n), *back = xmalloc(n), *expect = xmalloc(n);
    ub_buffer *bufs[3];
    for (int m = 0; m < 3; m++) {
        bufs[m] = alloc_buf(dev, UB_DTYPE_U8, shape, 1, MODES[m], "xfer");
        fill_random(data, n);
        OK(ub_queue_upload(q, bufs[m], data, n));
        poison(back, n);
        OK(ub_queue_download(q, bufs[m], back, n));
        CHECK(memcmp(data, back, n) == 0, "sync round trip, mode %u", MODES[m]);

        /* Async upload: the source may be overwritten as soon as the call returns. */
        fill_random(data, n);
        memcpy(expect, data, n);
        ub_fence f;
        OK(ub_queue_upload_async(q, bufs[m], data, n, &f));
        fill_random(data, n); /* the source is reused at once */
        OK(ub_device_wait(dev, f));
        bool done = false;
        OK(ub_device_is_complete(dev, f, &done));
        CHECK(done, "complete after the wait");
        ub_download *dl = NULL;
        ub_fence df;
        OK(ub_queue_download_async(q, bufs[m], &dl, &df));
        poison(back, n);
        OK(ub_download_wait(dl, back, n));
        CHECK(memcmp(expect, back, n) == 0, "async round trip, mode %u", MODES[m]);
        FAILS(ub_download_wait(dl, back, n), UB_STATUS_INVALID_ARGUMENT, "already waited");
        OK(ub_download_release(dl));
        FAILS(ub_download_release(dl), UB_STATUS_INVALID_HANDLE, NULL);

        FAILS(ub_queue_upload(q, bufs[m], data, n - 1), UB_STATUS_SHAPE_MISMATCH,
              "1237 bytes");
        FAILS(ub_queue_download(q, bufs[m], back, n + 1), UB_STATUS_SHAPE_MISMATCH, "1238");
        FAILS(ub_queue_upload(q, bufs[m], NULL, n), UB_STATUS_NULL_POINTER, "src");
        FAILS(ub_queue_upload_async(q, bufs[m], data, n, NULL), UB_STATUS_NULL_POINTER,
              "fence_out");
    }

    /* Copies between every pair of modes, into a byte range at an odd offset. */
    for (int s = 0; s < 3; s++) {
        for (int d = 0; d < 3; d++) {
            fill_random(data, n);
            OK(ub_queue_upload(q, bufs[s], data, n));
            ub_buffer *src = NULL, *dst = NULL, *dst_all = NULL;
            size_t big[1] = {n + 9};
            dst_all = alloc_buf(dev, UB_DTYPE_U8, big, 1, MODES[d], "copy dst");
            unsigned char zero = 0;
            OK(ub_queue_fill(q, dst_all, &zero, 1));
            OK(ub_buffer_byte_view(bufs[s], 3, n - 3, &src));
            OK(ub_buffer_byte_view(dst_all, 7, n - 3, &dst));
            if ((s + d) % 2) {
                OK(ub_queue_copy(q, src, dst));
            } else {
                ub_fence f;
                OK(ub_queue_copy_async(q, src, dst, &f));
                OK(ub_queue_wait(q, f));
            }
            unsigned char *all = xmalloc(n + 9);
            poison(all, n + 9);
            OK(ub_queue_download(q, dst_all, all, n + 9));
            int ok = memcmp(all + 7, data + 3, n - 3) == 0;
            for (size_t i = 0; i < 7; i++) ok &= all[i] == 0;
            ok &= all[n + 4] == 0 && all[n + 8] == 0;
            CHECK(ok, "copy mode %u -> %u", MODES[s], MODES[d]);
            free(all);
            OK(ub_buffer_release(src));
            OK(ub_buffer_release(dst));
            OK(ub_buffer_release(dst_all));
        }
    }

    /* Fills: a float pattern, a 2-byte pattern, async; the bad widths and offsets. */
    size_t fshape[1] = {333};
    ub_buffer *fb = alloc_buf(dev, UB_DTYPE_F32, fshape, 1, UB_STORAGE_PRIVATE, "fill");
    float pat = next_f32();
    OK(ub_queue_fill(q, fb, &pat, sizeof pat));
    float *got = download_f32(q, fb, 333);
    int ok = 1;
    for (int i = 0; i < 333; i++) ok &= got[i] == pat;
    CHECK(ok, "fill with %g", (double)pat);
    free(got);
    uint16_t half_pat = (uint16_t)next_u64();
    ub_fence ff;
    OK(ub_queue_fill_async(q, fb, &half_pat, 2, &ff));
    OK(ub_device_wait(dev, ff));
    uint16_t hb[666];
    OK(ub_queue_download(q, fb, hb, sizeof hb));
    ok = 1;
    for (int i = 0; i < 666; i++) ok &= hb[i] == half_pat;
    CHECK(ok, "fill with 0x%04x", half_pat);
    FAILS(ub_queue_fill(q, fb, &pat, 3), UB_STATUS_INVALID_ARGUMENT, "3 bytes");
    FAILS(ub_queue_fill(q, fb, NULL, 4), UB_STATUS_NULL_POINTER, "pattern");
    ub_buffer *odd = NULL;
    OK(ub_buffer_byte_view(fb, 2, 8, &odd));
    FAILS(ub_queue_fill(q, odd, &pat, 4), UB_STATUS_MISALIGNED, "offset");
    OK(ub_buffer_release(odd));

    /* Copies that cannot be. */
    size_t s4[1] = {4};
    ub_buffer *f4 = alloc_buf(dev, UB_DTYPE_F32, s4, 1, UB_STORAGE_SHARED, "f4");
    ub_buffer *u4 = alloc_buf(dev, UB_DTYPE_U32, s4, 1, UB_STORAGE_SHARED, "u4");
    FAILS(ub_queue_copy(q, f4, u4), UB_STATUS_DTYPE_MISMATCH, "F32");
    FAILS(ub_queue_copy(q, f4, fb), UB_STATUS_SHAPE_MISMATCH, "333");
    ub_buffer *a = NULL, *b = NULL;
    OK(ub_buffer_slice(fb, 0, 10, &a));
    OK(ub_buffer_slice(fb, 5, 15, &b));
    FAILS(ub_queue_copy(q, a, b), UB_STATUS_INVALID_ARGUMENT, "overlap");
    OK(ub_buffer_release(a));
    OK(ub_buffer_release(b));
    OK(ub_buffer_release(f4));
    OK(ub_buffer_release(u4));
    OK(ub_buffer_release(fb));
    for (int m = 0; m < 3; m++) OK(ub_buffer_release(bufs[m]));
    free(data);
    free(back);
    free(expect);
}

/* Host mappings, and caller memory wrapped as External buffers. */
static void test_host_memory(ub_device *dev, ub_queue *q) {
    size_t shape[2] = {9, 13};
    const size_t n = 117;
    ub_buffer *b = alloc_buf(dev, UB_DTYPE_F32, shape, 2, UB_STORAGE_SHARED, "mapped");
    float v[117];
    fill_f32(v, n);
    OK(ub_queue_upload(q, b, v, sizeof v));
    ub_mapping *map = NULL;
    void *data = NULL;
    size_t len = 0;
    OK(ub_buffer_map(b, UB_MAP_READ, &map, &data, &len));
    CHECK(len == sizeof v && memcmp(data, v, len) == 0, "read mapping sees the upload");
    OK(ub_mapping_release(map));
    FAILS(ub_mapping_release(map), UB_STATUS_INVALID_HANDLE, "ub_mapping");

    OK(ub_buffer_map(b, UB_MAP_WRITE, &map, &data, &len));
    float w[117];
    fill_f32(w, n);
    memcpy(data, w, sizeof w);
    /* Device access to the bytes is refused while the write mapping lives: retryable. */
    FAILS(ub_queue_upload(q, b, v, sizeof v), UB_STATUS_HOST_ACCESS_CONFLICT, "mapped");
    CHECK(ub_last_error_retryable(), "a host access conflict is retryable");
    ub_mapping *second = NULL;
    FAILS(ub_buffer_map(b, UB_MAP_READ, &second, &data, &len), UB_STATUS_HOST_ACCESS_CONFLICT,
          NULL);
    OK(ub_mapping_release(map));
    float *got = download_f32(q, b, n);
    CHECK(memcmp(got, w, sizeof w) == 0, "writes through the mapping reach the buffer");
    free(got);
    FAILS(ub_buffer_map(b, 3, &map, &data, &len), UB_STATUS_INVALID_ARGUMENT,
          "3 is not a ub_map_access");
    FAILS(ub_buffer_map(b, UB_MAP_READ, &map, NULL, &len), UB_STATUS_NULL_POINTER, "data_out");

    ub_buffer *p = alloc_buf(dev, UB_DTYPE_F32, shape, 2, UB_STORAGE_PRIVATE, "private");
    FAILS(ub_buffer_map(p, UB_MAP_READ, &map, &data, &len), UB_STATUS_NOT_HOST_ACCESSIBLE,
          "Private");
    CHECK(!ub_last_error_retryable(), "not retryable");
    CHECK(map == NULL, "no mapping on failure");
    OK(ub_buffer_release(p));
    OK(ub_buffer_release(b));

    /* External: caller memory wrapped, read and written in place, released once. */
    ub_device_info info;
    OK(ub_device_get_info(dev, &info));
    const size_t bytes = 3 * info.page_size + 100;
    float *mem = aligned_alloc(info.page_size, 4 * info.page_size);
    CHECK(mem != NULL, "aligned_alloc");
    fill_f32(mem, bytes / 4);
    int before = released;
    size_t eshape[1] = {bytes / 4};
    ub_buffer *e = NULL;
    OK(ub_device_wrap_host(dev, "external", mem, bytes, true, UB_DTYPE_F32, eshape, 1,
                           release_free, mem, &e));
    ub_buffer_info ei;
    OK(ub_buffer_get_info(e, &ei));
    CHECK(ei.mode == UB_STORAGE_EXTERNAL && ei.writable && ei.host_accessible, "external info");
    OK(ub_buffer_map(e, UB_MAP_READ, &map, &data, &len));
    CHECK(data == (void *)mem && len == bytes, "zero copy: the mapping is the memory itself");
    OK(ub_mapping_release(map));
    float *inc = xmalloc(bytes);
    fill_f32(inc, bytes / 4);
    OK(ub_queue_upload(q, e, inc, bytes));
    CHECK(memcmp(mem, inc, bytes) == 0, "an upload writes the caller's memory");
    free(inc);
    CHECK(released == before, "not released while wrapped");
    OK(ub_buffer_release(e));
    OK(ub_device_drain(dev));
    CHECK(released == before + 1, "released once after the last view (%d)", released - before);

    /* Read-only External memory: mapping for writes and uploads are refused. */
    static float ro[1000];
    fill_f32(ro, 1000);
    size_t rshape[1] = {1000};
    OK(ub_device_wrap_host(dev, "read-only", ro, sizeof ro, false, UB_DTYPE_F32, rshape, 1,
                           release_count, NULL, &e));
    FAILS(ub_buffer_map(e, UB_MAP_WRITE, &map, &data, &len), UB_STATUS_READ_ONLY, "read-only");
    FAILS(ub_queue_upload(q, e, ro, sizeof ro), UB_STATUS_READ_ONLY, NULL);
    got = download_f32(q, e, 1000);
    CHECK(memcmp(got, ro, sizeof ro) == 0, "read-only memory reads back");
    free(got);
    OK(ub_buffer_release(e));
    OK(ub_device_drain(dev));

    /* Bad wraps: each still releases the memory, exactly once. */
    before = released;
    char *raw = xmalloc(64);
    size_t s4[1] = {4};
    FAILS(ub_device_wrap_host(dev, NULL, raw + 1, 32, true, UB_DTYPE_F32, s4, 1, release_free,
                              raw, &e),
          UB_STATUS_MISALIGNED, "address");
    size_t s20[1] = {20};
    FAILS(ub_device_wrap_host(dev, NULL, ro, 16, true, UB_DTYPE_F32, s20, 1, release_count,
                              NULL, &e),
          UB_STATUS_OUT_OF_RANGE, "80");
    FAILS(ub_device_wrap_host(dev, NULL, NULL, 16, true, UB_DTYPE_F32, s4, 1, release_count,
                              NULL, &e),
          UB_STATUS_NULL_POINTER, "data");
    FAILS(ub_device_wrap_host(NULL, NULL, ro, 16, true, UB_DTYPE_F32, s4, 1, release_count,
                              NULL, &e),
          UB_STATUS_NULL_POINTER, "dev");
    CHECK(released == before + 4, "each failed wrap released its memory (%d)",
          released - before);
    CHECK(e == NULL, "no buffer");
}

/* Queues and fences: a new queue, a host signal holding work back, forged fences. */
static void test_queues_and_fences(ub_device *dev, ub_queue *q) {
    ub_queue *q2 = NULL, *labelled = NULL;
    OK(ub_device_new_queue(dev, "second", &q2));
    OK(ub_device_queue(dev, "labelled", &labelled));
    ub_queue *unnamed = (ub_queue *)0x1;
    FAILS(ub_device_new_queue(dev, NULL, &unnamed), UB_STATUS_NULL_POINTER, "label");
    CHECK(unnamed == NULL, "NULL on failure");

    size_t shape[1] = {257};
    ub_buffer *b = alloc_buf(dev, UB_DTYPE_U32, shape, 1, UB_STORAGE_SHARED, "signal");
    ub_host_signal *sig = NULL;
    OK(ub_host_signal_create(&sig));
    ub_fence wf;
    OK(ub_queue_wait_host_signal(q2, sig, &wf));
    uint32_t seven = 7 + (uint32_t)(next_u64() % 1000);
    ub_fence ff;
    OK(ub_queue_fill_async(q2, b, &seven, 4, &ff));
    bool done = true;
    OK(ub_device_is_complete(dev, ff, &done));
    CHECK(!done, "the fill waits for the signal");
    OK(ub_host_signal_set(sig));
    OK(ub_queue_wait(labelled, ff));
    OK(ub_device_is_complete(dev, ff, &done));
    CHECK(done, "complete after the signal");
    ub_fence last;
    OK(ub_queue_last_fence(q2, &last));
    CHECK(last.queue == ff.queue && last.epoch == ff.epoch, "last fence");
    uint32_t got[257];
    OK(ub_queue_download(q, b, got, sizeof got));
    int ok = 1;
    for (int i = 0; i < 257; i++) ok &= got[i] == seven;
    CHECK(ok, "the second queue's fill, read on the first");
    OK(ub_host_signal_release(sig));

    ub_fence forged = ff;
    forged.epoch += 1000;
    FAILS(ub_device_wait(dev, forged), UB_STATUS_INVALID_ARGUMENT, "has submitted");
    FAILS(ub_device_is_complete(dev, forged, &done), UB_STATUS_INVALID_ARGUMENT, NULL);
    forged = ff;
    forged.queue = 99;
    FAILS(ub_device_wait(dev, forged), UB_STATUS_INVALID_ARGUMENT, "does not exist");
    ub_device *other = NULL;
    OK(ub_device_open("cpu", &other));
    FAILS(ub_device_wait(other, ff), UB_STATUS_WRONG_DEVICE, "device");
    ub_queue *oq = NULL;
    OK(ub_device_queue(other, NULL, &oq));
    FAILS(ub_queue_copy(oq, b, b), UB_STATUS_WRONG_DEVICE, NULL);
    OK(ub_queue_release(oq));
    OK(ub_device_release(other));
    ub_fence zero = {0};
    zero.device = ff.device;
    OK(ub_device_wait(dev, zero));

    OK(ub_buffer_release(b));
    OK(ub_queue_release(q2));
    OK(ub_queue_release(labelled));
}

/* External work: a C callback runs on the queue under the epochs. */
typedef struct {
    const float *src;
    float *dst;
    size_t n;
    int rc;
    int ran;
} scale_job;

static int32_t scale_by_three(void *user_data, const ub_native_encoder *enc) {
    scale_job *job = user_data;
    job->ran++;
    if (enc == NULL || enc->kind != UB_NATIVE_CPU) return 99;
    if (job->rc != 0) return job->rc;
    for (size_t i = 0; i < job->n; i++) job->dst[i] = 3.0f * job->src[i];
    return 0;
}

static void test_interop(ub_device *dev, ub_queue *q) {
    ub_native_device nd;
    OK(ub_device_native(dev, &nd));
    CHECK(nd.kind == UB_NATIVE_CPU && nd.handle == NULL, "native device");
    ub_native_queue nq;
    OK(ub_queue_native(q, &nq));
    CHECK(nq.kind == UB_NATIVE_CPU, "native queue");

    const size_t n = 301;
    size_t shape[1] = {n};
    float *src = xmalloc(n * 4);
    fill_f32(src, n);
    ub_buffer *x = upload_f32(dev, q, src, shape, 1, "ext x");
    ub_buffer *y = alloc_buf(dev, UB_DTYPE_F32, shape, 1, UB_STORAGE_SHARED, "ext y");
    ub_native_buffer nx, ny;
    OK(ub_buffer_native(x, &nx));
    OK(ub_buffer_native(y, &ny));
    ub_buffer_info xi;
    OK(ub_buffer_get_info(x, &xi));
    CHECK(nx.kind == UB_NATIVE_CPU && nx.bytes == n * 4 && (uint64_t)(uintptr_t)nx.handle ==
                                                               xi.device_address,
          "native buffer");
    scale_job job = {nx.handle, ny.handle, n, 0, 0};
    ub_buffer *reads[1] = {x}, *writes[1] = {y};
    int before = released;
    ub_fence f;
    OK(ub_queue_external(q, reads, 1, writes, 1, scale_by_three, &job, release_count, &f));
    OK(ub_device_wait(dev, f));
    float *got = download_f32(q, y, n);
    int ok = job.ran == 1;
    for (size_t i = 0; i < n; i++) ok &= got[i] == 3.0f * src[i];
    CHECK(ok, "external work wrote 3x (ran %d)", job.ran);
    CHECK(released == before + 1, "the context was released after the callback");
    free(got);

    /* A failing callback: the CPU queue faults, a wait reports it, reset clears it. */
    job.rc = 7;
    OK(ub_queue_external(q, reads, 1, writes, 1, scale_by_three, &job, NULL, &f));
    FAILS(ub_device_wait(dev, f), UB_STATUS_DEVICE_FAULT, "returned 7");
    FAILS(ub_device_check_fault(dev), UB_STATUS_DEVICE_FAULT, NULL);
    OK(ub_device_reset(dev));
    OK(ub_device_check_fault(dev));
    before = released;
    FAILS(ub_queue_external(q, reads, 1, writes, 1, NULL, &job, release_count, &f),
          UB_STATUS_NULL_POINTER, "callback");
    CHECK(released == before + 1, "released although the call failed");
    FAILS(ub_queue_external(q, reads, 1, reads, 1, scale_by_three, &job, NULL, &f),
          UB_STATUS_INVALID_ARGUMENT, "overlap");
    FAILS(ub_queue_external(q, NULL, 2, writes, 1, scale_by_three, &job, NULL, &f),
          UB_STATUS_NULL_POINTER, "reads");

    /* Foreign streams: a CUDA signal on the CPU backend is refused before it is touched. */
    int dummy = 0;
    FAILS(ub_queue_wait_foreign(q, UB_SIGNAL_CUDA_STREAM, &dummy, 0, NULL),
          UB_STATUS_UNSUPPORTED, NULL);
    FAILS(ub_queue_wait_foreign(q, UB_SIGNAL_CUDA_EVENT, NULL, 0, NULL),
          UB_STATUS_INVALID_ARGUMENT, "null");
    FAILS(ub_queue_wait_foreign(q, 0, &dummy, 0, NULL), UB_STATUS_INVALID_ARGUMENT,
          "ub_signal_kind");
    OK(ub_device_order_native(dev, f, UB_WAITER_HOST, NULL));
    FAILS(ub_device_order_native(dev, f, 5, NULL), UB_STATUS_INVALID_ARGUMENT,
          "ub_waiter_kind");

    /* Foreign host memory: wrapped, read in place, its owner released after the last use. */
    float *theirs = xmalloc(12 * 4);
    fill_f32(theirs, 12);
    ub_foreign_memory fm;
    memset(&fm, 0, sizeof fm);
    fm.kind = UB_FOREIGN_HOST;
    fm.handle = theirs;
    size_t fshape[2] = {3, 4};
    ub_buffer *fb = NULL;
    before = released;
    OK(ub_device_wrap_foreign(dev, "theirs", &fm, true, UB_DTYPE_F32, fshape, 2, release_free,
                              theirs, &fb));
    ub_buffer_info fi;
    OK(ub_buffer_get_info(fb, &fi));
    CHECK(fi.mode == UB_STORAGE_FOREIGN && !fi.writable, "foreign info");
    got = download_f32(q, fb, 12);
    CHECK(memcmp(got, theirs, 48) == 0, "foreign memory reads back");
    free(got);
    FAILS(ub_queue_upload(q, fb, src, 48), UB_STATUS_READ_ONLY, NULL);
    ub_memory_stats ms;
    OK(ub_device_memory_stats(dev, &ms));
    CHECK(ms.foreign_bytes == 48 && ms.foreign_count == 1, "foreign stats %zu",
          ms.foreign_bytes);
    OK(ub_buffer_release(fb));
    OK(ub_device_drain(dev));
    CHECK(released == before + 1, "the owner is released after the last view");
    fm.kind = 17;
    FAILS(ub_device_wrap_foreign(dev, NULL, &fm, true, UB_DTYPE_F32, fshape, 2, release_count,
                                 NULL, &fb),
          UB_STATUS_INVALID_ARGUMENT, "ub_foreign_kind");
    fm.kind = UB_FOREIGN_CUDA_DEVICE;
    fm.device_ptr = 0x10000;
    FAILS(ub_device_wrap_foreign(dev, NULL, &fm, true, UB_DTYPE_F32, fshape, 2, release_count,
                                 NULL, &fb),
          UB_STATUS_UNSUPPORTED, NULL);
    CHECK(released == before + 3, "failed wraps released their owners");

    free(src);
    OK(ub_buffer_release(x));
    OK(ub_buffer_release(y));
}

/* ---- ops against references computed here ---------------------------------------------- */

static void test_ops(ub_device *dev, ub_queue *q) {
    /* matmul: [m, k] @ [k, n], odd sizes. */
    const size_t m = 7, k = 13, n = 5;
    float *a = xmalloc(m * k * 4), *b = xmalloc(k * n * 4), *want = xmalloc(m * n * 4);
    fill_f32(a, m * k);
    fill_f32(b, k * n);
    for (size_t i = 0; i < m; i++)
        for (size_t j = 0; j < n; j++) {
            double s = 0;
            for (size_t p = 0; p < k; p++) s += (double)a[i * k + p] * b[p * n + j];
            want[i * n + j] = (float)s;
        }
    size_t sa[2] = {m, k}, sb[2] = {k, n}, so[2] = {m, n}, sbt[2] = {n, k};
    ub_buffer *A = upload_f32(dev, q, a, sa, 2, "A"), *B = upload_f32(dev, q, b, sb, 2, "B");
    ub_buffer *C = NULL;
    OK(ub_op_matmul(q, A, B, &C));
    float *got = download_f32(q, C, m * n);
    CHECK(all_close(got, want, m * n, 1e-5f, "matmul"), "matmul");
    free(got);
    /* matmul_bt with B transposed on the host, into a poisoned buffer. */
    float *bt = xmalloc(k * n * 4);
    for (size_t p = 0; p < k; p++)
        for (size_t j = 0; j < n; j++) bt[j * k + p] = b[p * n + j];
    ub_buffer *BT = upload_f32(dev, q, bt, sbt, 2, "BT");
    ub_buffer *C2 = alloc_buf(dev, UB_DTYPE_F32, so, 2, UB_STORAGE_PRIVATE, "C2");
    float *nan = xmalloc(m * n * 4);
    poison(nan, m * n * 4);
    OK(ub_queue_upload(q, C2, nan, m * n * 4));
    ub_fence f;
    OK(ub_op_matmul_bt_into(q, A, BT, C2, &f));
    OK(ub_device_wait(dev, f));
    got = download_f32(q, C2, m * n);
    CHECK(all_close(got, want, m * n, 1e-5f, "matmul_bt"), "matmul_bt");
    free(got);
    /* Wrong dtype and shape. */
    ub_buffer *H = alloc_buf(dev, UB_DTYPE_F16, sb, 2, UB_STORAGE_SHARED, "half");
    ub_buffer *bad = NULL;
    FAILS(ub_op_matmul(q, A, H, &bad), UB_STATUS_DTYPE_MISMATCH, "F16");
    FAILS(ub_op_matmul(q, A, A, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_op_matmul_into(q, A, B, A, NULL), UB_STATUS_SHAPE_MISMATCH, NULL);
    ub_buffer *U = alloc_buf(dev, UB_DTYPE_U32, sb, 2, UB_STORAGE_SHARED, "u32");
    ub_status s = ub_op_matmul(q, U, U, &bad);
    CHECK(s == UB_STATUS_INVALID_ARGUMENT || s == UB_STATUS_DTYPE_MISMATCH ||
              s == UB_STATUS_UNSUPPORTED,
          "matmul of u32: %s", ub_status_name(s));
    CHECK(ub_last_error_message()[0] != '\0', "with a message");
    FAILS(ub_op_matmul(q, A, B, NULL), UB_STATUS_NULL_POINTER, "out");
    CHECK(bad == NULL, "no output on failure");

    /* rms_norm over rows of 19. */
    const size_t rows = 3, hidden = 19;
    float x[57], w[19], rn[57];
    fill_f32(x, rows * hidden);
    fill_f32(w, hidden);
    const float eps = 1e-5f;
    for (size_t r = 0; r < rows; r++) {
        double ss = 0;
        for (size_t i = 0; i < hidden; i++) ss += (double)x[r * hidden + i] * x[r * hidden + i];
        double inv = 1.0 / sqrt(ss / hidden + eps);
        for (size_t i = 0; i < hidden; i++) rn[r * hidden + i] = (float)(x[r * hidden + i] * inv * w[i]);
    }
    size_t sx[2] = {rows, hidden}, sw[1] = {hidden};
    ub_buffer *X = upload_f32(dev, q, x, sx, 2, "x"), *W = upload_f32(dev, q, w, sw, 1, "w");
    ub_buffer *Y = NULL;
    OK(ub_op_rms_norm(q, X, W, eps, &Y));
    got = download_f32(q, Y, rows * hidden);
    CHECK(all_close(got, rn, rows * hidden, 1e-5f, "rms_norm"), "rms_norm");
    free(got);
    FAILS(ub_op_rms_norm(q, X, X, eps, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_op_rms_norm(q, X, W, -1.0f, &bad), UB_STATUS_INVALID_ARGUMENT, NULL);

    /* rms_norm_residual: sum = x + r, normed = rms_norm(sum). */
    float r[57], sum[57], nr[57];
    fill_f32(r, 57);
    for (size_t i = 0; i < 57; i++) sum[i] = x[i] + r[i];
    for (size_t row = 0; row < rows; row++) {
        double ss = 0;
        for (size_t i = 0; i < hidden; i++) ss += (double)sum[row * hidden + i] * sum[row * hidden + i];
        double inv = 1.0 / sqrt(ss / hidden + eps);
        for (size_t i = 0; i < hidden; i++) nr[row * hidden + i] = (float)(sum[row * hidden + i] * inv * w[i]);
    }
    ub_buffer *R = upload_f32(dev, q, r, sx, 2, "r");
    ub_buffer *N1 = alloc_buf(dev, UB_DTYPE_F32, sx, 2, UB_STORAGE_SHARED, "normed");
    ub_buffer *S1 = alloc_buf(dev, UB_DTYPE_F32, sx, 2, UB_STORAGE_SHARED, "sum");
    OK(ub_op_rms_norm_residual_into(q, X, R, W, eps, N1, S1, NULL));
    got = download_f32(q, S1, 57);
    CHECK(all_close(got, sum, 57, 1e-6f, "residual sum"), "residual sum");
    free(got);
    got = download_f32(q, N1, 57);
    CHECK(all_close(got, nr, 57, 1e-5f, "residual norm"), "residual norm");
    free(got);

    /* softmax and swiglu. */
    float sm[57], sg[57];
    for (size_t row = 0; row < rows; row++) {
        float mx = -INFINITY;
        for (size_t i = 0; i < hidden; i++) mx = fmaxf(mx, x[row * hidden + i]);
        double z = 0;
        for (size_t i = 0; i < hidden; i++) z += exp((double)x[row * hidden + i] - mx);
        for (size_t i = 0; i < hidden; i++) sm[row * hidden + i] = (float)(exp((double)x[row * hidden + i] - mx) / z);
    }
    for (size_t i = 0; i < 57; i++) sg[i] = (float)(x[i] / (1.0 + exp(-(double)x[i])) * r[i]);
    ub_buffer *SM = NULL, *SG = alloc_buf(dev, UB_DTYPE_F32, sx, 2, UB_STORAGE_PRIVATE, "sg");
    OK(ub_op_softmax(q, X, &SM));
    got = download_f32(q, SM, 57);
    CHECK(all_close(got, sm, 57, 1e-5f, "softmax"), "softmax");
    free(got);
    OK(ub_op_swiglu_into(q, X, R, SG, &f));
    got = download_f32(q, SG, 57);
    CHECK(all_close(got, sg, 57, 1e-5f, "swiglu"), "swiglu");
    free(got);
    FAILS(ub_op_swiglu(q, X, W, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_op_softmax_into(q, X, H, NULL), UB_STATUS_DTYPE_MISMATCH, NULL);

    /* rope (neox) of [tokens 3, heads 2, head_dim 6] at random positions. */
    const size_t T = 3, NH = 2, HD = 6;
    float xr[36], rr[36];
    uint32_t pos[3];
    fill_f32(xr, 36);
    for (size_t t = 0; t < T; t++) pos[t] = (uint32_t)(next_u64() % 500);
    const float base = 10000.0f;
    for (size_t t = 0; t < T; t++)
        for (size_t h = 0; h < NH; h++)
            for (size_t i = 0; i < HD / 2; i++) {
                const float *v = xr + (t * NH + h) * HD;
                float *o = rr + (t * NH + h) * HD;
                double inv = pow((double)base, -2.0 * (double)i / (double)HD);
                double ang = (double)pos[t] * inv;
                double c = cos(ang), sn = sin(ang);
                o[i] = (float)(v[i] * c - v[i + HD / 2] * sn);
                o[i + HD / 2] = (float)(v[i] * sn + v[i + HD / 2] * c);
            }
    size_t srx[3] = {T, NH, HD}, sp[1] = {T};
    ub_buffer *XR = upload_f32(dev, q, xr, srx, 3, "xr");
    ub_buffer *P = alloc_buf(dev, UB_DTYPE_U32, sp, 1, UB_STORAGE_SHARED, "pos");
    OK(ub_queue_upload(q, P, pos, sizeof pos));
    ub_buffer *RO = NULL;
    OK(ub_op_rope(q, XR, P, base, UB_ROPE_NEOX, &RO));
    got = download_f32(q, RO, 36);
    CHECK(all_close(got, rr, 36, 2e-3f, "rope"), "rope");
    free(got);
    FAILS(ub_op_rope(q, XR, P, base, 7, &bad), UB_STATUS_INVALID_ARGUMENT, "ub_rope_style");
    FAILS(ub_op_rope(q, XR, XR, base, UB_ROPE_NEOX, &bad), UB_STATUS_DTYPE_MISMATCH, NULL);

    /* embed_rows: rows of a [vocab 11, cols 7] table. */
    float table[77], emb[28];
    uint32_t ids[4];
    fill_f32(table, 77);
    for (int i = 0; i < 4; i++) {
        ids[i] = (uint32_t)(next_u64() % 11);
        memcpy(emb + i * 7, table + ids[i] * 7, 28);
    }
    size_t st[2] = {11, 7}, si[1] = {4};
    ub_buffer *TB = upload_f32(dev, q, table, st, 2, "table");
    ub_buffer *ID = alloc_buf(dev, UB_DTYPE_U32, si, 1, UB_STORAGE_PRIVATE, "ids");
    OK(ub_queue_upload(q, ID, ids, sizeof ids));
    ub_buffer *EM = NULL;
    OK(ub_op_embed_rows(q, TB, ID, UB_DTYPE_F32, &EM));
    got = download_f32(q, EM, 28);
    CHECK(memcmp(got, emb, sizeof emb) == 0, "embed_rows");
    free(got);
    FAILS(ub_op_embed_rows(q, TB, XR, UB_DTYPE_F32, &bad), UB_STATUS_DTYPE_MISMATCH, NULL);

    /* argmax and greedy sampling of [rows 3, vocab 19]; a bad temperature. */
    uint32_t amax[3];
    for (size_t row = 0; row < rows; row++) {
        uint32_t best = 0;
        for (uint32_t i = 1; i < hidden; i++)
            if (x[row * hidden + i] > x[row * hidden + best]) best = i;
        amax[row] = best;
    }
    ub_buffer *AM = NULL;
    OK(ub_op_argmax(q, X, &AM));
    uint32_t tok[3] = {~0u, ~0u, ~0u};
    OK(ub_queue_download(q, AM, tok, sizeof tok));
    CHECK(tok[0] == amax[0] && tok[1] == amax[1] && tok[2] == amax[2], "argmax %u %u %u",
          tok[0], tok[1], tok[2]);
    ub_sampling sp_ = {0.8f, 3, 0.9f, next_u64()};
    ub_buffer *TK = alloc_buf(dev, UB_DTYPE_U32, &rows, 1, UB_STORAGE_SHARED, "tokens");
    OK(ub_op_sample_into(q, X, &sp_, 17, TK, NULL));
    OK(ub_queue_download(q, TK, tok, sizeof tok));
    for (size_t row = 0; row < rows; row++) {
        /* The pick is among the top 3 of its row. */
        int better = 0;
        for (uint32_t i = 0; i < hidden; i++)
            better += x[row * hidden + i] > x[row * hidden + tok[row]];
        CHECK(tok[row] < hidden && better < 3, "sample row %zu: %u", row, tok[row]);
    }
    ub_sampling hot = {-1.0f, 0, 1.0f, 0};
    FAILS(ub_op_sample(q, X, &hot, 0, &bad), UB_STATUS_INVALID_ARGUMENT, "temperature");
    FAILS(ub_op_sample(q, X, NULL, 0, &bad), UB_STATUS_NULL_POINTER, "sampling");
    FAILS(ub_op_sample_into(q, X, &sp_, 0, X, NULL), UB_STATUS_DTYPE_MISMATCH, NULL);

    /* attention: 2 query heads over 1 kv head, head_dim 4, a cache of 5 positions. */
    const size_t AT = 2, AH = 2, KVH = 1, AD = 4, CAP = 5;
    float qv[16], kc[20], vc[20], att[16];
    fill_f32(qv, 16);
    fill_f32(kc, 20);
    fill_f32(vc, 20);
    uint32_t apos[2] = {2, 4};
    const float scale = 0.5f;
    for (size_t t = 0; t < AT; t++)
        for (size_t h = 0; h < AH; h++) {
            double sc[5], mx = -1e30, z = 0;
            for (size_t j = 0; j <= apos[t]; j++) {
                double d = 0;
                for (size_t i = 0; i < AD; i++) d += (double)qv[(t * AH + h) * AD + i] * kc[j * AD + i];
                sc[j] = d * scale;
                if (sc[j] > mx) mx = sc[j];
            }
            for (size_t j = 0; j <= apos[t]; j++) z += exp(sc[j] - mx);
            for (size_t i = 0; i < AD; i++) {
                double o = 0;
                for (size_t j = 0; j <= apos[t]; j++) o += exp(sc[j] - mx) / z * vc[j * AD + i];
                att[(t * AH + h) * AD + i] = (float)o;
            }
        }
    size_t sq[3] = {AT, AH, AD}, sc_[3] = {CAP, KVH, AD}, sap[1] = {AT};
    ub_buffer *Q = upload_f32(dev, q, qv, sq, 3, "q");
    ub_buffer *KC = upload_f32(dev, q, kc, sc_, 3, "k cache");
    ub_buffer *VC = upload_f32(dev, q, vc, sc_, 3, "v cache");
    ub_buffer *AP = alloc_buf(dev, UB_DTYPE_U32, sap, 1, UB_STORAGE_SHARED, "apos");
    OK(ub_queue_upload(q, AP, apos, sizeof apos));
    ub_buffer *AO = NULL;
    OK(ub_op_attention(q, Q, KC, VC, AP, scale, &AO));
    got = download_f32(q, AO, 16);
    CHECK(all_close(got, att, 16, 1e-4f, "attention"), "attention");
    free(got);
    FAILS(ub_op_attention(q, Q, KC, VC, AP, -1.0f, &bad), UB_STATUS_INVALID_ARGUMENT, "scale");
    FAILS(ub_op_attention(q, Q, Q, VC, AP, scale, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);

    /* rope_kv_append: the key rotated into the cache row of its position, the value copied. */
    float kv[8], vv[8];
    fill_f32(kv, 8);
    fill_f32(vv, 8);
    size_t skv[3] = {AT, KVH, AD};
    ub_buffer *K = upload_f32(dev, q, kv, skv, 3, "key"), *V = upload_f32(dev, q, vv, skv, 3, "value");
    ub_buffer *QO = alloc_buf(dev, UB_DTYPE_F32, sq, 3, UB_STORAGE_SHARED, "q rotated");
    OK(ub_op_rope_kv_append_into(q, Q, K, V, AP, base, UB_ROPE_NEOX, QO, KC, VC, &f));
    OK(ub_device_wait(dev, f));
    got = download_f32(q, VC, 20);
    CHECK(memcmp(got + 2 * AD, vv, 16) == 0 && memcmp(got + 4 * AD, vv + 4, 16) == 0 &&
              memcmp(got, vc, 8 * 4) == 0,
          "values appended at positions 2 and 4");
    free(got);

    ub_buffer *all[] = {A, B, C, BT, C2, H, U, X, W, Y, R, N1, S1, SM, SG, XR, P, RO, TB, ID,
                        EM, AM, TK, Q, KC, VC, AP, AO, K, V, QO};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) OK(ub_buffer_release(all[i]));
    free(a);
    free(b);
    free(bt);
    free(want);
    free(nan);
}

/* ---- GGUF block matrices: blocks made here from random bytes, decoded here by hand -------- */

/* Random f16 bits of a normal value of magnitude 2^-6 .. 2^1. */
static uint16_t f16_random(void) {
    uint16_t sign = (uint16_t)((next_u64() >> 63) << 15);
    uint16_t exp = (uint16_t)(9 + next_u64() % 7);
    return (uint16_t)(sign | (exp << 10) | (next_u64() & 0x3FF));
}

/* The value of little-endian f16 bits at p (normal or zero/subnormal). */
static double f16_at(const unsigned char *p) {
    unsigned h = (unsigned)p[0] | ((unsigned)p[1] << 8);
    int exp = (int)((h >> 10) & 0x1F);
    double mant = (double)(h & 0x3FF);
    double v = exp == 0 ? ldexp(mant, -24) : ldexp(1.0 + mant / 1024.0, exp - 15);
    return (h & 0x8000) ? -v : v;
}

static size_t block_bytes(ub_ggml_type t) {
    return t == UB_GGML_TYPE_Q8_0 ? 34 : t == UB_GGML_TYPE_Q4_0 ? 18 : 20;
}

static const char *format_name(ub_ggml_type t) {
    return t == UB_GGML_TYPE_Q8_0 ? "Q8_0" : t == UB_GGML_TYPE_Q4_0 ? "Q4_0" : "Q4_1";
}

/* Random blocks: random codes, valid f16 scales (and Q4_1 minimums). */
static void random_blocks(ub_ggml_type t, unsigned char *p, size_t nblocks) {
    size_t bb = block_bytes(t);
    fill_random(p, nblocks * bb);
    for (size_t k = 0; k < nblocks; k++) {
        unsigned char *b = p + k * bb;
        uint16_t d = f16_random();
        memcpy(b, &d, 2);
        if (t == UB_GGML_TYPE_Q4_1) {
            uint16_t m = f16_random();
            memcpy(b + 2, &m, 2);
        }
    }
}

/* The 32 weights of each block, in f64. */
static void dequantize_blocks(ub_ggml_type t, const unsigned char *p, size_t nblocks, double *w) {
    size_t bb = block_bytes(t);
    for (size_t k = 0; k < nblocks; k++, w += 32) {
        const unsigned char *b = p + k * bb;
        double d = f16_at(b);
        if (t == UB_GGML_TYPE_Q8_0) {
            for (int j = 0; j < 32; j++) w[j] = d * (double)(int8_t)b[2 + j];
        } else if (t == UB_GGML_TYPE_Q4_0) {
            /* d * (code - 8): a code of 8 is a zero with d's sign, as the format defines it. */
            for (int j = 0; j < 16; j++) {
                w[j] = d * (double)((int)(b[2 + j] & 15) - 8);
                w[j + 16] = d * (double)((int)(b[2 + j] >> 4) - 8);
            }
        } else {
            double m = f16_at(b + 2);
            for (int j = 0; j < 16; j++) {
                w[j] = d * (double)(b[4 + j] & 15) + m;
                w[j + 16] = d * (double)(b[4 + j] >> 4) + m;
            }
        }
    }
}

/* A matrix of random blocks, its bytes' buffer and its weights (row-major, f64). */
typedef struct {
    ub_ggml_matrix *m;
    ub_buffer *bytes;
    double *w;
    size_t rows, cols;
} matrix_t;

static matrix_t make_matrix(ub_device *dev, ub_queue *q, ub_ggml_type t, size_t rows,
                            size_t cols) {
    matrix_t mt = {NULL, NULL, NULL, rows, cols};
    size_t nblocks = rows * cols / 32, n = nblocks * block_bytes(t);
    unsigned char *raw = xmalloc(n);
    random_blocks(t, raw, nblocks);
    mt.w = xmalloc(rows * cols * sizeof(double));
    dequantize_blocks(t, raw, nblocks, mt.w);
    size_t shape[2] = {rows, cols / 32 * block_bytes(t)};
    mt.bytes = alloc_buf(dev, UB_DTYPE_U8, shape, 2, UB_STORAGE_AUTO, format_name(t));
    OK(ub_queue_upload(q, mt.bytes, raw, n));
    OK(ub_ggml_matrix_new(mt.bytes, t, rows, cols, &mt.m));
    free(raw);
    return mt;
}

static void free_matrix(matrix_t *mt) {
    OK(ub_ggml_matrix_release(mt->m));
    OK(ub_buffer_release(mt->bytes));
    free(mt->w);
}

/* y[b * rows + r] = sum_c w[r, c] x[b, c] in f64, with mag the sum of the magnitudes. */
static void products(const matrix_t *mt, const float *x, size_t batch, double *y, double *mag) {
    for (size_t b = 0; b < batch; b++)
        for (size_t r = 0; r < mt->rows; r++) {
            double s = 0, a = 0;
            for (size_t c = 0; c < mt->cols; c++) {
                double p = mt->w[r * mt->cols + c] * (double)x[b * mt->cols + c];
                s += p;
                a += fabs(p);
            }
            y[b * mt->rows + r] = s;
            mag[b * mt->rows + r] = a;
        }
}

/* Whether got[i] is want[i] within tol of (1 + mag[i]): an f32 sum's error bound. */
static int sums_close(const float *got, const double *want, const double *mag, size_t n,
                      double tol, const char *what) {
    for (size_t i = 0; i < n; i++) {
        if (!(fabs((double)got[i] - want[i]) <= tol * (1.0 + mag[i]))) {
            fprintf(stderr, "  %s[%zu]: got %.9g, want %.9g (magnitude %.3g)\n", what, i,
                    (double)got[i], want[i], mag[i]);
            return 0;
        }
    }
    return 1;
}

/* The RMS norm of each row of x (batch x cols) times weight, rounded to f32. */
static void rms_rows(const float *x, const float *weight, size_t batch, size_t cols, float eps,
                     float *out) {
    for (size_t b = 0; b < batch; b++) {
        double ss = 0;
        for (size_t c = 0; c < cols; c++) ss += (double)x[b * cols + c] * x[b * cols + c];
        double inv = 1.0 / sqrt(ss / (double)cols + eps);
        for (size_t c = 0; c < cols; c++)
            out[b * cols + c] = (float)((double)x[b * cols + c] * inv * weight[c]);
    }
}

static void test_ggml(ub_device *dev, ub_queue *q) {
    const ub_ggml_type formats[3] = {UB_GGML_TYPE_Q8_0, UB_GGML_TYPE_Q4_0, UB_GGML_TYPE_Q4_1};
    ub_buffer *bad = NULL;
    ub_fence f;

    /* Products, dense weights and embedding rows in each format: 5 rows of 160 (5 blocks),
     * a batch of 3. */
    const size_t rows = 5, cols = 160, batch = 3;
    float x[480];
    fill_f32(x, batch * cols);
    size_t sx[2] = {batch, cols}, sd[2] = {rows, cols};
    ub_buffer *X = upload_f32(dev, q, x, sx, 2, "x");
    for (int fi = 0; fi < 3; fi++) {
        ub_ggml_type t = formats[fi];
        matrix_t mt = make_matrix(dev, q, t, rows, cols);
        ub_ggml_matrix_info info;
        memset(&info, 0xEE, sizeof info);
        OK(ub_ggml_matrix_get_info(mt.m, &info));
        CHECK(info.ggml_type == t && info.rows == rows && info.cols == cols &&
                  info.row_bytes == cols / 32 * block_bytes(t),
              "%s info: type %u, %zu x %zu, %zu bytes a row", format_name(t), info.ggml_type,
              info.rows, info.cols, info.row_bytes);
        ub_buffer *view = NULL;
        OK(ub_ggml_matrix_bytes(mt.m, &view));
        ub_buffer_info bi;
        OK(ub_buffer_get_info(view, &bi));
        CHECK(bi.dtype == UB_DTYPE_U8 && bi.byte_len == rows * info.row_bytes, "bytes view");
        OK(ub_buffer_release(view));

        double want[15], mag[15];
        products(&mt, x, batch, want, mag);
        ub_buffer *Y = NULL;
        OK(ub_op_ggml_matvec(q, mt.m, X, &Y));
        float *got = download_f32(q, Y, batch * rows);
        CHECK(sums_close(got, want, mag, batch * rows, 1e-5, format_name(t)), "matvec %s",
              format_name(t));
        free(got);
        /* Into a poisoned buffer, one row of x ([cols]: a [rows] output). */
        ub_buffer *X1 = NULL, *Y1 = alloc_buf(dev, UB_DTYPE_F32, &rows, 1, UB_STORAGE_PRIVATE, "y1");
        float nan[5];
        poison(nan, sizeof nan);
        OK(ub_queue_upload(q, Y1, nan, sizeof nan));
        OK(ub_buffer_rows(X, 2, 3, &X1));
        ub_buffer *X1flat = NULL;
        OK(ub_buffer_reshape(X1, &cols, 1, &X1flat));
        OK(ub_op_ggml_matvec_into(q, mt.m, X1flat, Y1, &f));
        OK(ub_device_wait(dev, f));
        got = download_f32(q, Y1, rows);
        CHECK(sums_close(got, want + 2 * rows, mag + 2 * rows, rows, 1e-5, "matvec_into"),
              "matvec_into %s", format_name(t));
        free(got);

        /* Dense weights: exact in f32. */
        float *dense_want = xmalloc(rows * cols * 4);
        for (size_t i = 0; i < rows * cols; i++) dense_want[i] = (float)mt.w[i];
        ub_buffer *D = NULL;
        OK(ub_op_ggml_dequantize(q, mt.m, UB_DTYPE_F32, &D));
        got = download_f32(q, D, rows * cols);
        CHECK(memcmp(got, dense_want, rows * cols * 4) == 0, "dequantize %s", format_name(t));
        free(got);
        ub_buffer *D2 = alloc_buf(dev, UB_DTYPE_F32, sd, 2, UB_STORAGE_SHARED, "dense");
        OK(ub_op_ggml_dequantize_into(q, mt.m, D2, NULL));
        got = download_f32(q, D2, rows * cols);
        CHECK(memcmp(got, dense_want, rows * cols * 4) == 0, "dequantize_into %s",
              format_name(t));
        free(got);

        /* Embedding rows of the matrix as a table. */
        uint32_t ids[4];
        for (int i = 0; i < 4; i++) ids[i] = (uint32_t)(next_u64() % rows);
        size_t si = 4, se[2] = {4, cols};
        ub_buffer *ID = alloc_buf(dev, UB_DTYPE_U32, &si, 1, UB_STORAGE_AUTO, "ids");
        OK(ub_queue_upload(q, ID, ids, sizeof ids));
        ub_buffer *E = NULL;
        OK(ub_op_ggml_embed_rows(q, mt.m, ID, UB_DTYPE_F32, &E));
        got = download_f32(q, E, 4 * cols);
        int same = 1;
        for (int i = 0; i < 4; i++)
            same &= memcmp(got + i * cols, dense_want + ids[i] * cols, cols * 4) == 0;
        CHECK(same, "embed_rows %s", format_name(t));
        free(got);
        ub_buffer *E2 = alloc_buf(dev, UB_DTYPE_F32, se, 2, UB_STORAGE_PRIVATE, "embedded");
        OK(ub_op_ggml_embed_rows_into(q, mt.m, ID, E2, &f));
        got = download_f32(q, E2, 4 * cols);
        CHECK(memcmp(got + 3 * cols, dense_want + ids[3] * cols, cols * 4) == 0,
              "embed_rows_into %s", format_name(t));
        free(got);
        FAILS(ub_op_ggml_embed_rows(q, mt.m, X, UB_DTYPE_F32, &bad), UB_STATUS_DTYPE_MISMATCH,
              NULL);
        FAILS(ub_op_ggml_dequantize(q, mt.m, UB_DTYPE_U32, &bad), UB_STATUS_INVALID_ARGUMENT,
              NULL);
        FAILS(ub_op_ggml_dequantize_into(q, mt.m, Y, NULL), UB_STATUS_SHAPE_MISMATCH, NULL);

        ub_buffer *all[] = {Y, X1, X1flat, Y1, D, D2, ID, E, E2};
        for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) OK(ub_buffer_release(all[i]));
        free(dense_want);
        free_matrix(&mt);
        FAILS(ub_ggml_matrix_release(mt.m), UB_STATUS_INVALID_HANDLE, "already released");
    }

    /* matvec_norm: three matrices of three formats stacked, 96 cols, a batch of 2. */
    const size_t nc = 96, nbatch = 2, total = 3 + 5 + 2;
    const float eps = 1e-5f;
    matrix_t st[3] = {make_matrix(dev, q, UB_GGML_TYPE_Q8_0, 3, nc),
                      make_matrix(dev, q, UB_GGML_TYPE_Q4_1, 5, nc),
                      make_matrix(dev, q, UB_GGML_TYPE_Q4_0, 2, nc)};
    float xn[192], nw[96], normed[192];
    fill_f32(xn, nbatch * nc);
    fill_f32(nw, nc);
    rms_rows(xn, nw, nbatch, nc, eps, normed);
    double want[20], mag[20];
    for (size_t b = 0; b < nbatch; b++) {
        size_t at = b * total;
        for (int i = 0; i < 3; i++) {
            products(&st[i], normed + b * nc, 1, want + at, mag + at);
            at += st[i].rows;
        }
    }
    size_t sxn[2] = {nbatch, nc}, sout[2] = {nbatch, total};
    ub_buffer *XN = upload_f32(dev, q, xn, sxn, 2, "xn"), *NW = upload_f32(dev, q, nw, &nc, 1, "nw");
    ub_ggml_matrix *three[3] = {st[0].m, st[1].m, st[2].m};
    ub_buffer *YN = NULL;
    OK(ub_op_ggml_matvec_norm(q, three, 3, XN, NW, eps, &YN));
    float *got = download_f32(q, YN, nbatch * total);
    CHECK(sums_close(got, want, mag, nbatch * total, 1e-4, "matvec_norm"), "matvec_norm");
    free(got);
    ub_buffer *YN2 = alloc_buf(dev, UB_DTYPE_F32, sout, 2, UB_STORAGE_SHARED, "yn2");
    float poisoned[20];
    poison(poisoned, sizeof poisoned);
    OK(ub_queue_upload(q, YN2, poisoned, sizeof poisoned));
    OK(ub_op_ggml_matvec_norm_into(q, three, 3, XN, NW, eps, YN2, &f));
    OK(ub_device_wait(dev, f));
    got = download_f32(q, YN2, nbatch * total);
    CHECK(sums_close(got, want, mag, nbatch * total, 1e-4, "matvec_norm_into"),
          "matvec_norm_into");
    free(got);
    /* Bad inputs of the stacked product. */
    ub_ggml_matrix *four[4] = {st[0].m, st[1].m, st[2].m, st[0].m};
    FAILS(ub_op_ggml_matvec_norm(q, four, 4, XN, NW, eps, &bad), UB_STATUS_INVALID_ARGUMENT,
          "at most 3");
    FAILS(ub_op_ggml_matvec_norm(q, NULL, 0, XN, NW, eps, &bad), UB_STATUS_INVALID_ARGUMENT,
          "no matrix");
    FAILS(ub_op_ggml_matvec_norm(q, NULL, 2, XN, NW, eps, &bad), UB_STATUS_NULL_POINTER,
          "matrices");
    ub_ggml_matrix *wrong[2] = {st[0].m, (ub_ggml_matrix *)XN};
    FAILS(ub_op_ggml_matvec_norm(q, wrong, 2, XN, NW, eps, &bad), UB_STATUS_INVALID_HANDLE,
          "matrices[1]");
    FAILS(ub_op_ggml_matvec_norm(q, three, 3, XN, XN, eps, &bad), UB_STATUS_SHAPE_MISMATCH,
          NULL);
    FAILS(ub_op_ggml_matvec_norm(q, three, 3, XN, NW, NAN, &bad), UB_STATUS_INVALID_ARGUMENT,
          "eps");
    FAILS(ub_op_ggml_matvec_norm_into(q, three, 2, XN, NW, eps, YN2, NULL),
          UB_STATUS_SHAPE_MISMATCH, NULL);
    matrix_t wide = make_matrix(dev, q, UB_GGML_TYPE_Q8_0, 3, 128);
    ub_ggml_matrix *mixed[2] = {st[0].m, wide.m};
    FAILS(ub_op_ggml_matvec_norm(q, mixed, 2, XN, NW, eps, &bad), UB_STATUS_SHAPE_MISMATCH,
          "cols");
    FAILS(ub_op_ggml_matvec(q, wide.m, XN, &bad), UB_STATUS_SHAPE_MISMATCH, "[128]");
    FAILS(ub_op_ggml_matvec(q, (ub_ggml_matrix *)q, XN, &bad), UB_STATUS_INVALID_HANDLE,
          "ub_queue handle, not a ub_ggml_matrix");
    CHECK(bad == NULL, "no output on failure");

    /* matvec_add: y = residual + W x, into a poisoned buffer; the residual may not be y. */
    float res[10];
    fill_f32(res, 10);
    double pw[10], pm[10];
    products(&st[1], xn, nbatch, pw, pm);
    for (int i = 0; i < 10; i++) pw[i] += res[i], pm[i] += fabs(res[i]);
    size_t sres[2] = {nbatch, 5};
    ub_buffer *RES = upload_f32(dev, q, res, sres, 2, "residual");
    ub_buffer *YA = alloc_buf(dev, UB_DTYPE_F32, sres, 2, UB_STORAGE_PRIVATE, "ya");
    OK(ub_queue_upload(q, YA, poisoned, 40));
    OK(ub_op_ggml_matvec_add_into(q, st[1].m, XN, RES, YA, &f));
    got = download_f32(q, YA, 10);
    CHECK(sums_close(got, pw, pm, 10, 1e-5, "matvec_add_into"), "matvec_add_into");
    free(got);
    ub_buffer *YA2 = NULL;
    OK(ub_op_ggml_matvec_add(q, st[1].m, XN, RES, &YA2));
    got = download_f32(q, YA2, 10);
    CHECK(sums_close(got, pw, pm, 10, 1e-5, "matvec_add"), "matvec_add");
    free(got);
    FAILS(ub_op_ggml_matvec_add_into(q, st[1].m, XN, RES, RES, NULL), UB_STATUS_INVALID_ARGUMENT,
          "overlaps");
    FAILS(ub_op_ggml_matvec_add(q, st[1].m, XN, YN2, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_op_ggml_matvec_add(q, st[1].m, X, RES, &bad), UB_STATUS_SHAPE_MISMATCH, NULL);

    /* swiglu_norm: gate Q4_0 and up Q8_0 of 7 rows of 96. */
    matrix_t gate = make_matrix(dev, q, UB_GGML_TYPE_Q4_0, 7, nc);
    matrix_t up = make_matrix(dev, q, UB_GGML_TYPE_Q8_0, 7, nc);
    double g[14], gm[14], u[14], um[14], sw[14], swm[14];
    products(&gate, normed, nbatch, g, gm);
    for (size_t b = 0; b < nbatch; b++) products(&up, normed + b * nc, 1, u + b * 7, um + b * 7);
    for (int i = 0; i < 14; i++) {
        double s = g[i] / (1.0 + exp(-g[i]));
        sw[i] = s * u[i];
        /* The error of each product, carried through silu (slope at most 1.1) and the
         * multiplication. */
        swm[i] = 1.1 * gm[i] * fabs(u[i]) + fabs(s) * um[i];
    }
    size_t ssw[2] = {nbatch, 7};
    ub_buffer *SW = alloc_buf(dev, UB_DTYPE_F32, ssw, 2, UB_STORAGE_SHARED, "swiglu");
    OK(ub_queue_upload(q, SW, poisoned, 56));
    OK(ub_op_ggml_swiglu_norm_into(q, gate.m, up.m, XN, NW, eps, SW, NULL));
    got = download_f32(q, SW, 14);
    CHECK(sums_close(got, sw, swm, 14, 1e-4, "swiglu_norm_into"), "swiglu_norm_into");
    free(got);
    ub_buffer *SW2 = NULL;
    OK(ub_op_ggml_swiglu_norm(q, gate.m, up.m, XN, NW, eps, &SW2));
    got = download_f32(q, SW2, 14);
    CHECK(sums_close(got, sw, swm, 14, 1e-4, "swiglu_norm"), "swiglu_norm");
    free(got);
    FAILS(ub_op_ggml_swiglu_norm(q, gate.m, st[1].m, XN, NW, eps, &bad), UB_STATUS_SHAPE_MISMATCH,
          "as the gate");
    FAILS(ub_op_ggml_swiglu_norm(q, gate.m, up.m, XN, NW, -1.0f, &bad), UB_STATUS_INVALID_ARGUMENT,
          "eps");

    /* qkv_rope_append: 2 tokens at positions 1 and 4 of a cache of 6; 2 query heads over 1 kv
     * head of head_dim 8 (Neox pairs); caches poisoned, so untouched rows stay NaN. */
    const size_t HD = 8, H = 2, KVH = 1, CAP = 6, TOK = 2;
    const float theta = 10000.0f;
    matrix_t wq = make_matrix(dev, q, UB_GGML_TYPE_Q4_1, H * HD, nc);
    matrix_t wk = make_matrix(dev, q, UB_GGML_TYPE_Q8_0, KVH * HD, nc);
    matrix_t wv = make_matrix(dev, q, UB_GGML_TYPE_Q4_0, KVH * HD, nc);
    uint32_t qpos[2] = {1, 4};
    double qp[32], qm[32], kp[16], km[16], vp[16], vm[16];
    for (size_t t = 0; t < TOK; t++) {
        products(&wq, normed + t * nc, 1, qp + t * 16, qm + t * 16);
        products(&wk, normed + t * nc, 1, kp + t * 8, km + t * 8);
        products(&wv, normed + t * nc, 1, vp + t * 8, vm + t * 8);
    }
    /* RoPE (Neox) in place on heads of HD, with the magnitudes of both halves. */
    double qr[32], qrm[32], kr[16], krm[16];
    for (int which = 0; which < 2; which++) {
        const double *src = which ? kp : qp, *srcm = which ? km : qm;
        double *dst = which ? kr : qr, *dstm = which ? krm : qrm;
        size_t heads = which ? KVH : H;
        for (size_t t = 0; t < TOK; t++)
            for (size_t h = 0; h < heads; h++)
                for (size_t i = 0; i < HD / 2; i++) {
                    size_t a = (t * heads + h) * HD + i, b = a + HD / 2;
                    double ang = (double)qpos[t] * pow((double)theta, -2.0 * (double)i / (double)HD);
                    double c = cos(ang), sn = sin(ang);
                    dst[a] = src[a] * c - src[b] * sn;
                    dst[b] = src[a] * sn + src[b] * c;
                    dstm[a] = dstm[b] = srcm[a] + srcm[b];
                }
    }
    size_t sqo[3] = {TOK, H, HD}, scache[3] = {CAP, KVH, HD}, spos = TOK;
    ub_buffer *QO = alloc_buf(dev, UB_DTYPE_F32, sqo, 3, UB_STORAGE_SHARED, "q_out");
    ub_buffer *KC = alloc_buf(dev, UB_DTYPE_F32, scache, 3, UB_STORAGE_PRIVATE, "k cache");
    ub_buffer *VC = alloc_buf(dev, UB_DTYPE_F32, scache, 3, UB_STORAGE_PRIVATE, "v cache");
    ub_buffer *QP = alloc_buf(dev, UB_DTYPE_U32, &spos, 1, UB_STORAGE_AUTO, "positions");
    float cpoison[48];
    poison(cpoison, sizeof cpoison);
    OK(ub_queue_upload(q, QO, cpoison, 32 * 4));
    OK(ub_queue_upload(q, KC, cpoison, sizeof cpoison));
    OK(ub_queue_upload(q, VC, cpoison, sizeof cpoison));
    OK(ub_queue_upload(q, QP, qpos, sizeof qpos));
    OK(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wv.m, XN, NW, eps, QP, theta, UB_ROPE_NEOX,
                                       QO, KC, VC, &f));
    OK(ub_device_wait(dev, f));
    got = download_f32(q, QO, 32);
    CHECK(sums_close(got, qr, qrm, 32, 1e-4, "q_out"), "qkv q_out");
    free(got);
    float *kcg = download_f32(q, KC, 48), *vcg = download_f32(q, VC, 48);
    for (size_t t = 0; t < TOK; t++) {
        CHECK(sums_close(kcg + qpos[t] * HD, kr + t * HD, krm + t * HD, HD, 1e-4, "k cache"),
              "k cache row %u", qpos[t]);
        CHECK(sums_close(vcg + qpos[t] * HD, vp + t * HD, vm + t * HD, HD, 1e-4, "v cache"),
              "v cache row %u", qpos[t]);
    }
    int untouched = 1;
    for (size_t row = 0; row < CAP; row++)
        if (row != qpos[0] && row != qpos[1])
            untouched &= memcmp(kcg + row * HD, cpoison, HD * 4) == 0 &&
                         memcmp(vcg + row * HD, cpoison, HD * 4) == 0;
    CHECK(untouched, "the other cache rows are untouched");
    free(kcg);
    free(vcg);
    FAILS(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wq.m, XN, NW, eps, QP, theta,
                                          UB_ROPE_NEOX, QO, KC, VC, NULL),
          UB_STATUS_SHAPE_MISMATCH, "as wk");
    FAILS(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wv.m, XN, NW, eps, QP, theta, 9, QO, KC,
                                          VC, NULL),
          UB_STATUS_INVALID_ARGUMENT, "ub_rope_style");
    FAILS(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wv.m, XN, NW, eps, QP, -theta,
                                          UB_ROPE_NEOX, QO, KC, VC, NULL),
          UB_STATUS_INVALID_ARGUMENT, "theta_base");
    FAILS(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wv.m, XN, NW, eps, XN, theta,
                                          UB_ROPE_NEOX, QO, KC, VC, NULL),
          UB_STATUS_DTYPE_MISMATCH, NULL);
    FAILS(ub_op_ggml_qkv_rope_append_into(q, wq.m, wk.m, wv.m, XN, NW, eps, QP, theta,
                                          UB_ROPE_NEOX, QO, KC, QO, NULL),
          UB_STATUS_SHAPE_MISMATCH, NULL);

    /* Matrices refused at creation. */
    size_t sb[2] = {2, 34};
    ub_buffer *B = alloc_buf(dev, UB_DTYPE_U8, sb, 2, UB_STORAGE_AUTO, "blocks");
    ub_ggml_matrix *m = NULL;
    FAILS(ub_ggml_matrix_new(B, UB_GGML_TYPE_Q8_0, 2, 48, &m), UB_STATUS_INVALID_ARGUMENT,
          "multiple of 32");
    FAILS(ub_ggml_matrix_new(B, UB_GGML_TYPE_Q4_1, 2, 32, &m), UB_STATUS_SHAPE_MISMATCH,
          "[2, 20]");
    FAILS(ub_ggml_matrix_new(B, 14, 2, 32, &m), UB_STATUS_UNSUPPORTED, "Q6_K");
    FAILS(ub_ggml_matrix_new(B, 77, 2, 32, &m), UB_STATUS_INVALID_ARGUMENT, "GGUF type code");
    FAILS(ub_ggml_matrix_new(XN, UB_GGML_TYPE_Q8_0, 2, 32, &m), UB_STATUS_DTYPE_MISMATCH, NULL);
    FAILS(ub_ggml_matrix_new(NULL, UB_GGML_TYPE_Q8_0, 2, 32, &m), UB_STATUS_NULL_POINTER, "bytes");
    CHECK(m == NULL, "no matrix on failure");
    ub_ggml_matrix_info info;
    FAILS(ub_ggml_matrix_get_info(wq.m, NULL), UB_STATUS_NULL_POINTER, "info_out");
    FAILS(ub_ggml_matrix_get_info((ub_ggml_matrix *)B, &info), UB_STATUS_INVALID_HANDLE,
          "ub_buffer handle");
    OK(ub_ggml_matrix_release(NULL));

    ub_buffer *all[] = {X, XN, NW, YN, YN2, RES, YA, YA2, SW, SW2, QO, KC, VC, QP, B};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) OK(ub_buffer_release(all[i]));
    matrix_t *ms[] = {&st[0], &st[1], &st[2], &wide, &gate, &up, &wq, &wk, &wv};
    for (size_t i = 0; i < sizeof ms / sizeof ms[0]; i++) free_matrix(ms[i]);
}

/* ---- launch batches: a step recorded once, replayed on new inputs ------------------------- */

static void test_batch(ub_device *dev, ub_queue *q) {
    /* The step: the embedding row of a token id (a Q8_0 table of 11 x 64), its product with a
     * Q4_1 matrix of 5 x 64 (into y), and the softmax of y into a fresh buffer. */
    const size_t vocab = 11, cols = 64, rows = 5;
    matrix_t table = make_matrix(dev, q, UB_GGML_TYPE_Q8_0, vocab, cols);
    matrix_t w = make_matrix(dev, q, UB_GGML_TYPE_Q4_1, rows, cols);
    size_t one = 1, sx[2] = {1, cols}, sy[2] = {1, rows};
    ub_buffer *ID = alloc_buf(dev, UB_DTYPE_U32, &one, 1, UB_STORAGE_AUTO, "token");
    ub_buffer *X = alloc_buf(dev, UB_DTYPE_F32, sx, 2, UB_STORAGE_PRIVATE, "x");
    ub_buffer *Y = alloc_buf(dev, UB_DTYPE_F32, sy, 2, UB_STORAGE_PRIVATE, "y");

    ub_launch_batch *batch = NULL;
    ub_queue *rq = NULL;
    OK(ub_launch_batch_new(dev, "decode step", &batch));
    OK(ub_launch_batch_queue(batch, &rq));
    size_t len = 99;
    OK(ub_launch_batch_len(batch, &len));
    CHECK(len == 0, "a new batch is empty (%zu)", len);
    FAILS(ub_queue_launch_batch(q, batch, NULL), UB_STATUS_INVALID_ARGUMENT, "no launch");

    ub_fence f;
    memset(&f, 0xEE, sizeof f);
    OK(ub_op_ggml_embed_rows_into(rq, table.m, ID, X, &f));
    bool done = false;
    OK(ub_device_is_complete(dev, f, &done));
    CHECK(done, "a recorded op's fence is complete at once");
    OK(ub_op_ggml_matvec_into(rq, w.m, X, Y, NULL));
    ub_buffer *P = NULL;
    OK(ub_op_softmax(rq, Y, &P));
    CHECK(P != NULL, "a fresh op recorded gives its output");
    OK(ub_launch_batch_len(batch, &len));
    CHECK(len == 3, "three launches recorded (%zu)", len);

    /* What a recording queue refuses; a refused op appends nothing. */
    ub_buffer *bad = NULL;
    FAILS(ub_op_ggml_matvec_into(rq, w.m, Y, X, NULL), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_op_matmul(rq, X, X, &bad), UB_STATUS_UNSUPPORTED, "cannot record");
    FAILS(ub_op_matmul_bt_into(rq, X, X, Y, NULL), UB_STATUS_UNSUPPORTED, "cannot record");
    uint32_t id = 0;
    FAILS(ub_queue_upload(rq, ID, &id, 4), UB_STATUS_INVALID_ARGUMENT,
          "recording queue of the launch batch 'decode step'");
    FAILS(ub_queue_drain(rq), UB_STATUS_INVALID_ARGUMENT, "recording queue");
    FAILS(ub_queue_launch_batch(rq, batch, NULL), UB_STATUS_INVALID_ARGUMENT, "recording queue");
    OK(ub_launch_batch_len(batch, &len));
    CHECK(len == 3, "nothing appended by refused calls (%zu)", len);
    FAILS(ub_launch_batch_len(batch, NULL), UB_STATUS_NULL_POINTER, "len_out");
    FAILS(ub_launch_batch_len((ub_launch_batch *)rq, &len), UB_STATUS_INVALID_HANDLE,
          "ub_queue handle, not a ub_launch_batch");
    ub_launch_batch *unlabelled = NULL;
    FAILS(ub_launch_batch_new(dev, NULL, &unlabelled), UB_STATUS_NULL_POINTER, "label");
    CHECK(unlabelled == NULL, "no batch on failure");

    /* Two submissions, each on a new token: the three outputs against the references. */
    for (int step = 0; step < 2; step++) {
        id = (uint32_t)(next_u64() % vocab);
        OK(ub_queue_upload(q, ID, &id, 4));
        float nan[64];
        poison(nan, sizeof nan);
        OK(ub_queue_upload(q, X, nan, cols * 4));
        OK(ub_queue_upload(q, Y, nan, rows * 4));
        OK(ub_queue_upload(q, P, nan, rows * 4));
        OK(ub_queue_launch_batch(q, batch, &f));
        OK(ub_device_wait(dev, f));
        float xw[64];
        for (size_t c = 0; c < cols; c++) xw[c] = (float)table.w[id * cols + c];
        float *got = download_f32(q, X, cols);
        CHECK(memcmp(got, xw, cols * 4) == 0, "step %d: the embedding row of %u", step, id);
        free(got);
        double yw[5], ym[5];
        products(&w, xw, 1, yw, ym);
        float *y = download_f32(q, Y, rows);
        CHECK(sums_close(y, yw, ym, rows, 1e-5, "y"), "step %d: the product", step);
        /* The softmax of what the product wrote. */
        float mx = -INFINITY, pw[5];
        for (size_t r = 0; r < rows; r++) mx = fmaxf(mx, y[r]);
        double z = 0;
        for (size_t r = 0; r < rows; r++) z += exp((double)y[r] - mx);
        for (size_t r = 0; r < rows; r++) pw[r] = (float)(exp((double)y[r] - mx) / z);
        got = download_f32(q, P, rows);
        CHECK(all_close(got, pw, rows, 1e-5f, "softmax"), "step %d: the softmax", step);
        free(got);
        free(y);
    }
    size_t n = 0;
    OK(ub_launch_batch_label(batch, NULL, 0, &n));
    char label[32];
    OK(ub_launch_batch_label(batch, label, sizeof label, &n));
    CHECK(n == 11 && strcmp(label, "decode step") == 0, "label %s", label);

    /* A batch of another device is refused by this device's queue. */
    ub_device *other = NULL;
    ub_queue *oq = NULL;
    OK(ub_device_open("cpu", &other));
    OK(ub_device_queue(other, NULL, &oq));
    FAILS(ub_queue_launch_batch(oq, batch, NULL), UB_STATUS_WRONG_DEVICE, NULL);
    OK(ub_queue_release(oq));
    OK(ub_device_release(other));

    /* The recording queue keeps the batch alive after its handle is released. */
    OK(ub_launch_batch_release(batch));
    FAILS(ub_launch_batch_release(batch), UB_STATUS_INVALID_HANDLE, "already released");
    OK(ub_op_softmax_into(rq, Y, P, NULL));
    OK(ub_queue_release(rq));
    OK(ub_launch_batch_release(NULL));

    ub_buffer *all[] = {ID, X, Y, P};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) OK(ub_buffer_release(all[i]));
    free_matrix(&table);
    free_matrix(&w);
}

/* ---- weights: files written here, field by field ----------------------------------------- */

static void put_u32(FILE *f, uint32_t v) { fwrite(&v, 4, 1, f); }
static void put_u64(FILE *f, uint64_t v) { fwrite(&v, 8, 1, f); }
static void put_str(FILE *f, const char *s) {
    put_u64(f, strlen(s));
    fwrite(s, 1, strlen(s), f);
}

static void test_weights(ub_device *dev, ub_queue *q, const char *dir) {
    char path[512];
    /* safetensors: "w" F32 [3, 5] and "ids" U16 [7]. */
    snprintf(path, sizeof path, "%s/capi-test-%d.safetensors", dir, (int)getpid());
    float w[15];
    uint16_t ids[7];
    fill_f32(w, 15);
    fill_random(ids, sizeof ids);
    char json[256];
    int jn = snprintf(json, sizeof json,
                      "{\"w\":{\"dtype\":\"F32\",\"shape\":[3,5],\"data_offsets\":[0,60]},"
                      "\"ids\":{\"dtype\":\"U16\",\"shape\":[7],\"data_offsets\":[60,74]}}");
    while (jn % 8) json[jn++] = ' ';
    json[jn] = '\0';
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL, "create %s", path);
    if (f == NULL) return;
    put_u64(f, (uint64_t)jn);
    fwrite(json, 1, (size_t)jn, f);
    fwrite(w, 4, 15, f);
    fwrite(ids, 2, 7, f);
    fclose(f);

    ub_weights *wf = NULL;
    OK(ub_weights_open(path, &wf));
    const char *format = NULL;
    OK(ub_weights_format(wf, &format));
    CHECK(format && strcmp(format, "safetensors") == 0, "format %s", format);
    size_t count = 0;
    OK(ub_weights_tensor_count(wf, &count));
    CHECK(count == 2, "count %zu", count);
    for (size_t i = 0; i < count; i++) {
        ub_tensor_info ti;
        OK(ub_weights_tensor_info(wf, i, &ti));
        if (strcmp(ti.name, "w") == 0)
            CHECK(ti.dtype == UB_DTYPE_F32 && ti.rank == 2 && ti.shape[0] == 3 &&
                      ti.shape[1] == 5 && ti.byte_len == 60 && strcmp(ti.file_dtype, "F32") == 0,
                  "info of w");
        else
            CHECK(strcmp(ti.name, "ids") == 0 && ti.dtype == UB_DTYPE_U16 && ti.byte_len == 14,
                  "info of ids: %s", ti.name);
    }
    ub_tensor_info ti;
    FAILS(ub_weights_tensor_info(wf, 2, &ti), UB_STATUS_OUT_OF_RANGE, "2..3");

    const ub_route routes[2] = {UB_ROUTE_ZERO_COPY, UB_ROUTE_STAGED};
    for (int r = 0; r < 2; r++) {
        ub_loaded_weights *lw = NULL;
        OK(ub_weights_load(wf, dev, q, NULL, 0, routes[r], &lw));
        OK(ub_loaded_weights_count(lw, &count));
        CHECK(count == 2, "loaded %zu", count);
        ub_load_report rep;
        OK(ub_loaded_weights_report(lw, &rep));
        CHECK(rep.tensors == 2 && rep.bytes == 74 && rep.route == routes[r], "report");
        ub_buffer *bw = NULL, *bi = NULL;
        OK(ub_loaded_weights_get(lw, "w", &bw));
        OK(ub_loaded_weights_get(lw, "ids", &bi));
        float *got = download_f32(q, bw, 15);
        CHECK(memcmp(got, w, 60) == 0, "w by route %u", routes[r]);
        free(got);
        uint16_t gi[7];
        poison(gi, sizeof gi);
        OK(ub_queue_download(q, bi, gi, sizeof gi));
        CHECK(memcmp(gi, ids, sizeof ids) == 0, "ids by route %u", routes[r]);
        ub_buffer *bad = NULL;
        FAILS(ub_loaded_weights_get(lw, "nope", &bad), UB_STATUS_INVALID_ARGUMENT, "nope");
        OK(ub_loaded_weights_release(lw));
        /* The buffers outlive the set they came from. */
        got = download_f32(q, bw, 15);
        CHECK(memcmp(got, w, 60) == 0, "w after the set is released");
        free(got);
        OK(ub_buffer_release(bw));
        OK(ub_buffer_release(bi));
    }
    const char *names[1] = {"ids"};
    ub_loaded_weights *one = NULL;
    OK(ub_weights_load(wf, dev, NULL, names, 1, UB_ROUTE_AUTO, &one));
    OK(ub_loaded_weights_count(one, &count));
    CHECK(count == 1, "one selected");
    OK(ub_loaded_weights_release(one));
    const char *missing[1] = {"absent"};
    FAILS(ub_weights_load(wf, dev, NULL, missing, 1, UB_ROUTE_AUTO, &one),
          UB_STATUS_INVALID_ARGUMENT, "absent");
    FAILS(ub_weights_load(wf, dev, NULL, NULL, 0, 9, &one), UB_STATUS_INVALID_ARGUMENT,
          "ub_route");
    ub_buffer *single = NULL;
    OK(ub_weights_get_tensor(wf, dev, "w", &single));
    float *got = download_f32(q, single, 15);
    CHECK(memcmp(got, w, 60) == 0, "get_tensor");
    free(got);
    OK(ub_buffer_release(single));
    OK(ub_weights_release(wf));
    FAILS(ub_weights_release(wf), UB_STATUS_INVALID_HANDLE, "ub_weights");

    /* A truncated file is a format error naming the problem; a missing one an I/O error. */
    f = fopen(path, "r+b");
    if (f) {
        fclose(f);
        CHECK(truncate(path, 8 + jn + 30) == 0, "truncate");
    }
    FAILS(ub_weights_open(path, &wf), UB_STATUS_FORMAT, NULL);
    CHECK(wf == NULL, "no handle");
    remove(path);
    FAILS(ub_weights_open(path, &wf), UB_STATUS_IO, "I/O error");
    FAILS(ub_weights_open(NULL, &wf), UB_STATUS_NULL_POINTER, "path");

    /* GGUF v3: an F32 norm of 17 values and a Q8_0 matrix of 3 rows of 64, aligned to 32. */
    snprintf(path, sizeof path, "%s/capi-test-%d.gguf", dir, (int)getpid());
    f = fopen(path, "wb");
    CHECK(f != NULL, "create %s", path);
    if (f == NULL) return;
    fwrite("GGUF", 1, 4, f);
    put_u32(f, 3);
    put_u64(f, 2); /* tensors */
    put_u64(f, 1); /* key-value pairs */
    put_str(f, "general.architecture");
    put_u32(f, 8); /* a string value */
    put_str(f, "llama");
    put_str(f, "norm");
    put_u32(f, 1);
    put_u64(f, 17);
    put_u32(f, 0); /* F32 */
    put_u64(f, 0);
    put_str(f, "w");
    put_u32(f, 2);
    put_u64(f, 64);
    put_u64(f, 3);
    put_u32(f, 8); /* Q8_0 */
    put_u64(f, 96);
    long at = ftell(f);
    while (at % 32) {
        fputc(0, f);
        at++;
    }
    unsigned char gdata[96 + 204];
    fill_random(gdata, sizeof gdata);
    random_blocks(UB_GGML_TYPE_Q8_0, gdata + 96, 6); /* valid f16 scales */
    fwrite(gdata, 1, sizeof gdata, f);
    fclose(f);
    OK(ub_weights_open(path, &wf));
    OK(ub_weights_format(wf, &format));
    CHECK(format && strcmp(format, "gguf") == 0, "format %s", format);
    OK(ub_weights_tensor_count(wf, &count));
    CHECK(count == 2, "gguf count %zu", count);
    for (size_t i = 0; i < count; i++) {
        OK(ub_weights_tensor_info(wf, i, &ti));
        if (strcmp(ti.name, "w") == 0)
            CHECK(ti.dtype == UB_DTYPE_U8 && ti.rank == 2 && ti.shape[0] == 3 &&
                      ti.shape[1] == 68 && strcmp(ti.file_dtype, "Q8_0") == 0,
                  "Q8_0 loads as bytes [3, 68], is %s", ti.file_dtype);
    }
    OK(ub_weights_get_tensor(wf, dev, "w", &single));
    unsigned char gw[204];
    poison(gw, sizeof gw);
    OK(ub_queue_download(q, single, gw, sizeof gw));
    CHECK(memcmp(gw, gdata + 96, 204) == 0, "the Q8_0 blocks, byte for byte");
    /* The tensor as a block matrix: format and shape from the file, its product against a
     * reference over the blocks written. */
    ub_ggml_matrix *gm = NULL;
    OK(ub_ggml_matrix_from_tensor(wf, "w", single, &gm));
    ub_ggml_matrix_info gi;
    OK(ub_ggml_matrix_get_info(gm, &gi));
    CHECK(gi.ggml_type == UB_GGML_TYPE_Q8_0 && gi.rows == 3 && gi.cols == 64 && gi.row_bytes == 68,
          "the GGUF matrix: type %u, %zu x %zu", gi.ggml_type, gi.rows, gi.cols);
    matrix_t ref = {gm, single, xmalloc(3 * 64 * sizeof(double)), 3, 64};
    dequantize_blocks(UB_GGML_TYPE_Q8_0, gdata + 96, 6, ref.w);
    float gx[64];
    fill_f32(gx, 64);
    size_t sgx = 64;
    ub_buffer *GX = upload_f32(dev, q, gx, &sgx, 1, "gx"), *GY = NULL;
    OK(ub_op_ggml_matvec(q, gm, GX, &GY));
    double gwant[3], gmag[3];
    products(&ref, gx, 1, gwant, gmag);
    got = download_f32(q, GY, 3);
    CHECK(sums_close(got, gwant, gmag, 3, 1e-5, "gguf matvec"), "the GGUF matrix's product");
    free(got);
    free(ref.w);
    ub_ggml_matrix *gbad = NULL;
    FAILS(ub_ggml_matrix_from_tensor(wf, "nope", single, &gbad), UB_STATUS_INVALID_ARGUMENT,
          "no tensor 'nope'");
    FAILS(ub_ggml_matrix_from_tensor(wf, "norm", single, &gbad), UB_STATUS_UNSUPPORTED, "F32");
    FAILS(ub_ggml_matrix_from_tensor(wf, "w", GX, &gbad), UB_STATUS_SHAPE_MISMATCH, NULL);
    FAILS(ub_ggml_matrix_from_tensor(NULL, "w", single, &gbad), UB_STATUS_NULL_POINTER,
          "weights");
    CHECK(gbad == NULL, "no matrix on failure");
    OK(ub_ggml_matrix_release(gm));
    OK(ub_buffer_release(GX));
    OK(ub_buffer_release(GY));
    OK(ub_buffer_release(single));
    OK(ub_weights_get_tensor(wf, dev, "norm", &single));
    got = download_f32(q, single, 17);
    CHECK(memcmp(got, gdata, 68) == 0, "the F32 norm");
    free(got);
    OK(ub_buffer_release(single));
    OK(ub_weights_release(wf));
    remove(path);
}

static void test_stats(ub_device *dev, ub_queue *q) {
    OK(ub_device_clear_copy_ledger(dev));
    size_t shape[1] = {1001};
    ub_buffer *b = alloc_buf(dev, UB_DTYPE_U8, shape, 1, UB_STORAGE_PRIVATE, "audited");
    unsigned char data[1001], back[1001];
    fill_random(data, sizeof data);
    OK(ub_queue_upload(q, b, data, sizeof data));
    OK(ub_queue_upload(q, b, data, sizeof data));
    OK(ub_queue_download(q, b, back, sizeof back));
    unsigned char z = 0;
    OK(ub_queue_fill(q, b, &z, 1));
    ub_copy_report r;
    memset(&r, 0xEE, sizeof r);
    OK(ub_device_copy_report(dev, &r));
    CHECK(r.host_to_device.count == 2 && r.host_to_device.bytes == 2002, "uploads %llu / %llu",
          (unsigned long long)r.host_to_device.count, (unsigned long long)r.host_to_device.bytes);
    CHECK(r.host_to_device.staged_bytes == 2002, "Private uploads are staged");
    CHECK(r.device_to_host.count == 1 && r.device_to_host.bytes == 1001, "download");
    CHECK(r.fill.count == 1 && r.fill.bytes == 1001, "fill");
    CHECK(r.device_to_device.count == 0 && r.shared.count == 0, "nothing else");
    size_t len = 0;
    OK(ub_device_copy_report_text(dev, NULL, 0, &len));
    char *text = xmalloc(len + 1);
    OK(ub_device_copy_report_text(dev, text, len + 1, &len));
    CHECK(strstr(text, "copy audit: 4 transfers") != NULL && strstr(text, "host->device"),
          "report text:\n%s", text);
    free(text);

    ub_memory_stats s;
    OK(ub_device_memory_stats(dev, &s));
    CHECK(s.active_count >= 1 && s.active_bytes >= 1001 && s.reserved_bytes >= s.active_bytes,
          "memory stats %zu %zu", s.active_count, s.active_bytes);
    size_t before = s.active_count;
    OK(ub_buffer_release(b));
    OK(ub_device_drain(dev));
    OK(ub_device_memory_stats(dev, &s));
    CHECK(s.active_count == before - 1, "the release is accounted (%zu -> %zu)", before,
          s.active_count);
    size_t freed = 0;
    OK(ub_device_trim(dev, &freed));
    OK(ub_device_trim(dev, NULL));
    FAILS(ub_device_memory_stats(dev, NULL), UB_STATUS_NULL_POINTER, "stats_out");
}

int main(void) {
    const char *seed_env = getenv("UNIBUF_TEST_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10)
                             : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
    rng_state = seed ? seed : 1;
    printf("capi_test: seed %llu (UNIBUF_TEST_SEED to replay)\n", (unsigned long long)seed);
    const char *dir = getenv("TMPDIR");
    if (dir == NULL || dir[0] == '\0') dir = "/tmp";

    test_versions_and_statuses();
    ub_device *dev = NULL;
    OK(ub_device_open("cpu", &dev));
    if (dev == NULL) {
        fprintf(stderr, "cannot open the CPU backend: %s\n", ub_last_error_message());
        return 1;
    }
    ub_queue *q = NULL;
    OK(ub_device_queue(dev, NULL, &q));

    test_device(dev);
    test_handles(dev, q);
    test_alloc_and_views(dev, q);
    test_transfers(dev, q);
    test_host_memory(dev, q);
    test_queues_and_fences(dev, q);
    test_interop(dev, q);
    test_ops(dev, q);
    test_ggml(dev, q);
    test_batch(dev, q);
    test_weights(dev, q, dir);
    test_stats(dev, q);

    OK(ub_queue_release(q));
    OK(ub_device_release(dev));
    FAILS(ub_device_release(dev), UB_STATUS_INVALID_HANDLE, "already released");
    ub_handle_counts live;
    OK(ub_live_handles(&live));
    CHECK(live.devices == 0 && live.queues == 0 && live.buffers == 0 && live.mappings == 0 &&
              live.downloads == 0 && live.weights == 0 && live.loaded_weights == 0 &&
              live.host_signals == 0 && live.ggml_matrices == 0 && live.launch_batches == 0,
          "every handle released: %zu devices, %zu queues, %zu buffers, %zu mappings, %zu "
          "downloads, %zu weights, %zu loaded, %zu signals, %zu matrices, %zu batches",
          live.devices, live.queues, live.buffers, live.mappings, live.downloads, live.weights,
          live.loaded_weights, live.host_signals, live.ggml_matrices, live.launch_batches);

    printf("capi_test: %d checks, %d failed\n", checks, failures);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
