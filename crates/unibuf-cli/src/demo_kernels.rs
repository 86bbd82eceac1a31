//! The demo's kernels: one [`KernelSource`] each, with a Rust CPU implementation and CUDA C for
//! NVRTC, plus [`Kernels`], typed launchers that derive the size arguments from buffer shapes.
//!
//! The CPU versions check every length against their scalar arguments and return an error
//! instead of indexing out of bounds: on the CPU backend an error becomes a device fault that
//! names the submission, which is what a GPU would report for a bad launch.
//!
//! The CUDA versions are deliberately plain (grid-stride loops, one thread per element, one warp
//! per matrix row so that weight reads coalesce, one block-wide reduction for the norm): the
//! demo exercises the runtime, not kernel tuning.
//! Their parameters are in the order of `params`, buffers as pointers and `u32` as `unsigned int`.

use crate::Failure;
use unibuf::{
    Buffer, CpuKernelArgs, DType, Device, Fence, Kernel, KernelSource, LaunchDims, Param, Queue,
    ScalarType,
};

/// Threads per block of the CUDA matrix and element kernels; a multiple of the warp size.
const THREADS: u32 = 256;

/// Threads per warp on NVIDIA GPUs: `matvec_f32` gives each output row one warp.
const WARP: u32 = 32;

/// Threads of the single block that computes an RMS norm. A power of two no larger than the
/// `partial` array in [`RMS_NORM_CUDA`], which its tree reduction requires.
const NORM_THREADS: u32 = 256;

