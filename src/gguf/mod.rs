//! The GGUF container: parsing (on a memory map, zero-copy tensor views), metadata values, and
//! writing (atomic, either a copy of an existing file with new metadata or a file from scratch).
//!
//! Format knowledge about tensor *element types* lives in `ggml-compat`; this module only knows
//! how many bytes a tensor of a given type and shape occupies.
//!
//! Layout of a GGUF file (all little-endian):
//! `magic "GGUF" | version u32 | n_tensors | n_kv | kv* | tensor_info* | pad | data`, where counts
//! and string lengths are u64 (u32 in version 1), and each tensor's data offset is relative to the
//! data section, which starts at the first multiple of `general.alignment` (default 32) after the
//! tensor infos.

mod error;
mod exercise;
mod reader;
mod value;
mod writer;

pub use error::GgufError;
pub use exercise::exercise;
pub use reader::{Gguf, GgufFile, TensorInfo, MAX_DIMS};
pub use value::{GgufStr, Value, ValueType};
pub use writer::{GgufBuilder, TensorData};

/// The four magic bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
