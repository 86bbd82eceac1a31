//! Dtype names: Python spells them as NumPy and PyTorch do (`"float16"`, `"bfloat16"`), and
//! also takes unibuf's short names (`"f16"`, `"bf16"`) and `torch.float16`-style objects.

use crate::errors::{invalid, UbResult};
use pyo3::prelude::*;
use unibuf::DType;

/// The NumPy / PyTorch name of a dtype, which `Buffer.dtype` returns.
pub fn py_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::I8 => "int8",
        DType::U8 => "uint8",
        DType::I16 => "int16",
        DType::U16 => "uint16",
        DType::I32 => "int32",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        DType::U64 => "uint64",
        // `DType` is non-exhaustive; a new dtype reads as unibuf names it until mapped here.
        other => other.name(),
    }
}

/// Parses a dtype name: NumPy's and PyTorch's (`float32`, `half`, `torch.bfloat16`), unibuf's
/// (`f32`, `BF16`), case-insensitive.
pub fn parse(name: &str) -> UbResult<DType> {
    let n = name.trim().to_ascii_lowercase();
    let n = n.strip_prefix("torch.").unwrap_or(&n);
    let d = match n {
        "float16" | "half" | "f16" => DType::F16,
        "bfloat16" | "bf16" => DType::BF16,
        "float32" | "float" | "f32" => DType::F32,
        "float64" | "double" | "f64" => DType::F64,
        "int8" | "i8" => DType::I8,
        "uint8" | "u8" => DType::U8,
        "int16" | "short" | "i16" => DType::I16,
        "uint16" | "u16" => DType::U16,
        "int32" | "int" | "i32" => DType::I32,
        "uint32" | "u32" => DType::U32,
        "int64" | "long" | "i64" => DType::I64,
        "uint64" | "u64" => DType::U64,
        _ => {
            return Err(invalid(
                "dtype",
                format!(
                    "'{name}' is not a dtype unibuf has (float16, bfloat16, float32, float64, \
                     int8, uint8, int16, uint16, int32, uint32, int64, uint64)"
                ),
            ))
        }
    };
    Ok(d)
}

/// A dtype argument: a name, or any object whose `str()` is one (`torch.float16`,
/// `numpy.dtype('float32')`).
pub fn extract(obj: &Bound<'_, PyAny>) -> PyResult<DType> {
    let text = match obj.extract::<String>() {
        Ok(s) => s,
        Err(_) => obj.str()?.to_string(),
    };
    Ok(parse(&text)?)
}