/// `out = x / sqrt(mean(x^2) + eps) * weight`, over vectors of `n` elements.
pub static RMS_NORM: KernelSource = KernelSource {
    name: "rms_norm_f32",
    params: &[
        Param::input("x", DType::F32),
        Param::input("weight", DType::F32),
        Param::output("out", DType::F32),
        Param::scalar("n", ScalarType::U32),
        Param::scalar("eps", ScalarType::F32),
    ],
    cuda: Some(RMS_NORM_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;

// One threadgroup of a power-of-two number of threads (at most 1024) normalises the whole vector.
kernel void rms_norm_f32(const device float* x [[buffer(0)]], const device float* weight [[buffer(1)]],
                         device float* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                         constant float& eps [[buffer(4)]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint threads [[threads_per_threadgroup]]) {
    threadgroup float partial[1024];
    float acc = 0.0f;
    for (uint i = tid; i < n; i += threads) {
        acc += x[i] * x[i];
    }
    partial[tid] = acc;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint stride = threads / 2; stride > 0; stride /= 2) {
        if (tid < stride) {
            partial[tid] += partial[tid + stride];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    const float scale = rsqrt(partial[0] / float(n) + eps);
    for (uint i = tid; i < n; i += threads) {
        out[i] = x[i] * scale * weight[i];
    }
}
"#,
    ),
    cpu: Some(rms_norm_cpu),
};

/// `y = W x` for a row-major `rows x cols` matrix `W`.
pub static MATVEC: KernelSource = KernelSource {
    name: "matvec_f32",
    params: &[
        Param::input("w", DType::F32),
        Param::input("x", DType::F32),
        Param::output("y", DType::F32),
        Param::scalar("rows", ScalarType::U32),
        Param::scalar("cols", ScalarType::U32),
    ],
    cuda: Some(MATVEC_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;

// One SIMD-group per output row, grid-stride over rows: the lanes read consecutive columns and
// simd_sum adds them. The threadgroup size must be a multiple of the SIMD width, so that all
// lanes of a SIMD-group share one row (and so take every branch together).
kernel void matvec_f32(const device float* w [[buffer(0)]], const device float* x [[buffer(1)]],
                       device float* y [[buffer(2)]], constant uint& rows [[buffer(3)]],
                       constant uint& cols [[buffer(4)]], uint gid [[thread_position_in_grid]],
                       uint grid [[threads_per_grid]], uint lane [[thread_index_in_simdgroup]],
                       uint width [[threads_per_simdgroup]]) {
    const ulong groups = grid / width;
    for (ulong r = gid / width; r < rows; r += groups) {
        const device float* row = w + r * cols;
        float acc = 0.0f;
        for (uint c = lane; c < cols; c += width) {
            acc += row[c] * x[c];
        }
        acc = simd_sum(acc);
        if (lane == 0) {
            y[r] = acc;
        }
    }
}
"#,
    ),
    cpu: Some(matvec_cpu),
};

/// `out = silu(gate) * up`, the gated activation of a SwiGLU MLP.
pub static SILU_MUL: KernelSource = KernelSource {
    name: "silu_mul_f32",
    params: &[
        Param::input("gate", DType::F32),
        Param::input("up", DType::F32),
        Param::output("out", DType::F32),
        Param::scalar("n", ScalarType::U32),
    ],
    cuda: Some(SILU_MUL_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;

kernel void silu_mul_f32(const device float* gate [[buffer(0)]], const device float* up [[buffer(1)]],
                         device float* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                         uint gid [[thread_position_in_grid]], uint grid [[threads_per_grid]]) {
    for (uint i = gid; i < n; i += grid) {
        const float g = gate[i];
        out[i] = g / (1.0f + exp(-g)) * up[i];
    }
}
"#,
    ),
    cpu: Some(silu_mul_cpu),
};

/// `out = a + b`: the residual connection.
pub static ADD: KernelSource = KernelSource {
    name: "add_f32",
    params: &[
        Param::input("a", DType::F32),
        Param::input("b", DType::F32),
        Param::output("out", DType::F32),
        Param::scalar("n", ScalarType::U32),
    ],
    cuda: Some(ADD_CUDA),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;

kernel void add_f32(const device float* a [[buffer(0)]], const device float* b [[buffer(1)]],
                    device float* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                    uint gid [[thread_position_in_grid]], uint grid [[threads_per_grid]]) {
    for (uint i = gid; i < n; i += grid) {
        out[i] = a[i] + b[i];
    }
}
"#,
    ),
    cpu: Some(add_cpu),
};

/// Every kernel of the demo, for registration.
pub const ALL: [&KernelSource; 4] = [&RMS_NORM, &MATVEC, &SILU_MUL, &ADD];

const RMS_NORM_CUDA: &str = r#"
// One block of a power-of-two number of threads (at most 1024) normalises the whole vector.
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out,
                                        unsigned int n, float eps) {
    __shared__ float partial[1024];
    float acc = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        acc += x[i] * x[i];
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            partial[threadIdx.x] += partial[threadIdx.x + stride];
        }
        __syncthreads();
    }
    const float scale = rsqrtf(partial[0] / (float)n + eps);
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        out[i] = x[i] * scale * weight[i];
    }
}
"#;

const MATVEC_CUDA: &str = r#"
// One 32-lane warp per output row, grid-stride over rows. The lanes read consecutive columns,
// so every load of the warp is one coalesced transaction; a shuffle reduction sums the lanes.
// blockDim.x must be a multiple of 32, so that all lanes of a warp share one row.
extern "C" __global__ void matvec_f32(const float* w, const float* x, float* y,
                                      unsigned int rows, unsigned int cols) {
    const unsigned int lane = threadIdx.x % 32;
    const unsigned long long warps = (unsigned long long)gridDim.x * blockDim.x / 32;
    for (unsigned long long r = ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
         r < rows; r += warps) {
        const float* row = w + r * cols;
        float acc = 0.0f;
        for (unsigned int c = lane; c < cols; c += 32) {
            acc += row[c] * x[c];
        }
        for (int offset = 16; offset > 0; offset /= 2) {
            acc += __shfl_down_sync(0xffffffffu, acc, offset);
        }
        if (lane == 0) {
            y[r] = acc;
        }
    }
}
"#;

