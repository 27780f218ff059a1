//! GGUF parsing: the header, metadata and tensor infos are parsed from a byte slice with every
//! size checked before it is used (no allocation larger than the input can justify); tensor data
//! stays in the memory map and is handed out as borrowed slices.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ggml_compat::GgmlType;

use super::value::{GgufStr, Value, ValueType};
use super::{GgufError, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};

/// ggml tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are rejected (keeps recursion bounded on hostile input).
const MAX_NESTING: usize = 16;

/// One tensor's description. `dims` are in ggml order: `dims[0]` is the contiguous row length.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    /// Offset of the tensor's bytes relative to the start of the data section (as stored).
    pub offset: u64,
    /// Size of the tensor's bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Number of rows: elements / dims[0] (1 for a scalar).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// The parsed header of a GGUF file: version, metadata in file order, tensor infos in file order.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    /// Total size of the parsed input.
    pub file_size: u64,
    key_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

/// A byte cursor that checks every read against the end of the input.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Version 1 files use u32 for counts and lengths, later versions u64.
    wide: bool,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length: u32 in version 1, u64 later.
    fn count(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit in what remains.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        what: &dyn Fn() -> String,
    ) -> Result<(), GgufError> {
        match count.checked_mul(min_size) {
            Some(b) if b <= self.remaining() => Ok(()),
            _ => Err(GgufError::AbsurdCount {
                what: what(),
                count,
                offset: self.pos as u64,
                available: self.remaining(),
            }),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<GgufStr, GgufError> {
        let len = self.count(&|| format!("length of {}", what()))?;
        Ok(GgufStr(self.take(len, what)?.to_vec()))
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(&what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(&what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            ValueType::U32 => Value::U32(self.u32(&what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            ValueType::U64 => Value::U64(self.u64(&what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            ValueType::Bool => {
                let at = self.pos as u64;
                match self.array::<1>(&what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::WrongType {
                            key: key.to_string(),
                            expected: "a bool byte (0 or 1)".into(),
                            found: format!("byte {b} at offset {at}"),
                        })
                    }
                }
            }
            ValueType::String => Value::String(self.string(&what)?),
            ValueType::Array => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::TooDeep {
                        key: key.to_string(),
                        max: MAX_NESTING,
                    });
                }
                let id = self.u32(&|| format!("array element type of metadata key {key:?}"))?;
                let elem = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                    key: key.to_string(),
                    id,
                })?;
                let n = self.count(&|| format!("array length of metadata key {key:?}"))?;
                let min = match elem {
                    ValueType::String => {
                        if self.wide {
                            8
                        } else {
                            4
                        }
                    }
                    ValueType::Array => {
                        if self.wide {
                            12
                        } else {
                            8
                        }
                    }
                    t => t.fixed_size().unwrap_or(1) as u64,
                };
                self.check_count(n, min, &|| format!("array length of metadata key {key:?}"))?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl Gguf {
    /// Parses a whole GGUF file held in `bytes`, validating every tensor against its length.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        let mut c = Cursor {
            buf: bytes,
            pos: 0,
            wide: true,
        };
        let magic = c
            .take(4, &|| "magic".into())
            .map_err(|_| GgufError::BadMagic {
                found: bytes[..bytes.len().min(4)].to_vec(),
            })?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&|| "version".into())?;
        match version {
            1 => c.wide = false,
            2 | 3 => {}
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(GgufError::BigEndian(v.swap_bytes()))
            }
            v => return Err(GgufError::UnsupportedVersion(v)),
        }
        let n_tensors = c.count(&|| "tensor count".into())?;
        let n_kv = c.count(&|| "metadata key count".into())?;
        let (len_size, kv_min, ti_min) = if c.wide {
            (8, 8 + 4 + 1, 8 + 4 + 4 + 8)
        } else {
            (4, 4 + 4 + 1, 4 + 4 + 4 + 8)
        };
        let _ = len_size;
        c.check_count(n_kv, kv_min, &|| "metadata key count".into())?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut key_index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key_at = c.pos as u64;
            let key = c.string(&|| format!("key of metadata entry {i}"))?;
            let key = String::from_utf8(key.0).map_err(|_| GgufError::BadUtf8 {
                what: format!("key of metadata entry {i}"),
                offset: key_at,
            })?;
            let id = c.u32(&|| format!("value type of metadata key {key:?}"))?;
            let ty = ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                id,
            })?;
            let value = c.value(ty, &key, 0)?;
            if key_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        let alignment = match key_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => {
                let a = *a as u64;
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
            Some(v) => {
                return Err(GgufError::WrongType {
                    key: ALIGNMENT_KEY.into(),
                    expected: "UINT32".into(),
                    found: v.type_description(),
                })
            }
        };

        c.check_count(n_tensors, ti_min, &|| "tensor count".into())?;
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name_at = c.pos as u64;
            let name = c.string(&|| format!("name of tensor {i}"))?;
            let name = String::from_utf8(name.0).map_err(|_| GgufError::BadUtf8 {
                what: format!("name of tensor {i}"),
                offset: name_at,
            })?;
            let what = || format!("info of tensor {name:?}");
            let n_dims = c.u32(&what)? as u64;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    name,
                    n_dims,
                    max: MAX_DIMS,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.count(&what)?);
            }
            let type_id = c.u32(&what)?;
            let offset = c.u64(&what)?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                name: name.clone(),
                id: type_id,
            })?;
            let n_bytes = tensor_bytes(&name, ty, &dims)?;
            if !offset.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor {
                    name,
                    offset,
                    alignment,
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensors.push(TensorInfo {
                name,
                ty,
                dims,
                offset,
                n_bytes,
            });
        }

        let file_size = bytes.len() as u64;
        // The data section starts at the next multiple of the alignment. A file without tensors
        // may end before that padding.
        let data_offset = align_up(c.pos as u64, alignment).unwrap_or(u64::MAX);
        if !tensors.is_empty() && data_offset > file_size {
            return Err(GgufError::Truncated {
                what: "padding before the data section".into(),
                offset: c.pos as u64,
                needed: data_offset - c.pos as u64,
                available: file_size - c.pos as u64,
            });
        }
        let available = file_size.saturating_sub(data_offset);
        for t in &tensors {
            if t.offset
                .checked_add(t.n_bytes)
                .is_none_or(|end| end > available)
            {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    offset: t.offset,
                    needed: t.n_bytes,
                    available,
                });
            }
        }
        check_overlaps(&tensors)?;

        Ok(Gguf {
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
            file_size,
            key_index,
            tensor_index,
        })
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required key as an unsigned integer (any integer type that holds a non-negative value).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_integer()
            .filter(|_| !matches!(v, Value::Bool(_)))
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| GgufError::WrongType {
                key: key.into(),
                expected: "an unsigned integer".into(),
                found: v.type_description(),
            })
    }

    /// A required key as a float (any numeric type).
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_f64().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "a number".into(),
            found: v.type_description(),
        })
    }

    /// A required key as a UTF-8 string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_str().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "a UTF-8 STRING".into(),
            found: v.type_description(),
        })
    }

    /// A required key as an array (element type and items).
    pub fn get_array(&self, key: &str) -> Result<(ValueType, &[Value]), GgufError> {
        let v = self
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.into()))?;
        v.as_array().ok_or_else(|| GgufError::WrongType {
            key: key.into(),
            expected: "an ARRAY".into(),
            found: v.type_description(),
        })
    }

    /// The description of a tensor.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// `general.architecture`, when present.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }
}

