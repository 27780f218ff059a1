//! GGUF writing: a builder holding metadata and tensors (borrowed bytes, owned bytes, or a
//! generator that streams them), written as version 3 either to any `Write` or atomically to a
//! path (temporary file in the destination folder, flush, fsync, rename).

use std::io::{self, Write};
use std::path::Path;

use ggml_compat::GgmlType;

use crate::util::AtomicFile;

use super::reader::{align_up, tensor_bytes, GgufFile, MAX_DIMS};
use super::value::Value;
use super::{GgufError, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};

/// Streams a tensor's bytes into the writer; must write exactly the tensor's size.
pub type TensorGenerator<'a> = Box<dyn FnMut(&mut dyn Write) -> io::Result<()> + 'a>;

/// Where a tensor's bytes come from when writing.
pub enum TensorData<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    Generated(TensorGenerator<'a>),
}

struct TensorSpec<'a> {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    n_bytes: u64,
    data: TensorData<'a>,
}

/// Builds a GGUF file. Metadata keeps insertion order; [`GgufBuilder::set`] replaces in place.
pub struct GgufBuilder<'a> {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorSpec<'a>>,
}

impl Default for GgufBuilder<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufBuilder<'a> {
    pub fn new() -> Self {
        GgufBuilder {
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// A builder with all metadata and tensors of `file`, the tensors borrowing the file's bytes.
    pub fn from_file(file: &'a GgufFile) -> Self {
        let mut b = GgufBuilder {
            metadata: file.metadata.clone(),
            tensors: Vec::with_capacity(file.tensors.len()),
        };
        for t in &file.tensors {
            b.tensors.push(TensorSpec {
                name: t.name.clone(),
                ty: t.ty,
                dims: t.dims.clone(),
                n_bytes: t.n_bytes,
                data: TensorData::Borrowed(file.tensor_data(t)),
            });
        }
        b
    }

    /// Sets a key, replacing an existing value in place (keeping its position) or appending.
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
        self
    }

    /// Removes a key, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        Some(self.metadata.remove(i).1)
    }

    /// Removes every key starting with `prefix`; returns how many were removed.
    pub fn remove_prefix(&mut self, prefix: &str) -> usize {
        let before = self.metadata.len();
        self.metadata.retain(|(k, _)| !k.starts_with(prefix));
        before - self.metadata.len()
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// Adds a tensor; its shape is validated and its byte size checked against `data` (for
    /// generated data, when written).
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: TensorData<'a>,
    ) -> Result<&mut Self, GgufError> {
        if dims.len() > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name: name.into(),
                n_dims: dims.len() as u64,
                max: MAX_DIMS,
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(GgufError::DuplicateTensor(name.into()));
        }
        let n_bytes = tensor_bytes(name, ty, dims)?;
        let given = match &data {
            TensorData::Borrowed(b) => Some(b.len() as u64),
            TensorData::Owned(v) => Some(v.len() as u64),
            TensorData::Generated(_) => None,
        };
        if let Some(given) = given {
            if given != n_bytes {
                return Err(GgufError::BadTensorData {
                    name: name.into(),
                    reason: format!(
                        "{ty} tensor of shape {dims:?} needs {n_bytes} bytes, {given} given"
                    ),
                });
            }
        }
        self.tensors.push(TensorSpec {
            name: name.into(),
            ty,
            dims: dims.to_vec(),
            n_bytes,
            data,
        });
        Ok(self)
    }

    fn alignment(&self) -> Result<u64, GgufError> {
        match self
            .metadata
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .map(|(_, v)| v)
        {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => Ok(*a as u64),
            Some(Value::U32(a)) => Err(GgufError::BadAlignment(*a as u64)),
            Some(v) => Err(GgufError::WrongType {
                key: ALIGNMENT_KEY.into(),
                expected: "UINT32".into(),
                found: v.type_description(),
            }),
        }
    }

    fn check_metadata(&self) -> Result<(), GgufError> {
        for (i, (k, v)) in self.metadata.iter().enumerate() {
            if self.metadata[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(GgufError::DuplicateKey(k.clone()));
            }
            check_array_types(k, v)?;
        }
        Ok(())
    }

    /// Writes the file to `w` (version 3); returns the number of bytes written.
    pub fn write_to(&mut self, w: &mut dyn Write) -> Result<u64, GgufError> {
        self.check_metadata()?;
        let alignment = self.alignment()?;
        let mut out = CountingWriter { inner: w, count: 0 };
        let io = |e| GgufError::io("<output>", e);

        out.write_all(&MAGIC).map_err(io)?;
        out.write_all(&3u32.to_le_bytes()).map_err(io)?;
        out.write_all(&(self.tensors.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&(self.metadata.len() as u64).to_le_bytes())
            .map_err(io)?;
        for (k, v) in &self.metadata {
            write_str(&mut out, k.as_bytes()).map_err(io)?;
            out.write_all(&v.value_type().id().to_le_bytes())
                .map_err(io)?;
            write_value(&mut out, v).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut out, t.name.as_bytes()).map_err(io)?;
            out.write_all(&(t.dims.len() as u32).to_le_bytes())
                .map_err(io)?;
            for d in &t.dims {
                out.write_all(&d.to_le_bytes()).map_err(io)?;
            }
            out.write_all(&t.ty.id().to_le_bytes()).map_err(io)?;
            out.write_all(&offset.to_le_bytes()).map_err(io)?;
            offset = align_up(offset + t.n_bytes, alignment).expect("tensor sizes were validated");
        }
        pad(&mut out, alignment).map_err(io)?;
        for t in &mut self.tensors {
            let start = out.count;
            match &mut t.data {
                TensorData::Borrowed(b) => out.write_all(b).map_err(io)?,
                TensorData::Owned(v) => out.write_all(v).map_err(io)?,
                TensorData::Generated(g) => g(&mut out).map_err(io)?,
            }
            let written = out.count - start;
            if written != t.n_bytes {
                return Err(GgufError::BadTensorData {
                    name: t.name.clone(),
                    reason: format!(
                        "generator wrote {written} bytes, the tensor needs {}",
                        t.n_bytes
                    ),
                });
            }
            pad(&mut out, alignment).map_err(io)?;
        }
        out.flush().map_err(io)?;
        Ok(out.count)
    }

    /// Writes the file atomically: into a temporary file in the destination folder, flushed and
    /// synced, then renamed over `path`. On any error the temporary file is removed and `path`
    /// is untouched.
    pub fn write_atomic(&mut self, path: impl AsRef<Path>) -> Result<u64, GgufError> {
        let path = path.as_ref();
        let mut file = AtomicFile::create(path).map_err(|e| GgufError::io(path, e))?;
        let n = self.write_to(file.writer()).map_err(|e| match e {
            GgufError::Io { source, .. } => GgufError::io(path, source),
            e => e,
        })?;
        file.commit().map_err(|e| GgufError::io(path, e))?;
        Ok(n)
    }
}

