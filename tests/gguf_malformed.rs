//! Malformed GGUF input: each case is a clear error naming the problem, never a panic.

use moa::formats::GgmlType;
use moa::gguf::{Gguf, GgufBuilder, GgufFile, TensorData, Value};

/// Hand-assembles GGUF bytes so each field can be corrupted independently.
#[derive(Default)]
struct Raw {
    b: Vec<u8>,
}

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.b.extend_from_slice(b"GGUF");
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.b.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.b.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.b.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.str(k).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to the data section (alignment 32) and appends `n` data bytes.
    fn data(&mut self, n: usize) -> &mut Self {
        while !self.b.len().is_multiple_of(32) {
            self.b.push(0);
        }
        self.b.extend(std::iter::repeat_n(0x11u8, n));
        self
    }
}

fn err(bytes: &[u8]) -> String {
    match Gguf::parse(bytes) {
        Ok(_) => panic!("malformed input was accepted"),
        Err(e) => e.to_string(),
    }
}

fn assert_err(bytes: &[u8], needles: &[&str]) {
    let msg = err(bytes);
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} should mention {n:?}");
    }
}

fn valid() -> Vec<u8> {
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("a.b", 7)
        .tensor("w", &[32, 2], GgmlType::F32.id(), 0)
        .data(256);
    r.b
}

#[test]
fn the_valid_fixture_parses() {
    let g = Gguf::parse(&valid()).unwrap();
    assert_eq!(g.get("a.b"), Some(&Value::U32(7)));
    assert_eq!(g.tensors[0].n_bytes, 256);
}

#[test]
fn empty_and_short_files() {
    assert_err(b"", &["not a GGUF file"]);
    assert_err(b"GG", &["not a GGUF file"]);
    assert_err(b"GGUF\x03\x00", &["truncated", "version"]);
}

#[test]
fn wrong_magic() {
    let mut b = valid();
    b[..4].copy_from_slice(b"GGML");
    assert_err(&b, &["not a GGUF file", "47 47 55 46"]);
}

#[test]
fn unsupported_versions() {
    let mut b = valid();
    b[4..8].copy_from_slice(&4u32.to_le_bytes());
    assert_err(&b, &["unsupported GGUF version 4"]);
    b[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert_err(&b, &["unsupported GGUF version 0"]);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_err(&b, &["big-endian"]);
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let b = valid();
    for len in 0..b.len() {
        // Cutting inside the data section must fail too: the tensor would extend past the end.
        let msg = err(&b[..len]);
        assert!(
            msg.contains("truncated")
                || msg.contains("not a GGUF")
                || msg.contains("data section")
                || msg.contains("absurd"),
            "cut at {len}: unexpected error {msg}"
        );
    }
}

#[test]
fn absurd_counts_do_not_allocate() {
    let mut r = Raw::header(3, 0, u64::MAX);
    r.kv_u32("x", 1);
    assert_err(&r.b, &["absurd metadata key count"]);
    let r = Raw::header(3, 1 << 60, 0);
    assert_err(&r.b, &["absurd tensor count"]);
    // A string claiming 2^62 bytes.
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 62).u64(0).u64(0);
    assert_err(&r.b, &["truncated", "key of metadata entry 0"]);
    // An array claiming 2^40 u32 items.
    let mut r = Raw::header(3, 0, 1);
    r.str("arr").u32(9).u32(4).u64(1 << 40);
    assert_err(&r.b, &["absurd array length", "\"arr\""]);
}

#[test]
fn unknown_value_type() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    assert_err(&r.b, &["unknown value type id 13", "\"k\""]);
}

#[test]
fn deep_nesting_is_bounded() {
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..100 {
        r.u32(9).u64(1);
    }
    r.u32(4).u64(0);
    assert_err(&r.b, &["nested deeper", "\"deep\""]);
}

#[test]
fn bad_bool_byte() {
    let mut r = Raw::header(3, 0, 1);
    r.str("flag").u32(7);
    r.b.push(5);
    assert_err(&r.b, &["\"flag\"", "bool"]);
}

#[test]
fn invalid_utf8_key() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(2);
    r.b.extend_from_slice(&[0xff, 0xfe]);
    r.u32(4).u32(0);
    assert_err(&r.b, &["not valid UTF-8"]);
}

#[test]
fn duplicate_keys_and_tensors() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("same", 1).kv_u32("same", 2);
    assert_err(&r.b, &["duplicate metadata key \"same\""]);
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[32], 0, 0)
        .tensor("t", &[32], 0, 128)
        .data(256);
    assert_err(&r.b, &["duplicate tensor name \"t\""]);
}

