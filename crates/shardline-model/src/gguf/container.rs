//! The GGUF container, llama.cpp's model file (versions 2 and 3): header, metadata key/values,
//! tensor infos and the aligned data section, parsed from a memory map; and the shards of a split
//! model (`NAME-00001-of-0000N.gguf`, as `gguf-split` and the converter write them) put together.
//!
//! The parser is written here rather than taken from a crate: `ggus` (the most used Rust GGUF
//! reader) brings a dependency tree of its own, `gguf-rs` puts CLI crates (clap, comfy-table, a
//! logger) into the library, and `gguf` 0.1 is a small reader that is no longer worked on. None
//! says what it does with untrusted files, and this loader needs exactly that: every count and
//! length checked against the bytes left in the file before anything is allocated or looped over,
//! every tensor's bytes checked to lie inside the data section, errors as types naming the file
//! and the field, key or tensor. The format itself is small.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` key/value
//! count; the key/values (a string key, a `u32` value type, the value; strings are a `u64` length
//! and UTF-8 bytes; arrays a `u32` element type, a `u64` length and the elements); the tensor
//! infos (name, `u32` dimension count, `u64` dimensions innermost first, `u32` ggml type, `u64`
//! offset into the data section); padding to `general.alignment` (default 32); the data section.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// The data section's alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays nested deeper than this are refused (llama.cpp writes none at all); the bound
/// keeps a hostile file from recursing the parser off its stack.
const MAX_NESTING: usize = 4;
/// The fewest bytes one tensor info takes: an empty name (8), no dimensions (4), type (4),
/// offset (8).
const MIN_TENSOR_INFO: u64 = 24;
/// The fewest bytes one key/value takes: an empty key (8), the type (4), a one-byte value.
const MIN_KV: u64 = 13;

/// A GGUF file or split set that cannot be used, with the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}: {kind}", path.display())]
pub struct GgufError {
    /// The file at fault (empty when no file was given).
    pub path: PathBuf,
    /// What is wrong with it.
    pub kind: GgufErrorKind,
}

