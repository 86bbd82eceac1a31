// triton_buffers.cpp: the buffer API of an inference server's GPU backend (modelled on the
// Triton Inference Server's Metal backend), one call for one call over unibuf's C++ wrapper:
//
//   Create(size, mode)                          -> a buffer of `size` bytes in a storage mode
//   CopyFromHost(buf, offset, src, size)        -> host bytes into buf[offset, offset + size)
//   CopyToHost(dst, buf, offset, size)          -> buf[offset, offset + size) into host bytes
//   CopyBuffer(src, src_off, dst, dst_off, size)-> device copy between any two storage modes
//   ZeroBuffer(buf, offset, size)               -> zeroes buf[offset, offset + size)
//
// Storage modes: Shared (host and device see the bytes), Private (device only), External
// (host memory the server allocated, wrapped without copying). Every call is checked here:
// random data, odd sizes and offsets, every storage-mode pair for CopyBuffer, every byte read
// back and compared (also the bytes a call must not touch). Prints a summary; exits non-zero on
// any mismatch.
//
// Build (ci.sh does): c++ -std=c++17 -I include examples/triton_buffers.cpp -L <target>/debug
//                      -lunibuf_capi -Wl,-rpath,<target>/debug
#include "unibuf.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

enum class StorageMode { Shared, Private, External };

const char *mode_name(StorageMode m) {
    switch (m) {
        case StorageMode::Shared: return "Shared";
        case StorageMode::Private: return "Private";
        case StorageMode::External: return "External";
    }
    return "?";
}

void free_host(void *p) { std::free(p); }

// The backend's buffer manager: every method is one C ABI call (or two: a view, then the
// transfer), and errors surface as unibuf::Error with the library's message.
class BufferManager {
public:
    explicit BufferManager(unibuf::Device &dev)
        : dev_(dev), queue_(dev.queue("triton")), page_(dev.info().page_size) {}

    unibuf::Buffer Create(size_t size, StorageMode mode) {
        switch (mode) {
            case StorageMode::Shared:
                return dev_.alloc(UB_DTYPE_U8, {size}, UB_STORAGE_SHARED, "triton shared");
            case StorageMode::Private:
                return dev_.alloc(UB_DTYPE_U8, {size}, UB_STORAGE_PRIVATE, "triton private");
            case StorageMode::External: {
                // Memory the server owns, page-aligned as a no-copy Metal buffer wants it; the
                // library frees it (free_host) once the last view and use are gone.
                size_t rounded = (size + page_ - 1) / page_ * page_;
                void *mem = std::aligned_alloc(page_, rounded);
                if (mem == nullptr) throw std::bad_alloc();
                return dev_.wrap_host(mem, size, true, UB_DTYPE_U8, {size}, free_host, mem,
                                      "triton external");
            }
        }
        throw std::logic_error("unknown storage mode");
    }

    void CopyFromHost(const unibuf::Buffer &buf, size_t offset, const void *src, size_t size) {
        queue_.upload(buf.bytes(offset, size), src, size);
    }

    void CopyToHost(void *dst, const unibuf::Buffer &buf, size_t offset, size_t size) {
        queue_.download(buf.bytes(offset, size), dst, size);
    }

    void CopyBuffer(const unibuf::Buffer &src, size_t src_offset, const unibuf::Buffer &dst,
                    size_t dst_offset, size_t size) {
        queue_.copy(src.bytes(src_offset, size), dst.bytes(dst_offset, size));
    }

    void ZeroBuffer(const unibuf::Buffer &buf, size_t offset, size_t size) {
        queue_.zero(buf.bytes(offset, size));
    }

private:
    unibuf::Device &dev_;
    unibuf::Queue queue_;
    size_t page_;
};

int failures = 0;
int checks = 0;

void expect(bool ok, const std::string &what) {
    checks++;
    if (!ok) {
        failures++;
        std::fprintf(stderr, "MISMATCH: %s\n", what.c_str());
    }
}

std::vector<unsigned char> random_bytes(std::mt19937_64 &rng, size_t n) {
    std::vector<unsigned char> v(n);
    for (auto &b : v) b = static_cast<unsigned char>(rng() >> 56);
    return v;
}

// Reads the whole buffer back and compares it to the expected image of its bytes.
void expect_image(BufferManager &m, const unibuf::Buffer &buf,
                  const std::vector<unsigned char> &image, const std::string &what) {
    std::vector<unsigned char> got(image.size(), 0xA5);
    m.CopyToHost(got.data(), buf, 0, got.size());
    size_t bad = 0;
    while (bad < got.size() && got[bad] == image[bad]) bad++;
    expect(bad == got.size(),
           what + (bad < got.size() ? " (first difference at byte " + std::to_string(bad) + ")"
                                    : ""));
}

}  // namespace

