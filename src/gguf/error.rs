//! Errors of the GGUF container: every variant names the offending key, tensor, offset or size.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic bytes are {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { found: Vec<u8> },
    #[error("unsupported GGUF version {0} (supported: 1, 2, 3)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF (version field reads {0} byte-swapped) is not supported")]
    BigEndian(u32),
    #[error(
        "truncated file: {what} needs {needed} bytes at offset {offset}, only {available} remain"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("absurd {what} {count} at offset {offset}: the remaining {available} bytes cannot hold that many")]
    AbsurdCount {
        what: String,
        count: u64,
        offset: u64,
        available: u64,
    },
    #[error("metadata key at offset {offset}: {what} is not valid UTF-8")]
    BadUtf8 { what: String, offset: u64 },
    #[error("metadata key {key:?}: unknown value type id {id}")]
    UnknownValueType { key: String, id: u32 },
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    TooDeep { key: String, max: usize },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("missing metadata key {0:?}")]
    MissingKey(String),
    #[error("general.alignment = {0}: must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?}: {n_dims} dimensions (at most {max} allowed)")]
    TooManyDims {
        name: String,
        n_dims: u64,
        max: usize,
    },
    #[error("tensor {name:?}: unknown ggml type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: shape {shape:?} is invalid for {ty}: {reason}")]
    BadShape {
        name: String,
        shape: Vec<u64>,
        ty: String,
        reason: String,
    },
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?}: data needs {needed} bytes at data offset {offset}, but the data section has only {available} bytes")]
    TensorOutOfBounds {
        name: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("tensor {name:?} overlaps tensor {other:?} in the data section")]
    OverlappingTensors { name: String, other: String },
    #[error("no tensor named {0:?}")]
    NoSuchTensor(String),
    #[error("tensor {name:?}: {reason}")]
    BadTensorData { name: String, reason: String },
    #[error("format error: {0}")]
    Format(#[from] ggml_compat::FormatError),
}

impl GgufError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GgufError::Io {
            path: path.into(),
            source,
        }
    }
}
