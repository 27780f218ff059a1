//! Dot-kernel throughput: GB/s of weight bytes, scalar vs AVX2, rows of 4096 elements.
//!
//! `cargo bench -p ggml-compat --bench dot` (plain std::time, no harness). The weight matrix is
//! 256 rows (0.3 to 4 MiB depending on the type), small enough to stay in cache, so this
//! measures the kernels rather than memory bandwidth.

use ggml_compat::dot::{dot_kernel_avx2, dot_kernel_scalar, vec_dot_type};
use ggml_compat::{quantize_row, GgmlType};
use std::hint::black_box;
use std::time::{Duration, Instant};

const N: usize = 4096;
const ROWS: usize = 256;

fn main() {
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "{:<6} {:>12} {:>12} {:>8}",
        "type", "scalar GB/s", "avx2 GB/s", "speedup"
    );
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for ty in types {
        if !filter.is_empty() && !filter.iter().any(|f| ty.name().eq_ignore_ascii_case(f)) {
            continue;
        }
        // Weights: quantize random rows, so scales are realistic.
        let x: Vec<f32> = (0..N * ROWS)
            .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        let row_bytes = ty.bytes_for(N as u64).unwrap() as usize;
        let mut w = vec![0u8; row_bytes * ROWS];
        quantize_row(ty, &x, &mut w).unwrap();
        let at = vec_dot_type(ty).unwrap();
        let mut a = vec![0u8; at.bytes_for(N as u64).unwrap() as usize];
        quantize_row(at, &x[..N], &mut a).unwrap();

        let measure = |kernel: fn(usize, &[u8], &[u8]) -> f32| -> f64 {
            let mut passes = 0u64;
            let start = Instant::now();
            let mut sink = 0f32;
            while start.elapsed() < Duration::from_millis(300) {
                for row in w.chunks_exact(row_bytes) {
                    sink += kernel(black_box(N), black_box(row), black_box(&a));
                }
                passes += 1;
            }
            black_box(sink);
            (passes * w.len() as u64) as f64 / start.elapsed().as_secs_f64() / 1e9
        };
        let scalar = measure(dot_kernel_scalar(ty).unwrap());
        match dot_kernel_avx2(ty) {
            Some(k) => {
                let fast = measure(k);
                println!(
                    "{:<6} {:>12.2} {:>12.2} {:>7.1}x",
                    ty.name(),
                    scalar,
                    fast,
                    fast / scalar
                );
            }
            None => println!("{:<6} {:>12.2} {:>12} {:>8}", ty.name(), scalar, "-", "-"),
        }
    }
}