/// What is wrong with a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    /// The file does not start with the magic bytes `GGUF`.
    #[error("not a GGUF file: it starts with {found:02x?}, not \"GGUF\"")]
    Magic {
        /// The file's first (up to four) bytes.
        found: Vec<u8>,
    },
    /// A format version other than 2 or 3.
    #[error("GGUF version {version} is not supported (versions 2 and 3 are){}", big_endian_hint(*.version))]
    Version {
        /// The version the header gives.
        version: u32,
    },
    /// A field that runs past the end of the file.
    #[error(
        "{field}: {needed} bytes are needed at byte {at}, past the end of the file ({len} bytes)"
    )]
    Truncated {
        /// The field being read.
        field: String,
        /// Byte offset of the field in the file.
        at: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Length of the file in bytes.
        len: u64,
    },
    /// A count of items that could not fit in the rest of the file, refused before anything is
    /// allocated for them.
    #[error("{field} is {count}, but each takes at least {min_bytes} bytes and only {left} bytes are left in the file")]
    TooMany {
        /// The count being read.
        field: String,
        /// The count the file gives.
        count: u64,
        /// The fewest bytes one item takes.
        min_bytes: u64,
        /// Bytes left in the file after the count.
        left: u64,
    },
    /// A string (key, value or tensor name) that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    NotUtf8 {
        /// The string being read.
        field: String,
    },
    /// A metadata value type id outside GGUF's 0..=12.
    #[error("{field}: unknown metadata value type {ty}")]
    ValueType {
        /// The key (or array) whose value has the type.
        field: String,
        /// The type id.
        ty: u32,
    },
    /// Arrays of arrays nested deeper than the parser follows.
    #[error("{field}: arrays nested more than {MAX_NESTING} deep")]
    Nesting {
        /// The key holding the array.
        field: String,
    },
    /// A metadata key given twice.
    #[error("metadata key `{key}` appears twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A tensor name given twice, in one file or across the shards of a split set.
    #[error("tensor `{name}` appears twice")]
    DuplicateTensor {
        /// The tensor's name.
        name: String,
    },
    /// A `general.alignment` that is not a positive power of two fitting a `u32`.
    #[error("`general.alignment` is {value}; it must be a power of two")]
    Alignment {
        /// The value given, as debug-printed.
        value: String,
    },
    /// A tensor with more than ggml's four dimensions.
    #[error("tensor `{tensor}` has {n_dims} dimensions (ggml allows at most {MAX_DIMS})")]
    Dims {
        /// The tensor's name.
        tensor: String,
        /// The dimension count it gives.
        n_dims: u32,
    },
    /// A tensor whose element count or byte size overflows.
    #[error("tensor `{tensor}` has dimensions {dims:?}, too large")]
    DimSize {
        /// The tensor's name.
        tensor: String,
        /// Its dimensions, innermost first.
        dims: Vec<u64>,
    },
    /// A tensor whose ggml type id is not in ggml's list.
    #[error("tensor `{tensor}` has unknown ggml type {ty}")]
    UnknownType {
        /// The tensor's name.
        tensor: String,
        /// The type id.
        ty: u32,
    },
    /// A block-format tensor whose rows (innermost dimension) are not whole blocks.
    #[error("tensor `{tensor}` ({ggml_type}): its rows of {cols} elements are not whole blocks of {block}")]
    Blocks {
        /// The tensor's name.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
        /// Elements per row.
        cols: u64,
        /// Elements per block of the type.
        block: u64,
    },
    /// A tensor whose offset is not a multiple of the data section's alignment.
    #[error("tensor `{tensor}` starts at data offset {offset}, not a multiple of the alignment {alignment}")]
    Misaligned {
        /// The tensor's name.
        tensor: String,
        /// Its offset from the start of the data section, in bytes.
        offset: u64,
        /// The file's alignment in bytes.
        alignment: u64,
    },
    /// A tensor whose bytes do not lie inside the data section.
    #[error("tensor `{tensor}`: {size} bytes at data offset {offset} run past the end of the data section ({data_len} bytes)")]
    OutOfBounds {
        /// The tensor's name.
        tensor: String,
        /// Its offset from the start of the data section, in bytes.
        offset: u64,
        /// Its size in bytes.
        size: u64,
        /// Length of the data section in bytes.
        data_len: u64,
    },
    /// A metadata value of another type than the key calls for.
    #[error("metadata key `{key}` is {found}, expected {expected}")]
    KeyType {
        /// The key.
        key: String,
        /// What the reader needs (`a string`, `a non-negative integer`).
        expected: &'static str,
        /// The GGUF type name of the value found ([`Value::type_name`]).
        found: &'static str,
    },
    /// A metadata key the model needs that the file lacks.
    #[error("metadata key `{key}` is missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// Shards of a split model that do not fit together (numbering, counts, a missing shard).
    #[error("split model: {detail}")]
    Split {
        /// What does not fit.
        detail: String,
    },
    /// A `general.architecture` Shardline has no decoder for.
    #[error("unknown architecture `{arch}` in `general.architecture` (supported: llama, including Mixtral; qwen2moe; qwen3moe; qwen2; qwen3)")]
    UnknownArch {
        /// The architecture named.
        arch: String,
    },
    /// A tensor of a ggml type the loader does not read.
    #[error(
        "tensor `{tensor}` is {ggml_type}: only F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K and Q6_K GGUF tensors can be used"
    )]
    UnsupportedType {
        /// The tensor's name.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
    },
}

fn big_endian_hint(version: u32) -> &'static str {
    if version > 0xffff && version.swap_bytes() <= 3 {
        "; it reads as a small number byte-swapped: a big-endian GGUF?"
    } else {
        ""
    }
}