/// Arrays must be homogeneous: every item of the declared element type.
fn check_array_types(key: &str, v: &Value) -> Result<(), GgufError> {
    if let Value::Array(t, items) = v {
        for item in items {
            if item.value_type() != *t {
                return Err(GgufError::WrongType {
                    key: key.into(),
                    expected: format!("array items of type {t}"),
                    found: item.type_description(),
                });
            }
            check_array_types(key, item)?;
        }
    }
    Ok(())
}

struct CountingWriter<'w> {
    inner: &'w mut dyn Write,
    count: u64,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn pad(out: &mut CountingWriter, alignment: u64) -> io::Result<()> {
    let target = align_up(out.count, alignment).expect("file size fits in u64");
    let zeros = [0u8; 256];
    let mut left = target - out.count;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn write_str(out: &mut dyn Write, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)
}

fn write_value(out: &mut dyn Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => out.write_all(&[*x]),
        Value::I8(x) => out.write_all(&x.to_le_bytes()),
        Value::U16(x) => out.write_all(&x.to_le_bytes()),
        Value::I16(x) => out.write_all(&x.to_le_bytes()),
        Value::U32(x) => out.write_all(&x.to_le_bytes()),
        Value::I32(x) => out.write_all(&x.to_le_bytes()),
        Value::F32(x) => out.write_all(&x.to_le_bytes()),
        Value::Bool(x) => out.write_all(&[*x as u8]),
        Value::String(s) => write_str(out, &s.0),
        Value::U64(x) => out.write_all(&x.to_le_bytes()),
        Value::I64(x) => out.write_all(&x.to_le_bytes()),
        Value::F64(x) => out.write_all(&x.to_le_bytes()),
        Value::Array(t, items) => {
            out.write_all(&t.id().to_le_bytes())?;
            out.write_all(&(items.len() as u64).to_le_bytes())?;
            // Scalar arrays go out in one buffer: tokenizer arrays hold ~10^5 items.
            if t.fixed_size().is_some() {
                let mut buf = Vec::with_capacity(items.len() * 8);
                for item in items {
                    write_value(&mut buf, item)?;
                }
                out.write_all(&buf)
            } else {
                items.iter().try_for_each(|item| write_value(out, item))
            }
        }
    }
}
