// unibuf.hpp: a header-only C++17 wrapper over the C ABI of unibuf (unibuf.h).
//
// RAII owners for every handle (move-only: copying would release a handle twice), including
// GGUF block matrices (GgmlMatrix) and launch batches (LaunchBatch), and one
// exception type, unibuf::Error, carrying the status, the message and the retryable flag of the
// failed call. Fences are values (unibuf::Fence), as in C.
//
//   unibuf::Device dev = unibuf::Device::open("cpu");
//   unibuf::Queue q = dev.queue();
//   unibuf::Buffer b = dev.alloc(UB_DTYPE_F32, {2, 3}, UB_STORAGE_PRIVATE, "weights");
//   q.upload(b, host.data(), host.size() * sizeof(float));
//
// Threading: every object may be used from any thread; the C library's last error is per
// thread, and each exception is built on the thread that made the failing call.
#ifndef UNIBUF_HPP
#define UNIBUF_HPP

#include "unibuf.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace unibuf {

/// A failed call: its status, message (the C library's last error) and whether retrying the
/// same call later can succeed (after freeing memory or releasing a mapping).
class Error : public std::runtime_error {
public:
    Error(ub_status status, std::string message, bool retryable)
        : std::runtime_error(std::move(message)), status_(status), retryable_(retryable) {}

    /// The status the C call returned.
    ub_status status() const noexcept { return status_; }
    /// The status's name, e.g. "UB_STATUS_OUT_OF_RANGE".
    const char *status_name() const noexcept { return ub_status_name(status_); }
    /// Whether the same call can succeed later, unchanged.
    bool retryable() const noexcept { return retryable_; }

private:
    ub_status status_;
    bool retryable_;
};

/// Throws unibuf::Error for a failed status (read on the thread of the call).
inline void check(ub_status s) {
    if (s != UB_STATUS_OK) {
        throw Error(s, ub_last_error_message(), ub_last_error_retryable());
    }
}

