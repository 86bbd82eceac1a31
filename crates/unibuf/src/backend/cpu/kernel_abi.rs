//! How a Rust CPU kernel sees its arguments.

use crate::backend::{LaunchArg, LaunchDims};
use crate::dtype::Element;
use crate::epoch::Access;
use crate::kernel::{Constants, ScalarArg};

/// A CPU kernel: a plain function over its launch arguments. An `Err` (or a panic) becomes a
/// sticky [`DeviceFault`](crate::Error::DeviceFault) naming the submission.
pub type CpuKernelFn = fn(&mut CpuKernelArgs<'_>) -> Result<(), String>;

/// The arguments of one CPU kernel launch, typed on access.
///
/// Inputs can be borrowed any number of times; each output once, so two outputs can be held at
/// once without aliasing.
pub struct CpuKernelArgs<'a> {
    dims: LaunchDims,
    args: &'a [LaunchArg],
    constants: &'a Constants,
    outputs_taken: u64,
}

impl<'a> CpuKernelArgs<'a> {
    pub(crate) fn new(dims: LaunchDims, args: &'a [LaunchArg], constants: &'a Constants) -> Self {
        CpuKernelArgs {
            dims,
            args,
            constants,
            outputs_taken: 0,
        }
    }

    /// The launch geometry.
    pub fn dims(&self) -> LaunchDims {
        self.dims
    }

    /// A specialisation constant.
    pub fn constant(&self, name: &str) -> Option<i64> {
        self.constants.get(name)
    }

    fn buffer<T: Element>(&self, i: usize, access: Access) -> Result<(*mut T, usize), String> {
        let Some(arg) = self.args.get(i) else {
            return Err(format!(
                "argument {i} does not exist ({} given)",
                self.args.len()
            ));
        };
        let LaunchArg::Buffer {
            range,
            dtype,
            writable,
        } = *arg
        else {
            return Err(format!("argument {i} is a scalar, not a buffer"));
        };
        if dtype != T::DTYPE {
            return Err(format!(
                "argument {i} has dtype {dtype}, read as {}",
                T::DTYPE
            ));
        }
        if access == Access::Write && !writable {
            return Err(format!("argument {i} is read-only"));
        }
        let addr = range.addr as usize + range.offset;
        if !addr.is_multiple_of(std::mem::align_of::<T>())
            || range.bytes % std::mem::size_of::<T>() != 0
        {
            return Err(format!("argument {i} is not aligned for {}", T::DTYPE));
        }
        Ok((addr as *mut T, range.bytes / std::mem::size_of::<T>()))
    }

    /// Buffer argument `i` for reading. Outputs are refused here (read them through the slice
    /// `output` returns): a shared slice of memory that a `&mut` also covers would alias.
    pub fn input<T: Element>(&self, i: usize) -> Result<&'a [T], String> {
        if let Some(LaunchArg::Buffer { writable: true, .. }) = self.args.get(i) {
            return Err(format!(
                "argument {i} is an output: read it through output({i})"
            ));
        }
        let (ptr, len) = self.buffer::<T>(i, Access::Read)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: the core validated the launch: the range lies in live memory that stays
        // allocated until the submission completes, is aligned for T (checked above), and no
        // writable argument of this launch overlaps it, so no `&mut` from `output` aliases it.
        Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// Buffer argument `i` for writing; each output can be taken once per launch.
    pub fn output<T: Element>(&mut self, i: usize) -> Result<&'a mut [T], String> {
        let (ptr, len) = self.buffer::<T>(i, Access::Write)?;
        if self.outputs_taken & (1 << i) != 0 {
            return Err(format!("output {i} taken twice"));
        }
        self.outputs_taken |= 1 << i;
        if len == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `input`; in addition the core guarantees that a writable range overlaps
        // no other argument and no host access guard, and the mask above hands it out once.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    fn scalar(&self, i: usize) -> Result<ScalarArg, String> {
        match self.args.get(i) {
            Some(LaunchArg::Scalar(s)) => Ok(*s),
            Some(_) => Err(format!("argument {i} is a buffer, not a scalar")),
            None => Err(format!(
                "argument {i} does not exist ({} given)",
                self.args.len()
            )),
        }
    }

    /// Scalar argument `i` as `u32`.
    pub fn u32(&self, i: usize) -> Result<u32, String> {
        match self.scalar(i)? {
            ScalarArg::U32(v) => Ok(v),
            other => Err(format!("argument {i} is {other:?}, read as u32")),
        }
    }

    /// Scalar argument `i` as `i32`.
    pub fn i32(&self, i: usize) -> Result<i32, String> {
        match self.scalar(i)? {
            ScalarArg::I32(v) => Ok(v),
            other => Err(format!("argument {i} is {other:?}, read as i32")),
        }
    }

    /// Scalar argument `i` as `u64`.
    pub fn u64(&self, i: usize) -> Result<u64, String> {
        match self.scalar(i)? {
            ScalarArg::U64(v) => Ok(v),
            other => Err(format!("argument {i} is {other:?}, read as u64")),
        }
    }

    /// Scalar argument `i` as `f32`.
    pub fn f32(&self, i: usize) -> Result<f32, String> {
        match self.scalar(i)? {
            ScalarArg::F32(v) => Ok(v),
            other => Err(format!("argument {i} is {other:?}, read as f32")),
        }
    }
}
