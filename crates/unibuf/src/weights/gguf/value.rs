//! GGUF metadata values: the thirteen value types, scalars and typed arrays.

use std::fmt;

/// The type of a metadata value, as its u32 code in the file names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// `uint8` (code 0).
    U8,
    /// `int8` (code 1).
    I8,
    /// `uint16` (code 2).
    U16,
    /// `int16` (code 3).
    I16,
    /// `uint32` (code 4).
    U32,
    /// `int32` (code 5).
    I32,
    /// `float32` (code 6).
    F32,
    /// `bool` (code 7): one byte, 0 or 1.
    Bool,
    /// `string` (code 8): a u64 byte length and that many bytes of UTF-8.
    String,
    /// `array` (code 9): an element type (u32), a u64 count and the elements.
    Array,
    /// `uint64` (code 10).
    U64,
    /// `int64` (code 11).
    I64,
    /// `float64` (code 12).
    F64,
}

impl GgufValueType {
    /// Every value type, in code order (the index is the code).
    pub const ALL: [GgufValueType; 13] = [
        GgufValueType::U8,
        GgufValueType::I8,
        GgufValueType::U16,
        GgufValueType::I16,
        GgufValueType::U32,
        GgufValueType::I32,
        GgufValueType::F32,
        GgufValueType::Bool,
        GgufValueType::String,
        GgufValueType::Array,
        GgufValueType::U64,
        GgufValueType::I64,
        GgufValueType::F64,
    ];

    /// The type with file code `code`, if there is one.
    pub fn from_code(code: u32) -> Option<GgufValueType> {
        GgufValueType::ALL.get(code as usize).copied()
    }

    /// The type's code in the file.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The type's name in messages ("u32", "string", "array", ...).
    pub const fn name(self) -> &'static str {
        match self {
            GgufValueType::U8 => "u8",
            GgufValueType::I8 => "i8",
            GgufValueType::U16 => "u16",
            GgufValueType::I16 => "i16",
            GgufValueType::U32 => "u32",
            GgufValueType::I32 => "i32",
            GgufValueType::F32 => "f32",
            GgufValueType::Bool => "bool",
            GgufValueType::String => "string",
            GgufValueType::Array => "array",
            GgufValueType::U64 => "u64",
            GgufValueType::I64 => "i64",
            GgufValueType::F64 => "f64",
        }
    }

    /// Bytes of a value of this type, for the fixed-size (scalar) types.
    pub const fn fixed_size(self) -> Option<u64> {
        match self {
            GgufValueType::U8 | GgufValueType::I8 | GgufValueType::Bool => Some(1),
            GgufValueType::U16 | GgufValueType::I16 => Some(2),
            GgufValueType::U32 | GgufValueType::I32 | GgufValueType::F32 => Some(4),
            GgufValueType::U64 | GgufValueType::I64 | GgufValueType::F64 => Some(8),
            GgufValueType::String | GgufValueType::Array => None,
        }
    }

    /// The fewest bytes a value of this type can take: what bounds an untrusted array count
    /// by the bytes left in the file before anything is allocated for it.
    pub(crate) const fn min_size(self) -> u64 {
        match self.fixed_size() {
            Some(n) => n,
            // A string is at least its length; an array at least its type and count.
            None if matches!(self, GgufValueType::String) => 8,
            None => 12,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// A `uint8`.
    U8(u8),
    /// An `int8`.
    I8(i8),
    /// A `uint16`.
    U16(u16),
    /// An `int16`.
    I16(i16),
    /// A `uint32`.
    U32(u32),
    /// An `int32`.
    I32(i32),
    /// A `float32`.
    F32(f32),
    /// A `bool`.
    Bool(bool),
    /// A UTF-8 `string`.
    String(String),
    /// An `array`, of one element type.
    Array(GgufArray),
    /// A `uint64`.
    U64(u64),
    /// An `int64`.
    I64(i64),
    /// A `float64`.
    F64(f64),
}

/// An array value: a vector of one element type. Arrays of scalars are stored unboxed, so that
/// memory stays about the size of the file's bytes for them (a tokenizer's scores are a
/// `Vec<f32>`, not a vector of enums).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    /// `uint8` elements.
    U8(Vec<u8>),
    /// `int8` elements.
    I8(Vec<i8>),
    /// `uint16` elements.
    U16(Vec<u16>),
    /// `int16` elements.
    I16(Vec<i16>),
    /// `uint32` elements.
    U32(Vec<u32>),
    /// `int32` elements.
    I32(Vec<i32>),
    /// `float32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `string` elements.
    String(Vec<String>),
    /// Nested arrays (each of its own element type).
    Array(Vec<GgufArray>),
    /// `uint64` elements.
    U64(Vec<u64>),
    /// `int64` elements.
    I64(Vec<i64>),
    /// `float64` elements.
    F64(Vec<f64>),
}

