// wrapper_test.cpp: the C++17 wrapper's GGUF block matrices and launch batches, on the CPU
// backend. Blocks are made here from random bytes with valid f16 scales and decoded here by
// hand; products are checked against f64 references, outputs are poisoned before they are
// written, and bad inputs must throw unibuf::Error with their status and a message. A launch
// batch records two ops and is submitted twice on new inputs. Exits non-zero on any failure.
//
// Built and run by crates/unibuf-capi/ci.sh (also under valgrind).
#include "unibuf.hpp"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <string>
#include <vector>

namespace {

int checks = 0;
int failures = 0;

void check(bool ok, const std::string &what) {
    checks++;
    if (!ok) {
        failures++;
        std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    }
}

/// Runs `f`, which must throw unibuf::Error with `want` and a message containing `part`.
template <typename F>
void throws(F &&f, ub_status want, const char *part, const std::string &what) {
    checks++;
    try {
        f();
    } catch (const unibuf::Error &e) {
        if (e.status() == want && std::strstr(e.what(), part) != nullptr) return;
        failures++;
        std::fprintf(stderr, "FAIL: %s: %s \"%s\" (want %s with \"%s\")\n", what.c_str(),
                     e.status_name(), e.what(), ub_status_name(want), part);
        return;
    }
    failures++;
    std::fprintf(stderr, "FAIL: %s: no exception\n", what.c_str());
}

std::uint64_t rng = 1;
std::uint64_t next() {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
}
float next_f32() { return static_cast<float>(static_cast<double>(next() >> 40) / 16777216.0 * 4.0 - 2.0); }

double f16_at(const std::uint8_t *p) {
    unsigned h = p[0] | (p[1] << 8);
    int e = static_cast<int>((h >> 10) & 0x1F);
    double m = h & 0x3FF;
    double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
    return (h & 0x8000) ? -v : v;
}

/// Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles) for rows x cols, and their weights.
std::vector<std::uint8_t> q4_1_blocks(size_t rows, size_t cols, std::vector<double> &w) {
    std::vector<std::uint8_t> bytes(rows * cols / 32 * 20);
    for (auto &b : bytes) b = static_cast<std::uint8_t>(next() >> 56);
    w.assign(rows * cols, 0.0);
    for (size_t k = 0; k < rows * cols / 32; k++) {
        std::uint8_t *b = &bytes[k * 20];
        for (int h = 0; h < 2; h++) {  // normal f16 of magnitude 2^-6 .. 2^1
            unsigned v = ((next() & 1) << 15) | ((9 + next() % 7) << 10) | (next() & 0x3FF);
            b[2 * h] = static_cast<std::uint8_t>(v & 0xFF);
            b[2 * h + 1] = static_cast<std::uint8_t>(v >> 8);
        }
        double d = f16_at(b), m = f16_at(b + 2);
        for (int j = 0; j < 16; j++) {
            w[k * 32 + j] = d * (b[4 + j] & 15) + m;
            w[k * 32 + j + 16] = d * (b[4 + j] >> 4) + m;
        }
    }
    return bytes;
}

/// Whether got is w x (per row, f64) within an f32 sum's error.
bool product_close(const std::vector<float> &got, const std::vector<double> &w,
                   const std::vector<float> &x, size_t rows, size_t cols) {
    for (size_t r = 0; r < rows; r++) {
        double s = 0, mag = 0;
        for (size_t c = 0; c < cols; c++) {
            s += w[r * cols + c] * x[c];
            mag += std::fabs(w[r * cols + c] * x[c]);
        }
        if (!(std::fabs(got[r] - s) <= 1e-5 * (1.0 + mag))) {
            std::fprintf(stderr, "  row %zu: got %.9g, want %.9g\n", r, got[r], s);
            return false;
        }
    }
    return true;
}

}  // namespace

