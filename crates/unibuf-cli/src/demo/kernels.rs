//! The one kernel the demo adds to the ops of `unibuf::ops`: the weighted residual add that
//! mixes an expert's output into the residual stream, `out = x + alpha * d`.
//!
//! Everything else the demo runs is a built-in op (RMSNorm, the q4 matrix-vector product,
//! SwiGLU, sampling) or a device copy (the embedding row). The kernel comes in the three
//! versions every kernel of the registry has: Rust for the CPU backend, CUDA C for NVRTC and
//! Metal Shading Language, each a grid-stride loop over the elements. The CPU version checks
//! every length against `n` and returns an error instead of indexing out of bounds: on the CPU
//! backend that becomes a device fault naming the submission, as a bad launch would on a GPU.

use crate::Failure;
use unibuf::{
    Buffer, CpuKernelArgs, DType, Device, Fence, Kernel, KernelSource, LaunchDims, Param, Queue,
    ScalarType,
};

/// Threads per block of the CUDA kernel (threadgroup on Metal).
const THREADS: u32 = 256;
/// Blocks at most; the kernels grid-stride over the rest.
const MAX_BLOCKS: u32 = 4096;

/// `out = x + alpha * d`, over vectors of `n` elements.
pub static SCALED_ADD: KernelSource = KernelSource {
    name: "demo_scaled_add_f32",
    params: &[
        Param::input("x", DType::F32),
        Param::input("d", DType::F32),
        Param::output("out", DType::F32),
        Param::scalar("n", ScalarType::U32),
        Param::scalar("alpha", ScalarType::F32),
    ],
    cuda: Some(
        r#"
extern "C" __global__ void demo_scaled_add_f32(const float* x, const float* d, float* out,
                                               unsigned int n, float alpha) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += gridDim.x * blockDim.x) {
        out[i] = x[i] + alpha * d[i];
    }
}
"#,
    ),
    msl: Some(
        r#"#include <metal_stdlib>
using namespace metal;

kernel void demo_scaled_add_f32(const device float* x [[buffer(0)]],
                                const device float* d [[buffer(1)]],
                                device float* out [[buffer(2)]], constant uint& n [[buffer(3)]],
                                constant float& alpha [[buffer(4)]],
                                uint gid [[thread_position_in_grid]],
                                uint grid [[threads_per_grid]]) {
    for (uint i = gid; i < n; i += grid) {
        out[i] = x[i] + alpha * d[i];
    }
}
"#,
    ),
    cpu: Some(scaled_add_cpu),
};

/// Every kernel of the demo, for registration.
pub const ALL: [&KernelSource; 1] = [&SCALED_ADD];

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

// The CPU kernel ignores the launch geometry: the backend runs each launch on its queue's
// worker thread, and one pass over the whole vector is the natural unit there.
fn scaled_add_cpu(args: &mut CpuKernelArgs<'_>) -> Result<(), String> {
    const NAME: &str = "demo_scaled_add_f32";
    let n = args.u32(3)? as usize;
    let alpha = args.f32(4)?;
    let x = args.input::<f32>(0)?;
    let d = args.input::<f32>(1)?;
    let out = args.output::<f32>(2)?;
    expect_len(NAME, "x", x.len(), n)?;
    expect_len(NAME, "d", d.len(), n)?;
    expect_len(NAME, "out", out.len(), n)?;
    for ((o, &a), &b) in out.iter_mut().zip(x).zip(d) {
        *o = a + alpha * b;
    }
    Ok(())
}

/// The demo's kernels, compiled for one device, with launchers that take buffers and derive
/// the size arguments from their shapes, so a call cannot pass sizes that disagree with them.
#[derive(Debug)]
pub struct Kernels {
    scaled_add: Kernel,
}

impl Kernels {
    /// Registers the demo's kernels on `dev` and compiles every registered kernel now
    /// (`warm_all`: the demo's and the built-in ops'), so that no launch in the timed loop pays
    /// for compilation. Returns the kernels and the number of pipelines the device holds.
    pub fn register(dev: &Device) -> unibuf::Result<(Kernels, usize)> {
        for source in ALL {
            dev.register_kernel(*source)?;
        }
        let pipelines = dev.warm_all()?;
        let kernels = Kernels {
            scaled_add: dev.kernel(SCALED_ADD.name)?,
        };
        Ok((kernels, pipelines))
    }

    /// `out = x + alpha * d`, the length taken from `x`.
    pub fn scaled_add(
        &self,
        q: &Queue,
        x: &Buffer,
        d: &Buffer,
        alpha: f32,
        out: &Buffer,
    ) -> Result<Fence, Failure> {
        let n = u32::try_from(x.len()).map_err(|_| {
            Failure::new(format!(
                "{}: '{}' has {} elements, more than a u32 size argument can name",
                SCALED_ADD.name,
                x.label(),
                x.len()
            ))
        })?;
        // The GPU kernels trust `n` for all three buffers: refuse lengths that disagree before
        // anything is recorded (the CPU kernel checks again, as a second line).
        for (what, b) in [("d", d), ("out", out)] {
            if b.len() != x.len() {
                return Err(Failure::new(format!(
                    "{}: '{what}' ('{}') has {} elements, 'x' has {}",
                    SCALED_ADD.name,
                    b.label(),
                    b.len(),
                    x.len()
                )));
            }
        }
        let blocks = n.div_ceil(THREADS).clamp(1, MAX_BLOCKS);
        Ok(q.launch(
            &self.scaled_add,
            LaunchDims::linear(blocks, THREADS),
            &[x.into(), d.into(), out.into(), n.into(), alpha.into()],
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
        // Each kernel without constants, and the ops' specialised variants besides.
        assert!(pipelines >= names.len(), "{pipelines} for {}", names.len());
        assert!(ALL.iter().all(|k| names.contains(&k.name)));
        (dev, kernels)
    }

    fn buffer(dev: &Device, data: &[f32]) -> Buffer {
        let b = dev
            .alloc(DType::F32, &[data.len()], StorageMode::Shared)
            .expect("alloc");
        dev.queue().upload(&b, data).expect("upload");
        b
    }

    #[test]
    fn scaled_add_computes_what_it_documents() {
        let (dev, k) = device();
        let q = dev.queue();
        let x = buffer(&dev, &[1.0, -2.0, 0.5]);
        let d = buffer(&dev, &[4.0, 1.0, -1.0]);
        let out = buffer(&dev, &[0.0; 3]);
        k.scaled_add(&q, &x, &d, 0.25, &out).expect("scaled_add");
        assert_eq!(
            q.download::<f32>(&out).expect("download"),
            [2.0, -1.75, 0.25]
        );
    }

    #[test]
    fn mismatched_lengths_are_refused_before_launch() {
        let (dev, k) = device();
        let q = dev.queue();
        let x = buffer(&dev, &[1.0; 3]);
        let short_d = buffer(&dev, &[1.0; 2]);
        let out = buffer(&dev, &[0.0; 3]);
        let err = k
            .scaled_add(&q, &x, &short_d, 1.0, &out)
            .expect_err("a short d is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("demo_scaled_add_f32") && msg.contains("has 2 elements, 'x' has 3"),
            "{msg}"
        );
        let short_out = buffer(&dev, &[0.0; 2]);
        assert!(k.scaled_add(&q, &x, &x, 1.0, &short_out).is_err());
        q.drain().expect("nothing was launched");
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
