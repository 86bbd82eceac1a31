//! Kernels: one name, per-backend sources, a declared signature; the registry and pipeline cache.
//!
//! A [`KernelSource`] carries CUDA C, Metal Shading Language and a Rust CPU function for the same
//! kernel, plus the parameters it takes. Launches are checked against those parameters (count,
//! dtype, access, storage reachable by the device) before any command is recorded, so a wrong
//! argument is an error at the call site, never a fault on the device.

use crate::backend::cpu::CpuKernelFn;
use crate::backend::PipelineId;
use crate::dtype::DType;
use crate::epoch::Access;
use crate::error::{Error, Result};
use crate::Buffer;
use std::collections::HashMap;
use std::fmt;

/// The type of a scalar kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalarType {
    /// `uint32_t`.
    U32,
    /// `int32_t`.
    I32,
    /// `uint64_t`.
    U64,
    /// `float`.
    F32,
}

/// A scalar kernel argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarArg {
    /// `uint32_t`.
    U32(u32),
    /// `int32_t`.
    I32(i32),
    /// `uint64_t`.
    U64(u64),
    /// `float`.
    F32(f32),
}

impl ScalarArg {
    /// The argument's type.
    pub const fn scalar_type(&self) -> ScalarType {
        match self {
            ScalarArg::U32(_) => ScalarType::U32,
            ScalarArg::I32(_) => ScalarType::I32,
            ScalarArg::U64(_) => ScalarType::U64,
            ScalarArg::F32(_) => ScalarType::F32,
        }
    }
}

/// What one kernel parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// A buffer of `dtype` the kernel reads or writes.
    Buffer {
        /// The element type.
        dtype: DType,
        /// Read-only or written.
        access: Access,
    },
    /// A scalar by value.
    Scalar(ScalarType),
}

/// A named kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    /// The name, for messages.
    pub name: &'static str,
    /// The kind.
    pub kind: ParamKind,
}

impl Param {
    /// A buffer the kernel only reads.
    pub const fn input(name: &'static str, dtype: DType) -> Param {
        Param {
            name,
            kind: ParamKind::Buffer {
                dtype,
                access: Access::Read,
            },
        }
    }
    /// A buffer the kernel writes.
    pub const fn output(name: &'static str, dtype: DType) -> Param {
        Param {
            name,
            kind: ParamKind::Buffer {
                dtype,
                access: Access::Write,
            },
        }
    }
    /// A scalar.
    pub const fn scalar(name: &'static str, ty: ScalarType) -> Param {
        Param {
            name,
            kind: ParamKind::Scalar(ty),
        }
    }
}

/// A kernel: its name, its parameters and its per-backend sources.
///
/// ```
/// use unibuf::{DType, KernelSource, Param, ScalarType};
/// static SCALE: KernelSource = KernelSource {
///     name: "scale_f32",
///     params: &[
///         Param::input("x", DType::F32),
///         Param::output("y", DType::F32),
///         Param::scalar("factor", ScalarType::F32),
///     ],
///     cuda: None,
///     msl: None,
///     cpu: Some(|args| {
///         let x = args.input::<f32>(0)?;
///         let factor = args.f32(2)?;
///         let y = args.output::<f32>(1)?;
///         for (y, x) in y.iter_mut().zip(x) {
///             *y = x * factor;
///         }
///         Ok(())
///     }),
/// };
/// assert_eq!(SCALE.params.len(), 3);
/// ```
#[derive(Clone, Copy)]
pub struct KernelSource {
    /// The kernel's name; also the entry point in the CUDA and MSL sources.
    pub name: &'static str,
    /// The parameters in order.
    pub params: &'static [Param],
    /// CUDA C source (compiled with NVRTC).
    pub cuda: Option<&'static str>,
    /// Metal Shading Language source.
    pub msl: Option<&'static str>,
    /// The Rust implementation run by the CPU backend.
    pub cpu: Option<CpuKernelFn>,
}

impl fmt::Debug for KernelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelSource")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("cuda", &self.cuda.is_some())
            .field("msl", &self.msl.is_some())
            .field("cpu", &self.cpu.is_some())
            .finish()
    }
}

/// Specialisation constants, kept sorted by name so equal sets hash alike.
///
/// ```
/// let c = unibuf::Constants::new().with("BLOCK", 256).with("ROWS", 4);
/// assert_eq!(c.get("BLOCK"), Some(256));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Constants(Vec<(String, i64)>);

