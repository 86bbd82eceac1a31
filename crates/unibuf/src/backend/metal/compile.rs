//! Kernel compilation: Metal Shading Language source to compute pipelines, with unibuf's
//! constants as function constants, and a pipeline cache keyed by (name, constants).
//!
//! The source is compiled once per (kernel name, source) into an MTLLibrary
//! (`newLibraryWithSource:options:error:`); each set of constants then specialises the kernel
//! function (`newFunctionWithName:constantValues:error:`) without compiling the source again,
//! and the pipeline (`newComputePipelineStateWithFunction:error:`) is cached.
//!
//! The MSL convention of unibuf kernels: the kernel function has the [`KernelSource`]'s name,
//! and parameter `i` of the declared signature is bound at `[[buffer(i)]]`: buffers as
//! `device T*` (`const device T*` for inputs), scalars as `constant T&` (`uint`, `int`, `ulong`,
//! `float`). A constant named `N` is read from a function constant declared as
//! `constant <type> N [[function_constant(k)]];`; its value is converted to the declared type
//! (integer, bool or float), and a value that does not fit is an error. Constants the function
//! does not declare are ignored, as an unused `-D` define is on CUDA.
//!
//! There is no disk cache of our own: Metal keeps compiled shaders in its system shader cache.

use crate::backend::{KernelCacheStats, PipelineId};
use crate::error::{Error, Result};
use crate::kernel::{Constants, KernelSource};
use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2::Message;
use objc2_foundation::NSString;
use objc2_metal::{
    MTLCompileOptions, MTLComputePipelineState, MTLDataType, MTLDevice, MTLFunction,
    MTLFunctionConstantValues, MTLLibrary,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// A compiled kernel.
pub(super) struct Pipeline {
    pub state: Retained<ProtocolObject<dyn MTLComputePipelineState>>,
    pub name: &'static str,
    /// The largest threadgroup the pipeline accepts.
    pub max_threads: usize,
}

type Library = Retained<ProtocolObject<dyn MTLLibrary>>;

/// Compiled libraries and pipelines of one device.
#[derive(Default)]
pub(super) struct Compiler {
    /// Libraries by kernel name and source (two devices' registries may hold different kernels
    /// of one name).
    libraries: Mutex<HashMap<(&'static str, &'static str), Library>>,
    pipelines: RwLock<Vec<Pipeline>>,
    by_key: Mutex<HashMap<(&'static str, &'static str, Constants), PipelineId>>,
    compiled: AtomicU64,
    memory_hits: AtomicU64,
}

fn fail(kernel: &str, log: impl Into<String>) -> Error {
    Error::Compile {
        kernel: kernel.to_owned(),
        log: log.into(),
    }
}

/// A constant's value in the layout of its declared type: up to 8 bytes, native order.
#[derive(Debug, PartialEq)]
pub(super) struct ConstantBytes {
    bytes: [u8; 8],
}

/// Converts `value` to the function constant type `ty`, or says why it cannot.
pub(super) fn constant_bytes(ty: MTLDataType, value: i64) -> Result<ConstantBytes, String> {
    fn pack(b: &[u8]) -> ConstantBytes {
        let mut bytes = [0u8; 8];
        bytes[..b.len()].copy_from_slice(b);
        ConstantBytes { bytes }
    }
    let range = |what: &str| format!("{value} does not fit the declared type {what}");
    Ok(match ty {
        MTLDataType::Bool => match value {
            0 | 1 => pack(&[value as u8]),
            _ => return Err(range("bool (0 or 1)")),
        },
        MTLDataType::Char => pack(
            &i8::try_from(value)
                .map_err(|_| range("char"))?
                .to_ne_bytes(),
        ),
        MTLDataType::UChar => pack(
            &u8::try_from(value)
                .map_err(|_| range("uchar"))?
                .to_ne_bytes(),
        ),
        MTLDataType::Short => pack(
            &i16::try_from(value)
                .map_err(|_| range("short"))?
                .to_ne_bytes(),
        ),
        MTLDataType::UShort => pack(
            &u16::try_from(value)
                .map_err(|_| range("ushort"))?
                .to_ne_bytes(),
        ),
        MTLDataType::Int => pack(
            &i32::try_from(value)
                .map_err(|_| range("int"))?
                .to_ne_bytes(),
        ),
        MTLDataType::UInt => pack(
            &u32::try_from(value)
                .map_err(|_| range("uint"))?
                .to_ne_bytes(),
        ),
        MTLDataType::Long => pack(&value.to_ne_bytes()),
        MTLDataType::ULong => pack(
            &u64::try_from(value)
                .map_err(|_| range("ulong"))?
                .to_ne_bytes(),
        ),
        MTLDataType::Float => {
            // Exact only up to 2^24; a constant that would round is refused, not changed.
            let f = value as f32;
            if f as i64 != value || value.unsigned_abs() > 1 << 24 {
                return Err(range("float (integers up to 2^24 exactly)"));
            }
            pack(&f.to_ne_bytes())
        }
        other => {
            return Err(format!(
                "function constants of MTLDataType {} are not supported (integer, bool or float)",
                other.0
            ))
        }
    })
}

impl Compiler {
    /// The pipeline for `kernel` specialised with `constants`, compiled on first use.
    pub fn compile(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        kernel: &KernelSource,
        constants: &Constants,
    ) -> Result<PipelineId> {
        self.compile_counted(device, kernel, constants, true)
    }

    /// As `compile`, for the backend's own kernels: not counted in the stats, which describe
    /// the caller's kernels.
    pub fn compile_builtin(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        kernel: &KernelSource,
    ) -> Result<PipelineId> {
        self.compile_counted(device, kernel, &Constants::new(), false)
    }

    fn compile_counted(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        kernel: &KernelSource,
        constants: &Constants,
        count: bool,
    ) -> Result<PipelineId> {
        let source = kernel.msl.ok_or_else(|| {
            fail(
                kernel.name,
                "no MSL (Metal Shading Language) source was given",
            )
        })?;
        let key = (kernel.name, source, constants.clone());
        if let Some(id) = self.by_key.lock().get(&key) {
            if count {
                self.memory_hits.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(*id);
        }
        let library = self.library(device, kernel.name, source)?;
        let name = NSString::from_str(kernel.name);
        let base = library.newFunctionWithName(&name).ok_or_else(|| {
            fail(
                kernel.name,
                format!(
                    "the MSL source has no kernel function named '{}'",
                    kernel.name
                ),
            )
        })?;
        let function = specialise(&library, &base, &name, kernel.name, constants)?;
        let state = device
            .newComputePipelineStateWithFunction_error(&function)
            .map_err(|e| fail(kernel.name, e.localizedDescription().to_string()))?;
        let max_threads = state.maxTotalThreadsPerThreadgroup();
        let mut pipelines = self.pipelines.write();
        pipelines.push(Pipeline {
            state,
            name: kernel.name,
            max_threads,
        });
        let id = PipelineId(pipelines.len() as u64 - 1);
        drop(pipelines);
        if count {
            self.compiled.fetch_add(1, Ordering::Relaxed);
        }
        self.by_key.lock().insert(key, id);
        Ok(id)
    }

    fn library(
        &self,
        device: &ProtocolObject<dyn MTLDevice>,
        name: &'static str,
        source: &'static str,
    ) -> Result<Library> {
        let mut libraries = self.libraries.lock();
        if let Some(l) = libraries.get(&(name, source)) {
            return Ok(l.clone());
        }
        // The newest language version the OS supports, and IEEE floating point: Metal's default
        // fast math may assume no infinities or NaNs, which would fold away the ops' handling of
        // masked (-inf) logits and scores. `fastMathEnabled` rather than `mathMode` because the
        // latter needs macOS 15; the kernels need macOS 14 (bfloat, MSL 3.1).
        let options = MTLCompileOptions::new();
        #[allow(deprecated)]
        options.setFastMathEnabled(false);
        let library = device
            .newLibraryWithSource_options_error(&NSString::from_str(source), Some(&options))
            .map_err(|e| fail(name, e.localizedDescription().to_string()))?;
        libraries.insert((name, source), library.clone());
        Ok(library)
    }

    /// Runs `f` on pipeline `id`, or fails naming it.
    pub fn with<R>(&self, id: PipelineId, f: impl FnOnce(&Pipeline) -> R) -> Result<R> {
        let pipelines = self.pipelines.read();
        let p = pipelines.get(id.0 as usize).ok_or_else(|| {
            Error::invalid(
                "pipeline",
                format!("{} does not exist ({} compiled)", id.0, pipelines.len()),
            )
        })?;
        Ok(f(p))
    }

    pub fn stats(&self) -> KernelCacheStats {
        KernelCacheStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            disk_hits: 0,
            memory_hits: self.memory_hits.load(Ordering::Relaxed),
        }
    }
}

/// `base` specialised with the constants it declares (itself when it declares none).
fn specialise(
    library: &ProtocolObject<dyn MTLLibrary>,
    base: &ProtocolObject<dyn MTLFunction>,
    name: &NSString,
    kernel: &str,
    constants: &Constants,
) -> Result<Retained<ProtocolObject<dyn MTLFunction>>> {
    let declared = base.functionConstantsDictionary();
    if declared.count() == 0 {
        return Ok(base.retain());
    }
    let values = MTLFunctionConstantValues::new();
    for (cname, value) in constants.iter() {
        let ns = NSString::from_str(cname);
        let Some(constant) = declared.objectForKey(&ns) else {
            continue; // not declared by this function: ignored, like an unused define
        };
        let ty = constant.r#type();
        let bytes = constant_bytes(ty, value)
            .map_err(|why| fail(kernel, format!("function constant {cname}: {why}")))?;
        // SAFETY: `bytes` holds the value in the layout of `ty` (checked by `constant_bytes`)
        // and outlives the call, which copies it.
        unsafe {
            values.setConstantValue_type_withName(
                NonNull::from(&bytes.bytes).cast::<c_void>(),
                ty,
                &ns,
            )
        };
    }
    // Required constants left unset fail here, with Metal's message naming them.
    library
        .newFunctionWithName_constantValues_error(name, &values)
        .map_err(|e| fail(kernel, e.localizedDescription().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_convert_to_the_declared_type_or_fail() {
        assert_eq!(
            constant_bytes(MTLDataType::Int, -7).unwrap().bytes[..4],
            (-7i32).to_ne_bytes()
        );
        assert_eq!(
            constant_bytes(MTLDataType::ULong, 1 << 40).unwrap().bytes,
            (1u64 << 40).to_ne_bytes()
        );
        assert!(constant_bytes(MTLDataType::UInt, -1).is_err());
        assert!(constant_bytes(MTLDataType::UChar, 256).is_err());
        assert!(constant_bytes(MTLDataType::Bool, 2).is_err());
        assert_eq!(
            constant_bytes(MTLDataType::Float, 3).unwrap().bytes[..4],
            3.0f32.to_ne_bytes()
        );
        assert!(constant_bytes(MTLDataType::Float, (1 << 24) + 1).is_err());
        assert!(constant_bytes(MTLDataType::Half, 1).is_err());
    }
}
