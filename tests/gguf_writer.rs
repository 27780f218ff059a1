//! The GGUF writer: files written from scratch and copies with changed metadata read back
//! identically by our reader and by gguf-py; writes are atomic.

mod common;
use common::*;

use moa::formats::GgmlType;
use moa::gguf::{Gguf, GgufBuilder, GgufFile, TensorData, Value, ValueType};
use proptest::prelude::*;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn every_value_type() -> Vec<(&'static str, Value)> {
    let s = |x: &str| Value::string(x);
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.f32", Value::F32(1.5e-7)),
        ("t.bool", Value::Bool(true)),
        ("t.string", s("héllo, wörld ✓")),
        ("t.empty_string", s("")),
        ("t.u64", Value::U64(u64::MAX - 1)),
        ("t.i64", Value::I64(i64::MIN + 1)),
        ("t.f64", Value::F64(-2.5e300)),
        (
            "t.arr_u32",
            Value::Array(ValueType::U32, (0..1000).map(Value::U32).collect()),
        ),
        (
            "t.arr_f32",
            Value::Array(ValueType::F32, vec![Value::F32(0.25), Value::F32(-1e30)]),
        ),
        (
            "t.arr_str",
            Value::Array(ValueType::String, vec![s("a"), s(""), s("<|im_end|>")]),
        ),
        (
            "t.arr_bool",
            Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
        ),
        ("t.arr_empty", Value::Array(ValueType::I64, vec![])),
        (
            "t.nested",
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::I16, vec![Value::I16(1), Value::I16(-2)]),
                    Value::Array(ValueType::String, vec![s("x")]),
                    Value::Array(ValueType::U8, vec![]),
                ],
            ),
        ),
    ]
}

fn tensors() -> Vec<(&'static str, GgmlType, Vec<u64>)> {
    vec![
        ("f32", GgmlType::F32, vec![7, 3]),
        ("f16", GgmlType::F16, vec![5]),
        ("q4_0", GgmlType::Q4_0, vec![64, 2]),
        ("q8_0", GgmlType::Q8_0, vec![32, 1, 3]),
        ("q4_k", GgmlType::Q4_K, vec![256, 2, 1, 2]),
        ("i32", GgmlType::I32, vec![3]),
    ]
}

fn build(alignment: Option<u32>) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut b = GgufBuilder::new();
    b.set("general.architecture", Value::string("test"));
    if let Some(a) = alignment {
        b.set("general.alignment", Value::U32(a));
    }
    for (k, v) in every_value_type() {
        b.set(k, v);
    }
    let mut datas = Vec::new();
    for (i, (name, ty, dims)) in tensors().into_iter().enumerate() {
        let n = ty.bytes_for(dims.iter().product()).unwrap() as usize;
        let mut data = bytes(n, i as u64 + 1);
        if ty == GgmlType::F16 || ty == GgmlType::F32 {
            data.fill(0x3c); // finite values, so the comparison is about bytes not NaN payloads
        }
        datas.push(data.clone());
        b.add_tensor(name, ty, &dims, TensorData::Owned(data))
            .unwrap();
    }
    let mut out = Vec::new();
    b.write_to(&mut out).unwrap();
    (out, datas)
}

#[test]
fn from_scratch_round_trips_through_our_reader() {
    for align in [None, Some(64), Some(8)] {
        let (out, datas) = build(align);
        let f = GgufFile::from_bytes(out).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, align.unwrap_or(32) as u64);
        for (k, v) in every_value_type() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        for ((name, ty, dims), data) in tensors().into_iter().zip(&datas) {
            let (t, bytes) = f.tensor(name).unwrap();
            assert_eq!((t.ty, &t.dims), (ty, &dims));
            assert_eq!(bytes, &data[..]);
            assert_eq!((f.data_offset + t.offset) % f.alignment, 0);
        }
    }
}

/// gguf-py's view of a file written by us.
fn py_dump(path: &std::path::Path) -> Json {
    serde_json::from_str(&run_py("gguf_ref.py", &["dump", path.to_str().unwrap()])).unwrap()
}

fn py_metadata(dump: &Json) -> Vec<(String, Json)> {
    dump["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap().to_string(), m["value"].clone()))
        .collect()
}

#[test]
fn from_scratch_reads_back_in_gguf_py() {
    if !python_gguf() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for align in [None, Some(64)] {
        let (out, datas) = build(align);
        let path = dir.path().join("scratch.gguf");
        std::fs::write(&path, &out).unwrap();
        let ours = Gguf::parse(&out).unwrap();
        let dump = py_dump(&path);
        let expect: Vec<(String, Json)> = ours
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), moa::inspect::value_to_json(v, None)))
            .collect();
        assert_eq!(py_metadata(&dump), expect);
        for (m, (_, v)) in dump["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&ours.metadata)
        {
            assert_eq!(m["type"], v.value_type().name());
        }
        let pt = dump["tensors"].as_array().unwrap();
        assert_eq!(pt.len(), datas.len());
        for ((t, data), (name, ty, dims)) in pt.iter().zip(&datas).zip(tensors()) {
            assert_eq!(t["name"], name);
            assert_eq!(t["type"], ty.name());
            assert_eq!(t["shape"], serde_json::json!(dims));
            assert_eq!(t["sha256"], sha256(data), "{name}");
        }
    }
}