/// The element type of a stored ggml tensor.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 4-bit, blocks of 32 elements with an f16 scale (18 bytes).
    Q4_0,
    /// 4-bit, blocks of 32 elements with an f16 scale and minimum (20 bytes).
    Q4_1,
    /// 5-bit, blocks of 32 elements with an f16 scale (22 bytes).
    Q5_0,
    /// 5-bit, blocks of 32 elements with an f16 scale and minimum (24 bytes).
    Q5_1,
    /// 8-bit, blocks of 32 elements with an f16 scale (34 bytes).
    Q8_0,
    /// 8-bit, blocks of 32 elements with an f16 scale and an f16 scaled sum (36 bytes); ggml's
    /// activation format for the 32-element formats.
    Q8_1,
    /// 2-bit K-quant, super-blocks of 256 elements (84 bytes).
    Q2_K,
    /// 3-bit K-quant, super-blocks of 256 elements (110 bytes).
    Q3_K,
    /// 4-bit K-quant, super-blocks of 256 elements with per-sub-block scales and minimums (144 bytes).
    Q4_K,
    /// 5-bit K-quant, super-blocks of 256 elements with per-sub-block scales and minimums (176 bytes).
    Q5_K,
    /// 6-bit K-quant, super-blocks of 256 elements with per-sub-block scales (210 bytes).
    Q6_K,
    /// 8-bit K-quant, super-blocks of 256 elements (292 bytes); ggml's activation format for the
    /// K-quants.
    Q8_K,
    /// I-quant of about 2 bits per weight, super-blocks of 256 elements (66 bytes).
    IQ2_XXS,
    /// I-quant of about 2.3 bits per weight, super-blocks of 256 elements (74 bytes).
    IQ2_XS,
    /// I-quant of about 3 bits per weight, super-blocks of 256 elements (98 bytes).
    IQ3_XXS,
    /// I-quant of about 1.6 bits per weight, super-blocks of 256 elements (50 bytes).
    IQ1_S,
    /// Non-linear 4-bit, blocks of 32 elements (18 bytes).
    IQ4_NL,
    /// I-quant of about 3.4 bits per weight, super-blocks of 256 elements (110 bytes).
    IQ3_S,
    /// I-quant of about 2.6 bits per weight, super-blocks of 256 elements (82 bytes).
    IQ2_S,
    /// Non-linear 4-bit, super-blocks of 256 elements (136 bytes).
    IQ4_XS,
    /// 8-bit integer.
    I8,
    /// 16-bit integer.
    I16,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// I-quant of about 1.75 bits per weight, super-blocks of 256 elements (56 bytes).
    IQ1_M,
    /// bfloat16.
    BF16,
    /// Ternary, super-blocks of 256 elements (54 bytes).
    TQ1_0,
    /// Ternary in 2 bits, super-blocks of 256 elements (66 bytes).
    TQ2_0,
    /// 4-bit floats (E2M1), blocks of 32 elements with a shared 8-bit exponent (17 bytes).
    MXFP4,
    /// 4-bit floats (E2M1), blocks of 64 elements with an FP8 scale per 16 (36 bytes).
    NVFP4,
    /// 1-bit signs, blocks of 128 elements with an f16 scale (18 bytes).
    Q1_0,
}