/// Bytes of a tensor of type `ty` and shape `dims`, with the shape validated.
pub(crate) fn tensor_bytes(name: &str, ty: GgmlType, dims: &[u64]) -> Result<u64, GgufError> {
    let bad = |reason: String| GgufError::BadShape {
        name: name.into(),
        shape: dims.to_vec(),
        ty: ty.name().into(),
        reason,
    };
    if let Some(&d0) = dims.first() {
        if d0 % ty.block_size() as u64 != 0 {
            return Err(bad(format!(
                "row length {d0} is not a multiple of the block size {}",
                ty.block_size()
            )));
        }
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| bad("element count overflows".into()))?;
    ty.bytes_for(n).map_err(|e| bad(e.to_string()))
}

fn check_overlaps(tensors: &[TensorInfo]) -> Result<(), GgufError> {
    let mut spans: Vec<(u64, u64, usize)> = tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| t.n_bytes > 0)
        .map(|(i, t)| (t.offset, t.offset + t.n_bytes, i))
        .collect();
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(GgufError::OverlappingTensors {
                name: tensors[w[1].2].name.clone(),
                other: tensors[w[0].2].name.clone(),
            });
        }
    }
    Ok(())
}

/// Where a file's bytes live: a read-only memory map, or memory owned by us (tests, fuzzing).
enum Backing {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A parsed GGUF file together with its bytes; tensor data is borrowed from the map.
pub struct GgufFile {
    pub path: PathBuf,
    header: Gguf,
    backing: Backing,
}

impl std::ops::Deref for GgufFile {
    type Target = Gguf;
    fn deref(&self) -> &Gguf {
        &self.header
    }
}

impl GgufFile {
    /// Opens and parses a file through a read-only memory map.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| GgufError::io(path, e))?;
        let meta = file.metadata().map_err(|e| GgufError::io(path, e))?;
        if !meta.is_file() {
            return Err(GgufError::io(
                path,
                std::io::Error::other("not a regular file"),
            ));
        }
        // SAFETY: the map is read-only and private to this process. Another process truncating
        // or rewriting the file while it is mapped is outside what we can guard against (the
        // same contract as every mmap-based model loader); our own writer never modifies a file
        // in place, it writes a new file and renames it over the old path.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| GgufError::io(path, e))?;
        let header = Gguf::parse(&map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            backing: Backing::Map(map),
        })
    }

    /// Parses a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        let header = Gguf::parse(&bytes)?;
        Ok(GgufFile {
            path: PathBuf::from("<memory>"),
            header,
            backing: Backing::Owned(bytes),
        })
    }

    /// The header (metadata and tensor infos).
    pub fn header(&self) -> &Gguf {
        &self.header
    }

    /// All bytes of the file.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// The bytes of a tensor (validated at parse time to lie inside the file).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.bytes()[start..start + t.n_bytes as usize]
    }

    /// A tensor's info and bytes by name.
    pub fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::NoSuchTensor(name.into()))?;
        Ok((t, self.tensor_data(t)))
    }

    /// A tensor dequantized to f32 in ggml element order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (t, bytes) = self.tensor(name)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        ggml_compat::dequantize_row(t.ty, bytes, &mut out)?;
        Ok(out)
    }
}
