//! Cross-checks against gguf-py (`gguf.quants`), the Python reference for ggml's formats.
//!
//! Each test generates seeded data in Rust, hands it to `tests/py/quants_ref.py` through a
//! scratch directory, and compares:
//! - `dequantize_random_blocks_match_gguf_py`: decoding random blocks (random bytes with sane
//!   f16 scales; raw random bits for F16/BF16) gives the same floats as gguf-py: bit-identical
//!   for F16/BF16, within 1e-6 relative for the block types (in practice bit-identical too).
//! - `quantize_bytes_match_gguf_py`: F16, BF16, Q4_0, Q4_1, Q5_0 and Q5_1 encodings are
//!   byte-identical to gguf-py's on several distributions, row lengths and edge cases.
//! - `quantize_error_not_worse_than_gguf_py`: for every type we quantize, our
//!   quantize->dequantize RMS error is no worse than gguf-py's reference quantizer where it has
//!   one; gguf-py has no K-quant quantizers, so for Q2_K..Q6_K the error is held to fixed
//!   bounds relative to the data RMS (see `k_quant_bound`) and, for Q4_K / Q5_K / Q6_K, to be
//!   no worse than gguf-py's legacy quantizer of equal or more bits per weight (Q4_0, Q5_0,
//!   Q5_1; see `k_quant_peer`). gguf-py also decodes our bytes of every type to exactly what
//!   we decode, which checks our packing.
//!
//! Q8_0 / Q8_1 / Q8_K are owned by `q8.rs` and not covered here.
//!
//! Without python3 + gguf + numpy each test prints `SKIP pyref: ...` and passes.
//! Run with `--nocapture` to see the measured numbers.

use std::path::{Path, PathBuf};
use std::process::Command;

use ggml_compat::{dequantize_row, quantize_row, GgmlType};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/py/quants_ref.py");

/// True when python3 can import gguf and numpy; otherwise prints the SKIP line.
fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIP pyref: python gguf package not installed (pip install gguf)");
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// Deterministic data.

/// xorshift64* seeded through splitmix64.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f32 {
        (lo + (hi - lo) * self.unit()) as f32
    }
    /// Standard normal (Box-Muller).
    fn gauss(&mut self) -> f32 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[derive(Clone, Copy, Debug)]
enum Dist {
    /// N(0, 1).
    Gaussian,
    /// U(-1, 1).
    Uniform,
    /// N(0, 1) with 1% of the values multiplied by 30.
    Outliers,
    /// N(0, s) with s = 10^U(-3, 2) drawn per 32 elements.
    MixedScale,
    /// |N(0, 1)| + 0.1: one-signed, like norm weights.
    Positive,
}

const DISTS: [Dist; 5] = [
    Dist::Gaussian,
    Dist::Uniform,
    Dist::Outliers,
    Dist::MixedScale,
    Dist::Positive,
];

fn generate(dist: Dist, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut scale = 1.0f32;
    (0..n)
        .map(|i| match dist {
            Dist::Gaussian => rng.gauss(),
            Dist::Uniform => rng.uniform(-1.0, 1.0),
            Dist::Outliers => {
                let v = rng.gauss();
                if rng.unit() < 0.01 {
                    v * 30.0
                } else {
                    v
                }
            }
            Dist::MixedScale => {
                if i % 32 == 0 {
                    scale = 10f32.powf(rng.uniform(-3.0, 2.0));
                }
                rng.gauss() * scale
            }
            Dist::Positive => rng.gauss().abs() + 0.1,
        })
        .collect()
}

/// Row lengths and row counts used for every type (all multiples of 256).
const SHAPES: [(usize, usize); 3] = [(256, 4), (768, 2), (4096, 2)];
/// Extra, shorter shapes for the 32-element-block and float types.
const SHORT_SHAPES: [(usize, usize); 2] = [(32, 8), (96, 3)];