/// (type, ggml id, name, elements per block, bytes per block), from ggml's type traits.
const GGML_TYPES: [(GgmlType, u32, &str, u64, u64); 34] = [
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// The type with ggml id `id`, if known.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GGML_TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    fn traits(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        GGML_TYPES
            .iter()
            .find(|t| t.0 == self)
            .expect("every GgmlType is in GGML_TYPES")
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        self.traits().1
    }

    /// ggml's name of the type (`Q4_K`, `BF16`).
    pub fn name(self) -> &'static str {
        self.traits().2
    }

    /// Elements per block and bytes per block (1 and the element size for plain types).
    pub fn block(self) -> (u64, u64) {
        let t = self.traits();
        (t.3, t.4)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Value type 0.
    U8(u8),
    /// Value type 1.
    I8(i8),
    /// Value type 2.
    U16(u16),
    /// Value type 3.
    I16(i16),
    /// Value type 4.
    U32(u32),
    /// Value type 5.
    I32(i32),
    /// Value type 6.
    F32(f32),
    /// Value type 7: one byte, any non-zero value true.
    Bool(bool),
    /// Value type 8: a `u64` length and UTF-8 bytes.
    String(String),
    /// Value type 9: a `u32` element type, a `u64` length and the elements.
    Array(Vec<Value>),
    /// Value type 10.
    U64(u64),
    /// Value type 11.
    I64(i64),
    /// Value type 12.
    F64(f64),
}

impl Value {
    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// An integer of any width, if it is one.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(x) => x.into(),
            Value::I8(x) => x.into(),
            Value::U16(x) => x.into(),
            Value::I16(x) => x.into(),
            Value::U32(x) => x.into(),
            Value::I32(x) => x.into(),
            Value::U64(x) => x.into(),
            Value::I64(x) => x.into(),
            _ => return None,
        })
    }

    /// A float of either width, if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The fewest bytes a value of GGUF type `ty` takes, or `None` for an unknown type.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

/// One tensor's entry in the tensor infos.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as ggml lists them, innermost (the row length) first.
    pub dims: Vec<u64>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

impl TensorInfo {
    /// The shape in row-major order, outermost first (`[rows, cols]` for a matrix), as Hugging
    /// Face and the rest of Shardline list it.
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension fits: their product is the size of a mapped file.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// A parse error before the path is attached.
type Parse<T> = std::result::Result<T, GgufErrorKind>;

impl<'a> Reader<'a> {
    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &str) -> Parse<&'a [u8]> {
        if n > self.left() {
            return Err(GgufErrorKind::Truncated {
                field: field.to_string(),
                at: self.pos as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Parse<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, field)?);
        Ok(out)
    }

    fn u32(&mut self, field: &str) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// `count` items of at least `min_bytes` each must fit in what is left of the file.
    fn check_count(&self, count: u64, min_bytes: u64, field: &str) -> Parse<usize> {
        if count > self.left() / min_bytes {
            return Err(GgufErrorKind::TooMany {
                field: field.to_string(),
                count,
                min_bytes,
                left: self.left(),
            });
        }
        Ok(count as usize)
    }

    fn string(&mut self, field: &str) -> Parse<String> {
        let len = self.u64(field)?;
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufErrorKind::NotUtf8 {
            field: field.to_string(),
        })
    }

    fn value(&mut self, ty: u32, field: &str, depth: usize) -> Parse<Value> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(field)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(field)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            4 => Value::U32(self.u32(field)?),
            5 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            7 => Value::Bool(self.array::<1>(field)?[0] != 0),
            8 => Value::String(self.string(field)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(GgufErrorKind::Nesting {
                        field: field.to_string(),
                    });
                }
                let elem = self.u32(field)?;
                let min = min_value_size(elem).ok_or_else(|| GgufErrorKind::ValueType {
                    field: field.to_string(),
                    ty: elem,
                })?;
                let n = self.u64(field)?;
                let n = self.check_count(n, min, &format!("{field}: the array length"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, field, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(field)?),
            11 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            _ => {
                return Err(GgufErrorKind::ValueType {
                    field: field.to_string(),
                    ty,
                })
            }
        })
    }
}

/// Everything the header, metadata and tensor infos say.
struct Parsed {
    version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    data_start: usize,
}

