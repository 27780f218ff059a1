//! Q8_0 quantization against gguf-py's (`tests/py/q8_ref.py`): the bytes must be identical.
//!
//! Skipped, with a printed reason, when `python3` or its `gguf` / `numpy` packages are missing.

use ggml_compat::{quantize_row, GgmlType};
use std::io::Write;
use std::process::{Command, Stdio};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/py/q8_ref.py");

/// splitmix64: a tiny deterministic generator for test data.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn python_has_gguf() -> bool {
    Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn gguf_py_q8_0(x: &[f32]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python3");
    let input: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("python3 output");
    writer.join().unwrap().expect("write to python3");
    assert!(out.status.success(), "q8_ref.py failed: {:?}", out.status);
    out.stdout
}

/// Blocks that exercise the rounding: random values at many magnitudes, exact halves, negative
/// maxima, zero blocks, f16-subnormal and f16-overflowing scales, constant blocks.
fn test_data() -> Vec<f32> {
    let mut rng = Rng(0x5eed_0008);
    let mut x = Vec::new();
    for b in 0..3000usize {
        let kind = b % 12;
        for i in 0..32usize {
            let u = rng.f32();
            let v = match kind {
                // Uniform at a random magnitude 2^-20 .. 2^20.
                0..=4 => u * (2.0f32).powi((rng.next_u64() % 41) as i32 - 20),
                // max 127 makes d = 1 and id = 1: exact halves are ties.
                5 if i == 0 => 127.0,
                5 => ((rng.next_u64() % 253) as f32 - 126.0) + 0.5,
                // Negative maximum, halves of other scales.
                6 if i == 7 => -63.5,
                6 => (((rng.next_u64() % 127) as f32) - 63.0) * 0.5,
                7 => 0.0,
                // Scales that are f16 subnormals (d < 6.1e-5) or round to f16 infinity.
                8 => u * 3e-3,
                9 => u * 1e7,
                // Constant block.
                10 => -0.3,
                // Sparse block: mostly zeros.
                _ => {
                    if rng.next_u64() & 7 == 0 {
                        u
                    } else {
                        0.0
                    }
                }
            };
            x.push(v);
        }
    }
    x
}

#[test]
fn q8_0_matches_gguf_py_bit_for_bit() {
    if !python_has_gguf() {
        println!("SKIP q8_0_matches_gguf_py_bit_for_bit: python gguf package not installed");
        return;
    }
    let x = test_data();
    let want = gguf_py_q8_0(&x);
    let mut got = vec![0u8; GgmlType::Q8_0.bytes_for(x.len() as u64).unwrap() as usize];
    quantize_row(GgmlType::Q8_0, &x, &mut got).unwrap();
    assert_eq!(want.len(), got.len());
    let bs = GgmlType::Q8_0.type_size();
    for (b, (w, g)) in want.chunks(bs).zip(got.chunks(bs)).enumerate() {
        assert_eq!(
            w,
            g,
            "block {b} differs; input {:?}",
            &x[b * 32..b * 32 + 32]
        );
    }
}