const SILU_MUL_CUDA: &str = r#"
extern "C" __global__ void silu_mul_f32(const float* gate, const float* up, float* out,
                                        unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
"#;

const ADD_CUDA: &str = r#"
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}
"#;

/// Fails unless buffer argument `what` of `kernel` holds exactly `want` elements.
fn expect_len(kernel: &str, what: &str, have: usize, want: usize) -> Result<(), String> {
    if have == want {
        Ok(())
    } else {
        Err(format!(
            "{kernel}: '{what}' has {have} elements, expected {want}"
        ))
    }
}

/// A dot product with eight independent accumulators. A single running sum is a serial
/// dependency chain that the compiler may not reorder (float addition is not associative);
/// eight lanes let it vectorise, which makes the CPU demo several times faster.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

// The CPU kernels ignore the launch geometry: the backend runs each launch on its queue's
// worker thread, and one pass over the whole vector is the natural unit there.

fn rms_norm_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "rms_norm_f32";
    let n = args.u32(3)? as usize;
    let eps = args.f32(4)?;
    let x = args.input::<f32>(0)?;
    let weight = args.input::<f32>(1)?;
    let out = args.output::<f32>(2)?;
    if n == 0 {
        return Err(format!("{NAME}: n must be at least 1"));
    }
    expect_len(NAME, "x", x.len(), n)?;
    expect_len(NAME, "weight", weight.len(), n)?;
    expect_len(NAME, "out", out.len(), n)?;
    let mean_square = dot(x, x) / n as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
    Ok(())
}

fn matvec_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "matvec_f32";
    let rows = args.u32(3)? as usize;
    let cols = args.u32(4)? as usize;
    let w = args.input::<f32>(0)?;
    let x = args.input::<f32>(1)?;
    let y = args.output::<f32>(2)?;
    if rows == 0 || cols == 0 {
        return Err(format!(
            "{NAME}: rows ({rows}) and cols ({cols}) must be at least 1"
        ));
    }
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| format!("{NAME}: {rows} x {cols} overflows"))?;
    expect_len(NAME, "w", w.len(), elements)?;
    expect_len(NAME, "x", x.len(), cols)?;
    expect_len(NAME, "y", y.len(), rows)?;
    for (y, row) in y.iter_mut().zip(w.chunks_exact(cols)) {
        *y = dot(row, x);
    }
    Ok(())
}

fn silu_mul_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "silu_mul_f32";
    let n = args.u32(3)? as usize;
    let gate = args.input::<f32>(0)?;
    let up = args.input::<f32>(1)?;
    let out = args.output::<f32>(2)?;
    expect_len(NAME, "gate", gate.len(), n)?;
    expect_len(NAME, "up", up.len(), n)?;
    expect_len(NAME, "out", out.len(), n)?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
    Ok(())
}

fn add_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "add_f32";
    let n = args.u32(3)? as usize;
    let a = args.input::<f32>(0)?;
    let b = args.input::<f32>(1)?;
    let out = args.output::<f32>(2)?;
    expect_len(NAME, "a", a.len(), n)?;
    expect_len(NAME, "b", b.len(), n)?;
    expect_len(NAME, "out", out.len(), n)?;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
    Ok(())
}

/// A buffer's element count as the `u32` the kernels take.
fn len_u32(kernel: &str, what: &str, len: usize) -> Result<u32, Failure> {
    u32::try_from(len).map_err(|_| {
        Failure::new(format!(
            "{kernel}: '{what}' has {len} elements, more than a u32 size argument can name"
        ))
    })
}

/// One block per `THREADS` elements, so each element gets its own thread.
fn per_element(n: u32) -> LaunchDims {
    LaunchDims::linear(n.div_ceil(THREADS).max(1), THREADS)
}

/// The demo's kernels, compiled for one device, with launchers that take buffers and derive
/// the size arguments from their shapes, so a call cannot pass sizes that disagree with them.
#[derive(Debug)]
pub struct Kernels {
    rms_norm: Kernel,
    matvec: Kernel,
    silu_mul: Kernel,
    add: Kernel,
}