fn parse(bytes: &[u8]) -> Parse<Parsed> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r
        .take(4, "the magic number")
        .map_err(|_| GgufErrorKind::Magic {
            found: bytes[..bytes.len().min(4)].to_vec(),
        })?;
    if magic != b"GGUF" {
        return Err(GgufErrorKind::Magic {
            found: magic.to_vec(),
        });
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufErrorKind::Version { version });
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata key/value count")?;
    let n_kv = r.check_count(n_kv, MIN_KV, "the metadata key/value count")?;
    let mut metadata = HashMap::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let field = format!("metadata key `{key}`");
        let ty = r.u32(&field)?;
        let value = r.value(ty, &field, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(GgufErrorKind::DuplicateKey { key });
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_i128() {
            Some(a) if a > 0 && a <= u32::MAX as i128 && (a as u64).is_power_of_two() => a as u64,
            _ => {
                return Err(GgufErrorKind::Alignment {
                    value: format!("{v:?}"),
                })
            }
        },
    };
    // Checked only now: tensor infos follow the metadata.
    let n_tensors = r.check_count(n_tensors, MIN_TENSOR_INFO, "the tensor count")?;
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&format!("the name of tensor #{i}"))?;
        let field = format!("tensor `{name}`");
        let n_dims = r.u32(&field)?;
        if n_dims > MAX_DIMS {
            return Err(GgufErrorKind::Dims {
                tensor: name,
                n_dims,
            });
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&field))
            .collect::<Parse<Vec<u64>>>()?;
        let ty = r.u32(&field)?;
        let ggml_type = GgmlType::from_id(ty).ok_or_else(|| GgufErrorKind::UnknownType {
            tensor: name.clone(),
            ty,
        })?;
        let offset = r.u64(&field)?;
        let size = tensor_size(&name, &dims, ggml_type)?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            size,
        });
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let data_len = (bytes.len() as u64).saturating_sub(data_start);
    let mut seen = HashMap::with_capacity(tensors.len());
    for t in &tensors {
        if seen.insert(t.name.as_str(), ()).is_some() {
            return Err(GgufErrorKind::DuplicateTensor {
                name: t.name.clone(),
            });
        }
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufErrorKind::Misaligned {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        if t.offset
            .checked_add(t.size)
            .is_none_or(|end| end > data_len)
        {
            return Err(GgufErrorKind::OutOfBounds {
                tensor: t.name.clone(),
                offset: t.offset,
                size: t.size,
                data_len,
            });
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        // At most the file length when there are tensor bytes; nothing is read past it otherwise.
        data_start: data_start.min(bytes.len() as u64) as usize,
    })
}

/// The byte size of a tensor of `dims` (innermost first) and `ty`.
fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Parse<u64> {
    let too_large = || GgufErrorKind::DimSize {
        tensor: name.to_string(),
        dims: dims.to_vec(),
    };
    let elems = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(too_large)?;
    let (block, block_bytes) = ty.block();
    let cols = dims.first().copied().unwrap_or(1);
    if !cols.is_multiple_of(block) {
        return Err(GgufErrorKind::Blocks {
            tensor: name.to_string(),
            ggml_type: ty,
            cols,
            block,
        });
    }
    (elems / block)
        .checked_mul(block_bytes)
        .ok_or_else(too_large)
}