/// Typed accessors of [`GgufValue`] and [`GgufArray`], one per scalar type.
macro_rules! accessors {
    ($( $v:ident, $t:ty, $scalar:ident, $slice:ident; )*) => {
        impl GgufValue {
            $(
                #[doc = concat!("The value if it is a `", stringify!($t), "` (no conversion).")]
                pub fn $scalar(&self) -> Option<$t> {
                    match self {
                        GgufValue::$v(x) => Some(*x),
                        _ => None,
                    }
                }
            )*
        }
        impl GgufArray {
            $(
                #[doc = concat!("The elements if they are `", stringify!($t), "`s.")]
                pub fn $slice(&self) -> Option<&[$t]> {
                    match self {
                        GgufArray::$v(x) => Some(x),
                        _ => None,
                    }
                }
            )*
        }
    };
}

accessors! {
    U8, u8, as_u8, as_u8s;
    I8, i8, as_i8, as_i8s;
    U16, u16, as_u16, as_u16s;
    I16, i16, as_i16, as_i16s;
    U32, u32, as_u32, as_u32s;
    I32, i32, as_i32, as_i32s;
    F32, f32, as_f32, as_f32s;
    Bool, bool, as_bool, as_bools;
    U64, u64, as_u64, as_u64s;
    I64, i64, as_i64, as_i64s;
    F64, f64, as_f64, as_f64s;
}

impl GgufValue {
    /// The value's type.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value if it is an array.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as a u64 if it is an integer of any width or signedness that is not
    /// negative. Writers disagree on the integer type of sizes (`context_length` is a u32 in
    /// most files, a u64 or an i32 in some), so sizes are best read this way.
    pub fn as_uint(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(x) => Some(x.into()),
            GgufValue::U16(x) => Some(x.into()),
            GgufValue::U32(x) => Some(x.into()),
            GgufValue::U64(x) => Some(x),
            GgufValue::I8(x) => u64::try_from(x).ok(),
            GgufValue::I16(x) => u64::try_from(x).ok(),
            GgufValue::I32(x) => u64::try_from(x).ok(),
            GgufValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// What the value is, for messages: its type, and an array's element type and length.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::Array(a) => a.describe(),
            v => v.value_type().name().to_owned(),
        }
    }
}

impl GgufArray {
    /// The elements' type.
    pub fn elem_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements if they are strings (a tokenizer's `tokenizer.ggml.tokens`).
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            GgufArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if they are arrays.
    pub fn as_arrays(&self) -> Option<&[GgufArray]> {
        match self {
            GgufArray::Array(v) => Some(v),
            _ => None,
        }
    }

    /// `"array of N TYPE"` (as "array of 3 f32"), for messages.
    pub fn describe(&self) -> String {
        format!("array of {} {}", self.len(), self.elem_type())
    }
}

impl fmt::Display for GgufValue {
    /// Scalars as themselves, strings quoted and escaped, arrays summarised with their first
    /// few elements (a vocabulary's 49,152 tokens do not belong in a log line).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(x) => write!(f, "{x}"),
            GgufValue::I8(x) => write!(f, "{x}"),
            GgufValue::U16(x) => write!(f, "{x}"),
            GgufValue::I16(x) => write!(f, "{x}"),
            GgufValue::U32(x) => write!(f, "{x}"),
            GgufValue::I32(x) => write!(f, "{x}"),
            GgufValue::F32(x) => write!(f, "{x}"),
            GgufValue::Bool(x) => write!(f, "{x}"),
            GgufValue::String(s) => write!(f, "\"{}\"", s.escape_debug()),
            GgufValue::Array(a) => write!(f, "{a}"),
            GgufValue::U64(x) => write!(f, "{x}"),
            GgufValue::I64(x) => write!(f, "{x}"),
            GgufValue::F64(x) => write!(f, "{x}"),
        }
    }
}

impl fmt::Display for GgufArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Elements shown before "...".
        const SHOWN: usize = 4;
        fn list<T: fmt::Debug>(f: &mut fmt::Formatter<'_>, v: &[T]) -> fmt::Result {
            let shown: Vec<String> = v.iter().take(SHOWN).map(|x| format!("{x:?}")).collect();
            let more = if v.len() > SHOWN { ", ..." } else { "" };
            write!(f, ": [{}{more}]", shown.join(", "))
        }
        write!(f, "{}", self.describe())?;
        match self {
            GgufArray::U8(v) => list(f, v),
            GgufArray::I8(v) => list(f, v),
            GgufArray::U16(v) => list(f, v),
            GgufArray::I16(v) => list(f, v),
            GgufArray::U32(v) => list(f, v),
            GgufArray::I32(v) => list(f, v),
            GgufArray::F32(v) => list(f, v),
            GgufArray::Bool(v) => list(f, v),
            GgufArray::String(v) => list(f, v),
            GgufArray::Array(v) => {
                let shown: Vec<String> = v.iter().take(SHOWN).map(|a| a.describe()).collect();
                let more = if v.len() > SHOWN { ", ..." } else { "" };
                write!(f, ": [{}{more}]", shown.join(", "))
            }
            GgufArray::U64(v) => list(f, v),
            GgufArray::I64(v) => list(f, v),
            GgufArray::F64(v) => list(f, v),
        }
    }
}