#[test]
fn bad_alignment() {
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("general.alignment", 24);
    assert_err(&r.b, &["general.alignment = 24", "power of two"]);
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(10).u64(32);
    assert_err(&r.b, &["general.alignment", "UINT32", "UINT64"]);
}

#[test]
fn unknown_tensor_type() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], 4, 0).data(128);
    assert_err(&r.b, &["tensor \"w\"", "unknown ggml type id 4"]);
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], 99, 0).data(128);
    assert_err(&r.b, &["unknown ggml type id 99"]);
}

#[test]
fn too_many_dims() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[1, 1, 1, 1, 1], 0, 0).data(4);
    assert_err(&r.b, &["tensor \"w\"", "5 dimensions"]);
}

#[test]
fn shape_not_whole_blocks_and_overflow() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("q", &[100, 2], GgmlType::Q4_0.id(), 0).data(1024);
    assert_err(
        &r.b,
        &[
            "tensor \"q\"",
            "Q4_0",
            "not a multiple of the block size 32",
        ],
    );
    let mut r = Raw::header(3, 1, 0);
    r.tensor("big", &[1 << 32, 1 << 32, 1 << 32], 0, 0).data(64);
    assert_err(&r.b, &["tensor \"big\"", "overflows"]);
}

#[test]
fn misaligned_tensor_offset() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[32], 0, 4).data(256);
    assert_err(&r.b, &["tensor \"w\"", "offset 4", "alignment 32"]);
}

#[test]
fn tensor_data_beyond_end_of_file() {
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[64], 0, 0).data(100);
    assert_err(&r.b, &["tensor \"w\"", "256 bytes", "only 100"]);
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[64], 0, u64::MAX - 31).data(300);
    assert_err(&r.b, &["tensor \"w\"", "data section"]);
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[64], 0, 0)
        .tensor("b", &[64], 0, 128)
        .data(512);
    assert_err(&r.b, &["overlaps"]);
}

#[test]
fn version_1_uses_32_bit_counts() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // tensors
    b.extend_from_slice(&1u32.to_le_bytes()); // kv
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(b"key");
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(b"hi");
    let g = Gguf::parse(&b).unwrap();
    assert_eq!(g.version, 1);
    assert_eq!(g.get("key").and_then(Value::as_str), Some("hi"));
}

#[test]
fn typed_getters_name_the_key() {
    let g = Gguf::parse(&valid()).unwrap();
    assert_eq!(g.get_u64("a.b").unwrap(), 7);
    assert!(g
        .get_str("a.b")
        .unwrap_err()
        .to_string()
        .contains("\"a.b\""));
    assert!(g
        .get_u64("missing.key")
        .unwrap_err()
        .to_string()
        .contains("missing metadata key \"missing.key\""));
}

#[test]
fn open_reports_missing_file_and_directories() {
    let e = GgufFile::open("/definitely/not/here.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/definitely/not/here.gguf"), "{e}");
    let e = GgufFile::open("/tmp").err().unwrap().to_string();
    assert!(e.contains("not a regular file"), "{e}");
}

#[test]
fn writer_rejects_bad_tensors() {
    let mut b = GgufBuilder::new();
    let e = b
        .add_tensor("w", GgmlType::F32, &[4], TensorData::Owned(vec![0; 15]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs 16 bytes, 15 given"), "{e}");
    let e = b
        .add_tensor("w", GgmlType::Q4_K, &[100], TensorData::Owned(vec![]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("block size 256"), "{e}");
    b.add_tensor("w", GgmlType::F32, &[4], TensorData::Owned(vec![0; 16]))
        .unwrap();
    let e = b
        .add_tensor("w", GgmlType::F32, &[4], TensorData::Owned(vec![0; 16]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("duplicate tensor name"), "{e}");
    b.set(
        "mixed",
        Value::Array(
            moa::gguf::ValueType::U32,
            vec![Value::U32(1), Value::F32(2.0)],
        ),
    );
    let e = b.write_to(&mut Vec::new()).err().unwrap().to_string();
    assert!(e.contains("\"mixed\""), "{e}");
}

#[test]
fn file_ending_inside_the_padding_before_the_data_section() {
    // Found by the fuzzer: a zero-byte tensor made the data-section bounds check pass.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("empty", &[0], 0, 0);
    assert!(!r.b.len().is_multiple_of(32), "fixture must need padding");
    assert_err(&r.b, &["truncated", "padding before the data section"]);
}