int main() {
    const StorageMode modes[3] = {StorageMode::Shared, StorageMode::Private,
                                  StorageMode::External};
    std::random_device rd;
    const unsigned long long seed =
        std::getenv("UNIBUF_TEST_SEED") ? std::strtoull(std::getenv("UNIBUF_TEST_SEED"), nullptr, 10)
                                        : (static_cast<unsigned long long>(rd()) << 32) ^ rd();
    std::mt19937_64 rng(seed);
    std::printf("triton_buffers: seed %llu\n", seed);
    try {
        unibuf::Device dev = unibuf::Device::open(static_cast<const char *>(nullptr));
        std::printf("device: %s (%s)\n", dev.name().c_str(), dev.info().backend);
        BufferManager m(dev);

        // Create + CopyFromHost + CopyToHost, per mode: a whole buffer, then a sub-range.
        for (StorageMode mode : modes) {
            const size_t size = 4099 + rng() % 3001;  // odd sizes, not page multiples
            unibuf::Buffer b = m.Create(size, mode);
            std::vector<unsigned char> image = random_bytes(rng, size);
            m.CopyFromHost(b, 0, image.data(), size);
            expect_image(m, b, image, std::string("CopyFromHost/CopyToHost ") + mode_name(mode));
            const size_t off = 1 + rng() % 97, len = size - off - rng() % 101;
            std::vector<unsigned char> part = random_bytes(rng, len);
            m.CopyFromHost(b, off, part.data(), len);
            std::memcpy(image.data() + off, part.data(), len);
            expect_image(m, b, image, std::string("CopyFromHost at an offset ") + mode_name(mode));
            std::vector<unsigned char> back(len, 0x5A);
            m.CopyToHost(back.data(), b, off, len);
            expect(back == part, std::string("CopyToHost at an offset ") + mode_name(mode));
        }

        // CopyBuffer across every storage-mode pair, at odd offsets, leaving the rest intact.
        int pairs = 0;
        for (StorageMode from : modes) {
            for (StorageMode to : modes) {
                const size_t ssize = 3001 + rng() % 2000, dsize = 3001 + rng() % 2000;
                unibuf::Buffer src = m.Create(ssize, from), dst = m.Create(dsize, to);
                std::vector<unsigned char> simg = random_bytes(rng, ssize);
                std::vector<unsigned char> dimg = random_bytes(rng, dsize);
                m.CopyFromHost(src, 0, simg.data(), ssize);
                m.CopyFromHost(dst, 0, dimg.data(), dsize);
                const size_t soff = rng() % 500, doff = rng() % 500;
                const size_t len = 1 + rng() % (std::min(ssize - soff, dsize - doff) - 1);
                m.CopyBuffer(src, soff, dst, doff, len);
                std::memcpy(dimg.data() + doff, simg.data() + soff, len);
                std::string what = std::string("CopyBuffer ") + mode_name(from) + " -> " +
                                   mode_name(to) + " (" + std::to_string(len) + " bytes)";
                expect_image(m, dst, dimg, what);
                expect_image(m, src, simg, what + ": the source is unchanged");
                pairs++;
            }
        }

        // ZeroBuffer: a sub-range becomes zero, the rest stays.
        for (StorageMode mode : modes) {
            const size_t size = 2053 + rng() % 1000;
            unibuf::Buffer b = m.Create(size, mode);
            std::vector<unsigned char> image = random_bytes(rng, size);
            m.CopyFromHost(b, 0, image.data(), size);
            const size_t off = 1 + rng() % 300, len = 1 + rng() % (size - off - 1);
            m.ZeroBuffer(b, off, len);
            std::memset(image.data() + off, 0, len);
            expect_image(m, b, image, std::string("ZeroBuffer ") + mode_name(mode));
        }

        // A range past the end is a typed error, not a crash.
        unibuf::Buffer small = m.Create(64, StorageMode::Private);
        unsigned char byte = 0;
        try {
            m.CopyToHost(&byte, small, 64, 1);
            expect(false, "a read past the end must fail");
        } catch (const unibuf::Error &e) {
            expect(e.status() == UB_STATUS_OUT_OF_RANGE && !e.retryable() && e.what()[0] != '\0',
                   std::string("out of range read: ") + e.status_name() + ": " + e.what());
        }

        dev.drain();
        ub_copy_report r = dev.copy_report();
        std::printf("copy audit: %llu uploads (%llu bytes), %llu downloads, %llu device copies, "
                    "%llu fills\n",
                    static_cast<unsigned long long>(r.host_to_device.count),
                    static_cast<unsigned long long>(r.host_to_device.bytes),
                    static_cast<unsigned long long>(r.device_to_host.count),
                    static_cast<unsigned long long>(r.device_to_device.count),
                    static_cast<unsigned long long>(r.fill.count));
        expect(r.device_to_device.count == static_cast<unsigned long long>(pairs),
               "one device copy per storage-mode pair in the audit");
        std::printf("triton_buffers: %d storage-mode pairs copied, %d checks, %d mismatches\n",
                    pairs, checks, failures);
    } catch (const unibuf::Error &e) {
        std::fprintf(stderr, "error: %s (%s)\n", e.what(), e.status_name());
        return 2;
    }
    ub_handle_counts live{};
    unibuf::check(ub_live_handles(&live));
    if (live.buffers != 0 || live.queues != 0 || live.devices != 0) {
        std::fprintf(stderr, "leaked handles: %zu buffers, %zu queues, %zu devices\n",
                     live.buffers, live.queues, live.devices);
        return 1;
    }
    std::printf("%d passed, %d failed\n", checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
