//! Stable-toolchain companion of the `cargo fuzz` target: every input kept in
//! `tests/fuzz/regressions/` (inputs that once crashed), and many seeded random mutations of
//! valid files, go through `moa::gguf::exercise` without a panic.

use moa::formats::GgmlType;
use moa::gguf::{exercise, GgufBuilder, TensorData, Value, ValueType};

#[test]
fn regression_inputs_do_not_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
        exercise(&std::fs::read(&path).unwrap());
        n += 1;
    }
    println!("{n} regression inputs");
}

fn seed_file() -> Vec<u8> {
    let mut b = GgufBuilder::new();
    b.set("general.architecture", Value::string("llama"));
    b.set(
        "a",
        Value::Array(
            ValueType::String,
            vec![Value::string("x"), Value::string("yz")],
        ),
    );
    b.set(
        "n",
        Value::Array(
            ValueType::Array,
            vec![Value::Array(ValueType::U8, vec![Value::U8(1)])],
        ),
    );
    b.set("f", Value::F32(0.5));
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::F16,
    ]
    .into_iter()
    .enumerate()
    {
        let dims = [ty.block_size() as u64 * 2, 2];
        let n = ty.bytes_for(dims[0] * dims[1]).unwrap() as usize;
        b.add_tensor(
            &format!("t{i}"),
            ty,
            &dims,
            TensorData::Owned(vec![0x11; n]),
        )
        .unwrap();
    }
    let mut out = Vec::new();
    b.write_to(&mut out).unwrap();
    out
}

#[test]
fn random_mutations_do_not_panic() {
    let seed = seed_file();
    assert!(exercise(&seed));
    let mut x = 0x2545F4914F6CDD1Du64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut parsed = 0;
    for _ in 0..20_000 {
        let mut b = seed.clone();
        for _ in 0..1 + rnd() % 4 {
            let at = (rnd() % b.len() as u64) as usize;
            match rnd() % 6 {
                0 => b[at] ^= 1 << (rnd() % 8),
                1 => b[at] = rnd() as u8,
                2 => b.truncate(at),
                3 => b[at] = [0, 0xff, 0x7f, 0x80][(rnd() % 4) as usize],
                4 => {
                    // Overwrite 8 bytes with a boundary integer (counts, lengths, offsets).
                    let v: u64 = [0, 1, u64::MAX, 1 << 32, 1 << 62, 255][(rnd() % 6) as usize];
                    let end = (at + 8).min(b.len());
                    b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                }
                _ => b.insert(at, rnd() as u8),
            }
            if b.is_empty() {
                break;
            }
        }
        parsed += exercise(&b) as u32;
    }
    println!("{parsed} of 20000 mutated files still parsed");
}