fn shapes_for(ty: GgmlType) -> Vec<(usize, usize)> {
    let mut s = SHAPES.to_vec();
    if ty.block_size() <= 32 {
        s.extend_from_slice(&SHORT_SHAPES);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Running the Python side.

struct Job {
    op: &'static str,
    ty: GgmlType,
    ne0: usize,
    input: PathBuf,
    output: PathBuf,
}

/// A scratch directory plus a batch of jobs for one run of the Python script.
struct Scratch {
    dir: PathBuf,
    jobs: Vec<Job>,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ggml-compat-pyref-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch {
            dir,
            jobs: Vec::new(),
        }
    }

    fn add(&mut self, op: &'static str, ty: GgmlType, ne0: usize, input: &[u8]) -> usize {
        let id = self.jobs.len();
        let input_path = self.dir.join(format!("{id}.in"));
        std::fs::write(&input_path, input).expect("write input");
        let output = self.dir.join(format!("{id}.out"));
        self.jobs.push(Job {
            op,
            ty,
            ne0,
            input: input_path,
            output,
        });
        id
    }

    /// gguf-py's encoding of `x` (rows of `ne0`).
    fn quantize(&mut self, ty: GgmlType, ne0: usize, x: &[f32]) -> usize {
        self.add("quantize", ty, ne0, &f32_bytes(x))
    }

    /// gguf-py's decoding of `bytes` (rows of `ne0` elements).
    fn dequantize(&mut self, ty: GgmlType, ne0: usize, bytes: &[u8]) -> usize {
        self.add("dequantize", ty, ne0, bytes)
    }

    /// gguf-py's dequantize(quantize(x)).
    fn roundtrip(&mut self, ty: GgmlType, ne0: usize, x: &[f32]) -> usize {
        self.add("roundtrip", ty, ne0, &f32_bytes(x))
    }

    /// Runs every job; returns each job's output bytes, or `None` where gguf-py does not
    /// implement the operation for that type.
    fn run(&self) -> Vec<Option<Vec<u8>>> {
        let manifest = self.dir.join("manifest.tsv");
        let text: String = self
            .jobs
            .iter()
            .map(|j| {
                format!(
                    "{}\t{}\t{}\t{}\t{}\n",
                    j.op,
                    j.ty.name(),
                    j.ne0,
                    path_str(&j.input),
                    path_str(&j.output)
                )
            })
            .collect();
        std::fs::write(&manifest, text).expect("write manifest");
        let out = Command::new("python3")
            .arg(SCRIPT)
            .arg(&manifest)
            .output()
            .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "quants_ref.py failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines.len(),
            self.jobs.len(),
            "one status line per job:\n{stdout}"
        );
        self.jobs
            .iter()
            .zip(lines)
            .map(|(j, line)| {
                if line.starts_with("ok ") {
                    Some(std::fs::read(&j.output).expect("read output"))
                } else {
                    assert!(
                        line.starts_with("unsupported "),
                        "unexpected status line {line:?}"
                    );
                    None
                }
            })
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> &str {
    let s = p.to_str().expect("utf-8 temp path");
    assert!(
        !s.contains(['\t', '\n']),
        "temp path {s:?} has a tab or newline"
    );
    s
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Our side, row by row as a tensor would be processed.

fn our_quantize(ty: GgmlType, ne0: usize, x: &[f32]) -> Vec<u8> {
    let row_bytes = ty.bytes_for(ne0 as u64).unwrap() as usize;
    let mut out = vec![0u8; x.len() / ne0 * row_bytes];
    for (src, dst) in x.chunks_exact(ne0).zip(out.chunks_exact_mut(row_bytes)) {
        quantize_row(ty, src, dst).unwrap();
    }
    out
}

fn our_dequantize(ty: GgmlType, ne0: usize, q: &[u8]) -> Vec<f32> {
    let row_bytes = ty.bytes_for(ne0 as u64).unwrap() as usize;
    let mut out = vec![0f32; q.len() / row_bytes * ne0];
    for (src, dst) in q.chunks_exact(row_bytes).zip(out.chunks_exact_mut(ne0)) {
        dequantize_row(ty, src, dst).unwrap();
    }
    out
}

fn rmse(x: &[f32], y: &[f32]) -> f64 {
    let s: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum();
    (s / x.len() as f64).sqrt()
}

fn rms(x: &[f32]) -> f64 {
    (x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

/// Byte offsets of the f16 scale fields inside one block of `ty`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// Random blocks of `ty`: random bytes, with every f16 scale field set to a finite value of
/// magnitude 2^-14 .. 2^4 and random sign (5% exact zeros). For F16/BF16, raw random bits.
fn random_blocks(ty: GgmlType, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let size = ty.type_size();
    let mut b: Vec<u8> = (0..n_blocks * size).map(|_| rng.next_u64() as u8).collect();
    for block in b.chunks_exact_mut(size) {
        for &off in f16_fields(ty) {
            let v = if rng.unit() < 0.05 {
                0.0
            } else {
                let mag = 2f32.powf(rng.uniform(-14.0, 4.0));
                if rng.unit() < 0.5 {
                    -mag
                } else {
                    mag
                }
            };
            block[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

const DEQUANT_TYPES: [GgmlType; 11] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[test]
fn dequantize_random_blocks_match_gguf_py() {
    if !python_ready() {
        return;
    }
    let mut rng = Rng::new(1);
    let mut scratch = Scratch::new("dequant");
    let mut cases = Vec::new();
    for ty in DEQUANT_TYPES {
        // 64 rows of one 256-element super-block / 256 elements.
        let ne0 = 256;
        let n_blocks = 64 * ne0 / ty.block_size();
        let bytes = random_blocks(ty, n_blocks, &mut rng);
        let job = scratch.dequantize(ty, ne0, &bytes);
        cases.push((ty, ne0, bytes, job));
    }
    let results = scratch.run();
    for (ty, ne0, bytes, job) in cases {
        let theirs = bytes_f32(
            results[job]
                .as_ref()
                .unwrap_or_else(|| panic!("gguf-py cannot dequantize {ty}")),
        );
        let ours = our_dequantize(ty, ne0, &bytes);
        assert_eq!(ours.len(), theirs.len(), "{ty}");
        let mut identical = 0;
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if a.to_bits() == b.to_bits() {
                identical += 1;
                continue;
            }
            // Float types must be bit-identical (NaN payloads included).
            assert!(
                !matches!(ty, GgmlType::F16 | GgmlType::BF16),
                "{ty} element {i}: ours {a:e} ({:#010x}) vs gguf-py {b:e} ({:#010x})",
                a.to_bits(),
                b.to_bits()
            );
            let tol = 1e-6 * a.abs().max(b.abs());
            assert!(
                (a - b).abs() <= tol,
                "{ty} element {i}: ours {a:e} vs gguf-py {b:e}"
            );
        }
        println!(
            "dequantize {ty:>5}: {identical}/{} values bit-identical to gguf-py",
            ours.len()
        );
    }
}

/// Hand-picked f32 values that exercise F16/BF16 rounding, overflow, underflow and NaN.
fn float_edge_values() -> Vec<f32> {
    let mut v = vec![
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, small payload
        f32::from_bits(0xff80_2000),
        f32::from_bits(0x7fbf_ffff),
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1), // smallest subnormal
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e-8,
        5.9604645e-8,
        2.9802322e-8, // half of the smallest f16 subnormal: ties to even (0)
        8.940697e-8,  // 1.5 x smallest subnormal: ties to even (2)
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        f32::from_bits(0x3f80_8000), // BF16 tie
        f32::from_bits(0x3f81_8000),
        f32::from_bits(0x3f80_7fff),
        f32::from_bits(0x3f80_8001),
    ];
    // Pad to a multiple of 256.
    let mut rng = Rng::new(99);
    while v.len() % 256 != 0 {
        v.push(f32::from_bits(rng.next_u64() as u32));
    }
    v
}

/// Edge-case inputs for the 32-element block types: zeros, constants, one-signed, huge, tiny.
fn legacy_edge_values() -> Vec<f32> {
    let mut rng = Rng::new(7);
    let mut v = Vec::new();
    v.extend([0.0f32; 32]);
    v.extend([1.0f32; 32]);
    v.extend([-3.5f32; 32]);
    v.extend((0..32).map(|_| -(rng.gauss().abs() + 0.5)));
    v.extend((0..32).map(|_| rng.gauss().abs() + 0.5));
    v.extend((0..32).map(|_| rng.gauss() * 20000.0));
    v.extend((0..32).map(|_| rng.gauss() * 1e-9));
    v.extend((0..32).map(|i| if i == 17 { 100.0 } else { rng.gauss() * 0.01 }));
    // Ties: the max and its negation both present (first one wins in ggml's absmax search).
    v.extend((0..32).map(|i| match i {
        3 => 2.0,
        9 => -2.0,
        _ => rng.uniform(-1.0, 1.0),
    }));
    v.extend((0..32).map(|i| match i {
        3 => -2.0,
        9 => 2.0,
        _ => rng.uniform(-1.0, 1.0),
    }));
    while v.len() % 256 != 0 {
        v.push(rng.gauss());
    }
    v
}

const BYTE_EXACT_TYPES: [GgmlType; 6] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

#[test]
fn quantize_bytes_match_gguf_py() {
    if !python_ready() {
        return;
    }
    let mut scratch = Scratch::new("quant");
    let mut cases = Vec::new();
    let mut seed = 100;
    for ty in BYTE_EXACT_TYPES {
        let mut inputs: Vec<(String, usize, Vec<f32>)> = Vec::new();
        for dist in DISTS {
            for (ne0, rows) in shapes_for(ty) {
                seed += 1;
                inputs.push((
                    format!("{dist:?} {ne0}x{rows}"),
                    ne0,
                    generate(dist, ne0 * rows, seed),
                ));
            }
        }
        let edges = if ty.block_size() == 1 {
            float_edge_values()
        } else {
            legacy_edge_values()
        };
        inputs.push(("edge cases".to_string(), 256, edges));
        if ty.block_size() == 1 {
            // Random f32 bit patterns: every class of value, NaN payloads included.
            let mut rng = Rng::new(5);
            let bits: Vec<f32> = (0..4096)
                .map(|_| f32::from_bits(rng.next_u64() as u32))
                .collect();
            inputs.push(("random bits".to_string(), 256, bits));
        }
        for (label, ne0, x) in inputs {
            let job = scratch.quantize(ty, ne0, &x);
            cases.push((ty, label, ne0, x, job));
        }
    }
    let results = scratch.run();
    let mut per_type = std::collections::BTreeMap::new();
    for (ty, label, ne0, x, job) in cases {
        let theirs = results[job]
            .as_ref()
            .unwrap_or_else(|| panic!("gguf-py cannot quantize {ty}"));
        let ours = our_quantize(ty, ne0, &x);
        assert_eq!(ours.len(), theirs.len(), "{ty} {label}");
        if let Some(pos) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
            let size = ty.type_size();
            let blk = pos / size;
            let elems = ty.block_size();
            panic!(
                "{ty} {label}: bytes differ from gguf-py in block {blk} (byte {pos})\n  input {:?}\n  ours   {:02x?}\n  theirs {:02x?}",
                &x[blk * elems..(blk + 1) * elems],
                &ours[blk * size..(blk + 1) * size],
                &theirs[blk * size..(blk + 1) * size],
            );
        }
        *per_type.entry(ty).or_insert(0usize) += x.len();
    }
    for (ty, n) in per_type {
        println!("quantize {ty:>5}: {n} values, bytes identical to gguf-py");
    }
}

/// Bounds on rmse / rms(data) for the K-quants, whose quantizers gguf-py lacks: about 1.3x
/// the worst value measured over the distributions here, so they catch real regressions.
fn k_quant_bound(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::Q2_K => 0.40,
        GgmlType::Q3_K => 0.20,
        GgmlType::Q4_K => 0.12,
        GgmlType::Q5_K => 0.07,
        GgmlType::Q6_K => 0.045,
        _ => unreachable!(),
    }
}

/// A legacy type, quantized by gguf-py, with at least as many bits per weight, that the
/// K-quant must match or beat on every distribution here.
fn k_quant_peer(ty: GgmlType) -> Option<GgmlType> {
    match ty {
        GgmlType::Q4_K => Some(GgmlType::Q4_0), // 4.5 bpw vs 4.5 bpw
        GgmlType::Q5_K => Some(GgmlType::Q5_0), // 5.5 bpw vs 5.5 bpw
        GgmlType::Q6_K => Some(GgmlType::Q5_1), // 6.5625 bpw vs 6 bpw
        _ => None,
    }
}

const QUANT_TYPES: [GgmlType; 11] = [
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[test]
fn quantize_error_not_worse_than_gguf_py() {
    if !python_ready() {
        return;
    }
    let mut scratch = Scratch::new("rmse");
    // Per distribution: one data set spanning every shape, processed as rows of 256.
    let data: Vec<Vec<f32>> = DISTS
        .iter()
        .enumerate()
        .map(|(i, &dist)| {
            SHAPES
                .iter()
                .enumerate()
                .flat_map(|(j, &(ne0, rows))| {
                    generate(dist, ne0 * rows, 1000 + 10 * i as u64 + j as u64)
                })
                .collect()
        })
        .collect();
    // (type, distribution index) -> (our bytes, gguf-py round-trip job, gguf-py decode job).
    let mut cases = std::collections::BTreeMap::new();
    for ty in QUANT_TYPES {
        for (d, x) in data.iter().enumerate() {
            let ours_q = our_quantize(ty, 256, x);
            let ref_job = scratch.roundtrip(ty, 256, x);
            // gguf-py decoding our bytes must agree with our decoding (checks our packing).
            let cross_job = scratch.dequantize(ty, 256, &ours_q);
            cases.insert((ty, d), (ours_q, ref_job, cross_job));
        }
    }
    let results = scratch.run();
    let reference_error = |ty: GgmlType, d: usize| -> Option<f64> {
        let (_, ref_job, _) = &cases[&(ty, d)];
        results[*ref_job]
            .as_ref()
            .map(|r| rmse(&data[d], &bytes_f32(r)) / rms(&data[d]))
    };
    println!("relative rmse (rmse / rms of data), ours vs gguf-py's reference quantizer:");
    for ((ty, d), (ours_q, _, cross_job)) in &cases {
        let (ty, d) = (*ty, *d);
        let (x, dist) = (&data[d], DISTS[d]);
        let ours = our_dequantize(ty, 256, ours_q);
        let cross = bytes_f32(
            results[*cross_job]
                .as_ref()
                .expect("gguf-py dequantizes every type here"),
        );
        for (i, (a, b)) in ours.iter().zip(&cross).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{ty} {dist:?}: gguf-py decodes our element {i} differently"
            );
        }
        let ours_err = rmse(x, &ours) / rms(x);
        match reference_error(ty, d) {
            Some(theirs_err) => {
                println!("  {ty:>5} {dist:<10?} ours {ours_err:.6e}  gguf-py {theirs_err:.6e}");
                assert!(
                    ours_err <= theirs_err * (1.0 + 1e-9) + 1e-12,
                    "{ty} {dist:?}: our rmse {ours_err:e} is worse than gguf-py's {theirs_err:e}"
                );
            }
            None => {
                let bound = k_quant_bound(ty);
                let peer = k_quant_peer(ty).map(|p| {
                    (
                        p,
                        reference_error(p, d).expect("gguf-py quantizes the peer"),
                    )
                });
                let peer_text =
                    peer.map_or(String::new(), |(p, e)| format!(", gguf-py {p} {e:.6e}"));
                println!("  {ty:>5} {dist:<10?} ours {ours_err:.6e}  (gguf-py: no quantizer; bound {bound}{peer_text})");
                assert!(
                    ours_err < bound,
                    "{ty} {dist:?}: relative rmse {ours_err:e} above bound {bound}"
                );
                if let Some((p, e)) = peer {
                    assert!(
                        ours_err <= e,
                        "{ty} {dist:?}: relative rmse {ours_err:e} worse than gguf-py {p}'s {e:e}"
                    );
                }
            }
        }
    }
}