impl Kernels {
    /// Registers every kernel on `dev` and compiles them all now (`warm_all`), so that no
    /// launch in the timed loop pays for compilation. Returns the kernels and the number of
    /// pipelines the device's cache holds.
    pub fn register(dev: &Device) -> unibuf::Result<(Kernels, usize)> {
        for source in ALL {
            dev.register_kernel(*source)?;
        }
        let pipelines = dev.warm_all()?;
        let kernels = Kernels {
            rms_norm: dev.kernel(RMS_NORM.name)?,
            matvec: dev.kernel(MATVEC.name)?,
            silu_mul: dev.kernel(SILU_MUL.name)?,
            add: dev.kernel(ADD.name)?,
        };
        Ok((kernels, pipelines))
    }

    /// `out = rms_norm(x) * weight`, the length taken from `x`.
    pub fn rms_norm(
        &self,
        q: &Queue,
        x: &Buffer,
        weight: &Buffer,
        out: &Buffer,
        eps: f32,
    ) -> Result<Fence, Failure> {
        let n = len_u32(RMS_NORM.name, "x", x.len())?;
        let dims = LaunchDims::linear(1, NORM_THREADS);
        Ok(q.launch(
            &self.rms_norm,
            dims,
            &[x.into(), weight.into(), out.into(), n.into(), eps.into()],
        )?)
    }

    /// `y = w x`, the sizes taken from the shape `[rows, cols]` of `w`.
    pub fn matvec(&self, q: &Queue, w: &Buffer, x: &Buffer, y: &Buffer) -> Result<Fence, Failure> {
        let &[rows, cols] = w.shape() else {
            return Err(Failure::new(format!(
                "{}: '{}' has shape {:?}, expected [rows, cols]",
                MATVEC.name,
                w.label(),
                w.shape()
            )));
        };
        let rows = len_u32(MATVEC.name, "rows of w", rows)?;
        let cols = len_u32(MATVEC.name, "cols of w", cols)?;
        // One warp per row; the grid covers every row once (the kernel also grid-strides).
        let dims = LaunchDims::linear(rows.div_ceil(THREADS / WARP).max(1), THREADS);
        Ok(q.launch(
            &self.matvec,
            dims,
            &[w.into(), x.into(), y.into(), rows.into(), cols.into()],
        )?)
    }

    /// `out = silu(gate) * up`, the length taken from `gate`.
    pub fn silu_mul(
        &self,
        q: &Queue,
        gate: &Buffer,
        up: &Buffer,
        out: &Buffer,
    ) -> Result<Fence, Failure> {
        let n = len_u32(SILU_MUL.name, "gate", gate.len())?;
        Ok(q.launch(
            &self.silu_mul,
            per_element(n),
            &[gate.into(), up.into(), out.into(), n.into()],
        )?)
    }