impl Constants {
    /// No constants.
    pub const fn new() -> Constants {
        Constants(Vec::new())
    }
    /// Adds or replaces a constant.
    pub fn with(mut self, name: &str, value: i64) -> Constants {
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name.to_owned(), value)),
        }
        self
    }
    /// A constant's value.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| self.0[i].1)
    }
    /// All constants, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(n, v)| (n.as_str(), *v))
    }
}

/// One argument of a launch.
#[derive(Clone, Copy, Debug)]
pub enum KernelArg<'a> {
    /// A buffer (view) the kernel reads or writes, per its parameter.
    Buffer(&'a Buffer),
    /// A scalar.
    Scalar(ScalarArg),
}

impl<'a> From<&'a Buffer> for KernelArg<'a> {
    fn from(b: &'a Buffer) -> Self {
        KernelArg::Buffer(b)
    }
}
impl From<u32> for KernelArg<'_> {
    fn from(v: u32) -> Self {
        KernelArg::Scalar(ScalarArg::U32(v))
    }
}
impl From<i32> for KernelArg<'_> {
    fn from(v: i32) -> Self {
        KernelArg::Scalar(ScalarArg::I32(v))
    }
}
impl From<u64> for KernelArg<'_> {
    fn from(v: u64) -> Self {
        KernelArg::Scalar(ScalarArg::U64(v))
    }
}
impl From<f32> for KernelArg<'_> {
    fn from(v: f32) -> Self {
        KernelArg::Scalar(ScalarArg::F32(v))
    }
}

/// A compiled kernel of one device, ready to launch on its queues.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub(crate) source: KernelSource,
    pub(crate) constants: Constants,
    pub(crate) pipeline: PipelineId,
    pub(crate) device_id: u64,
}

impl Kernel {
    /// The kernel's name.
    pub fn name(&self) -> &'static str {
        self.source.name
    }
    /// Its parameters.
    pub fn params(&self) -> &'static [Param] {
        self.source.params
    }
    /// The constants it was specialised with.
    pub fn constants(&self) -> &Constants {
        &self.constants
    }
}

/// Kernels by name, and the pipelines compiled from them by (name, constants).
#[derive(Default)]
pub(crate) struct KernelRegistry {
    sources: HashMap<&'static str, KernelSource>,
    pipelines: HashMap<(&'static str, Constants), PipelineId>,
    memory_hits: std::sync::atomic::AtomicU64,
}

impl KernelRegistry {
    /// A registry holding the ops' kernels (`crate::ops`).
    pub fn with_ops() -> Result<KernelRegistry> {
        let mut r = KernelRegistry::default();
        for k in crate::ops::kernels() {
            r.register(*k)?;
        }
        Ok(r)
    }

    pub fn register(&mut self, source: KernelSource) -> Result<()> {
        check_signature(&source)?;
        if self.sources.contains_key(source.name) {
            return Err(Error::invalid(
                "kernel",
                format!("a kernel named '{}' is already registered", source.name),
            ));
        }
        self.sources.insert(source.name, source);
        Ok(())
    }

    pub fn source(&self, name: &str) -> Result<KernelSource> {
        self.sources.get(name).copied().ok_or_else(|| {
            let mut known: Vec<_> = self.sources.keys().copied().collect();
            known.sort_unstable();
            Error::invalid(
                "kernel",
                format!(
                    "no kernel named '{name}' is registered (known: {})",
                    known.join(", ")
                ),
            )
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.sources.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn pipeline(&self, name: &'static str, constants: &Constants) -> Option<PipelineId> {
        let hit = self.pipelines.get(&(name, constants.clone())).copied();
        if hit.is_some() {
            self.memory_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit
    }

    pub fn memory_hits(&self) -> u64 {
        self.memory_hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn insert_pipeline(&mut self, name: &'static str, constants: Constants, id: PipelineId) {
        self.pipelines.insert((name, constants), id);
    }

    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }
}

/// Rejects signatures no backend could bind: over 64 parameters (the CPU ABI tracks outputs in a
/// 64-bit mask) or duplicate names.
fn check_signature(source: &KernelSource) -> Result<()> {
    if source.name.is_empty() {
        return Err(Error::invalid("kernel", "the kernel name is empty"));
    }
    if source.params.len() > 64 {
        return Err(Error::invalid(
            "kernel",
            format!(
                "'{}' declares {} parameters; at most 64",
                source.name,
                source.params.len()
            ),
        ));
    }
    for (i, p) in source.params.iter().enumerate() {
        if source.params[..i].iter().any(|q| q.name == p.name) {
            return Err(Error::invalid(
                "kernel",
                format!("'{}' declares parameter '{}' twice", source.name, p.name),
            ));
        }
    }
    Ok(())
}