#[test]
fn copy_with_changed_metadata_keeps_tensor_bytes() {
    let Some(src) = model(SMOLLM) else { return };
    let file = GgufFile::open(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.gguf");
    let mut b = GgufBuilder::from_file(&file);
    b.set("general.name", Value::string("renamed"));
    b.set("moa.version", Value::U32(1));
    b.set(
        "moa.alpha",
        Value::Array(ValueType::F32, vec![Value::F32(-2048.0); 90]),
    );
    assert!(b.remove("general.license").is_some());
    b.write_atomic(&out).unwrap();

    let copy = GgufFile::open(&out).unwrap();
    assert_eq!(
        copy.get("general.name").and_then(Value::as_str),
        Some("renamed")
    );
    assert_eq!(copy.get("moa.version"), Some(&Value::U32(1)));
    assert!(copy.get("general.license").is_none());
    assert_eq!(copy.metadata.len(), file.metadata.len() + 1);
    assert_eq!(copy.tensors.len(), file.tensors.len());
    for (a, b) in file.tensors.iter().zip(&copy.tensors) {
        assert_eq!((&a.name, a.ty, &a.dims), (&b.name, b.ty, &b.dims));
        assert_eq!(file.tensor_data(a), copy.tensor_data(b), "{}", a.name);
    }
    // The source is untouched and no temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    if python_gguf() {
        let orig = py_dump(&src);
        let dump = py_dump(&out);
        let ot = orig["tensors"].as_array().unwrap();
        let ct = dump["tensors"].as_array().unwrap();
        for (a, b) in ot.iter().zip(ct) {
            for k in ["name", "type", "shape", "sha256"] {
                assert_eq!(a[k], b[k], "{} {k}", a["name"]);
            }
        }
        let meta = py_metadata(&dump);
        let expect: Vec<(String, Json)> = copy
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), moa::inspect::value_to_json(v, None)))
            .collect();
        assert_eq!(meta, expect);
    }
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad.gguf");
    std::fs::write(&out, b"previous contents").unwrap();
    let mut b = GgufBuilder::new();
    b.add_tensor(
        "gen",
        GgmlType::F32,
        &[1024],
        TensorData::Generated(Box::new(|w| w.write_all(&[0u8; 100]))),
    )
    .unwrap();
    let e = b.write_atomic(&out).unwrap_err().to_string();
    assert!(
        e.contains("generator wrote 100 bytes, the tensor needs 4096"),
        "{e}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"previous contents");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temporary file left behind"
    );

    let e = GgufBuilder::new()
        .write_atomic(dir.path().join("no/such/dir/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no/such/dir"), "{e}");
}

#[test]
fn generated_tensors_stream() {
    let mut b = GgufBuilder::new();
    b.add_tensor(
        "gen",
        GgmlType::F32,
        &[1000],
        TensorData::Generated(Box::new(|w| {
            for i in 0..1000u32 {
                w.write_all(&(i as f32).to_le_bytes())?;
            }
            Ok(())
        })),
    )
    .unwrap();
    let mut out = Vec::new();
    b.write_to(&mut out).unwrap();
    let f = GgufFile::from_bytes(out).unwrap();
    assert_eq!(
        f.dequantize("gen").unwrap_or_else(|e| panic!("{e}"))[999],
        999.0
    );
}

fn arb_scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        (-1e30f32..1e30).prop_map(Value::F32),
        (-1e300f64..1e300).prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,20}".prop_map(Value::string),
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    arb_scalar().prop_recursive(3, 64, 8, |inner| {
        // Homogeneous arrays: pick one element, then repeat values of its type.
        (inner, 0usize..6).prop_flat_map(|(first, n)| {
            let t = first.value_type();
            let elem = match &first {
                Value::Array(..) => Just(first.clone()).boxed(),
                _ => arb_scalar()
                    .prop_filter("same type", move |v| v.value_type() == t)
                    .boxed(),
            };
            proptest::collection::vec(elem, n).prop_map(move |items| Value::Array(t, items))
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_metadata_and_tensors_round_trip(
        values in proptest::collection::vec(arb_value(), 0..12),
        shapes in proptest::collection::vec((0usize..4, 1u64..4, 1u64..3), 0..5),
        align_pow in 3u32..8,
    ) {
        let mut b = GgufBuilder::new();
        b.set("general.alignment", Value::U32(1 << align_pow));
        for (i, v) in values.iter().enumerate() {
            b.set(&format!("k.{i}"), v.clone());
        }
        let types = [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q6_K, GgmlType::BF16];
        let mut expect = Vec::new();
        for (i, &(t, blocks, rows)) in shapes.iter().enumerate() {
            let ty = types[t];
            let dims = vec![blocks * ty.block_size() as u64, rows];
            let data = bytes(ty.bytes_for(dims[0] * rows).unwrap() as usize, i as u64);
            b.add_tensor(&format!("t{i}"), ty, &dims, TensorData::Owned(data.clone())).unwrap();
            expect.push((ty, dims, data));
        }
        let mut out = Vec::new();
        b.write_to(&mut out).unwrap();
        let f = GgufFile::from_bytes(out).unwrap();
        for (i, v) in values.iter().enumerate() {
            prop_assert_eq!(f.get(&format!("k.{i}")), Some(v));
        }
        for (i, (ty, dims, data)) in expect.iter().enumerate() {
            let (t, bytes) = f.tensor(&format!("t{i}")).unwrap();
            prop_assert_eq!((t.ty, &t.dims), (*ty, dims));
            prop_assert_eq!(bytes, &data[..]);
        }
    }
}