namespace detail {

/// A move-only owner of one handle of type T, released by Release.
template <typename T, ub_status (*Release)(T *)>
class Handle {
public:
    Handle() noexcept = default;
    explicit Handle(T *h) noexcept : h_(h) {}
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    Handle(Handle &&o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    Handle &operator=(Handle &&o) noexcept {
        if (this != &o) {
            reset();
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    ~Handle() { reset(); }

    /// The C handle (still owned by this object).
    T *get() const noexcept { return h_; }
    /// Whether a handle is held.
    explicit operator bool() const noexcept { return h_ != nullptr; }
    /// Gives the handle up without releasing it.
    T *release() noexcept { return std::exchange(h_, nullptr); }
    /// Releases the handle now (a destructor cannot report failure: a release can only fail
    /// for a handle that is not live, which ownership rules out).
    void reset() noexcept {
        if (h_ != nullptr) {
            (void)Release(h_);
            h_ = nullptr;
        }
    }

private:
    T *h_ = nullptr;
};

/// A string the C API writes through (buf, cap, len_out).
template <typename F>
std::string read_string(F &&f) {
    size_t len = 0;
    check(f(nullptr, 0, &len));
    std::string s(len + 1, '\0');
    check(f(&s[0], s.size(), &len));
    s.resize(len);
    return s;
}

}  // namespace detail

/// A point in a queue's work (a value: copy it freely). Wait with Device::wait or Queue::wait.
struct Fence {
    ub_fence raw{};
};

class Buffer;
class Queue;

/// A host mapping of a host-visible buffer: its bytes, valid while this object lives. Device
/// work that would conflict with the mapping is refused until it is destroyed.
class Mapping {
public:
    Mapping() = default;
    /// The first byte.
    void *data() const noexcept { return data_; }
    /// The bytes mapped.
    size_t size() const noexcept { return size_; }
    /// The bytes as `T` (the caller picks the buffer's element type).
    template <typename T>
    T *as() const noexcept {
        return static_cast<T *>(data_);
    }
    /// Unmaps now.
    void reset() noexcept { h_.reset(); }

private:
    friend class Buffer;
    detail::Handle<ub_mapping, ub_mapping_release> h_;
    void *data_ = nullptr;
    size_t size_ = 0;
};

/// A typed view of device memory (a buffer or a view of one); views share memory.
class Buffer {
public:
    Buffer() = default;
    /// Takes ownership of a C handle.
    explicit Buffer(ub_buffer *h) noexcept : h_(h) {}

    ub_buffer *get() const noexcept { return h_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(h_); }

    /// What the buffer is (dtype, resolved mode, lengths, offset, address, access).
    ub_buffer_info info() const {
        ub_buffer_info i{};
        check(ub_buffer_get_info(get(), &i));
        return i;
    }
    /// Bytes in the view.
    size_t byte_len() const { return info().byte_len; }
    /// The shape.
    std::vector<size_t> shape() const {
        size_t rank = 0;
        check(ub_buffer_shape(get(), nullptr, 0, &rank));
        std::vector<size_t> dims(rank);
        check(ub_buffer_shape(get(), dims.data(), dims.size(), &rank));
        return dims;
    }
    /// The label given at allocation.
    std::string label() const {
        return detail::read_string([&](char *b, size_t c, size_t *l) {
            return ub_buffer_label(get(), b, c, l);
        });
    }
    /// Rows `start..end` along the first dimension.
    Buffer rows(size_t start, size_t end) const {
        ub_buffer *v = nullptr;
        check(ub_buffer_rows(get(), start, end, &v));
        return Buffer(v);
    }
    /// Elements `start..end` of the flattened buffer, 1-D.
    Buffer slice(size_t start, size_t end) const {
        ub_buffer *v = nullptr;
        check(ub_buffer_slice(get(), start, end, &v));
        return Buffer(v);
    }
    /// Bytes `offset..offset + len` as a 1-D U8 view.
    Buffer bytes(size_t offset, size_t len) const {
        ub_buffer *v = nullptr;
        check(ub_buffer_byte_view(get(), offset, len, &v));
        return Buffer(v);
    }
    /// The same elements with another shape.
    Buffer reshape(std::initializer_list<size_t> shape) const {
        std::vector<size_t> s(shape);
        ub_buffer *v = nullptr;
        check(ub_buffer_reshape(get(), s.data(), s.size(), &v));
        return Buffer(v);
    }
    /// The same bytes as another dtype.
    Buffer cast(ub_dtype dtype) const {
        ub_buffer *v = nullptr;
        check(ub_buffer_cast(get(), dtype, &v));
        return Buffer(v);
    }
    /// Maps the bytes for UB_MAP_READ or UB_MAP_WRITE.
    Mapping map(ub_map_access access) const {
        Mapping m;
        ub_mapping *h = nullptr;
        check(ub_buffer_map(get(), access, &h, &m.data_, &m.size_));
        m.h_ = detail::Handle<ub_mapping, ub_mapping_release>(h);
        return m;
    }
    /// The platform's name for the memory (host pointer, CUdeviceptr, MTLBuffer).
    ub_native_buffer native() const {
        ub_native_buffer n{};
        check(ub_buffer_native(get(), &n));
        return n;
    }

private:
    detail::Handle<ub_buffer, ub_buffer_release> h_;
};

/// A download in flight; wait() hands its bytes over once.
class Download {
public:
    Download() = default;
    explicit Download(ub_download *h, Fence f) noexcept : h_(h), fence_(f) {}
    /// The fence of the device copy.
    Fence fence() const noexcept { return fence_; }
    /// Waits and copies the bytes into `dst` (`len` must be the source's byte length).
    void wait(void *dst, size_t len) { check(ub_download_wait(h_.get(), dst, len)); }

private:
    detail::Handle<ub_download, ub_download_release> h_;
    Fence fence_;
};

/// A queue: submissions run in order on it.
class Queue {
public:
    Queue() = default;
    explicit Queue(ub_queue *h) noexcept : h_(h) {}
    ub_queue *get() const noexcept { return h_.get(); }

    /// Uploads `len` bytes into `dst` and waits.
    void upload(const Buffer &dst, const void *src, size_t len) {
        check(ub_queue_upload(get(), dst.get(), src, len));
    }
    /// Uploads a vector's elements (its byte length must be the buffer's).
    template <typename T>
    void upload(const Buffer &dst, const std::vector<T> &src) {
        upload(dst, src.data(), src.size() * sizeof(T));
    }
    /// Uploads and returns the fence at once; `src` may be reused on return.
    Fence upload_async(const Buffer &dst, const void *src, size_t len) {
        Fence f;
        check(ub_queue_upload_async(get(), dst.get(), src, len, &f.raw));
        return f;
    }
    /// Downloads `src` into `len` bytes at `dst`.
    void download(const Buffer &src, void *dst, size_t len) {
        check(ub_queue_download(get(), src.get(), dst, len));
    }
    /// Downloads `src` into a new vector of `T`.
    template <typename T>
    std::vector<T> download(const Buffer &src) {
        std::vector<T> out(src.byte_len() / sizeof(T));
        download(src, out.data(), out.size() * sizeof(T));
        return out;
    }
    /// Starts a download; its bytes as of this point in the queue.
    Download download_async(const Buffer &src) {
        ub_download *h = nullptr;
        Fence f;
        check(ub_queue_download_async(get(), src.get(), &h, &f.raw));
        return Download(h, f);
    }
    /// Copies `src` into `dst` on the device and waits.
    void copy(const Buffer &src, const Buffer &dst) {
        check(ub_queue_copy(get(), src.get(), dst.get()));
    }
    /// Queues a device copy and returns its fence.
    Fence copy_async(const Buffer &src, const Buffer &dst) {
        Fence f;
        check(ub_queue_copy_async(get(), src.get(), dst.get(), &f.raw));
        return f;
    }
    /// Fills `dst` with `value`'s bytes repeated (sizeof(T) must be 1, 2, 4 or 8) and waits.
    template <typename T>
    void fill(const Buffer &dst, const T &value) {
        check(ub_queue_fill(get(), dst.get(), &value, sizeof(T)));
    }
    /// Queues a fill and returns its fence.
    template <typename T>
    Fence fill_async(const Buffer &dst, const T &value) {
        Fence f;
        check(ub_queue_fill_async(get(), dst.get(), &value, sizeof(T), &f.raw));
        return f;
    }
    /// Zeroes `dst` and waits.
    void zero(const Buffer &dst) { fill(dst, static_cast<std::uint8_t>(0)); }
    /// Blocks until `f` completes.
    void wait(Fence f) { check(ub_queue_wait(get(), f.raw)); }
    /// Blocks until everything submitted to this queue completes.
    void drain() { check(ub_queue_drain(get())); }
    /// The fence of the last submission.
    Fence last_fence() const {
        Fence f;
        check(ub_queue_last_fence(get(), &f.raw));
        return f;
    }
    /// The platform's queue object (CUstream, MTLCommandQueue).
    ub_native_queue native() const {
        ub_native_queue n{};
        check(ub_queue_native(get(), &n));
        return n;
    }

private:
    detail::Handle<ub_queue, ub_queue_release> h_;
};

/// An open safetensors or GGUF file.
class Weights {
public:
    Weights() = default;
    /// Opens and validates `path`.
    static Weights open(const std::string &path) {
        ub_weights *h = nullptr;
        check(ub_weights_open(path.c_str(), &h));
        Weights w;
        w.h_ = detail::Handle<ub_weights, ub_weights_release>(h);
        return w;
    }
    ub_weights *get() const noexcept { return h_.get(); }
    /// "safetensors" or "gguf".
    std::string format() const {
        const char *f = nullptr;
        check(ub_weights_format(get(), &f));
        return f;
    }
    /// The tensors, in file order (their pointers live as long as this object).
    std::vector<ub_tensor_info> tensors() const {
        size_t n = 0;
        check(ub_weights_tensor_count(get(), &n));
        std::vector<ub_tensor_info> out(n);
        for (size_t i = 0; i < n; i++) check(ub_weights_tensor_info(get(), i, &out[i]));
        return out;
    }

private:
    detail::Handle<ub_weights, ub_weights_release> h_;
};

/// A matrix in a GGUF block format (Q8_0, Q4_0, Q4_1) over a buffer of its blocks; keeps the
/// blocks alive.
class GgmlMatrix {
public:
    GgmlMatrix() = default;
    /// Takes ownership of a C handle.
    explicit GgmlMatrix(ub_ggml_matrix *h) noexcept : h_(h) {}

    /// `rows` x `cols` weights of `type` over `bytes` (U8 `[rows, cols / 32 * block bytes]`).
    static GgmlMatrix from_bytes(const Buffer &bytes, ub_ggml_type type, size_t rows,
                                 size_t cols) {
        ub_ggml_matrix *m = nullptr;
        check(ub_ggml_matrix_new(bytes.get(), type, rows, cols, &m));
        return GgmlMatrix(m);
    }
    /// The GGUF tensor `name` of `weights`, over `tensor`, the buffer its load gave.
    static GgmlMatrix from_tensor(const Weights &weights, const std::string &name,
                                  const Buffer &tensor) {
        ub_ggml_matrix *m = nullptr;
        check(ub_ggml_matrix_from_tensor(weights.get(), name.c_str(), tensor.get(), &m));
        return GgmlMatrix(m);
    }
    ub_ggml_matrix *get() const noexcept { return h_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(h_); }

    /// Format, rows, cols and bytes per row.
    ub_ggml_matrix_info info() const {
        ub_ggml_matrix_info i{};
        check(ub_ggml_matrix_get_info(get(), &i));
        return i;
    }
    size_t rows() const { return info().rows; }
    size_t cols() const { return info().cols; }
    ub_ggml_type type() const { return info().ggml_type; }
    /// The blocks, U8 `[rows, row_bytes]` (a view of the same memory).
    Buffer bytes() const {
        ub_buffer *b = nullptr;
        check(ub_ggml_matrix_bytes(get(), &b));
        return Buffer(b);
    }

private:
    detail::Handle<ub_ggml_matrix, ub_ggml_matrix_release> h_;
};

/// A device of one backend.
class Device {
public:
    Device() = default;
    explicit Device(ub_device *h) noexcept : h_(h) {}

    /// Opens `backend` ("cpu", "cuda", "metal"), or with nullptr the UNIBUF_BACKEND / best one.
    static Device open(const char *backend = nullptr) {
        ub_device *h = nullptr;
        check(ub_device_open(backend, &h));
        return Device(h);
    }
    /// Opens with options.
    static Device open(const ub_device_options &options) {
        ub_device *h = nullptr;
        check(ub_device_open_with(&options, &h));
        return Device(h);
    }
    ub_device *get() const noexcept { return h_.get(); }

    /// What the device is.
    ub_device_info info() const {
        ub_device_info i{};
        check(ub_device_get_info(get(), &i));
        return i;
    }
    /// The driver's name of the device.
    std::string name() const {
        return detail::read_string([&](char *b, size_t c, size_t *l) {
            return ub_device_name(get(), b, c, l);
        });
    }
    /// A handle of the default queue (optionally labelling its submissions).
    Queue queue(const char *label = nullptr) const {
        ub_queue *q = nullptr;
        check(ub_device_queue(get(), label, &q));
        return Queue(q);
    }
    /// A new queue with its own stream.
    Queue new_queue(const char *label) const {
        ub_queue *q = nullptr;
        check(ub_device_new_queue(get(), label, &q));
        return Queue(q);
    }
    /// Allocates `dtype` x `shape` in `mode` (Shared, Private or Auto).
    Buffer alloc(ub_dtype dtype, std::initializer_list<size_t> shape, ub_storage_mode mode,
                 const char *label = nullptr) const {
        std::vector<size_t> s(shape);
        return alloc(dtype, s, mode, label);
    }
    /// Allocates `dtype` x `shape` in `mode`.
    Buffer alloc(ub_dtype dtype, const std::vector<size_t> &shape, ub_storage_mode mode,
                 const char *label = nullptr) const {
        ub_buffer *b = nullptr;
        check(ub_device_alloc(get(), dtype, shape.data(), shape.size(), mode, label, &b));
        return Buffer(b);
    }
    /// Wraps `len` bytes of host memory at `data` without copying (External storage).
    /// `release(user_data)` runs once when the library is done with the memory, also if this
    /// throws.
    Buffer wrap_host(void *data, size_t len, bool writable, ub_dtype dtype,
                     const std::vector<size_t> &shape, ub_release_fn release, void *user_data,
                     const char *label = nullptr) const {
        ub_buffer *b = nullptr;
        check(ub_device_wrap_host(get(), label, data, len, writable, dtype, shape.data(),
                                  shape.size(), release, user_data, &b));
        return Buffer(b);
    }
    /// Blocks until `f` completes.
    void wait(Fence f) const { check(ub_device_wait(get(), f.raw)); }
    /// Whether `f` has completed (never blocks).
    bool is_complete(Fence f) const {
        bool done = false;
        check(ub_device_is_complete(get(), f.raw, &done));
        return done;
    }
    /// Blocks until every queue's work completes.
    void drain() const { check(ub_device_drain(get())); }
    /// The memory accounting.
    ub_memory_stats memory_stats() const {
        ub_memory_stats s{};
        check(ub_device_memory_stats(get(), &s));
        return s;
    }
    /// The copy audit as counts.
    ub_copy_report copy_report() const {
        ub_copy_report r{};
        check(ub_device_copy_report(get(), &r));
        return r;
    }
    /// The copy audit as the printed table.
    std::string copy_report_text() const {
        // The text can grow between the length query and the copy if other threads transfer:
        // retry until it fits.
        for (;;) {
            try {
                return detail::read_string([&](char *b, size_t c, size_t *l) {
                    return ub_device_copy_report_text(get(), b, c, l);
                });
            } catch (const Error &e) {
                if (e.status() != UB_STATUS_BUFFER_TOO_SMALL) throw;
            }
        }
    }
    /// Loads a tensor of `weights` onto this device as a buffer.
    Buffer load_tensor(const Weights &weights, const std::string &name) const {
        ub_buffer *b = nullptr;
        check(ub_weights_get_tensor(weights.get(), get(), name.c_str(), &b));
        return Buffer(b);
    }

private:
    detail::Handle<ub_device, ub_device_release> h_;
};

/// A fixed sequence of op launches on one device, recorded through recorder() and submitted
/// as one submission (on CUDA one graph launch) with submit(), any number of times.
///
///   unibuf::LaunchBatch step(dev, "decode step");
///   unibuf::Queue rec = step.recorder();
///   unibuf::ops::ggml_matvec_into(rec, w, x, y);     // recorded, not run
///   q.upload(token, ...);                              // new inputs, then
///   q.wait(step.submit(q));                            // the whole step
class LaunchBatch {
public:
    LaunchBatch() = default;
    /// An empty batch of `dev`'s kernels; `label` names its submissions.
    LaunchBatch(const Device &dev, const char *label) {
        ub_launch_batch *b = nullptr;
        check(ub_launch_batch_new(dev.get(), label, &b));
        h_ = detail::Handle<ub_launch_batch, ub_launch_batch_release>(b);
    }
    ub_launch_batch *get() const noexcept { return h_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(h_); }

    /// A recording queue: ops given it append their launches to this batch (matmul, external
    /// work, refuses it; so do transfers and waits).
    Queue recorder() const {
        ub_queue *q = nullptr;
        check(ub_launch_batch_queue(get(), &q));
        return Queue(q);
    }
    /// Launches recorded.
    size_t size() const {
        size_t n = 0;
        check(ub_launch_batch_len(get(), &n));
        return n;
    }
    /// The label its submissions carry.
    std::string label() const {
        return detail::read_string([&](char *b, size_t c, size_t *l) {
            return ub_launch_batch_label(get(), b, c, l);
        });
    }
    /// Submits every launch, in order, on `q` (a queue of the batch's device); returns the fence.
    Fence submit(const Queue &q) const {
        Fence f;
        check(ub_queue_launch_batch(q.get(), get(), &f.raw));
        return f;
    }

private:
    detail::Handle<ub_launch_batch, ub_launch_batch_release> h_;
};

/// The fused ops: fresh outputs, or `_into` a caller's buffer returning the fence (queued, not
/// waited for; on a LaunchBatch's recorder they are recorded instead).
namespace ops {

inline Buffer matmul(Queue &q, const Buffer &a, const Buffer &b) {
    ub_buffer *out = nullptr;
    check(ub_op_matmul(q.get(), a.get(), b.get(), &out));
    return Buffer(out);
}
inline Buffer rms_norm(Queue &q, const Buffer &x, const Buffer &weight, float eps) {
    ub_buffer *out = nullptr;
    check(ub_op_rms_norm(q.get(), x.get(), weight.get(), eps, &out));
    return Buffer(out);
}
inline Buffer softmax(Queue &q, const Buffer &x) {
    ub_buffer *out = nullptr;
    check(ub_op_softmax(q.get(), x.get(), &out));
    return Buffer(out);
}
inline Buffer swiglu(Queue &q, const Buffer &gate, const Buffer &up) {
    ub_buffer *out = nullptr;
    check(ub_op_swiglu(q.get(), gate.get(), up.get(), &out));
    return Buffer(out);
}
inline Buffer rope(Queue &q, const Buffer &x, const Buffer &positions, float theta_base,
                   ub_rope_style style = UB_ROPE_NEOX) {
    ub_buffer *out = nullptr;
    check(ub_op_rope(q.get(), x.get(), positions.get(), theta_base, style, &out));
    return Buffer(out);
}
inline Buffer argmax(Queue &q, const Buffer &logits) {
    ub_buffer *out = nullptr;
    check(ub_op_argmax(q.get(), logits.get(), &out));
    return Buffer(out);
}

inline Buffer ggml_matvec(Queue &q, const GgmlMatrix &m, const Buffer &x) {
    ub_buffer *out = nullptr;
    check(ub_op_ggml_matvec(q.get(), m.get(), x.get(), &out));
    return Buffer(out);
}
inline Fence ggml_matvec_into(Queue &q, const GgmlMatrix &m, const Buffer &x, const Buffer &y) {
    Fence f;
    check(ub_op_ggml_matvec_into(q.get(), m.get(), x.get(), y.get(), &f.raw));
    return f;
}

/// The C handles of the matrices (a count above UB_GGML_MAX_STACKED is for the library to
/// refuse).
inline std::vector<ub_ggml_matrix *> stacked(std::initializer_list<const GgmlMatrix *> ms) {
    std::vector<ub_ggml_matrix *> h;
    for (const GgmlMatrix *m : ms) h.push_back(m ? m->get() : nullptr);
    return h;
}

/// The matrices (1 to UB_GGML_MAX_STACKED) applied to rms_norm(x) * norm_weight, stacked.
inline Buffer ggml_matvec_norm(Queue &q, std::initializer_list<const GgmlMatrix *> matrices,
                               const Buffer &x, const Buffer &norm_weight, float eps) {
    std::vector<ub_ggml_matrix *> h = stacked(matrices);
    ub_buffer *out = nullptr;
    check(ub_op_ggml_matvec_norm(q.get(), h.data(), h.size(), x.get(), norm_weight.get(), eps,
                                 &out));
    return Buffer(out);
}
inline Fence ggml_matvec_norm_into(Queue &q, std::initializer_list<const GgmlMatrix *> matrices,
                                   const Buffer &x, const Buffer &norm_weight, float eps,
                                   const Buffer &out) {
    std::vector<ub_ggml_matrix *> h = stacked(matrices);
    Fence f;
    check(ub_op_ggml_matvec_norm_into(q.get(), h.data(), h.size(), x.get(), norm_weight.get(),
                                      eps, out.get(), &f.raw));
    return f;
}
inline Buffer ggml_matvec_add(Queue &q, const GgmlMatrix &m, const Buffer &x,
                              const Buffer &residual) {
    ub_buffer *out = nullptr;
    check(ub_op_ggml_matvec_add(q.get(), m.get(), x.get(), residual.get(), &out));
    return Buffer(out);
}
inline Fence ggml_matvec_add_into(Queue &q, const GgmlMatrix &m, const Buffer &x,
                                  const Buffer &residual, const Buffer &out) {
    Fence f;
    check(ub_op_ggml_matvec_add_into(q.get(), m.get(), x.get(), residual.get(), out.get(),
                                     &f.raw));
    return f;
}
inline Buffer ggml_swiglu_norm(Queue &q, const GgmlMatrix &gate, const GgmlMatrix &up,
                               const Buffer &x, const Buffer &norm_weight, float eps) {
    ub_buffer *out = nullptr;
    check(ub_op_ggml_swiglu_norm(q.get(), gate.get(), up.get(), x.get(), norm_weight.get(), eps,
                                 &out));
    return Buffer(out);
}
inline Fence ggml_swiglu_norm_into(Queue &q, const GgmlMatrix &gate, const GgmlMatrix &up,
                                   const Buffer &x, const Buffer &norm_weight, float eps,
                                   const Buffer &out) {
    Fence f;
    check(ub_op_ggml_swiglu_norm_into(q.get(), gate.get(), up.get(), x.get(), norm_weight.get(),
                                      eps, out.get(), &f.raw));
    return f;
}
inline Fence ggml_qkv_rope_append_into(Queue &q, const GgmlMatrix &wq, const GgmlMatrix &wk,
                                       const GgmlMatrix &wv, const Buffer &x,
                                       const Buffer &norm_weight, float eps,
                                       const Buffer &positions, float theta_base,
                                       ub_rope_style style, const Buffer &q_out,
                                       const Buffer &k_cache, const Buffer &v_cache) {
    Fence f;
    check(ub_op_ggml_qkv_rope_append_into(q.get(), wq.get(), wk.get(), wv.get(), x.get(),
                                          norm_weight.get(), eps, positions.get(), theta_base,
                                          style, q_out.get(), k_cache.get(), v_cache.get(),
                                          &f.raw));
    return f;
}
inline Buffer ggml_dequantize(Queue &q, const GgmlMatrix &m, ub_dtype dtype = UB_DTYPE_F32) {
    ub_buffer *out = nullptr;
    check(ub_op_ggml_dequantize(q.get(), m.get(), dtype, &out));
    return Buffer(out);
}
inline Fence ggml_dequantize_into(Queue &q, const GgmlMatrix &m, const Buffer &out) {
    Fence f;
    check(ub_op_ggml_dequantize_into(q.get(), m.get(), out.get(), &f.raw));
    return f;
}
inline Buffer ggml_embed_rows(Queue &q, const GgmlMatrix &table, const Buffer &ids,
                              ub_dtype dtype = UB_DTYPE_F32) {
    ub_buffer *out = nullptr;
    check(ub_op_ggml_embed_rows(q.get(), table.get(), ids.get(), dtype, &out));
    return Buffer(out);
}
inline Fence ggml_embed_rows_into(Queue &q, const GgmlMatrix &table, const Buffer &ids,
                                  const Buffer &out) {
    Fence f;
    check(ub_op_ggml_embed_rows_into(q.get(), table.get(), ids.get(), out.get(), &f.raw));
    return f;
}
inline Fence softmax_into(Queue &q, const Buffer &x, const Buffer &out) {
    Fence f;
    check(ub_op_softmax_into(q.get(), x.get(), out.get(), &f.raw));
    return f;
}

}  // namespace ops

}  // namespace unibuf

#endif  // UNIBUF_HPP