    /// `out = a + b`, the length taken from `a`.
    pub fn add(&self, q: &Queue, a: &Buffer, b: &Buffer, out: &Buffer) -> Result<Fence, Failure> {
        let n = len_u32(ADD.name, "a", a.len())?;
        Ok(q.launch(
            &self.add,
            per_element(n),
            &[a.into(), b.into(), out.into(), n.into()],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unibuf::StorageMode;

    fn device() -> (Device, Kernels) {
        let dev = Device::open("cpu").expect("the CPU backend is always available");
        let (kernels, pipelines) = Kernels::register(&dev).expect("registration");
        // warm_all compiles every registered kernel: the demo's and the ops' built-in ones.
        let names = dev.kernel_names();
        assert_eq!(pipelines, names.len());
        assert!(ALL.iter().all(|k| names.contains(&k.name)));
        (dev, kernels)
    }

    fn buffer(dev: &Device, shape: &[usize], data: &[f32]) -> Buffer {
        let b = dev
            .alloc(DType::F32, shape, StorageMode::Shared)
            .expect("alloc");
        dev.queue().upload(&b, data).expect("upload");
        b
    }

    #[test]
    fn dot_matches_a_plain_sum_for_every_tail_length() {
        for n in 0..40 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.25).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - plain).abs() <= 1e-4 * plain.abs().max(1.0),
                "n = {n}"
            );
        }
    }

    #[test]
    fn kernels_compute_what_they_document() {
        let (dev, k) = device();
        let q = dev.queue();
        let w = buffer(&dev, &[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.5, 4.0]);
        let x = buffer(&dev, &[3], &[2.0, -1.0, 0.5]);
        let y = buffer(&dev, &[2], &[0.0; 2]);
        k.matvec(&q, &w, &x, &y).expect("matvec");
        assert_eq!(q.download::<f32>(&y).expect("download"), [1.5, -0.5]);

        let ones = buffer(&dev, &[3], &[1.0; 3]);
        let sum = buffer(&dev, &[3], &[0.0; 3]);
        k.add(&q, &x, &ones, &sum).expect("add");
        assert_eq!(q.download::<f32>(&sum).expect("download"), [3.0, 0.0, 1.5]);

        let act = buffer(&dev, &[3], &[0.0; 3]);
        k.silu_mul(&q, &x, &ones, &act).expect("silu_mul");
        let silu = |g: f32| g / (1.0 + (-g).exp());
        let got = q.download::<f32>(&act).expect("download");
        for (g, want) in got.iter().zip([silu(2.0), silu(-1.0), silu(0.5)]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }

        let normed = buffer(&dev, &[3], &[0.0; 3]);
        k.rms_norm(&q, &x, &ones, &normed, 0.0).expect("rms_norm");
        let rms = ((4.0f32 + 1.0 + 0.25) / 3.0).sqrt();
        let got = q.download::<f32>(&normed).expect("download");
        for (g, v) in got.iter().zip([2.0f32, -1.0, 0.5]) {
            assert!((g - v / rms).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn mismatched_lengths_fault_instead_of_reading_out_of_bounds() {
        let (dev, k) = device();
        let q = dev.queue();
        let w = buffer(&dev, &[2, 3], &[1.0; 6]);
        let short_x = buffer(&dev, &[2], &[1.0; 2]);
        let y = buffer(&dev, &[2], &[0.0; 2]);
        // The launch is valid for the runtime (dtypes and access match); the kernel itself
        // must notice that x is shorter than the matrix's rows and fail the submission.
        k.matvec(&q, &w, &short_x, &y)
            .expect("the launch is recorded");
        let err = q.drain().expect_err("the kernel rejects the sizes");
        let msg = err.to_string();
        assert!(
            msg.contains("matvec_f32") && msg.contains("'x' has 2 elements"),
            "{msg}"
        );
    }

    #[test]
    fn matvec_refuses_a_matrix_that_is_not_two_dimensional() {
        let (dev, k) = device();
        let flat = buffer(&dev, &[6], &[1.0; 6]);
        let x = buffer(&dev, &[3], &[1.0; 3]);
        let y = buffer(&dev, &[2], &[0.0; 2]);
        let err = k
            .matvec(&dev.queue(), &flat, &x, &y)
            .expect_err("1-D matrix");
        assert!(err.to_string().contains("expected [rows, cols]"), "{err}");
    }

    #[test]
    fn every_kernel_has_cuda_and_msl_source_with_its_entry_point() {
        for k in ALL {
            let src = k.cuda.expect("CUDA source");
            let entry = format!("extern \"C\" __global__ void {}(", k.name);
            assert!(src.contains(&entry), "{} lacks `{entry}`", k.name);
            let msl = k.msl.expect("MSL source");
            let entry = format!("kernel void {}(", k.name);
            assert!(msl.contains(&entry), "{} lacks `{entry}`", k.name);
            assert!(k.cpu.is_some(), "{}", k.name);
        }
    }
}