/// One parsed GGUF file, memory-mapped.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    version: u32,
    metadata: HashMap<String, Value>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: opened read-only; like every mmap-based loader we assume nobody truncates or
        // rewrites a model file while it is served.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(GgufFile::from_map(path, Arc::new(map))?)
    }

    /// Parses a file already mapped; `path` names it in errors.
    pub fn from_map(path: &Path, map: Arc<Mmap>) -> std::result::Result<GgufFile, GgufError> {
        let p = parse(&map).map_err(|kind| GgufError {
            path: path.to_path_buf(),
            kind,
        })?;
        let by_name = p
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: p.version,
            metadata: p.metadata,
            tensors: p.tensors,
            by_name,
            data_start: p.data_start,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name`, if the file holds it.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The mapped file.
    pub fn map(&self) -> &Arc<Mmap> {
        &self.map
    }

    /// Where `info`'s bytes lie in [`GgufFile::map`] (checked against the file when parsed).
    pub fn range(&self, info: &TensorInfo) -> Range<usize> {
        let start = self.data_start + info.offset as usize;
        start..start + info.size as usize
    }

    /// An error about this file.
    pub fn error(&self, kind: GgufErrorKind) -> GgufError {
        GgufError {
            path: self.path.clone(),
            kind,
        }
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn key_type(&self, key: &str, expected: &'static str, found: &Value) -> GgufError {
        self.error(GgufErrorKind::KeyType {
            key: key.to_string(),
            expected,
            found: found.type_name(),
        })
    }

    /// A non-negative integer key of any width.
    pub fn u64(&self, key: &str) -> std::result::Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_i128()
                    .and_then(|x| u64::try_from(x).ok())
                    .ok_or_else(|| self.key_type(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// A float key (an integer one is taken too).
    pub fn f64(&self, key: &str) -> std::result::Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .or_else(|| v.as_i128().map(|x| x as f64))
                    .ok_or_else(|| self.key_type(key, "a number", v))
            })
            .transpose()
    }

    /// A bool key.
    pub fn bool(&self, key: &str) -> std::result::Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                _ => Err(self.key_type(key, "a bool", v)),
            })
            .transpose()
    }

    /// A string key.
    pub fn str(&self, key: &str) -> std::result::Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.key_type(key, "a string", v)))
            .transpose()
    }

    /// An array key.
    pub fn array(&self, key: &str) -> std::result::Result<Option<&[Value]>, GgufError> {
        self.get(key)
            .map(|v| match v {
                Value::Array(a) => Ok(a.as_slice()),
                _ => Err(self.key_type(key, "an array", v)),
            })
            .transpose()
    }

    /// A key that must be present.
    pub fn require<T>(
        &self,
        key: &str,
        value: std::result::Result<Option<T>, GgufError>,
    ) -> std::result::Result<T, GgufError> {
        value?.ok_or_else(|| {
            self.error(GgufErrorKind::MissingKey {
                key: key.to_string(),
            })
        })
    }
}

/// The files of one model: a single GGUF, or every shard of a split set. The first holds the
/// model's metadata; tensors may be in any.
#[derive(Debug)]
pub struct GgufFiles {
    files: Vec<GgufFile>,
    /// Tensor name -> (file, tensor).
    index: HashMap<String, (usize, usize)>,
}

impl GgufFiles {
    /// Opens `path`: a single `.gguf`, or any shard of a split set named
    /// `NAME-0000K-of-0000N.gguf`, whose shards are then all opened from the same folder.
    pub fn open(path: &Path) -> Result<GgufFiles> {
        let files = match split_name(path) {
            Some((prefix, no, count)) => {
                if no == 0 || no > count {
                    return Err(GgufError {
                        path: path.to_path_buf(),
                        kind: GgufErrorKind::Split {
                            detail: format!("the name says shard {no} of {count}"),
                        },
                    }
                    .into());
                }
                (1..=count)
                    .map(|k| GgufFile::open(&shard_path(path, &prefix, k, count)))
                    .collect::<Result<Vec<_>>>()?
            }
            None => vec![GgufFile::open(path)?],
        };
        Ok(GgufFiles::from_files(files)?)
    }

    /// Puts parsed files together, shard `k` at index `k`, checking the `split.*` keys: each
    /// shard's number and the shard count, the tensor count, no tensor twice.
    pub fn from_files(files: Vec<GgufFile>) -> std::result::Result<GgufFiles, GgufError> {
        let Some(first) = files.first() else {
            return Err(GgufError {
                path: PathBuf::new(),
                kind: GgufErrorKind::Split {
                    detail: "no files".to_string(),
                },
            });
        };
        let n = files.len() as u64;
        let split = |f: &GgufFile, detail: String| {
            f.error(GgufErrorKind::Split {
                detail: format!("{detail} (a split model opens from its first shard, NAME-00001-of-0000N.gguf, with every shard beside it)"),
            })
        };
        for (k, f) in files.iter().enumerate() {
            let count = f.u64("split.count")?;
            if count.unwrap_or(1) != n {
                return Err(split(
                    f,
                    format!(
                        "`split.count` is {}, but {n} file(s) were opened",
                        count.unwrap_or(1)
                    ),
                ));
            }
            if let Some(no) = f.u64("split.no")? {
                if no != k as u64 {
                    return Err(split(
                        f,
                        format!("`split.no` is {no}, but this is shard {k} (from 0)"),
                    ));
                }
            }
        }
        let mut index = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for (ti, t) in f.tensors.iter().enumerate() {
                if index.insert(t.name.clone(), (fi, ti)).is_some() {
                    return Err(f.error(GgufErrorKind::DuplicateTensor {
                        name: t.name.clone(),
                    }));
                }
            }
        }
        if let Some(total) = first.u64("split.tensors.count")? {
            if total != index.len() as u64 {
                return Err(split(
                    first,
                    format!(
                        "`split.tensors.count` is {total}, but the shards hold {} tensors",
                        index.len()
                    ),
                ));
            }
        }
        Ok(GgufFiles { files, index })
    }

    /// The first file, which holds the model's metadata.
    pub fn first(&self) -> &GgufFile {
        &self.files[0]
    }

    /// Every file, shard `k` (from 0) at index `k`.
    pub fn files(&self) -> &[GgufFile] {
        &self.files
    }

    /// The tensor `name` and the file holding it.
    pub fn tensor(&self, name: &str) -> Option<(&GgufFile, &TensorInfo)> {
        self.index.get(name).map(|&(fi, ti)| {
            let f = &self.files[fi];
            (f, &f.tensors[ti])
        })
    }
}

/// `NAME-0000K-of-0000N.gguf` -> (`NAME`, K, N).
fn split_name(path: &Path) -> Option<(String, u32, u32)> {
    let stem = path.file_name()?.to_str()?.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(no) {
        return None;
    }
    Some((prefix.to_string(), no.parse().ok()?, count.parse().ok()?))
}

fn shard_path(path: &Path, prefix: &str, k: u32, count: u32) -> PathBuf {
    path.with_file_name(format!("{prefix}-{k:05}-of-{count:05}.gguf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            split_name(Path::new("/m/model-00002-of-00003.gguf")),
            Some(("model".to_string(), 2, 3))
        );
        assert_eq!(split_name(Path::new("model.gguf")), None);
        assert_eq!(split_name(Path::new("model-2-of-3.gguf")), None);
        assert_eq!(
            shard_path(Path::new("/m/x-00002-of-00003.gguf"), "x", 1, 3),
            Path::new("/m/x-00001-of-00003.gguf")
        );
    }

    #[test]
    fn ggml_types_round_trip() {
        for t in GGML_TYPES {
            assert_eq!(GgmlType::from_id(t.1), Some(t.0));
            assert_eq!(t.0.id(), t.1);
        }
        assert_eq!(GgmlType::from_id(31), None);
        assert_eq!(GgmlType::Q4_K.block(), (256, 144));
        // ggml's block_q8_1: two f16 (scale, scaled sum) and 32 quants.
        assert_eq!(GgmlType::Q8_1.block(), (32, 36));
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(tensor_size("t", &[64, 3], GgmlType::F16).unwrap(), 384);
        assert_eq!(tensor_size("t", &[256, 2], GgmlType::Q4_K).unwrap(), 288);
        assert!(matches!(
            tensor_size("t", &[100, 2], GgmlType::Q4_K),
            Err(GgufErrorKind::Blocks { .. })
        ));
        assert!(matches!(
            tensor_size("t", &[u64::MAX, 2], GgmlType::F32),
            Err(GgufErrorKind::DimSize { .. })
        ));
    }
}