int main() {
    const char *seed_env = std::getenv("UNIBUF_TEST_SEED");
    std::uint64_t seed = seed_env ? std::strtoull(seed_env, nullptr, 10)
                                  : static_cast<std::uint64_t>(std::time(nullptr));
    rng = seed ? seed : 1;
    std::printf("wrapper_test: seed %llu (UNIBUF_TEST_SEED to replay)\n",
                static_cast<unsigned long long>(seed));
    try {
        unibuf::Device dev = unibuf::Device::open("cpu");
        unibuf::Queue q = dev.queue();
        const size_t rows = 7, cols = 96;
        std::vector<double> w;
        std::vector<std::uint8_t> raw = q4_1_blocks(rows, cols, w);
        unibuf::Buffer bytes = dev.alloc(UB_DTYPE_U8, {rows, cols / 32 * 20}, UB_STORAGE_AUTO, "w");
        q.upload(bytes, raw);
        unibuf::GgmlMatrix m = unibuf::GgmlMatrix::from_bytes(bytes, UB_GGML_TYPE_Q4_1, rows, cols);
        check(m.rows() == rows && m.cols() == cols && m.type() == UB_GGML_TYPE_Q4_1, "info");
        check(m.bytes().byte_len() == raw.size(), "bytes view");

        std::vector<float> x(cols), nan(rows, std::numeric_limits<float>::quiet_NaN());
        for (auto &v : x) v = next_f32();
        unibuf::Buffer xb = dev.alloc(UB_DTYPE_F32, {cols}, UB_STORAGE_AUTO, "x");
        q.upload(xb, x);
        unibuf::Buffer y = unibuf::ops::ggml_matvec(q, m, xb);
        check(product_close(q.download<float>(y), w, x, rows, cols), "ggml_matvec");
        unibuf::Buffer dense = unibuf::ops::ggml_dequantize(q, m);
        std::vector<float> dw = q.download<float>(dense);
        bool exact = dw.size() == w.size();
        for (size_t i = 0; exact && i < w.size(); i++) exact = dw[i] == static_cast<float>(w[i]);
        check(exact, "ggml_dequantize");

        // Bad inputs throw with their status.
        throws([&] { unibuf::GgmlMatrix::from_bytes(bytes, UB_GGML_TYPE_Q8_0, rows, cols); },
               UB_STATUS_SHAPE_MISMATCH, "ggml matrix bytes", "Q8_0 over Q4_1's bytes");
        throws([&] { unibuf::ops::ggml_matvec_norm(q, {&m, &m, &m, &m}, xb, xb, 1e-5f); },
               UB_STATUS_INVALID_ARGUMENT, "at most 3", "four stacked");
        unibuf::Buffer short_x = dev.alloc(UB_DTYPE_F32, {64}, UB_STORAGE_AUTO, "short");
        throws([&] { unibuf::ops::ggml_matvec(q, m, short_x); }, UB_STATUS_SHAPE_MISMATCH,
               "[96]", "x of other cols");

        // A batch of two ops: the product into y, then the softmax of y into p; submitted twice
        // on new x.
        unibuf::LaunchBatch step(dev, "decode step");
        unibuf::Buffer yb = dev.alloc(UB_DTYPE_F32, {rows}, UB_STORAGE_PRIVATE, "y");
        unibuf::Buffer pb = dev.alloc(UB_DTYPE_F32, {rows}, UB_STORAGE_SHARED, "p");
        {
            unibuf::Queue rec = step.recorder();
            unibuf::ops::ggml_matvec_into(rec, m, xb, yb);
            unibuf::ops::softmax_into(rec, yb, pb);
            throws([&] { rec.drain(); }, UB_STATUS_INVALID_ARGUMENT, "recording queue",
                   "drain of a recording queue");
        }
        check(step.size() == 2 && step.label() == "decode step", "batch size and label");
        for (int s = 0; s < 2; s++) {
            for (auto &v : x) v = next_f32();
            q.upload(xb, x);
            q.upload(yb, nan);
            q.upload(pb, nan);
            q.wait(step.submit(q));
            std::vector<float> got = q.download<float>(yb);
            check(product_close(got, w, x, rows, cols), "batch step " + std::to_string(s) + ": y");
            double mx = got[0], z = 0;
            for (float v : got) mx = std::fmax(mx, v);
            for (float v : got) z += std::exp(v - mx);
            std::vector<float> p = q.download<float>(pb);
            bool ok = true;
            for (size_t r = 0; r < rows; r++)
                ok = ok && std::fabs(p[r] - std::exp(got[r] - mx) / z) <= 1e-6;
            check(ok, "batch step " + std::to_string(s) + ": softmax");
        }
        unibuf::LaunchBatch empty(dev, "empty");
        throws([&] { empty.submit(q); }, UB_STATUS_INVALID_ARGUMENT, "no launch", "empty batch");
    } catch (const unibuf::Error &e) {
        failures++;
        std::fprintf(stderr, "FAIL: unexpected %s: %s\n", e.status_name(), e.what());
    }
    ub_handle_counts live{};
    check(ub_live_handles(&live) == UB_STATUS_OK && live.devices == 0 && live.queues == 0 &&
              live.buffers == 0 && live.ggml_matrices == 0 && live.launch_batches == 0,
          "every handle released");
    std::printf("wrapper_test: %d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
